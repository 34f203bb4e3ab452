import Foundation
import TestSupport
import Testing

let libvirtAvailable = ConditionTrait.enabled(
  if: InteropEnvironment.current.libvirtMissing == nil,
  Comment(rawValue: "libvirt skipped: \(InteropEnvironment.current.libvirtMissing ?? "")"))

/// The README's libvirt domain under a real libvirt daemon (12.9, beside the
/// project's QEMU; scripts/libvirt.sh), with a Linux guest that uses the VF.
@Suite("libvirt (a real daemon)", .serialized, libvirtAvailable, .timeLimit(.minutes(8)))
struct LibvirtTests {
  static let domain = "xe-vf-guest"

  /// The guest enables the VF, writes BAR0's scratch register once, then reports
  /// it, GMD_ID and its COMMAND register every half second, for ever: a guest
  /// restored from a save file goes on reporting what it finds after the restore.
  static let initScript = """
    \(GuestRun.initPreamble())
    \(GuestRun.findVF)
    [ -n "$dev" ] || { echo "XEVF: no device"; sleep 600; }
    echo 1 > $dev/enable
    bar0=$(sed -n 1p $dev/resource | cut -d' ' -f1)
    devmem $((bar0 + 0x190240)) 32 0x600dcafe
    while true; do
      echo "XEVF: tick $(devmem $((bar0 + 0x190240)) 32) $(devmem $((bar0 + 0xd8c)) 32) $(od -An -tx2 -j4 -N2 $dev/config | tr -d ' ')"
      sleep 0.5
    done
    """

  @Test func theExampleDomainRunsAndTheHookRefusesTheRestoreThatLosesTheVF() throws {
    let env = InteropEnvironment.current
    GuestAvailability.check("libvirt test", missing: env.libvirtMissing)
    let rig = try Rig("libvirt", qemu: nil)
    defer { rig.close() }
    let libvirt = try LibvirtDaemon(
      state: rig.directory + "/libvirt", share: try #require(env.kernel))
    defer { libvirt.stop() }
    let serial = rig.directory + "/serial.log"
    let initrd = rig.directory + "/initrd.cpio"
    try Data(
      try GuestBootTests.initramfs(busybox: try #require(env.busybox), init: Self.initScript)
    )
    .write(to: URL(fileURLWithPath: initrd))
    let xml = try Self.fillIn(
      try String(contentsOfFile: env.root + "/examples/libvirt-domain.xml", encoding: .utf8),
      socket: rig.server.socketPath, kernel: try #require(env.kernel), initrd: initrd,
      serial: serial)
    try xml.write(toFile: rig.directory + "/domain.xml", atomically: true, encoding: .utf8)
    try libvirt.virsh("define", rig.directory + "/domain.xml")

    // 1. It starts, the guest uses the VF, and `info` names QEMU as the client.
    try libvirt.virsh("start", Self.domain)
    var tick = try Self.waitForTick(serial) { $0.scratch == "0x600DCAFE" }
    #expect(
      tick?.command.map { $0 & 0x2 != 0 } == true, "memory decoding on: \(tick.debugDescription)")
    let qemuPID = try String(
      contentsOfFile: libvirt.state + "/run/libvirt/qemu/\(Self.domain).pid", encoding: .utf8
    ).trimmingCharacters(in: .whitespacesAndNewlines)
    let info = try runTool(env.server, ["info", "-s", rig.server.socketPath])
    #expect(info.status == 0 && info.stdout.contains("Client: pid \(qemuPID),"), "\(info)")
    // top and metrics find the server by its record and show the same client.
    let name = "simulated-\(rig.server.pid)"
    let top = try runTool(env.server, ["top", "--once"])
    let row = top.stdout.split(separator: "\n").first { $0.hasPrefix(name + " ") }
    let columns = row?.split(separator: " ").map(String.init) ?? []
    #expect(
      columns.count > 3 && columns[1] == "\(rig.server.pid)" && columns[2] == qemuPID
        && columns[3] == "RUNNING", "\(top)")
    let metrics = try runTool(env.server, ["metrics"])
    #expect(
      metrics.stdout.contains("xe_vfio_user_client_pid{server=\"\(name)\"} \(qemuPID)\n"),
      "\(metrics.stdout.prefix(2000))")

