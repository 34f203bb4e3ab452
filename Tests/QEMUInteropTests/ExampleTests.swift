import Foundation
import TestSupport
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// Runs a tool to completion; output goes through files (no pipe to fill up).
func runTool(
  _ executable: String, _ arguments: [String], environment: [String: String]? = nil,
  timeout: Double = 60
)
  throws -> (status: Int32, stdout: String, stderr: String)
{
  let directory = try makeScratchDirectory("tool")
  defer { try? FileManager.default.removeItem(atPath: directory) }
  let child = try ChildProcess(
    executable: executable, arguments: arguments, logPath: directory + "/stderr",
    environment: environment)
  guard child.waitForExit(timeout: timeout) else {
    child.stop()
    throw InteropError("\(executable) \(arguments) did not finish within \(timeout) s")
  }
  return (child.stop(), child.output, child.log)
}

/// Finds a command on PATH.
func which(_ name: String) -> String? {
  let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
  return path.split(separator: ":").map { "\($0)/\(name)" }.first {
    FileManager.default.isExecutableFile(atPath: $0)
  }
}

/// Splits a shell command line the way sh would for the README's simple lines:
/// whitespace-separated words, single quotes kept together, `\` line continuations.
func shellWords(_ text: String) -> [String] {
  var words: [String] = []
  var current = ""
  var inWord = false
  var quoted = false
  for character in text.replacingOccurrences(of: "\\\n", with: " ") {
    if quoted {
      if character == "'" { quoted = false } else { current.append(character) }
    } else if character == "'" {
      quoted = true
      inWord = true
    } else if character.isWhitespace {
      if inWord { words.append(current) }
      current = ""
      inWord = false
    } else {
      current.append(character)
      inWord = true
    }
  }
  if inWord { words.append(current) }
  return words
}

/// The examples in examples/ and the README's QEMU command line, run for real.
@Suite("Examples (QEMU, libvirt, systemd)", .serialized, qemuAvailable, .timeLimit(.minutes(3)))
struct ExampleTests {
  let root = InteropEnvironment.current.root
  static let readmeSocket = "/tmp/xe-vfio-user.sock"

  /// The QEMU command block the README shows (what `serve` prints), as text.
  func readmeCommandBlock() throws -> String {
    let readme = try String(contentsOfFile: root + "/README.md", encoding: .utf8)
    let start = try #require(readme.range(of: "```\nqemu-system-x86_64 \\\n"))
    let end = try #require(readme.range(of: "\n```", range: start.upperBound..<readme.endIndex))
    return "qemu-system-x86_64 \\\n" + readme[start.upperBound..<end.lowerBound]
  }

  /// The README's QEMU arguments (the program name, the "..." placeholder and the
  /// comment about running without KVM dropped).
  func readmeArguments(socket: String) throws -> [String] {
    let block = try readmeCommandBlock()
    let lines = block.split(separator: "\n").filter {
      let line = $0.trimmingCharacters(in: .whitespaces)
      return !line.hasPrefix("...") && !line.hasPrefix("#")
    }
    // The last line's continuation backslash has no line after it.
    let words = shellWords(lines.joined(separator: "\n")).filter { $0 != "\\" }
    #expect(words.first == "qemu-system-x86_64")
    return words.dropFirst().map { $0.replacingOccurrences(of: Self.readmeSocket, with: socket) }
  }

