import SystemPackage

// The little-endian cursor is VFIOUser's ByteReader and ByteWriter; these are
// the whole-array word conversions the migration records add to it.

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
