import SystemPackage
import Testing
import VFIOUser

@testable import XeVF

@Suite struct DMATests {
  typealias D = XeSimRegisters.DMA

  /// A device with bus mastering, MSI-X enabled and `vector` unmasked.
  func ready(_ profile: XeProfile = .bmg, vector: Int = 3) throws -> (SimulatedXeVF, FakeHost) {
    let vf = try SimulatedXeVF(profile: profile, vramSize: profile.hasVRAM ? 1 << 20 : nil)
    let host = FakeHost()
    vf.attach(host: host)
    try vf.enableBusMaster()
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    try vf.setVectorMasked(vector, false)
    return (vf, host)
  }

  func errnoOf(_ vf: SimulatedXeVF) -> Int32 { D.errno(ofStatus: vf.dmaStatus) }

  @Test(arguments: XeProfile.allProfiles)
  func deviceToClientWithInterrupt(profile: XeProfile) throws {
    let (vf, host) = try ready(profile)
    let data = pattern(3000, seed: 5)
    vf.withDeviceMemory {
      UnsafeMutableRawBufferPointer(rebasing: $0[0x100..<0x100 + data.count]).copyBytes(from: data)
    }
    try vf.startDMA(
      src: 0x100, dst: host.base + 0x40, length: 3000,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    // Nothing moves until the reply to the doorbell write has gone out.
    #expect(vf.dmaStatus == D.statusBusy)
    #expect(try vf.reg32(D.status) == D.statusBusy)
    #expect(host.dmaCalls == 0)
    host.runDeferred()
    #expect(Array(host.memory[0x40..<0x40 + 3000]) == data)
    #expect(vf.dmaStatus == D.statusDone)
    #expect(try vf.reg32(D.completed) == 1)
    #expect(host.interrupts.map(\.index) == [VFIOPCIIRQ.msix])
    #expect(host.interrupts.map(\.vector) == [3])
  }

  @Test(arguments: XeProfile.allProfiles)
  func clientToDeviceWithoutInterrupt(profile: XeProfile) throws {
    let (vf, host) = try ready(profile)
    let data = pattern(512, seed: 9)
    host.memory.replaceSubrange(0x2000..<0x2000 + 512, with: data)
    try vf.startDMA(
      src: host.base + 0x2000, dst: 0x800, length: 512, control: D.control(toDevice: true))
    host.runDeferred()
    #expect(vf.withDeviceMemory { Array($0[0x800..<0x800 + 512]) } == data)
    #expect(vf.dmaStatus == D.statusDone)
    #expect(vf.dmaCompleted == 1)
    #expect(host.interrupts.isEmpty)
    if profile.hasVRAM {
      #expect(try vf.readBytes(2, 0x800, count: 512) == data)
    } else {
      #expect(
        try vf.reg32(XeSimRegisters.sram + 0x800) == UInt32(data[0]) | UInt32(data[1]) << 8
          | UInt32(data[2]) << 16 | UInt32(data[3]) << 24)
    }
  }

  @Test func statusBitsClearByWritingOne() throws {
    let (vf, host) = try ready()
    try vf.startDMA(src: 0, dst: host.base, length: 16, control: 0)
    host.runDeferred()
    #expect(vf.dmaStatus == D.statusDone)
    try vf.setReg32(D.status, D.statusError)  // not set: no change
    #expect(vf.dmaStatus == D.statusDone)
    try vf.setReg32(D.status, D.statusDone)
    #expect(vf.dmaStatus == 0)
    // COMPLETED is read-only; the registers read back what was programmed.
    try vf.setReg32(D.completed, 0)
    #expect(vf.dmaCompleted == 1)
    #expect(try vf.reg64(D.dst) == host.base)
    #expect(try vf.reg32(D.len) == 16)
  }

