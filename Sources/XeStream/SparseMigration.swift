import CVFIOUser
import SystemPackage
import VFIODevice
import VFIOUser

/// The sparse form of the Xe migration stream (protocol/sparse-migration.md),
/// which a connection uses when both ends negotiated
/// `"xe_vfio_user": {"sparse_migration": 1}` in VERSION: the Xe packet stream
/// byte for byte, except that the payload of each VRAM packet (type 6) is a
/// sequence of segments, each an 8-byte header (kind u8, 3 reserved bytes
/// that are 0, length u32, little-endian) and, for a data segment, its
/// `length` bytes. A zero segment's bytes are zero and do not follow. The
/// segments of a payload add up to exactly the packet header's `size`.
public enum SparseMigration {
  /// The version this code speaks, offered and echoed in VERSION.
  public static let version = Capabilities.sparseMigrationVersion
  public static let segmentHeaderSize = 8
  /// The longest segment this side writes (the format allows any u32 but 0).
  public static let maxSegment = 1 << 30
  static let page = 4096

  public enum SegmentKind: UInt8 {
    case data = 1
    case zeros = 2
  }

  /// The 8 bytes of a segment header.
  public static func segmentHeader(_ kind: SegmentKind, length: Int) -> UInt64 {
    UInt64(kind.rawValue) | UInt64(UInt32(length)) << 32
  }

  /// How the engine carries a device's Xe packet stream in this form: the
  /// transform the simulated VF and the kernel backends with an Xe PF offer.
  public static let transform: any MigrationStreamTransform = Transform()

  private struct Transform: MigrationStreamTransform {
    func encoding(_ source: any MigrationSource) -> any EncodingMigrationSource {
      SparseMigrationSource(source)
    }

    func decoding(into sink: any MigrationSink) -> any DecodingMigrationSink {
      SparseMigrationSink(sink)
    }
  }
}

/// Reads the sparse form: hands on the expanded stream as data pieces and
/// zero runs. Strict: a segment of an unknown kind, with reserved bytes set,
/// of length 0 or longer than what is left of its payload is EINVAL, and so
/// is everything after it.
public struct SparseStreamDecoder {
  private var framing = XePacketFraming()
  private var segmentHeader: UInt64 = 0
  private var segmentHeaderCount = 0
  private var dataLeft = 0
  /// The error that stopped the stream: it cannot be resynchronised.
  public private(set) var failure: Errno?

  public init() {}

  /// The bytes so far end between packets: nothing is cut.
  public var atBoundary: Bool { framing.atBoundary && segmentHeaderCount == 0 }

  /// Bytes of a VRAM data segment that come next, uninterrupted by framing;
  /// 0 when framing or a payload other than VRAM's comes next. A caller may
  /// hand such bytes on itself (received in place) and `consumeData` them.
  public var vramDataAhead: Int {
    failure == nil && framing.inPayload && framing.inVRAM ? dataLeft : 0
  }

  /// How many bytes `decode` must see before `vramDataAhead` can change (at least 1).
  public var bytesUntilNextDecision: Int {
    if !framing.inPayload { return framing.headerBytesLeft }
    if !framing.inVRAM { return Int(clamping: framing.payloadLeft) }
    return dataLeft > 0 ? dataLeft : SparseMigration.segmentHeaderSize - segmentHeaderCount
  }

  /// Takes `count` bytes of the current data segment that the caller handed
  /// on itself, as `decode` would have emitted them.
  public mutating func consumeData(_ count: Int) {
    precondition(count <= vramDataAhead, "more than the data segment holds")
    framing.consumePayload(count)
    dataLeft -= count
  }

