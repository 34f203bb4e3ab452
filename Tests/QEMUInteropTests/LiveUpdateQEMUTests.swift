import Foundation
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// Live update under real QEMU: the server is replaced ten times while QEMU
/// keeps using the VF the way a guest driver does (BAR0 registers through the
/// server, BAR2 VRAM through QEMU's mapping, the copy engine's DMA into guest
/// RAM, MSI-X delivered by QEMU), and QEMU never notices.
@Suite("QEMU interop (live update)", .serialized, qemuAvailable, .timeLimit(.minutes(5)))
struct LiveUpdateQEMUTests {
  /// `xe-vfio-user live-update`; returns the new server's pid.
  static func liveUpdate(_ socket: String) throws -> Int32 {
    let process = Process()
    let output = Pipe()
    process.executableURL = URL(fileURLWithPath: InteropEnvironment.current.server)
    process.arguments = ["live-update", "-s", socket]
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    guard process.terminationStatus == 0,
      let pid = text.split(separator: " ").dropFirst(3).first.flatMap({ Int32($0) })
    else { throw InteropError("live-update failed: \(text)") }
    return pid
  }

  @Test func qemuUsesTheVFWhileTheServerIsReplacedTenTimes() throws {
    let rig = try Rig("live-update")
    var serving = rig.server.pid
    defer {
      if serving != rig.server.pid { kill(serving, SIGTERM) }
      rig.close()
    }
    let qemu = rig.qemu!
    try qemu.enableDevice()
    let qt = qemu.qtest
    let vector = 3
    let msiAddress: UInt64 = 0x0030_0000
    let msiData: UInt32 = 0x4403
    try qemu.programMSIX(vector: vector, address: msiAddress, data: msiData)
    try qemu.enableMSIX()

    /// One pass of what the guest's driver does, with every result checked.
    func drive(_ round: Int) throws {
      let value = 0x5EED_0000 | UInt32(round)
      try qt.writel(qemu.bar0(Reg.scratch(gt: 0, index: 2)), value)
      #expect(try qt.readl(qemu.bar0(Reg.scratch(gt: 0, index: 2))) == value, "round \(round)")
      #expect(try qt.readl(qemu.bar0(Reg.gmdID)) == 0x0500_4000)
      let bytes = pattern(16 << 10, seed: UInt8(truncatingIfNeeded: round))
      try qt.write(QEMUSession.bar2 + 0x40_0000, bytes)
      try qt.writel(msiAddress, 0)
      try qt.memset(0x0100_0000, count: bytes.count, value: 0)
      #expect(
        try qemu.runDMA(
          toDevice: false, deviceOffset: 0x40_0000, clientAddress: 0x0100_0000,
          length: UInt32(bytes.count), vector: UInt8(vector)) == Reg.DMA.statusDone,
        "round \(round)")
      expectBytes(try qt.read(0x0100_0000, count: bytes.count), bytes, "round \(round)")
      #expect(
        try waitUntil(timeout: 5) { try qt.readl(msiAddress) == msiData },
        "round \(round): MSI-X delivered by QEMU")
    }

    try drive(0)
    let completedBefore = try qt.readl(qemu.bar0(Reg.DMA.completed))
    for round in 1...10 {
      let next = try Self.liveUpdate(rig.server.socketPath)
      #expect(next != serving, "round \(round)")
      serving = next
      try drive(round)
      // What the device did before the updates is still counted: one device all along.
      #expect(try qt.readl(qemu.bar0(Reg.DMA.completed)) == completedBefore + UInt32(round))
    }
    #expect(qemu.process.isRunning, "QEMU runs on")
    // info names the last server, its updates and QEMU as the client still.
    let info = Process()
    let output = Pipe()
    info.executableURL = URL(fileURLWithPath: InteropEnvironment.current.server)
    info.arguments = ["info", "-s", rig.server.socketPath]
    info.standardOutput = output
    try info.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    info.waitUntilExit()
    #expect(text.contains("Server: pid \(serving),"), "\(text)")
    #expect(text.contains("Live update: 10 updates since the first start"), "\(text)")
    #expect(text.contains("Client: pid \(qemu.process.pid),"), "\(text)")
    let log = rig.server.log
    #expect(log.components(separatedBy: "live update: took over").count - 1 == 10, "\(rig.logs)")
    #expect(!log.contains("client disconnected"), "QEMU's connection was never dropped")
    let qemuLog = qemu.process.log
    #expect(!qemuLog.lowercased().contains("vfio-user"), "QEMU logged: \(qemuLog)")
  }
}