    // 2. Without the hook, save and restore both succeed and the restored guest
    //    finds its VF reset: the loss this project exists to prevent.
    try libvirt.virsh("save", Self.domain, rig.directory + "/saved-1.img")
    try libvirt.virsh("restore", rig.directory + "/saved-1.img")
    tick = try Self.waitForTick(serial) { $0.scratch != "0x600DCAFE" }
    #expect(
      tick?.scratch == "0x00000000" && tick?.command == 0,
      "the restored guest reads a reset VF: scratch 0, COMMAND 0 (\(tick.debugDescription))")
    // The server cannot see the guest's MMIO (COMMAND is 0, so QEMU maps no BAR),
    // but it sees the device left disabled under a client long after the reset,
    // which a booting guest never does, and says so.
    let named = "the device is still disabled 15 s after a reset cleared it"
    #expect(rig.server.waitForLog(named, timeout: 45), "\(rig.logs)")

    // 3. destroy leaves the server listening, its device clean.
    try libvirt.virsh("destroy", Self.domain)
    #expect(rig.server.waitForLog("client disconnected", count: 2), "\(rig.logs)")
    let after = try runTool(env.server, ["info", "-s", rig.server.socketPath])
    #expect(after.status == 0, "\(after)")
    #expect(after.stdout.contains("Control: I/O- Mem- BusMaster-"), "\(after.stdout)")
    #expect(after.stdout.contains("Region 0: Memory at <unassigned>"), "\(after.stdout)")

    // 4. With the hook installed (libvirt reads hooks when it starts), a second
    //    start works, a save still does, and the restore is refused with the reason.
    let hooks = libvirt.state + "/etc/libvirt/hooks/qemu.d"
    try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true)
    try FileManager.default.copyItem(
      atPath: env.root + "/examples/libvirt-qemu-hook", toPath: hooks + "/xe-vfio-user")
    try libvirt.restart()
    try libvirt.virsh("start", Self.domain)
    tick = try Self.waitForTick(serial) { $0.scratch == "0x600DCAFE" }
    #expect(tick != nil, "the second start's guest uses the VF")
    try libvirt.virsh("save", Self.domain, rig.directory + "/saved-2.img")
    let refused = try libvirt.virsh(
      "restore", rig.directory + "/saved-2.img", expectFailure: true)
    #expect(
      refused.contains("refused a restore of domain '\(Self.domain)'")
        && refused.contains("QEMU does not carry a vfio-user device's state"), "\(refused)")
    let state = try libvirt.virsh("domstate", Self.domain)
    #expect(state.contains("shut off"), "\(state)")
    // The fresh boots enabled the device in time: only the restore was named.
    #expect(rig.server.log.components(separatedBy: named).count == 2, "\(rig.logs)")
  }

  /// One report of the guest's loop.
  struct Tick: CustomDebugStringConvertible {
    var scratch: String
    var gmdID: String
    var command: UInt16?
    var debugDescription: String {
      "scratch \(scratch) GMD_ID \(gmdID) COMMAND \(command.map { String($0, radix: 16) } ?? "?")"
    }
  }

  /// Waits (up to 60 s: a TCG boot on a loaded host) for a report that `matches`.
  static func waitForTick(_ serial: String, _ matches: (Tick) -> Bool) throws -> Tick? {
    var found: Tick?
    waitUntil(timeout: 60, interval: 0.2) {
      let console = (try? String(contentsOfFile: serial, encoding: .utf8)) ?? ""
      found =
        console.split(whereSeparator: \.isNewline).reversed().lazy.compactMap { line -> Tick? in
          let words = line.split(whereSeparator: \.isWhitespace).map(String.init)
          guard let at = words.firstIndex(of: "tick"), words.count >= at + 4 else { return nil }
          return Tick(
            scratch: words[at + 1], gmdID: words[at + 2], command: UInt16(words[at + 3], radix: 16))
        }.first
      return found.map(matches) ?? false
    }
    return found.flatMap { matches($0) ? $0 : nil }
  }

  /// examples/libvirt-domain.xml as the README says to fill it in (the socket's
  /// path), plus what this machine needs: TCG (KVM guests fail here), no host CPU
  /// model, a small guest, the test's kernel and initramfs instead of a disk, the
  /// serial console in a file. Each change requires its original text, so an
  /// example that drifts fails here instead of being tested half-changed.
  static func fillIn(
    _ example: String, socket: String, kernel: String, initrd: String, serial: String
  ) throws -> String {
    var xml = example
    func replace(_ pattern: String, _ replacement: String) throws {
      let regex = try NSRegularExpression(pattern: pattern, options: [.dotMatchesLineSeparators])
      let range = NSRange(xml.startIndex..., in: xml)
      guard regex.numberOfMatches(in: xml, range: range) == 1 else {
        throw InteropError("examples/libvirt-domain.xml no longer has one match of \(pattern)")
      }
      xml = regex.stringByReplacingMatches(
        in: xml, range: range, withTemplate: NSRegularExpression.escapedTemplate(for: replacement))
    }
    try replace("/run/xe-vfio-user/vf0\\.sock", socket)
    try replace("<domain type='kvm'", "<domain type='qemu'")
    try replace("<memory unit='GiB'>4</memory>", "<memory unit='MiB'>256</memory>")
    try replace("<vcpu>4</vcpu>", "<vcpu>1</vcpu>")
    try replace("\\s*<cpu mode='host-passthrough'/>", "")
    try replace(
      "<boot dev='hd'/>",
      "<kernel>\(kernel)</kernel><initrd>\(initrd)</initrd>"
        + "<cmdline>console=ttyS0 panic=-1 quiet no_timer_check</cmdline>")
    try replace("\\s*<disk type='file'.*?</disk>", "")
    try replace(
      "<serial type='pty'/>\\s*<console type='pty'/>",
      "<serial type='file'><source path='\(serial)'/></serial>")
    return xml
  }
}