  /// Decodes `bytes` (the next piece of the sparse stream, any segmentation),
  /// calling `emit` with the expanded stream in order. An error from `emit`
  /// also ends the stream.
  public mutating func decode(
    _ bytes: UnsafeRawBufferPointer, _ emit: (XeStreamSegment) throws(Errno) -> Void
  ) throws(Errno) {
    if let failure { throw failure }
    do throws(Errno) {
      var rest = bytes
      while !rest.isEmpty {
        let n: Int
        if !framing.inPayload {
          n = framing.takeHeader(rest)
          try emit(.data(UnsafeRawBufferPointer(rebasing: rest[0..<n])))
        } else if !framing.inVRAM || dataLeft > 0 {
          let limit = framing.inVRAM ? UInt64(dataLeft) : framing.payloadLeft
          n = Int(min(limit, UInt64(rest.count)))
          try emit(.data(UnsafeRawBufferPointer(rebasing: rest[0..<n])))
          framing.consumePayload(n)
          if framing.inVRAM { dataLeft -= n }
        } else {
          n = min(SparseMigration.segmentHeaderSize - segmentHeaderCount, rest.count)
          withUnsafeMutableBytes(of: &segmentHeader) {
            UnsafeMutableRawBufferPointer(
              rebasing: $0[segmentHeaderCount..<(segmentHeaderCount + n)]
            ).copyMemory(from: UnsafeRawBufferPointer(rebasing: rest[0..<n]))
          }
          segmentHeaderCount += n
          if segmentHeaderCount == SparseMigration.segmentHeaderSize {
            segmentHeaderCount = 0
            try beginSegment(emit)
          }
        }
        rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      }
    } catch {
      failure = error
      throw error
    }
  }

  /// `decode` for a caller whose `emit` throws any error: that error comes
  /// out as it was; a malformed stream is `MalformedSparseStream`.
  public mutating func decode(
    _ bytes: UnsafeRawBufferPointer, _ emit: (XeStreamSegment) throws -> Void
  ) throws {
    var failure: (any Error)?
    do throws(Errno) {
      try decode(bytes) { segment throws(Errno) in
        do { try emit(segment) } catch {
          failure = error
          throw .ioError
        }
      }
    } catch {
      throw failure ?? MalformedSparseStream(errno: error)
    }
  }

  private mutating func beginSegment(_ emit: (XeStreamSegment) throws(Errno) -> Void)
    throws(Errno)
  {
    let word = UInt64(littleEndian: segmentHeader)
    let kind = SparseMigration.SegmentKind(rawValue: UInt8(truncatingIfNeeded: word))
    let reserved = (word >> 8) & 0xFF_FFFF
    let length = Int(word >> 32)
    guard let kind, reserved == 0, length > 0, UInt64(length) <= framing.payloadLeft else {
      throw .invalidArgument
    }
    switch kind {
    case .data: dataLeft = length
    case .zeros:
      try emit(.zeros(length))
      framing.consumePayload(length)
    }
  }
}

/// A sparse stream that breaks the form's rules (EINVAL): it cannot be resynchronised.
public struct MalformedSparseStream: Error, CustomStringConvertible {
  public var errno: Errno
  public var description: String { "the sparse migration stream is malformed (\(errno.name))" }
}

/// Writes the sparse form from the expanded stream given as data pieces and
/// zero runs (a checkpoint's records): data inside a VRAM payload gets a
/// data segment header, a zero run inside one becomes a zero segment, and
/// zeros anywhere else are written out as bytes (the packet headers and
/// other payloads pass as they are).
public struct SparseStreamBuilder {
  private var framing = XePacketFraming()

  public init() {}

  /// The bytes so far end between packets: nothing is cut.
  public var atBoundary: Bool { framing.atBoundary }

  /// Appends `segment`, calling `write` with the sparse bytes in order.
  public mutating func append(
    _ segment: XeStreamSegment, _ write: (UnsafeRawBufferPointer) throws -> Void
  ) rethrows {
    switch segment {
    case .data(var rest):
      while !rest.isEmpty {
        let n: Int
        if !framing.inPayload {
          n = framing.takeHeader(rest)
        } else {
          n = Int(min(framing.payloadLeft, UInt64(min(rest.count, SparseMigration.maxSegment))))
          if framing.inVRAM { try header(.data, n, write) }
          framing.consumePayload(n)
        }
        try write(UnsafeRawBufferPointer(rebasing: rest[0..<n]))
        rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      }
    case .zeros(var left):
      while left > 0 {
        if framing.inPayload, framing.inVRAM {
          let n = Int(min(framing.payloadLeft, UInt64(min(left, SparseMigration.maxSegment))))
          try header(.zeros, n, write)
          framing.consumePayload(n)
          left -= n
        } else {
          let n = min(left, ZeroMemory.chunk.count)
          try append(
            .data(UnsafeRawBufferPointer(rebasing: ZeroMemory.chunk[0..<n])), write)
          left -= n
        }
      }
    }
  }

