import CVFIOUser
import Glibc
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser

@testable import XeVF

// MARK: Descriptors

// MARK: Handing over

extension SimulatedXeVF {
  /// Exports, and imports from a copy of the bytes and a duplicate of each
  /// lent descriptor, as the new process receives them over SCM_RIGHTS.
  func handedOver() throws -> SimulatedXeVF {
    let state = try exportHandover()
    return try SimulatedXeVF.importHandover(
      Array(state.bytes), descriptors: OwnedFileDescriptors(taking: duplicated(state.descriptors)))
  }

  /// SET_IRQS as the server passes it on.
  func setIRQs(
    _ flags: VFIOIRQSetFlags, index: UInt32, start: UInt32 = 0, count: UInt32,
    fds: [FileDescriptor] = []
  ) throws {
    try setIRQs(
      IRQSetRequest(
        IRQSetPayload(flags: flags, index: index, start: start, count: count),
        descriptors: OwnedFileDescriptors(taking: fds), irq: irq(index)))
  }

  /// The dirty log's bitmap for `range` at 4 KiB pages (clears what it reports).
  func dirtyReport(_ range: DMALoggingRange) throws -> [UInt8] {
    var bitmap = [UInt8](
      repeating: 0, count: DMALoggingReportData.bitmapSize(length: range.length, pageSize: 4096)!)
    try bitmap.withUnsafeMutableBytes {
      try reportDMALog(iova: range.iova, length: range.length, pageSize: 4096, into: $0)
    }
    return bitmap
  }
}

func duplicated(_ descriptors: [FileDescriptor]) -> [FileDescriptor] {
  descriptors.map { FileDescriptor(rawValue: dup($0.rawValue)) }
}

/// Everything a client, the server or a test can observe of the device.
struct Observed: Equatable {
  var identity: [String]
  var config: [UInt8]
  var bar0: [UInt8]
  var memory: [UInt8]
  var counters: [UInt64]
  var migration: [String]
  var pf: [String]
  var interrupts: [IRQConfigurationShape]

  struct IRQConfigurationShape: Equatable {
    var wired: [Bool]
    var masked: [Bool]
    var pending: [Bool]
    var unmaskWired: Bool
  }

  init(_ vf: SimulatedXeVF) throws {
    identity = [
      "\(vf.profile)", "\(vf.vramSize)", "\(vf.vfid)", "\(vf.deviceMemorySize)",
      "\(vf.migrationIdentity)",
    ]
    config = try vf.readBytes(VFIOPCIRegion.config, 0, count: XePCIConfig.size)
    typealias R = XeSimRegisters
    var registers: [UInt8] = []
    var offsets = [R.gmdID, R.mediaGMDID, R.msixPBA, R.msixPBA + 4]
    offsets += (0..<2).flatMap { gt in (0..<R.scratchCount).map { R.scratch(gt: gt, index: $0) } }
    offsets += stride(from: R.DMA.base, to: R.DMA.base + R.DMA.blockSize, by: 4)
    offsets += stride(from: R.msixTable, to: R.msixTable + MSIXState.tableBytes, by: 4)
    for offset in offsets { registers += try vf.readBytes(VFIOPCIRegion.bar0, offset, count: 4) }
    for pte in 0..<vf.profile.ggttPTECount {
      registers += try vf.readBytes(VFIOPCIRegion.bar0, R.ggttWindow + 8 * UInt64(pte), count: 8)
    }
    bar0 = registers
    memory =
      vf.vramSize > 0
      ? try vf.readBytes(VFIOPCIRegion.bar2, 0, count: Int(vf.vramSize))
      : vf.withDeviceMemory { Array($0) }
    counters = [
      UInt64(vf.msixPending), UInt64(vf.dmaStatus), UInt64(vf.dmaCompleted),
      UInt64(vf.eventFDCount), UInt64(vf.resetCount), UInt64(vf.command),
      vf.migrationSeed, vf.vramChunkSize,
    ]
    migration = [
      "\(vf.migrationState)", "\(vf.workHeld)", "\(vf.migration.restorePending)",
      "\(vf.dma.held.map { "\($0)" } ?? "none")", "\(vf.msix.held)", "\(vf.dma.generation)",
    ]
    let pf = vf.simulatedPF
    self.pf =
      (0..<pf.gtCount).flatMap { g in
        [
          "\(pf.state(gt: g))", "\(pf.ringHighWater(gt: g))",
          "\(pf.failure(gt: g).map { "\($0)" } ?? "-")",
        ]
      } + ["\(vf.pfTiming)", "\(vf.pfFaults)", "\(vf.pfRunsWorkInline)"]
    interrupts = (0..<VFIOPCIIRQ.count).map { index in
      let c = vf.irqs.configuration(index)!
      return IRQConfigurationShape(
        wired: c.triggerFDs.map { $0 != nil }, masked: c.masked, pending: c.pending,
        unmaskWired: c.unmaskFD != nil)
    }
  }
}