  @Test func busMasterDisabledFails() throws {
    let (vf, host) = try ready()
    try vf.setCfg16(0x04, XePCIConfig.commandMemory)
    try vf.startDMA(
      src: 0, dst: host.base, length: 16,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    host.runDeferred()
    #expect(host.dmaCalls == 0)
    #expect(vf.dmaStatus & (D.statusBusy | D.statusDone | D.statusError) == D.statusError)
    #expect(errnoOf(vf) == Errno.notPermitted.rawValue)
    #expect(vf.dmaCompleted == 1)
    #expect(host.interrupts.map(\.vector) == [3])  // the failure is reported too
  }

  @Test func deviceRangeOutsideMemoryFails() throws {
    let (vf, host) = try ready()
    try vf.startDMA(src: (1 << 20) - 8, dst: host.base, length: 16, control: 0)
    host.runDeferred()
    #expect(host.dmaCalls == 0)
    #expect(vf.dmaStatus & D.statusError != 0)
    #expect(errnoOf(vf) == Errno.invalidArgument.rawValue)

    try vf.setReg32(D.status, D.statusError)
    #expect(vf.dmaStatus == 0)  // clearing error drops its errno
    try vf.startDMA(src: host.base, dst: 1 << 20, length: 1, control: D.control(toDevice: true))
    host.runDeferred()
    #expect(errnoOf(vf) == Errno.invalidArgument.rawValue)
    #expect(vf.dmaCompleted == 2)
  }

  @Test func zeroLengthFails() throws {
    let (vf, host) = try ready()
    try vf.startDMA(src: 0, dst: host.base, length: 0, control: 0)
    host.runDeferred()
    #expect(host.dmaCalls == 0)
    #expect(errnoOf(vf) == Errno.invalidArgument.rawValue)
  }

  @Test func clientSideFailureIsReported() throws {
    let (vf, host) = try ready()
    try vf.startDMA(src: 0, dst: 0x10, length: 16, control: 0)  // not client memory
    host.runDeferred()
    #expect(host.dmaCalls == 1)
    #expect(vf.dmaStatus & (D.statusBusy | D.statusError) == D.statusError)
    #expect(errnoOf(vf) == Errno.badAddress.rawValue)
  }

  @Test func doorbellWhileBusyReportsEBUSYAndKeepsTheTransfer() throws {
    let (vf, host) = try ready()
    host.asynchronous = true
    let data = pattern(64, seed: 2)
    vf.withDeviceMemory {
      UnsafeMutableRawBufferPointer(rebasing: $0[0..<data.count]).copyBytes(from: data)
    }
    try vf.startDMA(
      src: 0, dst: host.base, length: 64,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    host.runDeferred()
    #expect(host.dmaCalls == 1)
    // A second transfer with other parameters while the first is in flight.
    try vf.startDMA(src: 0x1000, dst: host.base + 0x1000, length: 8, control: 0)
    #expect(vf.dmaStatus & D.statusBusy != 0)
    #expect(vf.dmaStatus & D.statusError != 0)
    #expect(errnoOf(vf) == Errno.resourceBusy.rawValue)
    host.runDeferred()
    #expect(host.dmaCalls == 1)
    host.completeDMA()
    #expect(Array(host.memory[0..<64]) == data)
    #expect(vf.dmaStatus & D.statusBusy == 0)
    #expect(vf.dmaStatus & D.statusDone != 0)
    #expect(vf.dmaCompleted == 1)
    #expect(host.interrupts.map(\.vector) == [3])
  }

  @Test func completionAfterResetIsIgnored() throws {
    let (vf, host) = try ready()
    host.asynchronous = true
    try vf.startDMA(
      src: 0, dst: host.base, length: 64,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    host.runDeferred()
    try vf.reset()
    host.completeDMA(with: .canceled)
    #expect(vf.dmaStatus == 0)
    #expect(vf.dmaCompleted == 0)
    #expect(host.interrupts.isEmpty)
    #expect(vf.msixPending == 0)

    // The engine works again in the new generation.
    host.asynchronous = false
    try vf.enableBusMaster()
    try vf.startDMA(src: 0, dst: host.base, length: 64, control: 0)
    host.runDeferred()
    #expect(vf.dmaStatus == D.statusDone)
    #expect(vf.dmaCompleted == 1)
  }

  @Test func lateCompletionDoesNotFinishTheNextGenerationsTransfer() throws {
    let (vf, host) = try ready()
    host.asynchronous = true
    try vf.startDMA(
      src: 0, dst: host.base, length: 64,
      control: D.control(toDevice: false, vector: 3, interrupt: true))
    host.runDeferred()
    try vf.reset()
    try vf.enableBusMaster()
    try vf.startDMA(src: 0, dst: host.base + 0x100, length: 32, control: 0)
    host.runDeferred()
    #expect(host.held.count == 2)
    host.completeOldestDMA(with: .canceled)  // the transfer from before the reset
    #expect(vf.dmaStatus == D.statusBusy)
    #expect(vf.dmaCompleted == 0)
    #expect(host.interrupts.isEmpty && vf.msixPending == 0)
    host.completeOldestDMA()
    #expect(vf.dmaStatus == D.statusDone)
    #expect(vf.dmaCompleted == 1)
  }

  @Test func transferQueuedBeforeAnFLRNeverStarts() throws {
    let (vf, host) = try ready()
    try vf.startDMA(src: 0, dst: host.base, length: 64, control: 0)
    try vf.setCfg16(UInt64(XePCIConfig.pcieCap + XePCIConfig.devCtl), XePCIConfig.devCtlInitiateFLR)
    try vf.enableBusMaster()  // the driver re-enables before the queued work runs
    host.runDeferred()
    #expect(host.dmaCalls == 0)
    #expect(vf.dmaStatus == 0)
  }

  @Test func noClientMeansNoDevice() throws {
    let (vf, host) = try ready()
    vf.attach(host: nil)
    try vf.startDMA(src: 0, dst: host.base, length: 8, control: 0)
    #expect(host.deferred.isEmpty)
    #expect(errnoOf(vf) == Errno.operationNotSupportedByDevice.rawValue)
    #expect(vf.dmaStatus & D.statusBusy == 0)
  }
}
