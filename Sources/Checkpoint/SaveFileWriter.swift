import CVFIOUser
import CZstd
import XeStream

/// Where a checkpoint's bytes go: `save`'s file, pipe or device, a bench's
/// /dev/null, a test's memory. A write takes all the bytes or throws.
public protocol SaveFileSink: AnyObject {
  func write(_ bytes: UnsafeRawBufferPointer) throws
}

extension SaveFileSink {
  public func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }
}

/// Builds a save file around the stream: `header`, then every chunk of the
/// stream through `append` (in order, any segmentation), then `finish`.
/// Zero pages of VRAM packets become zero records, other bytes stored or
/// zstd records; `XeStreamScanner` finds the pages, `Compressor` decides.
public final class SaveFileWriter {
  /// False only in `bench`, to measure what the checksums cost.
  public var checksummed = true
  /// False in `bench` (a container that stores everything) and `--no-elide`.
  public var elideZeros = true
  public var compress = true
  public private(set) var crc: UInt32 = 0
  public private(set) var streamBytes: UInt64 = 0
  /// Stream bytes appended so far (expanded: a sparse stream's zero runs count).
  public private(set) var appendedBytes: UInt64 = 0
  public private(set) var records: UInt64 = 0
  private let scanner = XeStreamScanner()
  private let pending: UnsafeMutableRawBufferPointer
  private var pendingCount = 0
  private var zeroRun = 0
  private let compressor = Compressor()
  /// Small records (a page of data, a zero run) gathered into one write.
  private let outBuffer: UnsafeMutableRawBufferPointer
  private var outCount = 0

  /// Data records hold at most this much, so compression and the reader's
  /// buffers stay small; a span this long is written from the caller's buffer.
  public static let dataRecord = 1 << 20
  /// Shorter data spans are gathered into one record instead.
  public static let directSpan = 64 << 10

  public init() {
    pending = .allocate(byteCount: Self.dataRecord, alignment: 4096)
    outBuffer = .allocate(byteCount: Self.dataRecord, alignment: 4096)
  }

  deinit {
    pending.deallocate()
    outBuffer.deallocate()
  }

  /// The header's bytes around `json`, the header's JSON part (the
  /// caller's encoding of what identifies the device); its CRC seeds the
  /// record chain.
  public func header(json: [UInt8]) -> [UInt8] {
    crc = json.withUnsafeBytes { cvfu_crc32c(0, $0.baseAddress, $0.count) }
    var bytes = SaveFormat.magic
    bytes += le(SaveFormat.version) + le(UInt32(json.count)) + le(crc) + le(UInt32(0))
    bytes += le(UInt64(0))  // file length: unknown until the end
    return bytes + json
  }

  /// The stream arrives in the sparse form (the device's connection
  /// negotiated it): its zero segments are the zero records, with no scan.
  public var sparseInput = false
  private var decoder = SparseStreamDecoder()

  /// Adds the next bytes of the stream, writing the records they complete.
  public func append(_ data: UnsafeRawBufferPointer, to out: any SaveFileSink) throws {
    if sparseInput { return try appendSparse(data, to: out) }
    appendedBytes += UInt64(data.count)
    guard elideZeros else { return try emitData(data, to: out) }
    // Each segment is written before the scanner goes on: a span may point into its carry.
    try scanner.scan(data) { segment in
      switch segment {
      case .data(let span): try emitData(span, to: out)
      case .zeros(let count): try emitZeros(count, to: out)
      }
    }
  }

  private func appendSparse(_ data: UnsafeRawBufferPointer, to out: any SaveFileSink) throws {
    try decoder.decode(data) { (segment: XeStreamSegment) throws in
      switch segment {
      case .data(let span):
        appendedBytes += UInt64(span.count)
        try emitData(span, to: out)
      case .zeros(let count):
        appendedBytes += UInt64(count)
        try emitZeros(count, to: out)
      }
    }
  }

  /// Writes what is still held (a partial page, gathered data, a zero run) and the end record.
  public func finish(to out: any SaveFileSink) throws {
    if sparseInput, !decoder.atBoundary {
      throw SaveFileError("the device's sparse stream ends inside a packet")
    }
    if let tail = scanner.flush() { try emitData(tail, to: out) }
    try flushPending(to: out)
    try flushZeros(to: out)
    let body = SaveFormat.endMagic + le(streamBytes) + le(records)
    try body.withUnsafeBytes { try writeRecord(.end, streamLength: 0, body: $0, to: out) }
    try flushOutput(to: out)
  }

  private func flushOutput(to out: any SaveFileSink) throws {
    guard outCount > 0 else { return }
    try out.write(UnsafeRawBufferPointer(rebasing: outBuffer[0..<outCount]))
    outCount = 0
  }