  private func header(
    _ kind: SparseMigration.SegmentKind, _ length: Int,
    _ write: (UnsafeRawBufferPointer) throws -> Void
  ) rethrows {
    var word = SparseMigration.segmentHeader(kind, length: length).littleEndian
    try withUnsafeBytes(of: &word) { try write($0) }
  }
}

/// A restore stream that takes the sparse form (`MIG_DATA_WRITE` on a
/// connection that negotiated it): data goes to the device's stream as it
/// is, zero runs through `MigrationSink.writeZeros`, so a device that can
/// zero its memory cheaply never sees the zero bytes. The device's stream
/// sees exactly the Xe packets the source's PF produced.
public final class SparseMigrationSink: DecodingMigrationSink {
  public let inner: any MigrationSink
  private var decoder = SparseStreamDecoder()

  public init(_ inner: any MigrationSink) { self.inner = inner }

  public func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let inner = self.inner
    try decoder.decode(bytes) { segment throws(Errno) in
      switch segment {
      case .data(var rest):
        while !rest.isEmpty {
          let n = try inner.write(rest)
          guard n > 0 else { throw .ioError }
          rest = UnsafeRawBufferPointer(rebasing: rest[n...])
        }
      case .zeros(var left):
        while left > 0 {
          let n = try inner.writeZeros(left)
          guard n > 0 else { throw .ioError }
          left -= n
        }
      }
    }
    return bytes.count
  }

  /// Zero runs are the decoder's to produce: nothing feeds this sink expanded zeros.
  public func writeZeros(_ count: Int) throws(Errno) -> Int { throw .invalidArgument }

  /// Inside a VRAM data segment, the memory the inner stream offers for its
  /// bytes (a MIG_DATA_WRITE's data received straight into VRAM, as on a
  /// connection without the sparse form); elsewhere the bytes go through
  /// `write`, up to where a data segment may begin, so they are decoded first.
  public func placement(ofNext count: Int) -> MigrationPlacement {
    let data = decoder.vramDataAhead
    guard data > 0 else { return .write(max(1, min(count, decoder.bytesUntilNextDecision))) }
    switch inner.placement(ofNext: min(count, data)) {
    case .memory(let span): return .memory(span)
    case .write(let n): return .write(max(1, min(n, data)))
    }
  }

  public func placed(_ count: Int) throws(Errno) {
    guard count <= decoder.vramDataAhead else { throw .invalidArgument }
    try inner.placed(count)
    decoder.consumeData(count)
  }

  public func close() { inner.close() }
}

/// A save stream in the sparse form (`MIG_DATA_READ` on a connection that
/// negotiated it): reads the device's stream and cuts each VRAM payload into
/// data segments and zero segments, pages counted from the payload's start
/// (`cvfu_all_zero` on each: a page with data fails on its first words, so
/// VRAM full of data costs little to scan). VRAM the device offers in place
/// (`read(gathering:)`) is scanned there and its data leaves from there.
///
/// Every reply is filled, as the raw stream's are, so a short one still
/// means the end.
public final class SparseMigrationSource: EncodingMigrationSource {
  public let inner: any MigrationSource
  private var framing = XePacketFraming()
  private let staging: UnsafeMutableRawBufferPointer
  /// Raw bytes read but not yet encoded: `staging[staged]`, then `span`.
  private var staged = 0..<0
  private var span = UnsafeRawBufferPointer(start: nil, count: 0)
  private var ended = false
  /// A segment header, and how much of it is written.
  private var header: UInt64 = 0
  private var headerWritten = SparseMigration.segmentHeaderSize
  /// Bytes of the current data segment still to write.
  private var dataLeft = 0
  /// Payload bytes of the current VRAM packet before this point (for page boundaries).
  private var payloadOffset: UInt64 = 0

  public init(_ inner: any MigrationSource, staging size: Int = 1 << 20) {
    self.inner = inner
    staging = .allocate(byteCount: size, alignment: 4096)
  }

  deinit { staging.deallocate() }

