import Foundation
import Glibc
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import XeStream

@testable import XeVF

/// The kernel's timeouts halved (1 s → 500 ms): waits that succeed end
/// as soon as they can, so these only bound them, with room for a loaded
/// machine. A test that waits for a timeout to expire sets that one shorter.
let fastTiming = PFTiming.kernel.scaled(by: 0.5)

extension XeProfile {
  /// bmg with a 1 MiB GGTT quota: a small stream for byte-by-byte reads.
  static let bmgSmall: XeProfile = {
    var p = XeProfile.bmg
    p.ggttQuota = 1 << 20
    return p
  }()
  /// ptl with a 1 MiB GGTT quota.
  static let ptlSmall: XeProfile = {
    var p = XeProfile.ptl
    p.ggttQuota = 1 << 20
    return p
  }()
}

/// A VF with fast PF timing, small VRAM and small VRAM chunks.
func migratableVF(
  _ profile: XeProfile = .bmg, vram: UInt64 = 8 << 20, chunk: UInt64 = 1 << 20, seed: UInt64 = 0,
  vfid: UInt16 = 1
) throws -> SimulatedXeVF {
  let vf = try SimulatedXeVF(
    profile: profile, vramSize: profile.hasVRAM ? vram : nil, vfid: vfid)
  vf.pfTiming = fastTiming
  vf.vramChunkSize = chunk
  vf.migrationSeed = seed
  return vf
}

/// The data stream as a test drives it: reads from a source, writes to a sink.
/// The wrong direction reaches the concrete stream's own method, which
/// refuses it as the kernel refuses an O_RDONLY or O_WRONLY data_fd (EBADF).
extension MigrationStream {
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    switch self {
    case .source(let source): return try source.read(into: buffer)
    case .sink(let sink):
      guard let restore = sink as? XeRestoreStream else { throw .badFileDescriptor }
      return try restore.read(into: buffer)
    }
  }

  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    switch self {
    case .sink(let sink): return try sink.write(bytes)
    case .source(let source):
      guard let save = source as? XeSaveStream else { throw .badFileDescriptor }
      return try save.write(bytes)
    }
  }
}

extension SimulatedXeVF {
  @discardableResult
  func step(_ from: MigrationState, _ to: MigrationState) throws -> MigrationStream? {
    try migrationStep(from: from, to: to)
  }

  /// RUNNING → RUNNING_P2P → STOP.
  func stopRunning() throws {
    try step(.running, .runningP2P)
    try step(.runningP2P, .stop)
  }

  /// STOP → RUNNING_P2P → RUNNING.
  func resumeRunning() throws {
    try step(.stop, .runningP2P)
    try step(.runningP2P, .running)
  }

  /// RUNNING → … → STOP_COPY.
  func beginSave() throws -> MigrationStream {
    try stopRunning()
    return try #require(try step(.stop, .stopCopy))
  }

  /// RUNNING → … → RESUMING.
  func beginRestore() throws -> MigrationStream {
    try stopRunning()
    return try #require(try step(.stop, .resuming))
  }

  /// A whole save from RUNNING; the device is left in STOP.
  func save(readSize: Int = 1 << 20) throws -> [UInt8] {
    let stream = try beginSave()
    let bytes = try readAll(stream, chunk: readSize)
    try step(.stopCopy, .stop)
    return bytes
  }

  /// A whole restore from RUNNING; the device is left in STOP.
  func restore(_ bytes: [UInt8], writeSize: Int = 1 << 20) throws {
    let stream = try beginRestore()
    try writeAll(stream, bytes, chunk: writeSize)
    try step(.resuming, .stop)
  }

  func pfState(_ gt: Int) -> PFState { simulatedPF.state(gt: gt) }
}

/// Reads to the end in `chunk`-sized reads, checking that only the last read is short.
func readAll(_ stream: MigrationStream, chunk: Int) throws -> [UInt8] {
  var out: [UInt8] = []
  var buffer = [UInt8](repeating: 0, count: chunk)
  while true {
    let count = try buffer.withUnsafeMutableBytes { try stream.read(into: $0) }
    out += buffer[..<count]
    if count < chunk { break }
  }
  // After the end: 0, and again 0.
  #expect(try buffer.withUnsafeMutableBytes { try stream.read(into: $0) } == 0)
  return out
}

