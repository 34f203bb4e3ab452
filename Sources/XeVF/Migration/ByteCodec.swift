import SystemPackage

/// Little-endian writer for the migration stream's fixed layouts. The stream
/// is host-endian and this project builds for little-endian Linux only.
struct ByteWriter {
  private(set) var bytes: [UInt8] = []

  init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

  mutating func put<T: FixedWidthInteger>(_ value: T) {
    withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
  }

  mutating func put(_ data: [UInt8]) { bytes.append(contentsOf: data) }
}

/// Little-endian reader over a byte array; running past the end throws EINVAL
/// (a truncated record is malformed input, never a crash).
struct ByteReader {
  let bytes: [UInt8]
  private(set) var offset = 0

  init(_ bytes: [UInt8]) { self.bytes = bytes }

  var remaining: Int { bytes.count - offset }

  mutating func get<T: FixedWidthInteger>(_: T.Type = T.self) throws(Errno) -> T {
    let size = MemoryLayout<T>.size
    guard remaining >= size else { throw .invalidArgument }
    var value: T = 0
    for i in 0..<size { value |= T(bytes[offset + i]) << (8 * i) }
    offset += size
    return value
  }

  mutating func take(_ count: Int) throws(Errno) -> [UInt8] {
    guard count >= 0, remaining >= count else { throw .invalidArgument }
    defer { offset += count }
    return Array(bytes[offset..<offset + count])
  }
}

extension Array where Element == UInt8 {
  /// The bytes as little-endian integers of `T` (the count must be a multiple of T's size).
  func littleEndianWords<T: FixedWidthInteger>(_: T.Type = T.self) -> [T] {
    let size = MemoryLayout<T>.size
    return stride(from: 0, to: count - count % size, by: size).map { start in
      var value: T = 0
      for i in 0..<size { value |= T(self[start + i]) << (8 * i) }
      return value
    }
  }

  /// `words` as little-endian bytes.
  init<T: FixedWidthInteger>(littleEndian words: [T]) {
    var writer = ByteWriter(capacity: words.count * MemoryLayout<T>.size)
    for word in words { writer.put(word) }
    self = writer.bytes
  }
}
