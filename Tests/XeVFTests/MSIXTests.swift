import SystemPackage
import Testing
import VFIOUser

@testable import XeVF

@Suite struct MSIXTests {
  typealias D = XeSimRegisters.DMA

  func device() throws -> (SimulatedXeVF, FakeHost) {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 1 << 20)
    let host = FakeHost()
    vf.attach(host: host)
    try vf.enableBusMaster()
    return (vf, host)
  }

  func complete(_ vf: SimulatedXeVF, _ host: FakeHost, vector: UInt8) throws {
    try vf.startDMA(
      src: 0, dst: host.base, length: 8,
      control: D.control(toDevice: false, vector: vector, interrupt: true))
    host.runDeferred()
    #expect(vf.dmaStatus & D.statusDone != 0)
  }

  func pba(_ vf: SimulatedXeVF) throws -> UInt64 { try vf.reg64(XeSimRegisters.msixPBA) }

  @Test func tableResetsMaskedAndKeepsWrites() throws {
    let (vf, _) = try device()
    for v in 0..<16 {
      let entry = XeSimRegisters.msixTable + 16 * UInt64(v)
      #expect(try vf.reg32(entry + 12) == 1)
      try vf.setReg64(entry, 0xFEE0_0000 | UInt64(v) << 12)
      try vf.setReg32(entry + 8, 0x4000 + UInt32(v))
      try vf.setReg32(entry + 12, 0xFFFF_FFFE)  // only bit 0 is writable
      #expect(try vf.reg64(entry) == 0xFEE0_0000 | UInt64(v) << 12)
      #expect(try vf.reg32(entry + 8) == 0x4000 + UInt32(v))
      #expect(try vf.reg32(entry + 12) == 0)
    }
    try vf.reset()
    #expect(try vf.reg32(XeSimRegisters.msixTable + 12) == 1)
    #expect(try vf.reg64(XeSimRegisters.msixTable) == 0)
  }

  /// QEMU emulates the table and never writes the device's copy: the reset
  /// mask bits must not hold its interrupts back.
  @Test func untouchedTableLeavesMaskingToTheClient() throws {
    let (vf, host) = try device()
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    try complete(vf, host, vector: 5)
    #expect(host.interrupts.map(\.vector) == [5])
    #expect(try pba(vf) == 0)
    // Once the client writes the table, its mask bits count (vector 5 is still masked there).
    try vf.setVectorMasked(3, false)
    try complete(vf, host, vector: 5)
    #expect(host.interrupts.map(\.vector) == [5])
    #expect(try pba(vf) == 1 << 5)
  }

  @Test func maskedVectorGoesPendingAndIsDeliveredOnUnmask() throws {
    let (vf, host) = try device()
    try vf.setVectorMasked(5, true)  // the client drives the table
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    try complete(vf, host, vector: 5)
    #expect(host.interrupts.isEmpty)
    #expect(try pba(vf) == 1 << 5)
    try vf.setReg64(XeSimRegisters.msixPBA, 0)  // read-only
    #expect(try pba(vf) == 1 << 5)
    try vf.setVectorMasked(4, false)  // another vector: nothing happens
    #expect(host.interrupts.isEmpty)
    try vf.setVectorMasked(5, false)
    #expect(host.interrupts.map(\.vector) == [5])
    #expect(host.interrupts.map(\.index) == [VFIOPCIIRQ.msix])
    #expect(try pba(vf) == 0)
  }

  @Test func functionMaskHoldsVectorsBack() throws {
    let (vf, host) = try device()
    try vf.setVectorMasked(2, false)
    try vf.setMSIXControl(XePCIConfig.msixEnable | XePCIConfig.msixFunctionMask)
    try complete(vf, host, vector: 2)
    #expect(host.interrupts.isEmpty)
    #expect(try pba(vf) == 1 << 2)
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    #expect(host.interrupts.map(\.vector) == [2])
    #expect(try pba(vf) == 0)
  }

  @Test func disabledMSIXHoldsVectorsBackUntilEnabled() throws {
    let (vf, host) = try device()
    try vf.setVectorMasked(7, false)
    try complete(vf, host, vector: 7)
    #expect(host.interrupts.isEmpty)
    #expect(try pba(vf) == 1 << 7)
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    #expect(host.interrupts.map(\.vector) == [7])
    // Delivered once: another control write sends nothing more.
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    #expect(host.interrupts.count == 1)
  }

  @Test func resetClearsPendingBits() throws {
    let (vf, host) = try device()
    try vf.setMSIXControl(XePCIConfig.msixEnable | XePCIConfig.msixFunctionMask)
    try complete(vf, host, vector: 1)
    #expect(vf.msixPending == 1 << 1)
    try vf.reset()
    #expect(vf.msixPending == 0)
    #expect(try pba(vf) == 0)
  }

  @Test func vectorBeyondTheTableIsNotRaised() throws {
    let (vf, host) = try device()
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    try complete(vf, host, vector: 16)
    #expect(host.interrupts.isEmpty)
    #expect(vf.msixPending == 0)
  }
}
