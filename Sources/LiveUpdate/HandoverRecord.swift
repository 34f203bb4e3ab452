import SystemPackage
import VFIODevice
import VFIOUser

/// The state record a live update carries (protocol/live-update.md): a
/// magic, a version, and sections, each a tag and its bytes. Every
/// descriptor a section names is an index into the one list that travels
/// with the record. A successor refuses a version or a section it does not
/// know: the old server then carries on.
public struct HandoverRecord {
  public static let magic: [UInt8] = Array("XVFU-LU\u{0}".utf8)
  /// The version this build writes and reads.
  public static let version: UInt32 = 1

  public enum Section: UInt32, Sendable, CaseIterable {
    /// The serve process: its arguments, the update count, times (CLI).
    case process = 1
    /// The device socket and the control socket, listening.
    case listeners = 2
    /// The attached client's connection, if there is one.
    case connection = 3
    /// The device, in its own format (`HandoverCapable`).
    case device = 4
  }

  public var sections: [(Section, [UInt8])] = []
  public init() {}

  public func section(_ which: Section) -> [UInt8]? {
    sections.first { $0.0 == which }?.1
  }

  public func encoded() -> [UInt8] {
    var out = ByteWriter()
    out.append(Self.magic)
    out.append(Self.version)
    out.append(UInt32(sections.count))
    for (tag, bytes) in sections {
      out.append(tag.rawValue)
      out.append(UInt64(bytes.count))
      out.append(bytes)
    }
    return out.bytes
  }

  public init(decoding bytes: [UInt8]) throws(HandoverRefusal) {
    var input = HandoverDecoder(bytes, what: "the state record")
    guard try input.raw(Self.magic.count) == Self.magic else {
      throw HandoverRefusal("the handover state is not a live-update record (bad magic)")
    }
    let version = try input.u32()
    guard version == Self.version else {
      throw HandoverRefusal(
        "the old server's state is version \(version); this binary reads version \(Self.version)")
    }
    let count = try input.u32()
    guard count <= 64 else { throw input.corrupt() }
    for _ in 0..<count {
      let tag = try input.u32()
      guard let section = Section(rawValue: tag) else {
        throw HandoverRefusal("the handover state has a section this binary does not know (\(tag))")
      }
      guard self.section(section) == nil else { throw input.corrupt() }
      let length = try input.u64()
      guard length <= UInt64(input.remaining) else { throw input.corrupt() }
      sections.append((section, try input.raw(Int(length))))
    }
    guard input.remaining == 0 else { throw input.corrupt() }
  }
}

/// Writes a section's fields, collecting the descriptors they name.
public struct HandoverEncoder {
  public var out = ByteWriter()
  /// Lent: the record names them by their index here.
  public var descriptors: [FileDescriptor]

  /// `descriptors`: those already in the record (sections share one list).
  public init(descriptors: [FileDescriptor] = []) { self.descriptors = descriptors }

  public var bytes: [UInt8] { out.bytes }
  public mutating func u8(_ v: UInt8) { out.append(v) }
  public mutating func bool(_ v: Bool) { out.append(UInt8(v ? 1 : 0)) }
  public mutating func u16(_ v: UInt16) { out.append(v) }
  public mutating func u32(_ v: UInt32) { out.append(v) }
  public mutating func u64(_ v: UInt64) { out.append(v) }
  public mutating func i64(_ v: Int64) { out.append(UInt64(bitPattern: v)) }
  public mutating func int(_ v: Int) { out.append(UInt64(bitPattern: Int64(v))) }
  public mutating func bytes(_ v: [UInt8]) {
    out.append(UInt64(v.count))
    out.append(v)
  }
  public mutating func string(_ v: String) { bytes(Array(v.utf8)) }
  /// A descriptor, by its index in `descriptors`.
  public mutating func descriptor(_ fd: FileDescriptor) {
    out.append(UInt32(descriptors.count))
    descriptors.append(fd)
  }
  /// An optional value: a presence byte, then the value.
  public mutating func optional<T>(_ v: T?, _ body: (inout Self, T) -> Void) {
    bool(v != nil)
    if let v { body(&self, v) }
  }
}

/// Reads a section's fields; every read is checked, and a short or
/// inconsistent section is refused (`corrupt`), never trusted.
public struct HandoverDecoder {
  private let input: [UInt8]
  private var offset = 0
  private let what: String

