import SystemPackage
import VFIODevice
import VFIOUser

@testable import XeVF

/// A DeviceHost that serves DMA from a byte array at `base`, records
/// interrupts and queues deferred work, optionally completing DMA later.
/// The device signals interrupts itself (its `IRQEmulation`); attached with
/// `attach(host:)` below, the host sees each one the device raises.
final class FakeHost: DeviceHost {
  let base: UInt64
  var memory: [UInt8]
  var interrupts: [(index: UInt32, vector: UInt32)] = []
  var deferred: [() -> Void] = []
  /// When set, DMA completes only on `completeDMA`.
  var asynchronous = false
  var held: [(Errno?) -> Void] = []
  var dmaCalls = 0

  init(base: UInt64 = 0x1_0000_0000, size: Int = 1 << 20) {
    self.base = base
    memory = Array(repeating: 0, count: size)
  }

  func deferWork(_ work: @escaping () -> Void) { deferred.append(work) }

  func runDeferred() {
    while !deferred.isEmpty { deferred.removeFirst()() }
  }

  /// Completes held DMA with `error` (copying the data on success).
  func completeDMA(with error: Errno? = nil) {
    let jobs = held
    held = []
    for job in jobs { job(error) }
  }

  /// Completes only the oldest held DMA.
  func completeOldestDMA(with error: Errno? = nil) {
    held.removeFirst()(error)
  }

  private func range(_ address: UInt64, _ count: Int) -> Range<Int>? {
    guard address >= base, address - base + UInt64(count) <= UInt64(memory.count) else {
      return nil
    }
    let start = Int(address - base)
    return start..<start + count
  }

  private func run(_ job: @escaping (Errno?) -> Void) {
    dmaCalls += 1
    if asynchronous { held.append(job) } else { job(nil) }
  }

  func dmaRead(
    address: UInt64, into buffer: UnsafeMutableRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    run { [self] error in
      if let error { return completion(.failure(error)) }
      guard let r = range(address, buffer.count) else { return completion(.failure(.badAddress)) }
      memory.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[r])) }
      completion(.success(()))
    }
  }

  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    run { [self] error in
      if let error { return completion(.failure(error)) }
      guard let r = range(address, buffer.count) else { return completion(.failure(.badAddress)) }
      memory.replaceSubrange(r, with: buffer)
      completion(.success(()))
    }
  }

  /// As the server's mappings do: the pages a write lands on are marked in `log`.
  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer, log: DirtyPageLog?,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    dmaWrite(address: address, from: buffer) { result in
      if case .success = result { log?.mark(address: address, length: UInt64(buffer.count)) }
      completion(result)
    }
  }
}

extension SimulatedXeVF {
  /// Attaches `host` and records in it every interrupt the device raises.
  func attach(host: FakeHost) {
    attach(host: host as DeviceHost)
    interruptTap = { [weak host] index, vector in host?.interrupts.append((index, vector)) }
  }

  func readValue<T: FixedWidthInteger>(_ region: UInt32, _ offset: UInt64, as: T.Type = T.self)
    throws -> T
  {
    var buffer = [UInt8](repeating: 0, count: MemoryLayout<T>.size)
    try buffer.withUnsafeMutableBytes { raw in try read(region: region, offset: offset, into: raw) }
    return buffer.reversed().reduce(T.zero) { $0 << 8 | T($1) }
  }

  func writeValue<T: FixedWidthInteger>(_ region: UInt32, _ offset: UInt64, _ value: T) throws {
    let bytes = (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    try bytes.withUnsafeBytes { raw in try write(region: region, offset: offset, from: raw) }
  }

  func readBytes(_ region: UInt32, _ offset: UInt64, count: Int) throws -> [UInt8] {
    var buffer = [UInt8](repeating: 0, count: count)
    try buffer.withUnsafeMutableBytes { raw in try read(region: region, offset: offset, into: raw) }
    return buffer
  }

  func writeBytes(_ region: UInt32, _ offset: UInt64, _ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { raw in try write(region: region, offset: offset, from: raw) }
  }

  func cfg8(_ offset: UInt64) throws -> UInt8 { try readValue(VFIOPCIRegion.config, offset) }
  func cfg16(_ offset: UInt64) throws -> UInt16 { try readValue(VFIOPCIRegion.config, offset) }
  func cfg32(_ offset: UInt64) throws -> UInt32 { try readValue(VFIOPCIRegion.config, offset) }
  func setCfg16(_ offset: UInt64, _ value: UInt16) throws {
    try writeValue(VFIOPCIRegion.config, offset, value)
  }
  func setCfg32(_ offset: UInt64, _ value: UInt32) throws {
    try writeValue(VFIOPCIRegion.config, offset, value)
  }
  func reg32(_ offset: UInt64) throws -> UInt32 { try readValue(VFIOPCIRegion.bar0, offset) }
  func reg64(_ offset: UInt64) throws -> UInt64 { try readValue(VFIOPCIRegion.bar0, offset) }
  func setReg32(_ offset: UInt64, _ value: UInt32) throws {
    try writeValue(VFIOPCIRegion.bar0, offset, value)
  }
  func setReg64(_ offset: UInt64, _ value: UInt64) throws {
    try writeValue(VFIOPCIRegion.bar0, offset, value)
  }

  /// Offsets of the standard capabilities, in list order, found by walking from 0x34.
  func capabilities() throws -> [(id: UInt8, offset: UInt64)] {
    var found: [(UInt8, UInt64)] = []
    var next = UInt64(try cfg8(0x34))
    while next != 0, found.count < 48 {
      found.append((try cfg8(next), next))
      next = UInt64(try cfg8(next + 1))
    }
    return found
  }

  func enableBusMaster() throws {
    try setCfg16(0x04, XePCIConfig.commandMemory | XePCIConfig.commandBusMaster)
  }
  func setMSIXControl(_ value: UInt16) throws {
    try setCfg16(UInt64(XePCIConfig.msixCap + 2), value)
  }
  func setVectorMasked(_ vector: Int, _ masked: Bool) throws {
    let at =
      XeSimRegisters.msixTable + XeSimRegisters.msixEntrySize * UInt64(vector)
      + XeSimRegisters.msixVectorControl
    try setReg32(at, masked ? 1 : 0)
  }

  /// Programs the engine and rings the doorbell.
  func startDMA(src: UInt64, dst: UInt64, length: UInt32, control: UInt32) throws {
    typealias D = XeSimRegisters.DMA
    try setReg64(D.src, src)
    try setReg64(D.dst, dst)
    try setReg32(D.len, length)
    try setReg32(D.ctrl, control)
    try setReg32(D.doorbell, 1)
  }
}

func pattern(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
  (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed) &+ 1) }
}
