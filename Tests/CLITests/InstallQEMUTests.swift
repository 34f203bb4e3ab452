import Foundation
import TestSupport
import Testing

/// scripts/install-qemu.sh and scripts/guest.sh as a user runs them, against a
/// temporary cache, with Tests/CLITests/Scripts/fake-debian.sh standing in for
/// Debian's mirror, debootstrap and apt (no network, seconds): two runs at once,
/// a run killed in each part, and what guest.sh installs.
@Suite(
  "scripts/install-qemu.sh", .serialized,
  .enabled(
    if: getuid() == 0,
    "install-qemu.sh tests skipped: its QEMU root needs root (debootstrap, chroot, mount)"))
struct InstallQEMUTests {
  let script = repositoryRoot + "/scripts/install-qemu.sh"

  /// The issue's report: two first runs at once (scripts/test.sh and
  /// scripts/guest.sh, say) ran debootstrap into the same directory and both
  /// failed. Now the second waits for the first, says so, and finds the cache
  /// finished: every step ran once, never two at the same time.
  @Test func twoFirstRunsAtOnceTakeTurns() throws {
    let fake = try FakeDebian()
    defer { fake.cleanUp() }
    let first = try fake.start(script, environment: ["FAKE_SECONDS": "0.5"])
    #expect(
      waitUntil(timeout: 30, interval: 0.02) { fake.starts.contains("debootstrap") },
      "\(tail(first.output))")
    let second = try fake.start(script, environment: ["FAKE_SECONDS": "0.5"])
    let firstStatus = first.finish()
    let secondStatus = second.finish()
    #expect(firstStatus == 0, "\(tail(first.output))")
    #expect(secondStatus == 0, "\(tail(second.output))")
    let waited = second.output.contains("waiting for another install-qemu.sh (pid \(first.pid))")
    #expect(waited, "\(tail(second.output))")
    #expect(fake.overlaps.isEmpty, "steps run at once: \(fake.overlaps)")
    #expect(fake.starts == FakeDebian.allSteps, "\(fake.starts)")
    fake.expectFinishedCache(full: true)
  }

  /// A run killed with SIGKILL inside a part (debootstrap's proc still mounted
  /// in the half-made root, a half-downloaded kernel, the mtty build root) while
  /// a second run waits: the lock goes with the killed run, and the second
  /// removes what it left, makes that part again, and finishes.
  @Test(arguments: [
    (step: "debootstrap", leftover: "qemu/root.partial", partFrom: "debootstrap"),
    (step: "guest-download", leftover: "guest/download", partFrom: "guest-download"),
    (step: "amd64-download", leftover: "guest/download-amd64", partFrom: "amd64-download"),
    (step: "mtty-make", leftover: "mtty-build", partFrom: "mtty-download"),
    (step: "libvirt-install", leftover: "libvirt/root.partial", partFrom: "libvirt-install"),
  ])
  func aRunKilledInAPartLeavesItToTheNext(step: String, leftover: String, partFrom: String)
    throws
  {
    let fake = try FakeDebian()
    defer { fake.cleanUp() }
    let first = try fake.start(script, environment: ["FAKE_HANG": step])
    #expect(waitUntil(timeout: 30, interval: 0.02) { fake.hanging != nil }, "\(tail(first.output))")
    let hanging = try #require(fake.hanging)
    let second = try fake.start(script)
    let waiting = "waiting for another install-qemu.sh (pid \(first.pid))"
    _ = waitUntil(timeout: 30, interval: 0.02) {
      second.output.contains(waiting) || !second.process.isRunning
    }
    let waited = second.output.contains(waiting)
    #expect(waited, "\(tail(second.output))")

    // The run dies, and the step it was in with it.
    kill(first.pid, SIGKILL)
    kill(hanging, SIGKILL)
    fake.note("killed \(step) \(hanging)")
    _ = first.finish()
    let status = second.finish()
    #expect(status == 0, "\(tail(second.output))")
    let output = second.output
    let removed =
      output.contains("removed what an interrupted run left:") && output.contains(leftover)
    #expect(removed, "\(tail(output))")
    // What was finished stays; the part the step belongs to is made again.
    let steps = FakeDebian.allSteps
    let killedAt = try #require(steps.firstIndex(of: step))
    let redoneFrom = try #require(steps.firstIndex(of: partFrom))
    #expect(fake.starts == Array(steps[...killedAt] + steps[redoneFrom...]), "\(fake.starts)")
    #expect(fake.overlaps.isEmpty, "steps run at once: \(fake.overlaps)")
    fake.expectFinishedCache(full: true)
  }

  /// The issue's report: the first scripts/guest.sh downloaded all the test
  /// suite needs. It installs QEMU, the guest kernel and busybox, boots, and a
  /// full run afterwards adds the rest without making those again.
  @Test func guestShInstallsOnlyWhatAGuestNeeds() throws {
    let fake = try FakeDebian()
    defer { fake.cleanUp() }
    let guest = try fake.start(
      repositoryRoot + "/scripts/guest.sh",
      environment: ["XE_VFU_BIN": executable.path, "XE_VFU_SOCKET": fake.base + "/vf0.sock"])
    let status = guest.finish()
    #expect(status == 0, "\(tail(guest.output))")
    let output = guest.output
    let booted =
      output.contains("fake qemu booted: ")
      && output.contains("-kernel \(fake.cache)/guest/vmlinuz")
    #expect(booted, "\(tail(output))")
    #expect(fake.starts == ["debootstrap", "guest-download"], "\(fake.starts)")
    #expect(!fake.logText.contains("host apt-get install"), "\(fake.logText)")
    fake.expectFinishedCache(full: false)

    let full = try fake.start(script)
    let fullStatus = full.finish()
    #expect(fullStatus == 0, "\(tail(full.output))")
    #expect(fake.starts == FakeDebian.allSteps, "\(fake.starts)")
    fake.expectFinishedCache(full: true)
  }
}