  public init(_ bytes: [UInt8], what: String) {
    input = bytes
    self.what = what
  }

  public var remaining: Int { input.count - offset }
  /// The refusal for a short or inconsistent field, naming the section, the
  /// byte and the reader's source line (which field it was).
  public func corrupt(_ file: StaticString = #fileID, _ line: UInt = #line) -> HandoverRefusal {
    HandoverRefusal(
      "the handover state is truncated or corrupt (\(what), byte \(offset); \(file):\(line))")
  }

  public mutating func raw(_ count: Int) throws(HandoverRefusal) -> [UInt8] {
    guard count >= 0, count <= remaining else { throw corrupt() }
    defer { offset += count }
    return Array(input[offset..<(offset + count)])
  }

  /// The next `T`, through the project's checked cursor (`ByteReader`).
  private mutating func load<T: FixedWidthInteger>(_: T.Type) throws(HandoverRefusal) -> T {
    let at = offset
    let value = input.withUnsafeBytes { try? ByteReader($0).load(T.self, at: at) }
    guard let value else { throw corrupt() }
    offset += MemoryLayout<T>.size
    return value
  }

  public mutating func u8() throws(HandoverRefusal) -> UInt8 { try load(UInt8.self) }
  public mutating func bool() throws(HandoverRefusal) -> Bool {
    switch try u8() {
    case 0: return false
    case 1: return true
    default: throw corrupt()
    }
  }
  public mutating func u16() throws(HandoverRefusal) -> UInt16 { try load(UInt16.self) }
  public mutating func u32() throws(HandoverRefusal) -> UInt32 { try load(UInt32.self) }
  public mutating func u64() throws(HandoverRefusal) -> UInt64 { try load(UInt64.self) }
  public mutating func i64() throws(HandoverRefusal) -> Int64 {
    Int64(bitPattern: try load(UInt64.self))
  }
  public mutating func int() throws(HandoverRefusal) -> Int {
    let v = try i64()
    guard let i = Int(exactly: v) else { throw corrupt() }
    return i
  }
  /// A count of items each at least `itemBytes` long: bounded by what is left.
  public mutating func count(
    itemBytes: Int, _ file: StaticString = #fileID, _ line: UInt = #line
  ) throws(HandoverRefusal) -> Int {
    let n = try u64()
    guard n <= UInt64(remaining / max(itemBytes, 1)) else { throw corrupt(file, line) }
    return Int(n)
  }
  public mutating func bytes(_ file: StaticString = #fileID, _ line: UInt = #line)
    throws(HandoverRefusal) -> [UInt8]
  {
    try raw(try count(itemBytes: 1, file, line))
  }
  public mutating func string() throws(HandoverRefusal) -> String {
    let raw = try bytes()
    guard let s = String(validating: raw, as: UTF8.self) else { throw corrupt() }
    return s
  }
  /// A descriptor's index, checked against the `count` that travelled.
  public mutating func descriptor(count: Int) throws(HandoverRefusal) -> Int {
    let i = try u32()
    guard Int(i) < count else { throw corrupt() }
    return Int(i)
  }
  public mutating func optional<T>(_ body: (inout Self) throws(HandoverRefusal) -> T)
    throws(HandoverRefusal) -> T?
  {
    try bool() ? try body(&self) : nil
  }
  /// The section was read to its end: trailing bytes mean a format mismatch.
  public func finish() throws(HandoverRefusal) {
    guard remaining == 0 else { throw corrupt() }
  }
}

/// A section's own bytes and the descriptors it names, owned.
public struct ImportedState: ~Copyable {
  public var bytes: [UInt8]
  public var descriptors: OwnedFileDescriptors
}

extension HandoverRecord {
  /// The device section: the device's own bytes and its descriptors,
  /// taken from the record's list.
  public func deviceState(descriptors: inout OwnedFileDescriptors) throws(HandoverRefusal)
    -> ImportedState
  {
    guard let bytes = section(.device) else {
      throw HandoverRefusal("the handover state has no device")
    }
    var input = HandoverDecoder(bytes, what: "device")
    let state = try input.bytes()
    var owned = OwnedFileDescriptors()
    for _ in 0..<(try input.count(itemBytes: 4)) {
      let index = try input.descriptor(count: descriptors.count)
      guard let fd = descriptors.take(index) else { throw input.corrupt() }
      owned.append(fd)
    }
    try input.finish()
    return ImportedState(bytes: state, descriptors: owned)
  }
}
