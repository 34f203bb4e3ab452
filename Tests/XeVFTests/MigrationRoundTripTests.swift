import Foundation
import Glibc
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import XeStream

@testable import XeVF

/// Gives a VF state in every part a save carries: VRAM (or SRAM), GGTT,
/// scratch registers of both GTs, the DMA engine's registers and counters,
/// the MSI-X table and a pending vector.
func populate(_ vf: SimulatedXeVF, seed: UInt64 = 1) throws {
  typealias D = XeSimRegisters.DMA
  vf.withDeviceMemory { memory in
    let words = memory.bindMemory(to: UInt64.self)
    for i in words.indices { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 ^ seed }
  }
  let window = XeSimRegisters.ggttWindow
  let last = window + UInt64(vf.profile.ggttPTECount - 1) * 8
  try vf.setReg64(window, 0xDEAD_B000_0000_0001 | 1 << 2)  // VFID 1, as the hardware stamps it
  try vf.setReg64(window + 800, 0x1234_5000_0000_0003 ^ seed << 40)
  try vf.setReg64(last, 0xFFFF_F000_0000_0FFD)
  for n in 0..<4 {
    try vf.setReg32(XeSimRegisters.vfSwFlag(n), 0x1100 + UInt32(n) + UInt32(seed))
    try vf.setReg32(XeSimRegisters.mediaVFSwFlag(n), 0xA100 + UInt32(n))
  }
  // One finished transfer with an interrupt, one whose vector is masked (pending).
  let host = FakeHost()
  vf.attach(host: host)
  try vf.enableBusMaster()
  try vf.setMSIXControl(XePCIConfig.msixEnable)
  try vf.setVectorMasked(3, false)
  try vf.setReg32(XeSimRegisters.msixTable + 16 * 3, 0xFEE0_1000)
  try vf.setReg32(XeSimRegisters.msixTable + 16 * 3 + 8, 0x4023)
  try vf.startDMA(
    src: 0x100, dst: host.base, length: 256,
    control: D.control(toDevice: false, vector: 3, interrupt: true))
  host.runDeferred()
  try vf.startDMA(
    src: 0x200, dst: host.base, length: 64,
    control: D.control(toDevice: false, vector: 7, interrupt: true))
  host.runDeferred()
  // Registers programmed for a next transfer that was never started.
  try vf.setReg64(D.src, 0x1_2345_6000)
  try vf.setReg64(D.dst, 0x4000)
  try vf.setReg32(D.len, 512)
  try vf.setReg32(D.ctrl, D.control(toDevice: true, vector: 2))
  vf.attach(host: nil)
}

/// What a restore must reproduce, read from the device's parts.
struct MigratedState: Equatable {
  var scratch: [[UInt32]]
  var ggtt: [UInt64]
  var engine: GuCVFState.Engine
  var msix: GuCVFState.MSIX

  init(_ vf: SimulatedXeVF) {
    scratch = vf.registers.scratch
    ggtt = vf.registers.ggtt.map { $0 & ~SimulatedXeVF.pteVFIDMask }
    engine = vf.dma.gucRecord
    msix = vf.msix.gucRecord
  }
}

func sameDeviceMemory(_ a: SimulatedXeVF, _ b: SimulatedXeVF) -> Bool {
  a.withDeviceMemory { x in
    b.withDeviceMemory { y in
      x.count == y.count && memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0
    }
  }
}