  private func emitData(_ span: UnsafeRawBufferPointer, to out: any SaveFileSink) throws {
    guard !span.isEmpty else { return }
    try flushZeros(to: out)
    if span.count >= Self.directSpan {
      try flushPending(to: out)
      var rest = span
      while !rest.isEmpty {
        let n = min(rest.count, Self.dataRecord)
        try writeData(UnsafeRawBufferPointer(rebasing: rest[0..<n]), to: out)
        rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      }
      return
    }
    if pendingCount + span.count > pending.count { try flushPending(to: out) }
    UnsafeMutableRawBufferPointer(rebasing: pending[pendingCount..<(pendingCount + span.count)])
      .copyMemory(from: span)
    pendingCount += span.count
  }

  private func emitZeros(_ count: Int, to out: any SaveFileSink) throws {
    try flushPending(to: out)
    zeroRun += count
    while zeroRun >= SaveFormat.maxRecord {
      try writeRecord(.zeros, streamLength: SaveFormat.maxRecord, body: nil, to: out)
      zeroRun -= SaveFormat.maxRecord
    }
  }

  private func flushPending(to out: any SaveFileSink) throws {
    guard pendingCount > 0 else { return }
    try writeData(UnsafeRawBufferPointer(rebasing: pending[0..<pendingCount]), to: out)
    pendingCount = 0
  }

  private func flushZeros(to out: any SaveFileSink) throws {
    guard zeroRun > 0 else { return }
    try writeRecord(.zeros, streamLength: zeroRun, body: nil, to: out)
    zeroRun = 0
  }

  /// A stored or a zstd record, whichever the compressor says pays.
  private func writeData(_ data: UnsafeRawBufferPointer, to out: any SaveFileSink) throws {
    if compress, let frame = compressor.compress(data) {
      try writeRecord(.zstd, streamLength: data.count, body: frame, to: out)
    } else {
      try writeRecord(.stored, streamLength: data.count, body: data, to: out)
    }
  }

  private func writeRecord(
    _ kind: SaveRecordKind, streamLength: Int, body: UnsafeRawBufferPointer?,
    to out: any SaveFileSink
  ) throws {
    let bodyCount = body?.count ?? 0
    var head = le(UInt32(bodyCount)) + le(UInt32(0)) + le(UInt32(streamLength))
    head += [kind.rawValue, 0, 0, 0]
    if checksummed || kind == .end {
      crc = head.withUnsafeBytes { cvfu_crc32c(crc, $0.baseAddress! + 8, 8) }
      if let body { crc = cvfu_crc32c(crc, body.baseAddress, body.count) }
    }
    head.replaceSubrange(4..<8, with: le(crc))
    if head.count + bodyCount <= Self.directSpan {
      if outCount + head.count + bodyCount > outBuffer.count { try flushOutput(to: out) }
      head.withUnsafeBytes {
        UnsafeMutableRawBufferPointer(rebasing: outBuffer[outCount...]).copyMemory(from: $0)
      }
      outCount += head.count
      if let body, bodyCount > 0 {
        UnsafeMutableRawBufferPointer(rebasing: outBuffer[outCount...]).copyMemory(from: body)
        outCount += bodyCount
      }
    } else {
      try flushOutput(to: out)
      try out.write(head)
      if let body, !body.isEmpty { try out.write(body) }
    }
    if kind != .end {
      streamBytes += UInt64(streamLength)
      records += 1
    }
  }
}

/// zstd for data records, where it pays: a record is compressed only when
/// a sample of it shrinks by an eighth, and after a record that did not pay
/// the next ones are stored without trying, for twice as many each time (up
/// to 256), so VRAM full of incompressible data costs a few probes in all.
final class Compressor {
  private let context: OpaquePointer
  private let scratch: UnsafeMutableRawBufferPointer
  private var skip = 0
  private var backoff = 1
  static let sample = 64 << 10

  init() {
    context = ZSTD_createCCtx()
    ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, 1)
    // The frame's own checksum (XXH64) checks the expanded bytes too.
    ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1)
    scratch = .allocate(
      byteCount: ZSTD_compressBound(SaveFileWriter.dataRecord), alignment: 4096)
  }

  deinit {
    ZSTD_freeCCtx(context)
    scratch.deallocate()
  }

  /// The zstd frame of `data` (valid until the next call), or nil when storing it is better.
  func compress(_ data: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
    if skip > 0 {
      skip -= 1
      return nil
    }
    if data.count > 2 * Self.sample {
      let probe = UnsafeRawBufferPointer(rebasing: data[0..<Self.sample])
      guard let n = frame(probe), n < Self.sample - Self.sample / 8 else { return giveUp() }
    }
    guard let n = frame(data), n < data.count - data.count / 8 else { return giveUp() }
    backoff = 1
    return UnsafeRawBufferPointer(rebasing: scratch[0..<n])
  }

  private func frame(_ data: UnsafeRawBufferPointer) -> Int? {
    let n = ZSTD_compress2(
      context, scratch.baseAddress, scratch.count, data.baseAddress, data.count)
    return ZSTD_isError(n) != 0 ? nil : n
  }

  private func giveUp() -> UnsafeRawBufferPointer? {
    skip = backoff
    backoff = min(backoff * 2, 256)
    return nil
  }
}