  public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    try produce(buffer, inPlace: false).count
  }

  public func read(gathering buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> (
    count: Int, span: UnsafeRawBufferPointer?
  ) {
    try produce(buffer, inPlace: true)
  }

  public func close() { inner.close() }

  private func produce(_ out: UnsafeMutableRawBufferPointer, inPlace: Bool) throws(Errno) -> (
    count: Int, span: UnsafeRawBufferPointer?
  ) {
    var filled = 0
    func put(_ bytes: UnsafeRawBufferPointer) {
      UnsafeMutableRawBufferPointer(rebasing: out[filled..<(filled + bytes.count)]).copyMemory(
        from: bytes)
      filled += bytes.count
    }
    while filled < out.count {
      if headerWritten < SparseMigration.segmentHeaderSize {
        let n = min(SparseMigration.segmentHeaderSize - headerWritten, out.count - filled)
        withUnsafeBytes(of: &header) {
          put(UnsafeRawBufferPointer(rebasing: $0[headerWritten..<(headerWritten + n)]))
        }
        headerWritten += n
        continue
      }
      if staged.isEmpty, span.isEmpty {
        if ended { break }
        let (n, gathered) = try inner.read(gathering: staging)
        staged = 0..<n
        span = gathered ?? UnsafeRawBufferPointer(start: nil, count: 0)
        if n == 0, span.isEmpty { ended = true }
        continue
      }
      let fromSpan = staged.isEmpty
      let raw = fromSpan ? span : UnsafeRawBufferPointer(rebasing: staging[staged])
      let space = out.count - filled
      if !framing.inPayload {
        let n = framing.takeHeader(UnsafeRawBufferPointer(rebasing: raw[0..<min(raw.count, space)]))
        put(UnsafeRawBufferPointer(rebasing: raw[0..<n]))
        payloadOffset = 0
        consume(n, fromSpan: fromSpan)
      } else if !framing.inVRAM || dataLeft > 0 {
        let limit = framing.inVRAM ? UInt64(dataLeft) : framing.payloadLeft
        let n = Int(min(limit, UInt64(min(raw.count, space))))
        let piece = UnsafeRawBufferPointer(rebasing: raw[0..<n])
        advance(n, fromSpan: fromSpan)
        if inPlace, fromSpan, n == space {
          return (filled, piece)  // the reply ends with bytes of device memory: sent from there
        }
        put(piece)
      } else {
        segment(
          UnsafeRawBufferPointer(
            rebasing: raw[0..<Int(min(UInt64(raw.count), framing.payloadLeft))]))
      }
    }
    return (filled, nil)
  }

  /// Consumes `n` raw bytes.
  private func consume(_ n: Int, fromSpan: Bool) {
    if fromSpan {
      span = UnsafeRawBufferPointer(rebasing: span[n...])
    } else {
      staged = (staged.lowerBound + n)..<staged.upperBound
    }
  }

  /// Consumes `n` raw bytes of the current payload.
  private func advance(_ n: Int, fromSpan: Bool) {
    consume(n, fromSpan: fromSpan)
    framing.consumePayload(n)
    payloadOffset += UInt64(n)
    if framing.inVRAM, dataLeft > 0 { dataLeft -= n }
  }

  /// Starts the next segment of a VRAM payload from `raw` (what is at hand
  /// of it): a run of zero pages, or of pages with data. A zero segment's
  /// bytes are consumed here; a data segment's are written after its header.
  private func segment(_ raw: UnsafeRawBufferPointer) {
    var length = 0
    var zero = false
    if ZeroMemory.holds(raw) {  // a hole of VRAM, gathered as zeros: nothing to scan
      length = min(raw.count, SparseMigration.maxSegment)
      zero = true
    }
    while length < raw.count, length < SparseMigration.maxSegment {
      let offset = payloadOffset + UInt64(length)
      let toPage = SparseMigration.page - Int(offset % UInt64(SparseMigration.page))
      let piece = min(toPage, raw.count - length)
      let pieceZero = cvfu_all_zero(raw.baseAddress! + length, piece)
      if length > 0, pieceZero != zero { break }
      zero = pieceZero
      length += piece
    }
    header = SparseMigration.segmentHeader(zero ? .zeros : .data, length: length).littleEndian
    headerWritten = 0
    if zero {
      advance(length, fromSpan: staged.isEmpty)
    } else {
      dataLeft = length
    }
  }
}