// MARK: The round trip

@Suite("SimulatedXeVF: live update")
struct HandoverTests {
  typealias D = XeSimRegisters.DMA
  static let logged = DMALoggingRange(iova: 0x1_0000_0000, length: 1 << 20)

  /// A device driven through a reset into a rich state: scratch registers,
  /// GGTT PTEs, VRAM, an MSI-X table the client drives with masked vectors
  /// pending (one with an eventfd, one without), eventfds on MSI-X vectors
  /// and ERR, DMA logging with dirtied pages, and STOP with a doorbell held.
  final class Rich {
    let vf: SimulatedXeVF
    let host = FakeHost()
    let msix = (0..<4).map { _ in TestEventFD() }
    let err = TestEventFD()

    init(_ profile: XeProfile = .bmgSmall) throws {
      vf = try migratableVF(profile, vram: 1 << 20, seed: 42, vfid: 3)
      vf.attach(host: host)
      try vf.reset()  // resetCount > 0; what follows survives no reset
      var faults = PFFaults()
      faults.inject(.busy(times: 2), on: .save, gt: 1)
      faults.vramChunkTimeout = 7
      vf.pfFaults = faults
      try vf.enableBusMaster()
      try vf.setMSIXControl(XePCIConfig.msixEnable)
      typealias R = XeSimRegisters
      try vf.setReg32(R.scratch(gt: 0, index: 1), 0xDEAD_BEEF)
      try vf.setReg32(R.scratch(gt: 1, index: 3), 0x0BAD_F00D)
      try vf.setReg64(R.ggttWindow + 8 * 5, 0x1234_5000 | 1)
      try vf.setReg64(R.ggttWindow + 8 * 200, 0xFFFF_F000 | 3)
      let data = pattern(4096, seed: 3)
      if vf.vramSize > 0 {
        try vf.writeBytes(VFIOPCIRegion.bar2, 0x1000, data)
      } else {
        for (i, byte) in data.enumerated() {
          try vf.writeValue(VFIOPCIRegion.bar0, R.sram + 0x1000 + UInt64(i), byte)
        }
      }
      for v in 0..<3 {
        let entry = R.msixTable + R.msixEntrySize * UInt64(v)
        try vf.setReg64(entry, 0xFEE0_0000 | UInt64(v) << 12)
        try vf.setReg32(entry + 8, 0x4000 + UInt32(v))
        try vf.setVectorMasked(v, false)
      }
      // Vector 5 stays masked in the table the client now drives: pending.
      try vf.startDMA(
        src: 0, dst: host.base, length: 8,
        control: D.control(toDevice: false, vector: 5, interrupt: true))
      host.runDeferred()
      try vf.setIRQs(
        [.dataEventfd, .actionTrigger], index: VFIOPCIIRQ.msix,
        count: 4, fds: msix.map { $0.lend() })
      try vf.setIRQs(
        [.dataEventfd, .actionTrigger], index: VFIOPCIIRQ.err,
        count: 1, fds: [err.lend()])
      try vf.startDMALogging(pageSize: 4096, ranges: [HandoverTests.logged])
      // Three pages dirtied, vector 2 signalled; then vector 3, masked in the table: pending.
      try vf.startDMA(
        src: 0x1000, dst: host.base + 0x3000, length: 3 * 4096,
        control: D.control(toDevice: false, vector: 2, interrupt: true))
      host.runDeferred()
      try vf.startDMA(
        src: 0x1000, dst: host.base + 0x10_0000 - 4096, length: 100,
        control: D.control(toDevice: false, vector: 3, interrupt: true))
      host.runDeferred()
      #expect(msix.map { $0.count() } == [0, 0, 1, 0])
      try vf.stopRunning()
      // Paused: the doorbell is held, to run on resume.
      try vf.startDMA(
        src: 0x1000, dst: host.base + 0x8_0000, length: 4096,
        control: D.control(toDevice: false, vector: 0, interrupt: true))
      host.runDeferred()
    }
  }

