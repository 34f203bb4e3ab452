import CVFIOUser
import CZstd
import FoundationEssentials
import Synchronization
import SystemPackage
import VFIODevice

#if canImport(Glibc)
  import Glibc
#endif

/// The save file: a header that identifies the device, the migration stream
/// cut into CRC-checked records, and an end record that seals its length
/// (protocol/save-format.md). The CRCs are chained, each record's seeded with
/// the one before, so a damaged, missing, repeated or reordered record, and
/// a file cut short, are all caught before the destination may run. A record
/// holds its stream bytes as they are, as a count of zero bytes (zero pages
/// of VRAM packets), or as a zstd frame (where compressing pays).
enum SaveFormat {
  static let magic = Array("XEVFUSAV".utf8)
  /// What `save` writes; `restore` also reads version 2 (records stored as they are).
  static let version: UInt32 = 3
  static let readableVersions: ClosedRange<UInt32> = 2...3
  /// magic, version, JSON length, JSON CRC, reserved, file length.
  static let fixedHeaderSize = 32
  /// The file-length field, filled in once a seekable output is complete.
  static let fileLengthOffset: Int64 = 24
  static let maxHeaderJSON = 1 << 20
  /// Version 2: length u32, CRC u32.
  static let recordHeaderSizeV2 = 8
  /// Version 3: body length u32, CRC u32, stream length u32, kind u8, 3 reserved.
  static let recordHeaderSize = 16
  /// No record expands to more stream bytes than this (nor holds a longer
  /// body), so a reader never buffers more.
  static let maxRecord = 16 << 20
  static let endMagic = Array("XEVFUEND".utf8)
  /// The end record's body: magic, stream bytes u64, records u64.
  static let endBodySize = 24
}

/// How a version 3 record holds its stream bytes.
enum SaveRecordKind: UInt8 {
  /// The body is the stream bytes.
  case stored = 1
  /// No body: the stream bytes are zeros (whole zero pages of VRAM packets).
  case zeros = 2
  /// The body is one zstd frame (with its content checksum) of the stream bytes.
  case zstd = 3
  /// The end record: its body is `SaveFormat.endBodySize` bytes.
  case end = 4
}

/// The header's JSON part.
struct SaveFileHeader: Codable {
  var identity: DeviceIdentity
  var estimatedBytes: UInt64
  /// ISO 8601; absent with `save --no-timestamp`.
  var created: String?
  var source: String
}

/// When a checkpoint was made: now, or SOURCE_DATE_EPOCH when it is set
/// (the reproducible-builds convention), so a save can be made byte for byte again.
func checkpointTimestamp(
  environment: String? = getenv("SOURCE_DATE_EPOCH").map { String(cString: $0) }
)
  throws -> String
{
  guard let environment else { return Date.now.formatted(.iso8601) }
  guard let seconds = Int64(environment), seconds >= 0 else {
    throw CLIError(
      "SOURCE_DATE_EPOCH=\(environment) is not a number of seconds since 1970; unset it or give one"
    )
  }
  return Date(timeIntervalSince1970: Double(seconds)).formatted(.iso8601)
}

/// Builds a save file around the stream: `header`, then every chunk of the
/// stream through `append` (in order, any segmentation), then `finish`.
/// Zero pages of VRAM packets become zero records, other bytes stored or
/// zstd records; `XeStreamScanner` finds the pages, `Compressor` decides.
final class SaveFileWriter {
  /// False only in `bench`, to measure what the checksums cost.
  var checksummed = true
  /// False in `bench` (a container that stores everything) and `--no-elide`.
  var elideZeros = true
  var compress = true
  private(set) var crc: UInt32 = 0
  private(set) var streamBytes: UInt64 = 0
  /// Stream bytes appended so far (expanded: a sparse stream's zero runs count).
  private(set) var appendedBytes: UInt64 = 0
  private(set) var records: UInt64 = 0
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
  static let dataRecord = 1 << 20
  /// Shorter data spans are gathered into one record instead.
  static let directSpan = 64 << 10

  init() {
    pending = .allocate(byteCount: Self.dataRecord, alignment: 4096)
    outBuffer = .allocate(byteCount: Self.dataRecord, alignment: 4096)
  }

  deinit {
    pending.deallocate()
    outBuffer.deallocate()
  }

