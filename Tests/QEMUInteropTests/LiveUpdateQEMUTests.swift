import Foundation
import TestSupport
import Testing
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