  @Test(arguments: [XeProfile.bmgSmall, XeProfile.ptlSmall])
  func aRichDeviceCarriesOverWhole(profile: XeProfile) throws {
    let rich = try Rich(profile)
    let old = rich.vf
    #expect(old.handoverRefusal == nil)
    #expect(old.resetCount == 1 && old.migrationState == .stop && old.dma.held != nil)
    #expect(old.msixPending == 1 << 5 | 1 << 3 && old.eventFDCount == 5)
    let new = try old.handedOver()
    #expect(try Observed(new) == Observed(old))
    // The dirty log reports the same pages (each device its own copy).
    let report = try new.dirtyReport(Self.logged)
    #expect(report == (try old.dirtyReport(Self.logged)))
    #expect(report[0] == 0b0011_1000 && report[report.count - 1] == 0x80)
    #expect(report.dropFirst().dropLast().allSatisfy { $0 == 0 })
    if profile.hasVRAM {
      // One memfd: what the old mapping writes, the new one reads (and the client's BAR2 mmap).
      #expect(fileReferences(new.vramFD!.rawValue) == 2)
      old.withDeviceMemory { $0[0x2000] = 0xA5 }
      #expect(try new.readBytes(VFIOPCIRegion.bar2, 0x2000, count: 1) == [0xA5])
    }

    // It carries on: the new server attaches, the client resumes the VF, the
    // held doorbell runs and raises vector 0 on the same eventfd.
    let host = FakeHost()
    new.attach(host: host)
    try new.resumeRunning()
    host.runDeferred()
    #expect(new.dmaCompleted == old.dmaCompleted + 1)
    #expect(new.dmaStatus == D.statusDone)
    #expect(rich.msix.map { $0.count() } == [1, 0, 0, 0])
    #expect(host.memory[0x8_0000..<0x8_1000].elementsEqual(pattern(4096, seed: 3)))
    // The pending vectors go out when the client unmasks them in the table.
    try new.setVectorMasked(3, false)
    #expect(rich.msix.map { $0.count() } == [0, 0, 0, 1])
    try new.setVectorMasked(5, false)
    #expect(host.interrupts.map(\.vector) == [0, 3, 5])
    #expect(new.msixPending == 0)
    // ERR's eventfd came along too: a loopback trigger from the client reaches it.
    try new.setIRQs(
      [.dataNone, .actionTrigger], index: VFIOPCIIRQ.err, count: 1)
    #expect(rich.err.count() == 1)
    // And a new transfer dirties pages the carried log reports.
    try new.startDMA(
      src: 0, dst: host.base + 0x4_0000, length: 4096,
      control: D.control(toDevice: false, vector: 1, interrupt: true))
    host.runDeferred()
    #expect(rich.msix.map { $0.count() } == [0, 1, 0, 0])
    // (Pages 0x40 and, from the held doorbell, 0x80: those before were reported.)
    let after = try new.dirtyReport(Self.logged)
    #expect(after[0x40 / 8] == 1 && after[0x80 / 8] == 1 && after.filter { $0 != 0 }.count == 2)
    #expect(new.scratch(gt: 1, index: 3) == 0x0BAD_F00D)
    // The PF's knobs came along.
    #expect(new.pfFaults.vramChunkTimeout == 7)
    #expect(new.pfTiming == fastTiming)
  }

