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
    // One copy of the bytes rather than a shift per byte: a GGTT is 16 Ki words.
    var words = [T](repeating: 0, count: count / MemoryLayout<T>.size)
    words.withUnsafeMutableBytes { target in
      withUnsafeBytes {
        target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[..<target.count]))
      }
    }
    #if _endian(big)
      words = words.map(T.init(littleEndian:))
    #endif
    return words
  }

  /// `words` as little-endian bytes.
  init<T: FixedWidthInteger>(littleEndian words: [T]) {
    #if _endian(big)
      self = words.map(\.littleEndian).withUnsafeBytes { Array($0) }
    #else
      self = words.withUnsafeBytes { Array($0) }
    #endif
  }
}