  @Test func serverPrintsTheREADMECommandLine() throws {
    let directory = try makeScratchDirectory("readme")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let serve = try ServeProcess(
      directory: directory, socketName: "vfu.sock", logPath: directory + "/server.log")
    let socket = serve.socketPath
    #expect(waitUntil(timeout: 10) { serve.output.contains("# your disk") })
    #expect(serve.stop(grace: 5, keepDirectory: true).status == 0)
    let block = try readmeCommandBlock().replacingOccurrences(of: Self.readmeSocket, with: socket)
    #expect(
      serve.output.contains(block), "README block:\n\(block)\nserve printed:\n\(serve.output)")
  }

  /// examples/qemu-attach.sh starts the server and QEMU with the README's line
  /// verbatim. QEMU here is a shim that records its argv and swaps KVM for
  /// qtest (tests never use KVM), then runs the real QEMU.
  @Test func qemuAttachScriptRunsTheREADMECommandLine() throws {
    let env = InteropEnvironment.current
    let directory = try makeScratchDirectory("attach")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let socket = directory + "/vfu.sock"
    let shim = directory + "/qemu-shim"
    try """
    #!/usr/bin/env bash
    printf '%s\\n' "$@" > \(directory)/argv
    args=()
    while [ $# -gt 0 ]; do
      if [ "$1" = -accel ] && [ "${2:-}" = kvm ]; then args+=(-accel qtest); shift 2; continue; fi
      if [ "$1" = -cpu ] && [ "${2:-}" = host ]; then shift 2; continue; fi
      args+=("$1"); shift
    done
    exec \(try #require(env.qemu)) "${args[@]}"
    """.write(toFile: shim, atomically: true, encoding: .utf8)
    chmod(shim, 0o755)
    let extra = [
      "-qtest", "unix:\(directory)/qtest.sock,server=on,wait=off", "-qtest-log", "none",
      "-qmp", "unix:\(directory)/qmp.sock,server=on,wait=off", "-display", "none", "-nodefaults",
    ]
    let script = try ChildProcess(
      executable: root + "/examples/qemu-attach.sh", arguments: extra,
      logPath: directory + "/script.log",
      environment: [
        "QEMU": shim, "XE_VFU_BIN": env.server, "XE_VFU_SOCKET": socket, "XE_VFU_ACCEL": "kvm",
      ])
    defer { script.stop() }
    let alive = { script.isRunning }
    let qtest = try QTest(path: directory + "/qtest.sock", alive: alive)
    let qmp = try QMP(path: directory + "/qmp.sock", alive: alive)

    let argv = try String(contentsOfFile: directory + "/argv", encoding: .utf8).split(
      separator: "\n"
    ).map(String.init)
    #expect(argv == (try readmeArguments(socket: socket)) + extra, "\(argv)")

    // The device is there, wherever QEMU put it.
    let buses = try qmp.execute("query-pci") as? [[String: Any]] ?? []
    let ours = buses.flatMap { $0["devices"] as? [[String: Any]] ?? [] }.first {
      $0["qdev_id"] as? String == "xevf0"
    }
    let slot = try #require(ours?["slot"] as? Int)
    try qtest.outl(0xCF8, 0x8000_0000 | UInt32(slot) << 11)
    #expect(try qtest.inl(0xCFC) == 0xE211_8086)

    // QEMU quits: the script stops the server (which removes its socket) and exits.
    _ = try? qmp.execute("quit")
    #expect(script.waitForExit(timeout: 20), "\(script.log)")
    #expect(script.stop() == 0, "\(script.log)")
    #expect(
      !FileManager.default.fileExists(atPath: socket), "the server stopped and removed its socket")
  }

  /// Where KVM cannot be used, qemu-attach.sh says so and runs the README's line
  /// with TCG instead: a real TCG QEMU (SeaBIOS runs and enumerates the VF).
  @Test func qemuAttachScriptFallsBackToTCGWithoutKVM() throws {
    let env = InteropEnvironment.current
    let directory = try makeScratchDirectory("attach-tcg")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let socket = directory + "/vfu.sock"
    let shim = directory + "/qemu-shim"
    try """
    #!/usr/bin/env bash
    printf '%s\\n' "$@" > \(directory)/argv
    exec \(try #require(env.qemu)) "$@"
    """.write(toFile: shim, atomically: true, encoding: .utf8)
    chmod(shim, 0o755)
    let extra = [
      "-qmp", "unix:\(directory)/qmp.sock,server=on,wait=off", "-display", "none", "-nodefaults",
    ]
    let script = try ChildProcess(
      executable: root + "/examples/qemu-attach.sh", arguments: extra,
      logPath: directory + "/script.log",
      environment: [
        "QEMU": shim, "XE_VFU_BIN": env.server, "XE_VFU_SOCKET": socket,
        "XE_VFU_KVM_DEVICE": directory + "/no-kvm", "XE_VFU_ACCEL": "auto",
      ])
    defer { script.stop() }
    let qmp = try QMP(path: directory + "/qmp.sock", alive: { script.isRunning })
    #expect(
      script.log.contains(
        "qemu-attach: no KVM: there is no \(directory)/no-kvm; running the guest under TCG (-accel tcg -cpu max)"
      ), "\(script.log)")

    let argv = try String(contentsOfFile: directory + "/argv", encoding: .utf8).split(
      separator: "\n"
    ).map(String.init)
    var expected = try readmeArguments(socket: socket)
    let kvm = try #require(expected.firstIndex(of: "kvm"))
    #expect(Array(expected[(kvm - 1)...(kvm + 2)]) == ["-accel", "kvm", "-cpu", "host"])
    expected.replaceSubrange((kvm - 1)...(kvm + 2), with: ["-accel", "tcg", "-cpu", "max"])
    #expect(argv == expected + extra, "\(argv)")

    let accelerator = try qmp.execute("query-kvm") as? [String: Any]
    #expect(accelerator?["enabled"] as? Bool == false, "TCG, not KVM: \(accelerator ?? [:])")
    let buses = try qmp.execute("query-pci") as? [[String: Any]] ?? []
    let ours = buses.flatMap { $0["devices"] as? [[String: Any]] ?? [] }.first {
      $0["qdev_id"] as? String == "xevf0"
    }
    let id = ours?["id"] as? [String: Any]
    #expect(id?["vendor"] as? Int == 0x8086 && id?["device"] as? Int == 0xE211, "\(buses)")
    _ = try? qmp.execute("quit")
    #expect(script.waitForExit(timeout: 20), "\(script.log)")
    #expect(script.stop() == 0, "\(script.log)")
  }

  /// scripts/guest.sh, the command a person runs to try the device: a Linux
  /// guest boots (TCG forced, as on a host where KVM guests fail), finds the VF,
  /// prints it lspci-style and checks BAR0 and BAR2, then powers off.
  @Test(.enabled(if: InteropEnvironment.current.guestMissing == nil, "no guest kernel"))
  func guestScriptBootsAGuestThatUsesTheVF() throws {
    let env = InteropEnvironment.current
    let directory = try makeScratchDirectory("guest-script")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let socket = directory + "/vfu.sock"
    let started = Date()
    let guest = try ChildProcess(
      executable: root + "/scripts/guest.sh", arguments: ["--poweroff"],
      logPath: directory + "/guest.log",
      environment: [
        "XE_VFU_BIN": env.server, "XE_VFU_SOCKET": socket, "XE_VFU_ACCEL": "",  // guest.sh's own default: TCG
        "QEMU": try #require(env.qemu),
      ])
    defer { guest.stop() }
    #expect(guest.waitForExit(timeout: 150), "the guest did not power off:\n\(guest.output)")
    #expect(guest.stop() == 0, "\(guest.log)")
    print(
      "guest.sh: \(String(format: "%.1f", Date().timeIntervalSince(started))) s from start to power-off"
    )
    let lines = guest.output.split(whereSeparator: \.isNewline).map {
      $0.trimmingCharacters(in: .whitespaces)
    }.filter { $0.hasPrefix("xevf: ") }
    let report = lines.joined(separator: "\n")
    #expect(
      lines.contains {
        $0.hasPrefix("xevf: found 0000:00:") && $0.hasSuffix("[8086:e211] class 038000 (rev 00)")
      },
      "\(guest.output)")
    #expect(lines.contains("xevf:   Subsystem: [8086:e211]"), "\(report)")
    #expect(
      lines.contains {
        $0.hasPrefix("xevf:   Region 0: Memory at")
          && $0.hasSuffix("(64-bit, non-prefetchable) [size=16M]")
      },
      "\(report)")
    #expect(
      lines.contains {
        $0.hasPrefix("xevf:   Region 2: Memory at")
          && $0.hasSuffix("(64-bit, prefetchable) [size=256M]")
      },
      "\(report)")
    #expect(lines.contains("xevf:   Capabilities: [40] Express (v2)"), "\(report)")
    #expect(lines.contains("xevf:   Capabilities: [80] MSI-X: Count=16"), "\(report)")
    #expect(lines.contains { $0.hasPrefix("xevf: BAR0 GMD_ID (+0xd8c) = 0x05004000") }, "\(report)")
    #expect(
      lines.contains {
        $0.hasPrefix("xevf: BAR0 scratch (+0x190240) wrote 0x600DCAFE, read 0x600DCAFE")
      },
      "\(report)")
    #expect(
      lines.contains {
        $0.hasPrefix("xevf: BAR2 VRAM (+0x1000) wrote 0xA5A55A5A, read 0xA5A55A5A")
      },
      "\(report)")
    #expect(lines.last == "xevf: powering off", "\(report)")
    #expect(guest.log.contains("qemu-attach: XE_VFU_ACCEL=tcg: running the guest under TCG"))
    #expect(!FileManager.default.fileExists(atPath: socket), "the server stopped with QEMU")
  }

  /// The libvirt domain validates against libvirt's schema, and the QEMU
  /// arguments it passes (with the memory backend libvirt derives from
  /// <memoryBacking>) attach the device.
  @Test func libvirtDomainValidatesAndItsDeviceArgumentsAttach() throws {
    let validate = try #require(
      which("virt-xml-validate"), "virt-xml-validate missing: run scripts/install-qemu.sh")
    let path = root + "/examples/libvirt-domain.xml"
    let result = try runTool(validate, [path, "domain"])
    #expect(
      result.status == 0 && (result.stdout + result.stderr).contains("validates"), "\(result)")

    // The check can fail: the same file with an element libvirt does not know.
    let xml = try String(contentsOfFile: path, encoding: .utf8)
    let directory = try makeScratchDirectory("libvirt")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try xml.replacingOccurrences(of: "<vcpu>", with: "<vcpus>").replacingOccurrences(
      of: "</vcpu>", with: "</vcpus>"
    )
    .write(toFile: directory + "/broken.xml", atomically: true, encoding: .utf8)
    #expect(try runTool(validate, [directory + "/broken.xml", "domain"]).status != 0)

    #expect(xml.contains("<source type='memfd'/>") && xml.contains("<access mode='shared'/>"))
    #expect(xml.contains("xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"))
    let regex = try NSRegularExpression(pattern: "<qemu:arg value='([^']*)'/>")
    let arguments = regex.matches(in: xml, range: NSRange(xml.startIndex..., in: xml)).map {
      String(xml[Range($0.range(at: 1), in: xml)!])
    }
    #expect(arguments.count == 2 && arguments.first == "-device", "\(arguments)")
    let unitSocket = "/run/xe-vfio-user/vf0.sock"
    #expect(arguments.last?.contains(unitSocket) == true, "the socket of xe-vfio-user@vf0.service")

    let rig = try Rig("libvirt-args", qemu: nil)
    defer { rig.close() }
    let device = arguments.map {
      $0.replacingOccurrences(of: unitSocket, with: rig.server.socketPath)
    }
    // What libvirt generates for <memoryBacking> memfd + shared, then the verbatim arguments.
    let qemu = try rig.attach(
      QEMUOptions(
        sharedMemory: false, attachDevice: false,
        extra: [
          "-object", "memory-backend-memfd,id=pc.ram,size=256M,share=on", "-machine",
          "memory-backend=pc.ram",
        ]
          + device))
    let buses = try qemu.qmp.execute("query-pci") as? [[String: Any]] ?? []
    let ours = buses.flatMap { $0["devices"] as? [[String: Any]] ?? [] }.first {
      $0["qdev_id"] as? String == "xevf0"
    }
    let id = ours?["id"] as? [String: Any]
    #expect(id?["vendor"] as? Int == 0x8086 && id?["device"] as? Int == 0xE211, "\(rig.logs)")
    #expect(
      rig.server.received("DMA_MAP").contains { ServeProcess.fds($0) == 1 },
      "guest RAM shared as an fd")
  }

  /// The systemd template passes `systemd-analyze verify` with no warning, and
  /// its ExecStart (instance vf0, the runtime directory moved under /tmp) serves
  /// a socket with the unit's permissions that QEMU attaches to.
  @Test func systemdUnitVerifiesAndItsCommandServes() throws {
    let analyze = try #require(
      which("systemd-analyze"), "systemd-analyze missing: run scripts/install-qemu.sh")
    let env = InteropEnvironment.current
    let unit = try String(contentsOfFile: root + "/examples/xe-vfio-user@.service", encoding: .utf8)
    let installed = "/usr/local/bin/xe-vfio-user"
    let directory = try makeScratchDirectory("systemd")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    // verify insists the binary exists: point the copy at the one just built.
    try unit.replacingOccurrences(of: installed, with: env.server)
      .write(toFile: directory + "/xe-vfio-user@.service", atomically: true, encoding: .utf8)
    let verified = try runTool(
      analyze, ["verify", "--man=no", directory + "/xe-vfio-user@vf0.service"])
    #expect(verified.status == 0 && verified.stderr.isEmpty, "\(verified)")
    // ...and it notices mistakes: systemd ignores a bad value with a warning.
    try unit.replacingOccurrences(of: installed, with: env.server)
      .replacingOccurrences(of: "Restart=on-failure", with: "Restart=sometimes")
      .write(toFile: directory + "/broken@.service", atomically: true, encoding: .utf8)
    #expect(
      !(try runTool(analyze, ["verify", "--man=no", directory + "/broken@vf0.service"]).stderr
        .isEmpty))

    var settings: [String: String] = [:]
    var environment: [String: String] = [:]
    for line in unit.split(separator: "\n") where !line.hasPrefix("#") {
      let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
      guard parts.count == 2 else { continue }
      settings[parts[0]] = parts[1]
      if parts[0] == "Environment" {
        let assignment = parts[1].trimmingCharacters(in: CharacterSet(charactersIn: "\""))
          .split(separator: "=", maxSplits: 1).map(String.init)
        if assignment.count == 2 { environment[assignment[0]] = assignment[1] }
      }
    }
    #expect(settings["Restart"] == "on-failure")
    #expect(settings["RuntimeDirectory"] == "xe-vfio-user")
    #expect(settings["KillSignal"] == "SIGTERM")
    // reload is a live update, and the successor may become the main process.
    #expect(
      settings["ExecReload"]
        == "/usr/local/bin/xe-vfio-user live-update --socket-path /run/xe-vfio-user/%i.sock")
    #expect(settings["NotifyAccess"] == "main")
    // No group the host may lack (Debian has kvm, others do not): one of the unit's own.
    #expect(settings["Group"] == "xe-vfio-user" && settings["DynamicUser"] == "yes")
    let profile = try #require(environment["XE_VFU_ARGS"])
    let socketMode = try #require(environment["XE_VFU_SOCKET_MODE"])
    #expect(socketMode == "0660")
    let runtime = directory + "/run"
    try FileManager.default.createDirectory(atPath: runtime, withIntermediateDirectories: true)
    let command = try #require(settings["ExecStart"])
      .replacingOccurrences(of: "$XE_VFU_ARGS", with: profile)
      .replacingOccurrences(of: "${XE_VFU_SOCKET_MODE}", with: socketMode)
      .replacingOccurrences(of: "%i", with: "vf0")
      .replacingOccurrences(of: "/run/xe-vfio-user", with: runtime)
    let words = shellWords(command)
    #expect(words.first == installed)
    let socket = runtime + "/vf0.sock"
    #expect(words.contains(socket))
    let server = try ChildProcess(
      executable: env.server, arguments: Array(words.dropFirst()),
      logPath: directory + "/server.log")
    defer { server.stop() }
    #expect(
      waitUntil(timeout: 10) { FileManager.default.fileExists(atPath: socket) }, "\(server.log)")
    let mode = try FileManager.default.attributesOfItem(atPath: socket)[.posixPermissions] as? Int
    #expect(mode == 0o660, "socket mode \(String(mode ?? 0, radix: 8))")

    let qemu = try QEMUSession(directory: directory, socketPath: socket)
    #expect(try qemu.config32(0) == 0xE211_8086)
    try qemu.quit()
    #expect(server.stop() == 0, "SIGTERM stops the service cleanly")
    #expect(!FileManager.default.fileExists(atPath: socket))
  }

  /// The unit for a real VF: the instance names the VF, the command serves
  /// it with `--device`, it passes `systemd-analyze verify`, and
  /// `systemd-analyze security` rates it OK or better with only the one
  /// capability it needs.
  @Test func realVFUnitVerifiesWithLeastPrivilege() throws {
    let analyze = try #require(
      which("systemd-analyze"), "systemd-analyze missing: run scripts/install-qemu.sh")
    let unit = try String(
      contentsOfFile: root + "/examples/xe-vfio-user-vf@.service", encoding: .utf8)
    let directory = try makeScratchDirectory("systemd-vf")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try unit.replacingOccurrences(
      of: "/usr/local/bin/xe-vfio-user", with: InteropEnvironment.current.server
    )
    .write(toFile: directory + "/xe-vfio-user-vf@.service", atomically: true, encoding: .utf8)
    // The instance 0000:03:00.1, escaped as systemd-escape does for a path argument.
    let instance = directory + "/xe-vfio-user-vf@0000\\x3a03\\x3a00.1.service"
    let verified = try runTool(analyze, ["verify", "--man=no", instance])
    #expect(verified.status == 0 && verified.stderr.isEmpty, "\(verified)")
    let security = try runTool(analyze, ["security", "--offline=true", "--no-pager", instance])
    let overall = security.stdout.split(separator: "\n").first {
      $0.contains("Overall exposure level")
    }
    let score = overall.flatMap { line in
      line.split(separator: " ").compactMap { Double($0) }.first
    }
    #expect(score.map { $0 <= 2.0 } == true, "\(overall ?? "") \(security.stderr)")
    print("systemd-analyze security xe-vfio-user-vf@.service: \(overall ?? "?")")

    var settings: [String: [String]] = [:]
    for line in unit.split(separator: "\n") where !line.hasPrefix("#") {
      let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
      if parts.count == 2 { settings[parts[0], default: []].append(parts[1]) }
    }
    let command = shellWords(try #require(settings["ExecStart"]?.first))
    #expect(command.contains("vfio:%i") && command.contains("/run/xe-vfio-user/%i.sock"))
    #expect(settings["CapabilityBoundingSet"] == ["CAP_DAC_OVERRIDE"])
    #expect(settings["AmbientCapabilities"] == ["CAP_DAC_OVERRIDE"])
    #expect(settings["DeviceAllow"] == ["/dev/vfio/vfio rw", "char-vfio rw"])
    #expect(settings["LimitMEMLOCK"] == ["20G"])
    #expect(settings["DynamicUser"] == ["yes"] && settings["NoNewPrivileges"] == ["yes"])
    #expect(settings["RuntimeDirectory"] == ["xe-vfio-user"])
  }
}