/// A libvirt daemon of scripts/libvirt.sh, with its state in `state`.
final class LibvirtDaemon {
  let state: String
  private let script: String
  private let environment: [String: String]

  /// `share`: a file whose directory QEMU must see (the guest kernel's).
  init(state: String, share: String) throws {
    self.state = state
    script = InteropEnvironment.current.root + "/scripts/libvirt.sh"
    environment = [
      "XE_VFU_QEMU_SHARE": URL(fileURLWithPath: share).deletingLastPathComponent().path,
      "XE_VFU_LIBVIRT_ROOT": InteropEnvironment.current.libvirtRoot ?? "",
    ]
    try start()
  }

  private func start() throws {
    let result = try runTool(script, ["start", state], environment: environment, timeout: 90)
    guard result.status == 0 else {
      throw InteropError("scripts/libvirt.sh start failed: \(result.stderr)")
    }
  }

  /// Stops the daemon (and so its hooks are read again), then starts it.
  func restart() throws {
    stop()
    try start()
  }

  func stop() {
    _ = try? runTool(script, ["stop", state], environment: environment, timeout: 60)
  }

  /// virsh's output; a failure (or, with `expectFailure`, a success) throws.
  @discardableResult
  func virsh(_ arguments: String..., expectFailure: Bool = false) throws -> String {
    let result = try runTool(
      script, ["virsh", state] + arguments, environment: environment, timeout: 120)
    guard (result.status == 0) != expectFailure else {
      throw InteropError(
        "virsh \(arguments.joined(separator: " ")): status \(result.status)\n\(result.stdout)\(result.stderr)\n"
          + ((try? String(contentsOfFile: state + "/libvirtd.log", encoding: .utf8)) ?? ""))
    }
    return result.stdout + result.stderr
  }
}

/// The hook's decisions, as libvirt asks for them (`DOMAIN OPERATION SUB-OP EXTRA`,
/// the domain XML on stdin), without a daemon.
@Suite("libvirt hook (examples/libvirt-qemu-hook)")
struct LibvirtHookTests {
  let hook = InteropEnvironment.current.root + "/examples/libvirt-qemu-hook"
  static let vfioUser = """
    <domain type='kvm'><name>vm</name><qemu:commandline>
    <qemu:arg value='{"driver":"vfio-user-pci","socket":{"path":"/run/xe-vfio-user/vf0.sock","type":"unix"}}'/>
    </qemu:commandline></domain>
    """

  func ask(_ operation: String, _ xml: String) throws -> (
    status: Int32, stdout: String, stderr: String
  ) {
    let directory = try makeScratchDirectory("hook")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try xml.write(toFile: directory + "/domain.xml", atomically: true, encoding: .utf8)
    return try runTool(
      "/bin/sh",
      ["-c", "exec \"$0\" vm \(operation) begin - < \"$1\"", hook, directory + "/domain.xml"])
  }

  @Test func refusesAnIncomingMigrationAndARestoreOfAVFIOUserDomain() throws {
    for (operation, words) in [
      ("migrate", "an incoming migration of"), ("restore", "a restore of"),
    ] {
      let answer = try ask(operation, Self.vfioUser)
      #expect(answer.status == 1, "\(operation): \(answer)")
      #expect(answer.stderr.contains("refused \(words) domain 'vm'"), "\(answer.stderr)")
      // For these operations libvirt would take stdout as a new domain XML.
      #expect(answer.stdout.isEmpty, "\(answer.stdout)")
    }
  }

  @Test func letsEverythingElseThrough() throws {
    for operation in ["prepare", "start", "started", "stopped", "release", "reconnect", "attach"] {
      let answer = try ask(operation, Self.vfioUser)
      #expect(answer.status == 0 && answer.stdout.isEmpty && answer.stderr.isEmpty, "\(operation)")
    }
    let plain = "<domain type='kvm'><name>vm</name><devices/></domain>"
    for operation in ["migrate", "restore"] {
      let answer = try ask(operation, plain)
      #expect(answer.status == 0 && answer.stdout.isEmpty, "a domain without vfio-user: \(answer)")
    }
    let optedOut = Self.vfioUser.replacingOccurrences(
      of: "<name>vm</name>",
      with: """
        <name>vm</name><metadata><xe-vfio-user:restore xmlns:xe-vfio-user="urn:xe-vfio-user:libvirt:1" allow-vf-reset="yes"/></metadata>
        """)
    let answer = try ask("restore", optedOut)
    #expect(answer.status == 0 && answer.stdout.isEmpty, "opted out: \(answer)")
  }
}
