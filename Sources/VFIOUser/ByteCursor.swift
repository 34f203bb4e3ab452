// The one little-endian byte codec of the project: every wire message, kernel
// ioctl structure and migration record is read with `ByteReader` and built
// with `ByteWriter`. The protocol is host-endian and this project builds for
// little-endian Linux only; the conversions cost nothing there.
//
// A read or write outside the bytes throws EINVAL (malformed input is an
// error, never a trap). Each check is a comparison against the count the
// optimizer can fold into a caller's earlier `count >= size` guard, so a
// fixed-layout decode after one length check compiles to bare loads.

import SystemPackage

/// Little-endian reads from borrowed bytes, by absolute offset or in sequence.
@frozen
public struct ByteReader {
  public let bytes: UnsafeRawBufferPointer
  /// Where the next sequential read starts.
  public var offset: Int

  @inlinable @inline(__always)
  public init(_ bytes: UnsafeRawBufferPointer, offset: Int = 0) {
    self.bytes = bytes
    self.offset = offset
  }

  @inlinable public var count: Int { bytes.count }
  /// Bytes after `offset` (0 once past the end).
  @inlinable public var remaining: Int { Swift.max(bytes.count - offset, 0) }

  /// Whether `[at, at + length)` lies inside the bytes (no overflow for any inputs).
  @inlinable @inline(__always)
  public func contains(_ at: Int, _ length: Int) -> Bool {
    at >= 0 && length >= 0 && at <= bytes.count && length <= bytes.count &- at
  }

  /// The `T` at byte `at`.
  @inlinable @inline(__always)
  public func load<T: FixedWidthInteger>(_: T.Type = T.self, at: Int) throws(Errno) -> T {
    guard at >= 0, at <= bytes.count &- MemoryLayout<T>.size else { throw .invalidArgument }
    return T(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self))
  }

  @inlinable @inline(__always)
  public func u8(at: Int) throws(Errno) -> UInt8 { try load(at: at) }
  @inlinable @inline(__always)
  public func u16(at: Int) throws(Errno) -> UInt16 { try load(at: at) }
  @inlinable @inline(__always)
  public func u32(at: Int) throws(Errno) -> UInt32 { try load(at: at) }
  @inlinable @inline(__always)
  public func u64(at: Int) throws(Errno) -> UInt64 { try load(at: at) }
  @inlinable @inline(__always)
  public func s32(at: Int) throws(Errno) -> Int32 { try load(at: at) }

  /// The `length` bytes at `at`, borrowed.
  @inlinable
  public func slice(at: Int, count length: Int) throws(Errno) -> UnsafeRawBufferPointer {
    guard contains(at, length) else { throw .invalidArgument }
    return UnsafeRawBufferPointer(rebasing: bytes[at..<(at + length)])
  }

  /// The bytes from `at` to the end, borrowed.
  @inlinable
  public func rest(from at: Int) throws(Errno) -> UnsafeRawBufferPointer {
    try slice(at: at, count: bytes.count &- at)
  }

  /// The next `T`, advancing `offset`.
  @inlinable @inline(__always)
  public mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) throws(Errno) -> T {
    let value: T = try load(at: offset)
    offset += MemoryLayout<T>.size
    return value
  }

  /// The next `length` bytes, borrowed, advancing `offset`.
  @inlinable
  public mutating func read(count length: Int) throws(Errno) -> UnsafeRawBufferPointer {
    let slice = try slice(at: offset, count: length)
    offset += length
    return slice
  }

  /// Runs `body` with a reader over `array`'s bytes (typed throws, which the
  /// standard `withUnsafeBytes` does not carry).
  @inlinable
  public static func reading<R>(
    _ array: [UInt8], _ body: (inout ByteReader) throws(Errno) -> R
  ) throws(Errno) -> R {
    let result: Result<R, Errno> = array.withUnsafeBytes { raw in
      var reader = ByteReader(raw)
      do throws(Errno) { return .success(try body(&reader)) } catch { return .failure(error) }
    }
    return try result.get()
  }
}

/// Little-endian writes into owned bytes: at fixed offsets of a zero-filled
/// layout (`init(count:)`, checked), or appended (`init(capacity:)`, growing).
public struct ByteWriter: Sendable {
  public var bytes: [UInt8]

  /// A zero-filled layout of `count` bytes, to be filled by offset.
  @inlinable
  public init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }

  /// An empty buffer to append to.
  @inlinable
  public init(capacity: Int = 0) {
    bytes = []
    bytes.reserveCapacity(capacity)
  }

  @inlinable public var count: Int { bytes.count }

  /// Stores `value` at byte `at`; throws EINVAL when it does not fit.
  @inlinable @inline(__always)
  public mutating func put<T: FixedWidthInteger>(_ value: T, at: Int) throws(Errno) {
    guard at >= 0, at <= bytes.count &- MemoryLayout<T>.size else { throw .invalidArgument }
    bytes.withUnsafeMutableBytes {
      $0.storeBytes(of: value.littleEndian, toByteOffset: at, as: T.self)
    }
  }

  /// Copies `data` to byte `at`; throws EINVAL when it does not fit.
  @inlinable
  public mutating func put(_ data: some Collection<UInt8>, at: Int) throws(Errno) {
    guard at >= 0, data.count <= bytes.count, at <= bytes.count &- data.count else {
      throw .invalidArgument
    }
    bytes.replaceSubrange(at..<(at + data.count), with: data)
  }

  /// Appends `value`.
  @inlinable
  public mutating func append<T: FixedWidthInteger>(_ value: T) {
    withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
  }

  /// Appends `data`.
  @inlinable
  public mutating func append(_ data: some Sequence<UInt8>) { bytes.append(contentsOf: data) }

  /// A reader over what has been written.
  @inlinable
  public func reading<R>(_ body: (inout ByteReader) throws(Errno) -> R) throws(Errno) -> R {
    try ByteReader.reading(bytes, body)
  }
}

extension UnsafeMutableRawBufferPointer {
  /// Stores `value` little-endian at `offset` of a buffer its encoder sized
  /// (`WirePayload.encodedSize`, a reply area the engine reserved): the
  /// in-place form the reply path writes with, checked in debug builds.
  @inlinable @inline(__always)
  public func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
  }
}
