import SystemPackage
import Testing
import VFIODevice
import VFIOUser

@testable import XeVF

/// A paused VF (RUNNING_P2P and beyond) keeps BAR accesses but runs no work:
/// no DMA, no interrupts, until it is resumed (protocol/xe-kernel-facts.md §2.2, §15).
@Suite struct MigrationPauseTests {
  typealias D = XeSimRegisters.DMA

  func ready(_ profile: XeProfile = .bmg) throws -> (SimulatedXeVF, FakeHost) {
    let vf = try migratableVF(profile, vram: 1 << 20)
    let host = FakeHost()
    vf.attach(host: host)
    try vf.enableBusMaster()
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    try vf.setVectorMasked(3, false)
    return (vf, host)
  }

  @Test func doorbellWhilePausedRunsOnResume() throws {
    let (vf, host) = try ready()
    let data = pattern(512, seed: 3)
    vf.withDeviceMemory { $0.copyBytes(from: data) }
    try vf.step(.running, .runningP2P)
    #expect(vf.workHeld)
    try vf.startDMA(
      src: 0, dst: host.base, length: 512,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    host.runDeferred()
    #expect(host.dmaCalls == 0 && host.interrupts.isEmpty)
    #expect(vf.dmaStatus == D.statusBusy)
    try vf.step(.runningP2P, .running)
    #expect(host.dmaCalls == 0)  // like any doorbell: after the current reply
    host.runDeferred()
    #expect(Array(host.memory[..<512]) == data)
    #expect(vf.dmaStatus == D.statusDone)
    #expect(host.interrupts.map(\.vector) == [3])
  }

  @Test func pauseBetweenDoorbellAndStartHoldsTheTransfer() throws {
    let (vf, host) = try ready()
    try vf.startDMA(src: 0, dst: host.base, length: 64, control: D.control(toDevice: false))
    try vf.step(.running, .runningP2P)  // the deferred start has not run yet
    host.runDeferred()
    #expect(host.dmaCalls == 0)
    try vf.step(.runningP2P, .running)
    host.runDeferred()
    #expect(host.dmaCalls == 1 && vf.dmaStatus == D.statusDone)
  }

  @Test func interruptOfATransferFinishingWhilePausedWaitsForResume() throws {
    let (vf, host) = try ready()
    host.asynchronous = true
    try vf.startDMA(
      src: 0, dst: host.base, length: 64,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    host.runDeferred()  // handed to the host
    try vf.step(.running, .runningP2P)
    host.completeDMA()
    #expect(vf.dmaStatus == D.statusDone)
    #expect(host.interrupts.isEmpty)
    try vf.step(.runningP2P, .running)
    #expect(host.interrupts.map(\.vector) == [3])
  }

  @Test func barAccessesWorkWhilePausedAndAreSaved() throws {
    let vf = try migratableVF(.bmg, vram: 1 << 20, chunk: 256 << 10)
    try vf.stopRunning()
    try vf.setReg32(XeSimRegisters.vfSwFlag(1), 0xCAFE)
    #expect(try vf.reg32(XeSimRegisters.vfSwFlag(1)) == 0xCAFE)
    try vf.setReg64(XeSimRegisters.ggttWindow + 8, 0xABC0_0001)
    try vf.writeBytes(VFIOPCIRegion.bar2, 0x8_0000, [1, 2, 3, 4])
    let stream = try #require(try vf.step(.stop, .stopCopy))
    let bytes = try readAll(stream, chunk: 1 << 20)
    try vf.step(.stopCopy, .stop)

    let destination = try migratableVF(.bmg, vram: 1 << 20)
    try destination.restore(bytes)
    #expect(try destination.reg32(XeSimRegisters.vfSwFlag(1)) == 0xCAFE)
    #expect(try destination.reg64(XeSimRegisters.ggttWindow + 8) == 0xABC0_0001 | 1 << 2)
    #expect(try destination.readBytes(VFIOPCIRegion.bar2, 0x8_0000, count: 4) == [1, 2, 3, 4])
  }

  @Test func aHeldDoorbellMigratesAndRunsOnTheDestination() throws {
    let (source, sourceHost) = try ready()
    let data = pattern(256, seed: 8)
    source.withDeviceMemory {
      UnsafeMutableRawBufferPointer(rebasing: $0[0x400..<0x500]).copyBytes(from: data)
    }
    try source.stopRunning()
    try source.startDMA(
      src: 0x400, dst: 0x1_0000_0000 + 0x100, length: 256,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    sourceHost.runDeferred()
    #expect(sourceHost.dmaCalls == 0)
    let bytes = try readAll(try #require(try source.step(.stop, .stopCopy)), chunk: 1 << 20)
    try source.step(.stopCopy, .stop)

    let (destination, host) = try ready()
    try destination.stopRunning()
    try destination.restore(bytesFromStop: bytes)
    #expect(destination.dmaStatus == D.statusBusy)
    try destination.resumeRunning()
    host.runDeferred()
    #expect(Array(host.memory[0x100..<0x200]) == data)
    #expect(destination.dmaStatus == D.statusDone && destination.dmaCompleted == 1)
    #expect(host.interrupts.map(\.vector) == [3])
  }
}

extension SimulatedXeVF {
  /// STOP → RESUMING → STOP with `bytes`.
  func restore(bytesFromStop bytes: [UInt8]) throws {
    let stream = try #require(try step(.stop, .resuming))
    try writeAll(stream, bytes, chunk: 1 << 20)
    try step(.resuming, .stop)
  }
}