/// Writes everything in `chunk`-sized writes, repeating a write's remainder
/// when the device takes a prefix.
func writeAll(_ stream: MigrationStream, _ bytes: [UInt8], chunk: Int) throws {
  var at = 0
  while at < bytes.count {
    let end = min(at + chunk, bytes.count)
    let taken = try bytes[at..<end].withUnsafeBytes { try stream.write($0) }
    #expect(taken > 0)
    at += taken
  }
}

/// Splits a stream into its packets (header, payload).
func packets(_ stream: [UInt8]) throws -> [(header: XePacketHeader, payload: [UInt8])] {
  var out: [(XePacketHeader, [UInt8])] = []
  var at = 0
  while at < stream.count {
    let header = try XePacketHeader(decoding: Array(stream[at..<at + XePacketHeader.size]))
    at += XePacketHeader.size
    let end = at + Int(header.size)
    try #require(end <= stream.count)
    out.append((header, Array(stream[at..<end])))
    at = end
  }
  return out
}

/// Encodes one packet.
func packet(_ header: XePacketHeader, _ payload: [UInt8] = []) -> [UInt8] {
  var h = header
  h.size = UInt64(payload.count)
  return h.encoded + payload
}

/// Polls `condition` for up to `seconds`.
func eventually(_ seconds: Double = 2, _ condition: () -> Bool) -> Bool {
  let deadline = Date(timeIntervalSinceNow: seconds)
  while !condition() {
    if Date() > deadline { return false }
    Thread.sleep(forTimeInterval: 0.001)
  }
  return true
}

/// Runs `body` and returns the errno it throws, or nil.
func thrownErrno(_ body: () throws -> Void) -> Errno? {
  do {
    try body()
    return nil
  } catch let error as Errno {
    return error
  } catch {
    Issue.record("unexpected error \(error)")
    return nil
  }
}

/// The errnos protocol/xe-packets.json names.
func errnoNamed(_ name: String) -> Errno? {
  let table: [String: Int32] = [
    "EINVAL": EINVAL, "EIO": EIO, "ENODEV": ENODEV, "ENOENT": ENOENT, "ENXIO": ENXIO,
  ]
  return table[name].map(Errno.init(rawValue:))
}

// MARK: protocol/xe-packets.json

struct XePacketFixture: Decodable, Sendable, CustomTestStringConvertible {
  struct Header: Decodable, Sendable {
    var version: UInt8
    var type: UInt8
    var tile: UInt8
    var gt: UInt8
    var flags: UInt32
    var offset: UInt64
    var size: UInt64
  }
  struct KLV: Decodable, Sendable {
    var key: UInt16
    var value: [UInt32]
  }
  struct Expectation: Decodable, Sendable {
    var errno: String
    var at: String
    var cause: String?
  }

  var name: String
  var hex: String
  var header: Header
  var payloadHex: String
  var zeroFill: Int?
  var headerOnly: Bool?
  var klvs: [KLV]?
  var expect: Expectation?
  var note: String

  var testDescription: String { name }

  /// The packet as a stream carries it (zero fill appended).
  var bytes: [UInt8] { hexBytes(hex) + [UInt8](repeating: 0, count: zeroFill ?? 0) }
  var payload: [UInt8] { hexBytes(payloadHex) }
}

struct XePacketFixtures: Decodable, Sendable {
  var packets: [XePacketFixture]
  var restoreErrors: [XePacketFixture]

  /// `<repo>/protocol/xe-packets.json`, found from this file's path.
  static let loaded: XePacketFixtures = {
    let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
      .deletingLastPathComponent().deletingLastPathComponent()
      .appendingPathComponent("protocol/xe-packets.json")
    let decoder = JSONDecoder()
    decoder.keyDecodingStrategy = .convertFromSnakeCase
    do {
      return try decoder.decode(XePacketFixtures.self, from: Data(contentsOf: url))
    } catch {
      fatalError("cannot load \(url.path): \(error)")
    }
  }()
}

/// The fixture's hex (TestSupport's decoder); a malformed fixture stops the run.
func hexBytes(_ hex: String) -> [UInt8] {
  guard let bytes = [UInt8](hex: hex) else {
    fatalError("not hex in xe-packets.json: \(hex.prefix(32))")
  }
  return bytes
}