@Suite struct MigrationRoundTripTests {
  @Test func bmgRoundTrip() throws {
    let source = try migratableVF(.bmg, vram: 8 << 20, chunk: 1 << 20, seed: 3)
    try populate(source)
    let expected = MigratedState(source)
    #expect(expected.engine.completed == 2 && expected.msix.pending == 1 << 7)
    let stream = try source.save(readSize: 65536)

    // The stream's shape: descriptor first, trailer last, each GT in order.
    let parsed = try packets(stream)
    #expect(parsed.first?.header.type == .descriptor)
    #expect(parsed.last?.header.type == .trailer)
    let gt0 = parsed.filter { $0.header.gt == 0 && $0.header.type.rawValue > 2 }
    let gt1 = parsed.filter { $0.header.gt == 1 }
    #expect(gt0.map(\.header.type) == [.guc, .ggtt, .mmio] + Array(repeating: .vram, count: 8))
    #expect(gt1.map(\.header.type) == [.guc, .mmio])
    #expect(
      gt0.filter { $0.header.type == .vram }.map(\.header.offset)
        == (0..<8).map { UInt64($0) << 20 })
    #expect(gt0.filter { $0.header.type == .vram }.allSatisfy { $0.header.size == 1 << 20 })
    #expect(gt0[1].payload.count == XeProfile.bmg.ggttPTECount * 8)
    #expect(
      parsed.allSatisfy { $0.header.version == 1 && $0.header.flags == 0 && $0.header.tile == 0 })

    let destination = try migratableVF(.bmg, vram: 8 << 20, vfid: 2)
    try destination.restore(stream, writeSize: 100_000)
    #expect(MigratedState(destination) == expected)
    #expect(sameDeviceMemory(source, destination))
    // The GGTT carries the destination's VFID; BAR0 shows the restored state.
    #expect(try destination.reg64(XeSimRegisters.ggttWindow) == 0xDEAD_B000_0000_0001 | 2 << 2)
    #expect(try destination.reg32(XeSimRegisters.mediaVFSwFlag(2)) == 0xA102)
    #expect(try destination.reg32(XeSimRegisters.DMA.completed) == 2)
    #expect(try destination.reg32(XeSimRegisters.msixTable + 16 * 3 + 8) == 0x4023)
    #expect(try destination.reg64(XeSimRegisters.msixPBA) == 1 << 7)
    try destination.resumeRunning()
    #expect(destination.migrationState == .running && !destination.workHeld)
    // The source rolls back to running.
    try source.resumeRunning()
    #expect(source.pfState(0) == .resumed)
  }

  @Test func ptlRoundTripCarriesSRAMInTheGuCBlob() throws {
    let source = try migratableVF(.ptl, seed: 5)
    try populate(source, seed: 9)
    let stream = try source.save()
    let parsed = try packets(stream)
    #expect(!parsed.contains { $0.header.type == .vram })
    let guc0 = try #require(parsed.first { $0.header.type == .guc && $0.header.gt == 0 })
    #expect(guc0.payload.count > Int(XeSimRegisters.sramSize))

    let destination = try migratableVF(.ptl)
    try destination.restore(stream, writeSize: 333)
    #expect(MigratedState(destination) == MigratedState(source))
    #expect(sameDeviceMemory(source, destination))
    #expect(
      try destination.reg32(XeSimRegisters.sram + 8)
        == source.withDeviceMemory { $0.load(fromByteOffset: 8, as: UInt32.self) })
  }

  @Test(arguments: [
    (XeProfile.ptlSmall, [1, 7, 1 << 20]),
    (XeProfile.bmgSmall, [7, 4093, 1 << 20]),
  ])
  func segmentationDoesNotMatter(profile: XeProfile, sizes: [Int]) throws {
    let source = try migratableVF(profile, vram: 1 << 20, chunk: 256 << 10)
    try populate(source)
    try source.stopRunning()
    var streams: [[UInt8]] = []
    for size in sizes {
      let stream = try #require(try source.step(.stop, .stopCopy))
      streams.append(try readAll(stream, chunk: size))
      try source.step(.stopCopy, .stop)
    }
    #expect(streams.allSatisfy { $0 == streams[0] })
    for size in sizes {
      let destination = try migratableVF(profile, vram: 1 << 20)
      try destination.restore(streams[0], writeSize: size)
      #expect(MigratedState(destination) == MigratedState(source))
      #expect(sameDeviceMemory(source, destination))
    }
  }

  @Test func interleavingFollowsTheSeedAndRestoreTakesAnyOrder() throws {
    var orders: [[String]] = []
    for seed: UInt64 in 0..<6 {
      let source = try migratableVF(.bmg, vram: 2 << 20, chunk: 512 << 10, seed: seed)
      try populate(source)
      let stream = try source.save()
      // Saved again (from STOP): same seed, same bytes.
      let again = try readAll(try #require(try source.step(.stop, .stopCopy)), chunk: 4096)
      try source.step(.stopCopy, .stop)
      #expect(again == stream)
      orders.append(try packets(stream).map { "\($0.header.type)/\($0.header.gt)" })
      let destination = try migratableVF(.bmg, vram: 2 << 20)
      try destination.restore(stream)
      #expect(MigratedState(destination) == MigratedState(source))
      #expect(sameDeviceMemory(source, destination))
    }
    #expect(Set(orders).count > 1)
  }

  @Test func streamEndsWithAShortReadThenZero() throws {
    let vf = try migratableVF(.ptlSmall)
    let full = try vf.save()
    let stream = try #require(try vf.step(.stop, .stopCopy))
    var head = [UInt8](repeating: 0, count: full.count - 10)
    #expect(try head.withUnsafeMutableBytes { try stream.read(into: $0) } == full.count - 10)
    var tail = [UInt8](repeating: 0, count: 100)
    #expect(try tail.withUnsafeMutableBytes { try stream.read(into: $0) } == 10)
    #expect(head + tail[..<10] == full)
    for _ in 0..<3 { #expect(try tail.withUnsafeMutableBytes { try stream.read(into: $0) } == 0) }
    #expect(throws: Errno.badFileDescriptor) {
      try [1].withUnsafeBytes { _ = try stream.write($0) }
    }
  }

  @Test(arguments: [XeProfile.bmg, XeProfile.ptl])
  func stopCopySizeIsTheKernelsEstimate(profile: XeProfile) throws {
    let vf = try migratableVF(profile, vram: 4 << 20, chunk: 1 << 20)
    try vf.stopRunning()
    let estimate = try vf.stopCopySize()
    try vf.resumeRunning()
    let stream = try vf.save()
    let parsed = try packets(stream)
    let chunks = parsed.filter { $0.header.type == .vram }.count
    let sram = profile.hasVRAM ? nil : Int(XeSimRegisters.sramSize)
    let gucSlack = parsed.filter { $0.header.type == .guc }.reduce(0) {
      $0 + GuCVFState.querySize(gt: Int($1.header.gt), sramSize: sram) - $1.payload.count
    }
    #expect(chunks == (profile.hasVRAM ? 4 : 0))
    #expect(gucSlack > 0)
    // actual = estimate + descriptor and trailer + a header per extra chunk − GuC slack
    let actual = Int(estimate) + 64 + 24 * max(chunks - 1, 0) - gucSlack
    #expect(stream.count == actual)
    #expect(UInt64(stream.count) != estimate)
  }

  @Test func theDocumentedExample() throws {
    // protocol/xe-migration-stream.md, "Size estimate".
    let vf = try migratableVF(.bmg, vram: 8 << 20, chunk: 1 << 20)
    #expect(try vf.stopCopySize() == 8_528_048)
    #expect(try vf.save().count == 8_520_488)
  }

  @Test func queryFaultFailsTheEstimate() throws {
    let vf = try migratableVF()
    vf.pfFaults.inject(.error(.noBufferSpace), on: .query, gt: 1)
    #expect(throws: Errno.noBufferSpace) { _ = try vf.stopCopySize() }
  }

  @Test func backpressureBoundsTheRings() throws {
    // 128 VRAM chunks of 64 KiB: far more than a ring holds.
    let source = try migratableVF(.bmg, vram: 8 << 20, chunk: 64 << 10)
    try populate(source)
    let stream = try source.beginSave()
    #expect(eventually { source.pfState(0).contains(.saveWaitData) })
    #expect(source.simulatedPF.ringHighWater(gt: 0) == SimulatedPF.ringSize)
    // Rings hold VRAM by reference, never a copy.
    let ring = source.simulatedPF.locked { source.simulatedPF.gts[0].ring }
    #expect(
      ring.allSatisfy { packet in
        if case .vram = packet.payload { return true }
        return packet.header.type != .vram
      })
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 300_000)
    while true {  // a slow reader
      let count = try buffer.withUnsafeMutableBytes { try stream.read(into: $0) }
      bytes += buffer[..<count]
      if count < buffer.count { break }
      Thread.sleep(forTimeInterval: 0.0005)
    }
    try source.step(.stopCopy, .stop)
    #expect(source.simulatedPF.ringHighWater(gt: 0) == SimulatedPF.ringSize)
    #expect(source.simulatedPF.ringHighWater(gt: 1) <= SimulatedPF.ringSize)

    let destination = try migratableVF(.bmg, vram: 8 << 20)
    try destination.restore(bytes, writeSize: 1 << 20)
    #expect(destination.simulatedPF.ringHighWater(gt: 0) <= SimulatedPF.ringSize)
    #expect(sameDeviceMemory(source, destination))
  }

  @Test func aLargeVRAMIsNeverCopiedIntoTheRings() throws {
    let vf = try migratableVF(.bmg, vram: 4 << 30, chunk: 512 << 20)
    let stream = try vf.beginSave()
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    _ = try buffer.withUnsafeMutableBytes { try stream.read(into: $0) }
    #expect(eventually { vf.pfState(0).contains(.saveWaitData) })
    let ring = vf.simulatedPF.locked { vf.simulatedPF.gts[0].ring }
    #expect(ring.count == SimulatedPF.ringSize)
    let buffered = ring.reduce(0) { sum, packet in
      if case .bytes(let bytes) = packet.payload { return sum + bytes.count }
      return sum
    }
    #expect(buffered == 0)  // five 512 MiB chunks, held as references
    try vf.reset()
  }

  @Test func interruptedReadLosesItsBytes() throws {
    let source = try migratableVF(.ptlSmall)
    try populate(source)
    let clean = try source.save()
    let stream = try #require(try source.step(.stop, .stopCopy))
    source.pfFaults.interruptRead = 100
    var buffer = [UInt8](repeating: 0, count: 4096)
    #expect(throws: Errno.interrupted) {
      try buffer.withUnsafeMutableBytes { _ = try stream.read(into: $0) }
    }
    let rest = try readAll(stream, chunk: 4096)
    #expect(rest == Array(clean.dropFirst(100)))
    // The destination gets a corrupt stream and refuses it.
    let destination = try migratableVF(.ptlSmall)
    destination.pfTiming.restore = .milliseconds(20)
    #expect(throws: (any Error).self) { try destination.restore(rest) }
    #expect(destination.migrationState != .running)
  }

  @Test func resetDuringStopCopyInvalidatesTheStream() throws {
    let vf = try migratableVF(.bmg, vram: 4 << 20)
    try populate(vf)
    let stream = try vf.beginSave()
    var buffer = [UInt8](repeating: 0, count: 1000)
    #expect(try buffer.withUnsafeMutableBytes { try stream.read(into: $0) } == 1000)
    try vf.reset()
    #expect(throws: Errno.operationNotSupportedByDevice) {
      try buffer.withUnsafeMutableBytes { _ = try stream.read(into: $0) }
    }
    #expect(vf.migrationState == .running)
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready && !vf.workHeld)
    // A new save runs from the start.
    let stream2 = try vf.save()
    #expect(try packets(stream2).first?.header.type == .descriptor)
  }

  @Test func resetDuringResumingInvalidatesTheStream() throws {
    let source = try migratableVF(.bmg, vram: 4 << 20)
    try populate(source)
    let bytes = try source.save()
    let destination = try migratableVF(.bmg, vram: 4 << 20)
    // Write up to the last MMIO packet: everything but (at least) the trailer.
    var cut = 0
    var offset = 0
    for (header, payload) in try packets(bytes) {
      offset += XePacketHeader.size + payload.count
      if header.type == .mmio { cut = offset }
    }
    let stream = try destination.beginRestore()
    try writeAll(stream, Array(bytes[..<cut]), chunk: 65536)
    // Both GTs' scratch registers are staged, none applied before the trailer.
    let pf = destination.simulatedPF
    #expect(eventually { pf.locked { pf.gts.allSatisfy { $0.staged.mmio != nil } } })
    #expect(destination.registers.scratch == [[0, 0, 0, 0], [0, 0, 0, 0]])
    try destination.reset()
    #expect(throws: Errno.operationNotSupportedByDevice) {
      try writeAll(stream, Array(bytes[cut...]), chunk: 65536)
    }
    #expect(destination.migrationState == .running)
    #expect(destination.pfState(0) == .ready && destination.pfState(1) == .ready)
    try destination.restore(bytes)
    #expect(MigratedState(destination) == MigratedState(source))
  }
}