/// A temporary directory with fake-debian.sh's stand-ins (first on PATH for the
/// scripts it starts), the cache and the stand-ins' log.
final class FakeDebian {
  /// The steps of a full install, in order, as the stand-ins log them.
  static let allSteps = [
    "debootstrap", "guest-download", "amd64-download", "mtty-download", "mtty-make",
    "libvirt-install",
  ]
  let base = NSTemporaryDirectory() + "xvu-install-qemu-\(UUID().uuidString.prefix(8))"
  var cache: String { base + "/cache" }
  var logPath: String { base + "/log" }
  private var runs: [ScriptRun] = []

  init() throws {
    try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
    let made = try run([
      "__shell__", "'\(repositoryRoot)/Tests/CLITests/Scripts/fake-debian.sh' '\(base)/debian'",
    ])
    try #require(made.status == 0, "fake-debian.sh: \(made.stderr)")
    _ = FileManager.default.createFile(atPath: logPath, contents: nil)
  }

  /// Starts `script` with the stand-ins first on PATH, the cache, and `environment`.
  func start(_ script: String, _ arguments: [String] = [], environment: [String: String] = [:])
    throws -> ScriptRun
  {
    // Nothing of the test's own setup (scripts/test.sh exports the real cache's env).
    var variables = ProcessInfo.processInfo.environment.filter {
      !$0.key.hasPrefix("XE_VFU_") && !$0.key.hasPrefix("FAKE_") && $0.key != "QEMU"
    }
    variables["PATH"] = base + "/debian/bin:" + (variables["PATH"] ?? "/usr/bin:/bin")
    variables["XE_VFU_CACHE"] = cache
    variables["XE_VFU_NO_HOST_QEMU"] = "1"
    variables["XE_VFU_MIRROR"] = "http://deb.invalid/debian"
    variables["FAKE_LOG"] = logPath
    variables["FAKE_SECONDS"] = "0.1"
    let started = try ScriptRun(
      script, arguments, environment: variables.merging(environment) { $1 },
      output: base + "/run\(runs.count).out")
    runs.append(started)
    return started
  }

  var logText: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  /// The stand-ins' lines: start/end/hang STEP PID, and the test's "killed STEP PID".
  var events: [(what: String, step: String, pid: Int32)] {
    logText.split(separator: "\n").compactMap {
      let fields = $0.split(separator: " ")
      guard fields.count == 3, let pid = Int32(fields[2]) else { return nil }
      return (String(fields[0]), String(fields[1]), pid)
    }
  }
  /// The steps started, in order.
  var starts: [String] { events.filter { $0.what == "start" }.map(\.step) }
  /// The stand-in hanging in its step, to be killed.
  var hanging: Int32? { events.first { $0.what == "hang" }?.pid }
  /// Each step that started while another had started and not yet ended (or been killed).
  var overlaps: [String] {
    var running: [Int32: String] = [:]
    var found: [String] = []
    for event in events {
      switch event.what {
      case "start":
        if !running.isEmpty { found.append("\(event.step) during \(running.values.sorted())") }
        running[event.pid] = event.step
      case "end", "killed": running[event.pid] = nil
      default: break
      }
    }
    return found
  }
  func note(_ line: String) {
    if let handle = FileHandle(forWritingAtPath: logPath) {
      handle.seekToEndOfFile()
      handle.write(Data((line + "\n").utf8))
      handle.closeFile()
    }
  }

  /// Mount points under the base (a killed debootstrap's proc, say).
  var mounts: [String] {
    let table = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
    return table.split(separator: "\n").compactMap {
      let fields = $0.split(separator: " ")
      return fields.count > 4 && fields[4].hasPrefix(base + "/") ? String(fields[4]) : nil
    }
  }

