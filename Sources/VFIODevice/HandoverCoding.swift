import SystemPackage
import VFIOUser

// Reading a handover blob: every read is checked, and a blob that ends early
// or names a descriptor it did not bring is refused with a sentence that says
// which field, never a trap. Devices and the shared pieces (`IRQEmulation`,
// `DirtyPageLog`) read their parts with these.

extension ByteReader {
  /// The next `T` of a handover blob; a refusal naming `field` when the blob ends first.
  public mutating func handoverField<T: FixedWidthInteger>(
    _ field: @autoclosure () -> String, as _: T.Type = T.self
  ) throws(HandoverRefusal) -> T {
    do throws(Errno) { return try read(T.self) } catch {
      throw HandoverRefusal.truncated(field(), at: offset, size: MemoryLayout<T>.size, of: count)
    }
  }

  /// The next `length` bytes of a handover blob, borrowed; a refusal naming
  /// `field` when the blob ends first.
  public mutating func handoverBytes(_ length: Int, _ field: @autoclosure () -> String)
    throws(HandoverRefusal) -> UnsafeRawBufferPointer
  {
    do throws(Errno) { return try read(count: length) } catch {
      throw HandoverRefusal.truncated(field(), at: offset, size: length, of: count)
    }
  }

  /// A boolean byte (0 or 1) of a handover blob.
  public mutating func handoverFlag(_ field: @autoclosure () -> String)
    throws(HandoverRefusal) -> Bool
  {
    let at = offset
    switch try handoverField(field(), as: UInt8.self) {
    case 0: return false
    case 1: return true
    case let value: throw HandoverRefusal.corrupt(field(), at: at, "\(value) is neither 0 nor 1")
    }
  }
}

extension ByteReader {
  /// Reads the header of section `tag` (`name`, for the refusals): a tag u32
  /// and a length u64. Returns a reader of its body, which ends with the
  /// section; offsets stay the blob's, so refusals name the blob's byte.
  public mutating func openHandoverSection(_ tag: UInt32, _ name: String)
    throws(HandoverRefusal) -> ByteReader
  {
    let at = offset
    let found: UInt32 = try handoverField("the \(name) section's tag")
    guard found == tag else {
      throw HandoverRefusal.corrupt(
        "a section tag", at: at, "section \(found) where section \(tag) (\(name)) belongs")
    }
    let length: UInt64 = try handoverField("the \(name) section's length")
    guard length <= UInt64(remaining) else {
      throw HandoverRefusal.truncated(
        "the \(name) section", at: offset, size: Int(clamping: length), of: count)
    }
    let end = offset + Int(length)
    return ByteReader(UnsafeRawBufferPointer(rebasing: bytes[..<end]), offset: offset)
  }

  /// Ends section `name`, whose `body` must have been read to its end; this
  /// reader goes on after it.
  public mutating func closeHandoverSection(_ body: ByteReader, _ name: String)
    throws(HandoverRefusal)
  {
    guard body.remaining == 0 else {
      throw HandoverRefusal.corrupt(
        "the \(name) section", at: body.offset, "\(body.remaining) bytes left unread")
    }
    offset = body.count
  }
}

extension ByteWriter {
  /// Writes section `tag` with its `body`: what `openHandoverSection` reads.
  public mutating func appendHandoverSection(_ tag: UInt32, _ body: ByteWriter) {
    append(tag)
    append(UInt64(body.count))
    append(body.bytes)
  }
}

extension OwnedFileDescriptors {
  /// Takes descriptor `index` of an imported handover for `field`: refused when
  /// the handover brought no such descriptor, or another field took it already.
  public mutating func takeHandover(_ index: UInt32, for field: @autoclosure () -> String)
    throws(HandoverRefusal) -> OwnedFileDescriptor
  {
    guard Int(index) < count else {
      throw HandoverRefusal(
        "the handover state names descriptor \(index) for \(field()), but only \(count) came with it"
      )
    }
    guard let descriptor = take(Int(index)) else {
      throw HandoverRefusal(
        "the handover state names descriptor \(index) for \(field()), which another field already took"
      )
    }
    return descriptor
  }
}

extension HandoverRefusal {
  /// The blob ends inside `field`.
  public static func truncated(_ field: String, at offset: Int, size: Int, of count: Int)
    -> HandoverRefusal
  {
    HandoverRefusal(
      "the handover state is truncated: \(field) (\(size) bytes at byte \(offset)) runs past its end (\(count) bytes)"
    )
  }

  /// `field` at byte `offset` holds a value no exporter writes.
  public static func corrupt(_ field: String, at offset: Int, _ why: String) -> HandoverRefusal {
    HandoverRefusal("the handover state is corrupt: \(field) at byte \(offset): \(why)")
  }
}

extension HandoverState {
  /// Where a blob names a descriptor: none (every other value indexes `descriptors`).
  public static let noDescriptor = UInt32.max
}