  /// The header's bytes; its JSON CRC seeds the record chain.
  func header(_ header: SaveFileHeader) throws -> [UInt8] {
    // Keys in one order, so two saves of one state differ only in `created`.
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    let json = Array(try encoder.encode(header))
    crc = json.withUnsafeBytes { cvfu_crc32c(0, $0.baseAddress, $0.count) }
    var bytes = SaveFormat.magic
    bytes += le(SaveFormat.version) + le(UInt32(json.count)) + le(crc) + le(UInt32(0))
    bytes += le(UInt64(0))  // file length: unknown until the end
    return bytes + json
  }

  /// The stream arrives in the sparse form (the device's connection
  /// negotiated it): its zero segments are the zero records, with no scan.
  var sparseInput = false
  private var decoder = SparseStreamDecoder()

  /// Adds the next bytes of the stream, writing the records they complete.
  func append(_ data: UnsafeRawBufferPointer, to out: SaveOutput) throws {
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

  private func appendSparse(_ data: UnsafeRawBufferPointer, to out: SaveOutput) throws {
    try decode(&decoder, data) { segment in
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
  func finish(to out: SaveOutput) throws {
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

  private func flushOutput(to out: SaveOutput) throws {
    guard outCount > 0 else { return }
    try out.write(UnsafeRawBufferPointer(rebasing: outBuffer[0..<outCount]))
    outCount = 0
  }

  private func emitData(_ span: UnsafeRawBufferPointer, to out: SaveOutput) throws {
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

  private func emitZeros(_ count: Int, to out: SaveOutput) throws {
    try flushPending(to: out)
    zeroRun += count
    while zeroRun >= SaveFormat.maxRecord {
      try writeRecord(.zeros, streamLength: SaveFormat.maxRecord, body: nil, to: out)
      zeroRun -= SaveFormat.maxRecord
    }
  }

  private func flushPending(to out: SaveOutput) throws {
    guard pendingCount > 0 else { return }
    try writeData(UnsafeRawBufferPointer(rebasing: pending[0..<pendingCount]), to: out)
    pendingCount = 0
  }

  private func flushZeros(to out: SaveOutput) throws {
    guard zeroRun > 0 else { return }
    try writeRecord(.zeros, streamLength: zeroRun, body: nil, to: out)
    zeroRun = 0
  }

  /// A stored or a zstd record, whichever the compressor says pays.
  private func writeData(_ data: UnsafeRawBufferPointer, to out: SaveOutput) throws {
    if compress, let frame = compressor.compress(data) {
      try writeRecord(.zstd, streamLength: data.count, body: frame, to: out)
    } else {
      try writeRecord(.stored, streamLength: data.count, body: data, to: out)
    }
  }

  private func writeRecord(
    _ kind: SaveRecordKind, streamLength: Int, body: UnsafeRawBufferPointer?, to out: SaveOutput
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

/// Finds the zero pages inside VRAM packets of an Xe migration stream
/// (protocol/xe-migration-stream.md) as it goes by in chunks of any size:
/// it follows the 24-byte packet headers, and cuts each VRAM payload into
/// 4 KiB pages counted from the payload's start, holding a page split
/// between chunks until it is whole. Everything else is data. It judges
/// nothing: a stream it cannot follow is still carried byte for byte.
final class XeStreamScanner {
  enum Segment {
    case data(UnsafeRawBufferPointer)
    case zeros(Int)
  }

  static let page = 4096
  private var header = [UInt8](repeating: 0, count: XeStreamScanner.headerSize)
  private var headerCount = 0
  private var payloadLeft: UInt64 = 0
  private var inVRAM = false
  /// A VRAM page split between chunks (and, once the stream ends, its tail).
  private let carry: UnsafeMutableRawBufferPointer
  private var carryCount = 0
  private static let headerSize = 24
  private static let vramType: UInt8 = 6

  init() { carry = .allocate(byteCount: Self.page, alignment: 64) }
  deinit { carry.deallocate() }

  /// Calls `emit` with the segments of `data`, in order; spans point into `data` or the carry.
  func scan(_ data: UnsafeRawBufferPointer, emit: (Segment) throws -> Void) rethrows {
    var at = 0
    while at < data.count {
      if payloadLeft == 0 {
        // A header, whole or in pieces: it is data.
        let n = min(Self.headerSize - headerCount, data.count - at)
        header.withUnsafeMutableBytes {
          UnsafeMutableRawBufferPointer(rebasing: $0[headerCount..<(headerCount + n)]).copyMemory(
            from: UnsafeRawBufferPointer(rebasing: data[at..<(at + n)]))
        }
        try emit(.data(UnsafeRawBufferPointer(rebasing: data[at..<(at + n)])))
        headerCount += n
        at += n
        if headerCount == Self.headerSize {
          headerCount = 0
          payloadLeft = load(header, 16)
          inVRAM = header[1] == Self.vramType
        }
        continue
      }
      let n = Int(min(payloadLeft, UInt64(data.count - at)))
      let payload = UnsafeRawBufferPointer(rebasing: data[at..<(at + n)])
      if inVRAM { try scanVRAM(payload, emit: emit) } else { try emit(.data(payload)) }
      payloadLeft -= UInt64(n)
      at += n
      if payloadLeft == 0, carryCount > 0 {
        // A payload that is not whole pages: its last piece is data.
        try emit(.data(UnsafeRawBufferPointer(rebasing: carry[0..<carryCount])))
        carryCount = 0
      }
    }
  }

  /// What is held when the stream ends (a stream cut inside a page), or nil.
  func flush() -> UnsafeRawBufferPointer? {
    defer { carryCount = 0 }
    return carryCount > 0 ? UnsafeRawBufferPointer(rebasing: carry[0..<carryCount]) : nil
  }

  private func scanVRAM(_ bytes: UnsafeRawBufferPointer, emit: (Segment) throws -> Void) rethrows {
    var rest = bytes
    if carryCount > 0 {
      let n = min(Self.page - carryCount, rest.count)
      UnsafeMutableRawBufferPointer(rebasing: carry[carryCount..<(carryCount + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: rest[0..<n]))
      carryCount += n
      rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      guard carryCount == Self.page else { return }
      carryCount = 0
      if cvfu_all_zero(carry.baseAddress, Self.page) {
        try emit(.zeros(Self.page))
      } else {
        try emit(.data(UnsafeRawBufferPointer(carry)))
      }
    }
    // Whole pages: runs of data and runs of zeros.
    var runStart = 0
    var runZero = false
    var at = 0
    while at + Self.page <= rest.count {
      let zero = cvfu_all_zero(rest.baseAddress! + at, Self.page)
      if zero != runZero, at > runStart {
        let run = UnsafeRawBufferPointer(rebasing: rest[runStart..<at])
        try emit(runZero ? .zeros(run.count) : .data(run))
        runStart = at
      }
      runZero = zero
      at += Self.page
    }
    if at > runStart {
      let run = UnsafeRawBufferPointer(rebasing: rest[runStart..<at])
      try emit(runZero ? .zeros(run.count) : .data(run))
    }
    // A page cut by the chunk's end waits for the rest of it.
    if at < rest.count {
      UnsafeMutableRawBufferPointer(rebasing: carry[0..<(rest.count - at)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: rest[at...]))
      carryCount = rest.count - at
    }
  }
}

/// Why a save file cannot be restored, said so a person can act on it.
struct SaveFileError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// Reads and checks a save file from `input`: `readHeader()`, then
/// `readRecords(into:)` until it says the end record was verified.
/// Nothing unverified is ever returned: a record's CRC is checked before its
/// body is expanded, and a zstd frame must expand to exactly the length its
/// record states, with its own checksum right.
final class SaveFileReader {
  let input: FileDescriptor
  let name: String
  /// The file's whole length when known (header field or file size), for messages.
  private(set) var declaredLength: UInt64 = 0
  private(set) var position: UInt64 = 0
  /// `position` for another thread (a progress line).
  let bytesRead = Atomic<UInt64>(0)
  private(set) var version: UInt32 = 0
  private var crc: UInt32 = 0
  private var streamBytes: UInt64 = 0
  private var records: UInt64 = 0
  /// A zstd record's body, before it is expanded.
  private var body: UnsafeMutableRawBufferPointer?
  private var decompressor: OpaquePointer?

  init(input: FileDescriptor, name: String) {
    self.input = input
    self.name = name
  }

  deinit {
    body?.deallocate()
    if let decompressor { ZSTD_freeDCtx(decompressor) }
  }

  /// Reads the regular file at `path` to its end through every check a
  /// restore makes (header, each record's chained CRC, each zstd frame, the
  /// end record and nothing after it), without keeping what it reads: a
  /// damaged file is refused before the device leaves its state.
  static func verifyWholeFile(at path: String, name: String) throws {
    let fd: FileDescriptor
    do { fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec]) } catch {
      throw EndError(end: "opening \(name)", underlying: error)
    }
    defer { try? fd.close() }
    _ = posix_fadvise(fd.rawValue, 0, 0, Int32(POSIX_FADV_SEQUENTIAL))
    let reader = SaveFileReader(input: fd, name: name)
    _ = try reader.readHeader()
    let buffer = UnsafeMutableRawBufferPointer.allocate(
      byteCount: SaveFormat.maxRecord + SparseMigration.segmentHeaderSize, alignment: 4096)
    defer { buffer.deallocate() }
    // Tagged: zero records take no room and cost no memset.
    while try !reader.readTaggedRecords(into: buffer).last {}
  }

  func readHeader() throws -> SaveFileHeader {
    var fixed = [UInt8](repeating: 0, count: SaveFormat.fixedHeaderSize)
    let got = try fill(&fixed, 0, fixed.count)
    guard got > 0 else {
      throw SaveFileError("\(name) is empty (0 bytes), not an xe-vfio-user save file")
    }
    guard got >= 8, Array(fixed[0..<8]) == SaveFormat.magic else {
      throw SaveFileError("\(name) is not an xe-vfio-user save file (bad magic)")
    }
    version = load(fixed, 8)
    guard SaveFormat.readableVersions.contains(version) else {
      throw SaveFileError(
        "\(name): save file format \(version) is not supported (this reads \(SaveFormat.readableVersions.lowerBound) to \(SaveFormat.version))"
      )
    }
    guard got == fixed.count else { throw truncated() }
    let length = Int(load(fixed, 12) as UInt32)
    let headerCRC: UInt32 = load(fixed, 16)
    declaredLength = load(fixed, 24)
    guard length <= SaveFormat.maxHeaderJSON else {
      throw SaveFileError("\(name): the header is damaged (JSON length \(length))")
    }
    // A regular file shorter than the length it declares is cut short: say so before anything else.
    var st = stat()
    if fstat(input.rawValue, &st) == 0, st.st_mode & S_IFMT == S_IFREG {
      let size = UInt64(st.st_size)
      if declaredLength == 0 { declaredLength = size }
      if size < declaredLength {
        throw SaveFileError(
          "\(name): input truncated at byte \(size) of \(declaredLength); nothing was restored")
      }
    }
    var json = [UInt8](repeating: 0, count: length)
    guard try fill(&json, 0, length) == length else { throw truncated() }
    crc = json.withUnsafeBytes { cvfu_crc32c(0, $0.baseAddress, $0.count) }
    guard crc == headerCRC else {
      throw SaveFileError("\(name): header checksum mismatch; the file is damaged")
    }
    do {
      return try JSONDecoder().decode(SaveFileHeader.self, from: Data(json))
    } catch {
      throw SaveFileError("\(name): the header's description of the device is unreadable")
    }
  }

  /// Puts the stream bytes of as many records as fit in `buffer` (at least
  /// `SaveFormat.maxRecord` bytes) into it, each verified before it is
  /// expanded; returns their count, and whether the end record has been
  /// verified with nothing after it. Filling the buffer from many small
  /// records (a page of data, a short zero run) keeps the writes to the
  /// device large.
  func readRecords(into buffer: UnsafeMutableRawBufferPointer) throws -> (count: Int, last: Bool) {
    try read(into: buffer, tagged: false)
  }

  /// `readRecords` for a sparse restore: each record goes into `buffer` as
  /// a segment header of the sparse form (`SparseMigration.segmentHeader`:
  /// data or zeros, and its stream length) followed, for data, by its
  /// verified, expanded bytes. Zero records take no room but their header,
  /// so nothing is memset. Returns the bytes used, and whether the end
  /// record has been verified.
  func readTaggedRecords(into buffer: UnsafeMutableRawBufferPointer) throws -> (
    count: Int, last: Bool
  ) {
    try read(into: buffer, tagged: true)
  }

  private func read(into buffer: UnsafeMutableRawBufferPointer, tagged: Bool) throws -> (
    count: Int, last: Bool
  ) {
    let tag = tagged ? SparseMigration.segmentHeaderSize : 0
    var count = 0
    while true {
      let head = try peeked ?? readRecordHead()
      peeked = nil
      if head.kind == .end {
        try end(head.crc)
        return (count, true)
      }
      let expanded = !tagged || head.kind != .zeros
      if count + tag + (expanded ? head.streamLength : 0) > buffer.count {
        peeked = head
        return (count, false)
      }
      if tagged {
        let word = SparseMigration.segmentHeader(
          expanded ? .data : .zeros, length: head.streamLength)
        buffer.storeBytes(of: word.littleEndian, toByteOffset: count, as: UInt64.self)
        count += tag
      }
      try readBody(
        head, into: UnsafeMutableRawBufferPointer(rebasing: buffer[count...]),
        at: tagged ? -1 : count)
      if expanded { count += head.streamLength }
    }
  }

  /// A record's header, as read (its CRC is the one it states).
  private struct RecordHead {
    var kind: SaveRecordKind
    var bodyLength: Int
    var streamLength: Int
    var crc: UInt32
    var start: UInt64
  }

  /// A record header read but not yet used: its record did not fit the last buffer.
  private var peeked: RecordHead?
  /// Leading bytes of each buffer known to be zero, so runs of zero records
  /// cost no memset once a buffer has been cleared.
  private var zeroPrefix: [UnsafeMutableRawPointer: Int] = [:]

  private func readRecordHead() throws -> RecordHead {
    let start = position
    if version == 2 {
      // Length u32 (0: the end record), CRC u32 over the data.
      var head = [UInt8](repeating: 0, count: SaveFormat.recordHeaderSizeV2)
      guard try fill(&head, 0, head.count) == head.count else { throw truncated() }
      let length = Int(load(head, 0) as UInt32)
      guard length <= SaveFormat.maxRecord else {
        throw SaveFileError(
          "\(name): damaged record header at byte \(start) (length \(length)); the file is damaged")
      }
      return RecordHead(
        kind: length == 0 ? .end : .stored, bodyLength: length, streamLength: length,
        crc: load(head, 4), start: start)
    }
    var head = [UInt8](repeating: 0, count: SaveFormat.recordHeaderSize)
    guard try fill(&head, 0, head.count) == head.count else { throw truncated() }
    let length = Int(load(head, 0) as UInt32)
    let streamLength = Int(load(head, 8) as UInt32)
    let kind = SaveRecordKind(rawValue: head[12])
    let consistent: Bool
    switch kind {
    case .stored: consistent = length == streamLength
    case .zeros: consistent = length == 0
    case .zstd: consistent = length > 0 && length <= streamLength
    case .end: consistent = length == SaveFormat.endBodySize && streamLength == 0
    case nil: consistent = false
    }
    guard let kind, consistent, head[13...15].allSatisfy({ $0 == 0 }),
      kind == .end || (streamLength > 0 && streamLength <= SaveFormat.maxRecord)
    else {
      throw SaveFileError(
        "\(name): damaged record header at byte \(start) (kind \(head[12]), \(length) bytes for \(streamLength)); the file is damaged"
      )
    }
    // The header's kind and lengths are under the chain too.
    crc = head.withUnsafeBytes { cvfu_crc32c(crc, $0.baseAddress! + 8, 8) }
    return RecordHead(
      kind: kind, bodyLength: length, streamLength: streamLength, crc: load(head, 4), start: start)
  }

  /// Reads, verifies and expands one record's body into `target` (`offset` bytes into its buffer).
  private func readBody(
    _ head: RecordHead, into target: UnsafeMutableRawBufferPointer, at offset: Int
  )
    throws
  {
    // Offset -1: a tagged read, where zero records are not expanded.
    let tagged = offset < 0
    let base = target.baseAddress! - max(offset, 0)
    let body: UnsafeMutableRawBufferPointer
    switch head.kind {
    case .stored: body = UnsafeMutableRawBufferPointer(rebasing: target[0..<head.bodyLength])
    case .zstd: body = compressedBody(head.bodyLength)
    case .zeros, .end: body = UnsafeMutableRawBufferPointer(rebasing: target[0..<0])
    }
    guard try fill(body) == head.bodyLength else { throw truncated() }
    crc = cvfu_crc32c(crc, body.baseAddress, head.bodyLength)
    guard crc == head.crc else {
      throw SaveFileError(
        "\(name): checksum mismatch in the record at bytes \(head.start)–\(position); the file is damaged"
      )
    }
    streamBytes += UInt64(head.streamLength)
    records += 1
    if tagged {
      if head.kind == .zstd {
        try expand(UnsafeRawBufferPointer(body), into: target, head.streamLength, at: head.start)
      }
      return
    }
    let known = zeroPrefix[base, default: 0]
    switch head.kind {
    case .zstd:
      try expand(UnsafeRawBufferPointer(body), into: target, head.streamLength, at: head.start)
      zeroPrefix[base] = min(known, offset)
    case .zeros:
      if offset + head.streamLength > known {
        target.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: head.streamLength)
        if offset <= known { zeroPrefix[base] = offset + head.streamLength }
      }
    default:
      zeroPrefix[base] = min(known, offset)
    }
  }

  private func compressedBody(_ length: Int) -> UnsafeMutableRawBufferPointer {
    if body == nil { body = .allocate(byteCount: SaveFormat.maxRecord, alignment: 4096) }
    return UnsafeMutableRawBufferPointer(rebasing: body![0..<length])
  }

  /// Expands a verified zstd frame; it must give exactly `count` bytes.
  private func expand(
    _ frame: UnsafeRawBufferPointer, into buffer: UnsafeMutableRawBufferPointer, _ count: Int,
    at start: UInt64
  ) throws {
    if decompressor == nil { decompressor = ZSTD_createDCtx() }
    let n = ZSTD_decompressDCtx(
      decompressor, buffer.baseAddress, count, frame.baseAddress, frame.count)
    guard ZSTD_isError(n) == 0, n == count else {
      let why = ZSTD_isError(n) != 0 ? String(cString: ZSTD_getErrorName(n)) : "\(n) bytes"
      throw SaveFileError(
        "\(name): the compressed record at byte \(start) does not expand to its \(count) bytes (\(why)); the file is damaged"
      )
    }
  }

  private func end(_ expected: UInt32) throws {
    var body = [UInt8](repeating: 0, count: SaveFormat.endBodySize)
    guard try fill(&body, 0, body.count) == body.count else { throw truncated() }
    let sealed = body.withUnsafeBytes { cvfu_crc32c(crc, $0.baseAddress, $0.count) }
    guard Array(body[0..<8]) == SaveFormat.endMagic, sealed == expected else {
      throw SaveFileError("\(name): checksum mismatch in the end record; the file is damaged")
    }
    let bytes: UInt64 = load(body, 8)
    let count: UInt64 = load(body, 16)
    guard bytes == streamBytes, count == records else {
      throw SaveFileError(
        "\(name): the end record says \(count) records of \(bytes) bytes, the file holds \(records) of \(streamBytes)"
      )
    }
    var probe = [UInt8](repeating: 0, count: 1)
    guard try fill(&probe, 0, 1) == 0 else {
      throw SaveFileError("\(name): unexpected data after the end record at byte \(position - 1)")
    }
  }

  private func truncated() -> SaveFileError {
    let of = declaredLength > position ? " of \(declaredLength)" : ""
    return SaveFileError(
      "\(name): input truncated at byte \(position)\(of) (no end record); the file is incomplete")
  }

  /// Reads until `bytes[from..<from+count]` is full or the input ends; returns the bytes read.
  private func fill(_ bytes: inout [UInt8], _ from: Int, _ count: Int) throws -> Int {
    try bytes.withUnsafeMutableBytes {
      try fill(UnsafeMutableRawBufferPointer(rebasing: $0[from..<(from + count)]))
    }
  }

  private func fill(_ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
    var done = 0
    while done < buffer.count {
      let n: Int
      do {
        n = try input.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
      } catch {
        throw EndError(end: "reading \(name)", underlying: error)
      }
      if n == 0 { break }
      done += n
      position += UInt64(n)
      bytesRead.store(position, ordering: .relaxed)
    }
    return done
  }
}

func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
  withUnsafeBytes(of: value.littleEndian) { Array($0) }
}

func load<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int) -> T {
  bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
}