  /// The cache as a finished install leaves it: the env file's paths there,
  /// its QEMU running, no staging name left and nothing mounted.
  func expectFinishedCache(full: Bool, sourceLocation: SourceLocation = #_sourceLocation) {
    let files = FileManager.default
    let text = (try? String(contentsOfFile: cache + "/env", encoding: .utf8)) ?? ""
    var settings: [String: String] = [:]
    for line in text.split(separator: "\n") {
      let parts = line.split(separator: "=", maxSplits: 1)
      if parts.count == 2 { settings[String(parts[0])] = String(parts[1]) }
    }
    let qemu = settings["XE_VFU_QEMU"] ?? "(none)"
    let version = try? run(["__shell__", "PATH='\(base)/debian/bin':\"$PATH\" '\(qemu)' --version"])
    #expect(
      version?.stdout.hasPrefix("QEMU emulator version 10.1.0") == true,
      "\(qemu): \(String(describing: version))", sourceLocation: sourceLocation)
    var made = [cache + "/qemu/.complete", cache + "/guest/.complete"]
    made += ["XE_VFU_GUEST_KERNEL", "XE_VFU_GUEST_BUSYBOX"].map { settings[$0] ?? $0 }
    made.append((settings["XE_VFU_GUEST_MODULES"] ?? "") + "/vfio-pci.ko")
    let more = [
      (settings["XE_VFU_GUEST_AMD64"] ?? "") + "/modules/igb.ko",
      (settings["XE_VFU_GUEST_MTTY"] ?? "") + "/mtty.ko",
      (settings["XE_VFU_GUEST_MTTY"] ?? "") + "/mdev.ko",
      (settings["XE_VFU_LIBVIRT_ROOT"] ?? "") + "/usr/sbin/libvirtd",
      cache + "/libvirt/.complete",
    ]
    for path in made + (full ? more : []) {
      #expect(files.fileExists(atPath: path), "\(path) missing", sourceLocation: sourceLocation)
    }
    if !full {
      for path in more {
        #expect(!files.fileExists(atPath: path), "\(path) made", sourceLocation: sourceLocation)
      }
    }
    let staging = [
      "qemu/root.partial", "qemu/package-version.new", "qemu/bin/qemu-system-x86_64.new",
      "guest/download", "guest/download-amd64", "guest/vmlinuz.new", "guest/modules.new",
      "guest/amd64.new", "guest/mtty.new", "mtty-build", "libvirt/root.partial", "env.new",
    ]
    let left =
      staging.filter { files.fileExists(atPath: cache + "/" + $0) }
      + tree(cache).filter { $0.hasPrefix(".trash.") }
    #expect(left.isEmpty, "left behind: \(left)", sourceLocation: sourceLocation)
    #expect(mounts.isEmpty, "still mounted: \(mounts)", sourceLocation: sourceLocation)
  }

  /// Ends what is still running, unmounts what a killed stand-in left, removes it all.
  func cleanUp() {
    for started in runs where started.process.isRunning {
      kill(started.pid, SIGKILL)
      started.process.waitUntilExit()
    }
    // A stand-in still hanging (a test that failed before killing it): its PID
    // is checked to be that `sleep 600` still, not a process that reused it.
    let killed = Set(events.filter { $0.what == "killed" }.map(\.pid))
    for event in events where event.what == "hang" && !killed.contains(event.pid) {
      let command = try? String(contentsOfFile: "/proc/\(event.pid)/cmdline", encoding: .utf8)
      if command == "sleep\u{0}600\u{0}" { kill(event.pid, SIGKILL) }
    }
    for mount in mounts.sorted().reversed() { _ = try? run(["__shell__", "umount -l '\(mount)'"]) }
    if mounts.isEmpty { _ = try? run(["__shell__", "rm -rf --one-file-system '\(base)'"]) }
  }
}

/// A script started in the background, stdout and stderr together in a file.
final class ScriptRun {
  let process = Process()
  let outputPath: String

  init(_ script: String, _ arguments: [String], environment: [String: String], output: String)
    throws
  {
    outputPath = output
    _ = FileManager.default.createFile(atPath: output, contents: nil)
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
    process.executableURL = URL(fileURLWithPath: script)
    process.arguments = arguments
    process.environment = environment
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = handle
    process.standardError = handle
    // Test threads block SIGTERM, and a child inherits the mask of the thread
    // that starts it: the scripts' own `kill PID` (install-qemu.sh's QEMU smoke
    // test, qemu-attach.sh's server) would do nothing.
    var none = sigset_t()
    var mask = sigset_t()
    sigemptyset(&none)
    pthread_sigmask(SIG_SETMASK, &none, &mask)
    defer { pthread_sigmask(SIG_SETMASK, &mask, nil) }
    try process.run()
    try handle.close()
  }

  var pid: Int32 { process.processIdentifier }
  var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }
  /// Waits for the exit: the status, or the signal that ended it. One that
  /// hangs is a failure, and killed.
  func finish(seconds: Double = 120) -> Int32 {
    if !waitUntil(timeout: seconds, interval: 0.02, { !process.isRunning }) {
      Issue.record("\(process.executableURL?.path ?? "") still runs after \(seconds) s: killed")
      kill(pid, SIGKILL)
    }
    process.waitUntilExit()
    return process.terminationStatus
  }
}

/// The last lines of a script's output, for a failure's message.
func tail(_ text: String, _ count: Int = 20) -> String {
  text.split(separator: "\n", omittingEmptySubsequences: false).suffix(count).joined(
    separator: "\n")
}