/// The same with a Linux guest under TCG driving the VF itself: its vCPU's
/// BAR0 accesses wait in QEMU for the server while it is replaced, and its
/// BAR2 accesses go through QEMU's mapping of VRAM, which must stay the same
/// memory across the updates. The guest checks every value it reads back.
@Suite(
  "QEMU interop (live update under a Linux guest)", .serialized, guestAvailable,
  .timeLimit(.minutes(4)))
struct LiveUpdateGuestTests {
  /// Seconds the guest loops: the ten updates take a few.
  static let seconds = 15

  static let initScript = """
    \(GuestRun.initPreamble())
    \(GuestRun.findVF)
    if [ -z "$dev" ]; then
      echo "XEVF: error no device"; echo "XEVF: done"; poweroff -f
    fi
    echo 1 > $dev/enable
    bar0=$(sed -n 1p $dev/resource | cut -d' ' -f1)
    bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
    bad=0
    i=0
    end=$(( $(cut -d. -f1 /proc/uptime) + \(seconds) ))
    while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
      value=$((0x5eed0000 + i))
      devmem $((bar0 + 0x190244)) 32 $value
      got=$(devmem $((bar0 + 0x190244)) 32)
      [ $((got)) -eq $value ] || { bad=$((bad + 1)); echo "XEVF: bad scratch $i $got"; }
      devmem $((bar2 + 0x2000 + (i % 64) * 8)) 64 $((0x0123456700000000 + i))
      got=$(devmem $((bar2 + 0x2000 + (i % 64) * 8)) 64)
      [ $((got)) -eq $((0x0123456700000000 + i)) ] || { bad=$((bad + 1)); echo "XEVF: bad vram $i $got"; }
      [ $((i % 20)) -eq 0 ] && echo "XEVF: progress $i"
      i=$((i + 1))
    done
    echo "XEVF: loops $i bad $bad"
    echo "XEVF: gmdid $(devmem $((bar0 + 0xd8c)) 32)"
    echo "XEVF: done"
    poweroff -f
    """

  @Test func aGuestKeepsUsingTheVFWhileTheServerIsReplacedTenTimes() throws {
    let env = InteropEnvironment.current
    let rig = try Rig("live-update-guest", qemu: nil)
    let serving = Locked(rig.server.pid)
    defer {
      let last = serving.withLock { $0 }
      if last != rig.server.pid { kill(last, SIGTERM) }
      rig.close()
    }
    // Updates start once the guest loops, one every 300 ms.
    let updates = Locked<[String]>([])
    let socket = rig.server.socketPath
    let serial = rig.directory + "/serial.log"
    let updater = Thread {
      guard
        waitUntil(
          timeout: 150, interval: 0.05,
          {
            ((try? String(contentsOfFile: serial, encoding: .utf8)) ?? "").contains(
              "XEVF: progress 0")
          })
      else { return }
      for _ in 0..<10 {
        do {
          let pid = try LiveUpdateQEMUTests.liveUpdate(socket)
          serving.withLock { $0 = pid }
          updates.withLock { $0.append("\(pid)") }
        } catch {
          updates.withLock { $0.append("failed: \(error)") }
        }
        usleep(300_000)
      }
      let loopEnded = ((try? String(contentsOfFile: serial, encoding: .utf8)) ?? "").contains(
        "XEVF: loops")
      updates.withLock { $0.append(loopEnded ? "the guest's loop had ended" : "during the loop") }
    }
    updater.start()
    let guest = try GuestRun.boot(
      rig: rig,
      initramfs: try GuestBootTests.initramfs(
        busybox: try #require(env.busybox), init: Self.initScript))
    while !updater.isFinished { usleep(10_000) }
    #expect(guest.finished, "\(guest.failureReport)")
    let done = updates.withLock { $0 }
    #expect(done.count == 11 && done.prefix(10).allSatisfy { Int32($0) != nil }, "\(done)")
    #expect(done.last == "during the loop", "every update came while the guest used the VF")
    let loops = guest.lines["loops"]?.first?.split(separator: " ") ?? []
    #expect(loops.count == 3 && loops[1] == "bad" && loops[2] == "0", "\(guest.lines)")
    #expect((loops.first.flatMap { Int($0) } ?? 0) > 20, "the guest looped: \(loops)")
    #expect(guest.lines["bad"] == nil, "\(guest.lines["bad"] ?? [])")
    #expect(guest.lines["gmdid"]?.first == "0x05004000")
    let log = rig.server.log
    #expect(log.components(separatedBy: "live update: took over").count - 1 == 10, "\(rig.logs)")
    #expect(!guest.qemuLog.lowercased().contains("vfio-user"), "QEMU logged: \(guest.qemuLog)")
    print("live update under a guest: \(guest.seconds) s, updates by pids \(done)")
  }
}