  @Test func noDescriptorOutlivesBothDevices() throws {
    let msix: [TestEventFD]
    let err: TestEventFD
    let vram: Int32
    do {
      let rich = try Rich()
      msix = rich.msix
      err = rich.err
      vram = dup(rich.vf.vramFD!.rawValue)
      let new = try rich.vf.handedOver()
      #expect((msix + [err]).map(\.references) == [3, 3, 3, 3, 3])
      #expect(fileReferences(vram) == 3)
      #expect(new.eventFDCount == 5)
    }
    #expect((msix + [err]).map(\.references) == [1, 1, 1, 1, 1])
    #expect(fileReferences(vram) == 1)
    close(vram)
  }

  @Test func anIdleDeviceCarriesOverAndResets() throws {
    let old = try SimulatedXeVF(profile: .bmgSmall, vramSize: 1 << 20)
    let new = try old.handedOver()
    #expect(try Observed(new) == Observed(old))
    #expect(new.eventFDCount == 0 && new.dirtyLog == nil)
    try new.reset()
    #expect(new.resetCount == 1 && new.migrationState == .running)
  }

  // MARK: Refused

  @Test func anOpenMigrationStreamIsRefused() throws {
    let saving = try migratableVF(.bmgSmall, vram: 1 << 20)
    _ = try saving.beginSave()
    #expect(saving.handoverRefusal?.contains("STOP_COPY") == true)
    #expect(throws: HandoverRefusal.self) { _ = try saving.exportHandover() }

    let restoring = try migratableVF(.bmgSmall, vram: 1 << 20)
    _ = try restoring.beginRestore()
    #expect(restoring.handoverRefusal?.contains("RESUMING") == true)
    #expect(throws: HandoverRefusal.self) { _ = try restoring.exportHandover() }
  }

  /// A transfer started and not finished completes through this process:
  /// its deferred start, then its host DMA, are refused until it has.
  @Test func aTransferInFlightIsRefusedUntilItCompletes() throws {
    let vf = try SimulatedXeVF(profile: .bmgSmall, vramSize: 1 << 20)
    let host = FakeHost()
    host.asynchronous = true
    vf.attach(host: host)
    try vf.enableBusMaster()
    try vf.startDMA(src: 0, dst: host.base, length: 64, control: D.control(toDevice: false))
    #expect(vf.handoverRefusal?.contains("in flight") == true)
    host.runDeferred()
    #expect(host.held.count == 1)
    let refusal = #expect(throws: HandoverRefusal.self) { _ = try vf.exportHandover() }
    #expect(refusal?.reason.contains("DMA engine") == true)
    host.completeDMA()
    #expect(vf.handoverRefusal == nil)
    #expect(try vf.handedOver().dmaStatus == D.statusDone)
  }

  @Test func aPFWaitingForTheGuCIsRefused() throws {
    let vf = try migratableVF(.bmgSmall, vram: 1 << 20)
    var timing = fastTiming
    timing.flr = .milliseconds(20)
    vf.pfTiming = timing
    var faults = PFFaults()
    faults.flrNotificationDelay = .seconds(30)
    vf.pfFaults = faults
    try vf.reset()  // wait_flr gives up; the notification is still to come
    #expect(vf.handoverRefusal?.contains("GuC events") == true)
  }

  /// ERROR after a failed restore is at rest: carried, and a reset revives it.
  @Test func errorAfterAFailedMigrationIsCarried() throws {
    let vf = try migratableVF(.bmgSmall, vram: 1 << 20)
    let stream = try vf.beginRestore()
    _ = try? [UInt8](repeating: 0xEE, count: 64).withUnsafeBytes { try stream.write($0) }
    #expect(throws: Errno.self) { try vf.step(.resuming, .stop) }
    stream.close()
    vf.migrationFailed()
    #expect(vf.migrationState == .error)
    #expect(vf.handoverRefusal == nil)
    let new = try vf.handedOver()
    #expect(try Observed(new) == Observed(vf))
    #expect(new.migrationState == .error)
    try new.reset()
    #expect(new.migrationState == .running && new.resetCount == 1)
    try new.stopRunning()  // the PF works again after the FLR
  }

  // MARK: Malformed blobs

  @Test func anotherVersionIsRefusedNamingBoth() throws {
    let vf = try SimulatedXeVF(profile: .bmgSmall, vramSize: 1 << 20)
    let state = try vf.exportHandover()
    var bytes = state.bytes
    bytes[16] = 2  // the version follows the 16-byte kind tag
    let probe = dup(state.descriptors[0].rawValue)
    defer { close(probe) }
    let error = #expect(throws: HandoverRefusal.self) {
      _ = try SimulatedXeVF.importHandover(
        bytes, descriptors: OwnedFileDescriptors(taking: duplicated(state.descriptors)))
    }
    #expect(error?.reason.contains("version 2") == true)
    #expect(error?.reason.contains("reads version 1") == true)
    #expect(fileReferences(probe) == 2)  // the device's and the probe's: the import's is closed

    var kind = state.bytes
    kind[0] ^= 0x20
    let wrongKind = #expect(throws: HandoverRefusal.self) {
      _ = try SimulatedXeVF.importHandover(kind, descriptors: OwnedFileDescriptors())
    }
    #expect(wrongKind?.reason.contains("not a simulated Xe VF") == true)
  }

  /// Every prefix of a rich device's blob, and the blob with each byte
  /// flipped: refused (or, for a flip in a value any device could hold,
  /// imported), never a trap, and no descriptor left open.
  @Test func truncatedAndCorruptedBlobsAreRefusedWithoutALeak() throws {
    let rich = try Rich()
    let state = try rich.vf.exportHandover()
    let vram = rich.vf.vramFD!.rawValue
    #expect(state.bytes.count < 16 << 10)
    var refusals = Set<String>()
    for length in 0..<state.bytes.count {
      let error = #expect(throws: HandoverRefusal.self, "\(length) bytes") {
        _ = try SimulatedXeVF.importHandover(
          Array(state.bytes[..<length]),
          descriptors: OwnedFileDescriptors(taking: duplicated(state.descriptors)))
      }
      if let error { refusals.insert(String(error.reason.prefix(40))) }
    }
    #expect(refusals.count > 1)  // the refusals say where the blob ended
    var imported = 0
    for at in state.bytes.indices {
      var bytes = state.bytes
      bytes[at] ^= 0xFF
      if (try? SimulatedXeVF.importHandover(
        bytes, descriptors: OwnedFileDescriptors(taking: duplicated(state.descriptors)))) != nil
      {
        imported += 1
      }
    }
    #expect(imported < state.bytes.count / 2)
    #expect((rich.msix + [rich.err]).map(\.references) == [2, 2, 2, 2, 2])
    #expect(fileReferences(vram) == 1)
  }

  @Test func descriptorsThatAreNotWhatTheBlobSaysAreRefused() throws {
    let rich = try Rich()
    let state = try rich.vf.exportHandover()
    // The VRAM memfd where an eventfd belongs, and the other way round.
    var swapped = duplicated(state.descriptors)
    swapped.swapAt(0, 1)
    #expect(throws: HandoverRefusal.self) {
      _ = try SimulatedXeVF.importHandover(
        state.bytes, descriptors: OwnedFileDescriptors(taking: swapped))
    }
    // Fewer descriptors than the blob names.
    #expect(throws: HandoverRefusal.self) {
      _ = try SimulatedXeVF.importHandover(
        state.bytes,
        descriptors: OwnedFileDescriptors(taking: duplicated(Array(state.descriptors.dropLast()))))
    }
    #expect((rich.msix + [rich.err]).map(\.references) == [2, 2, 2, 2, 2])
  }
}
