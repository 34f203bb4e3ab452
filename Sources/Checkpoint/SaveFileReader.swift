import CVFIOUser
import CZstd
import Synchronization
import SystemPackage
import XeStream

#if canImport(Glibc)
  import Glibc
#endif

/// Reads and checks a save file from `input`: `readHeader()`, then
/// `readRecords(into:)` until it says the end record was verified.
/// Nothing unverified is ever returned: a record's CRC is checked before its
/// body is expanded, and a zstd frame must expand to exactly the length its
/// record states, with its own checksum right.
public final class SaveFileReader {
  public let input: FileDescriptor
  public let name: String
  /// The file's whole length when known (header field or file size), for messages.
  public private(set) var declaredLength: UInt64 = 0
  public private(set) var position: UInt64 = 0
  /// `position` for another thread (a progress line).
  public let bytesRead = Atomic<UInt64>(0)
  public private(set) var version: UInt32 = 0
  private var crc: UInt32 = 0
  private var streamBytes: UInt64 = 0
  private var records: UInt64 = 0
  /// A zstd record's body, before it is expanded.
  private var body: UnsafeMutableRawBufferPointer?
  private var decompressor: OpaquePointer?

  public init(input: FileDescriptor, name: String) {
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
  public static func verifyWholeFile(at path: String, name: String) throws {
    let fd: FileDescriptor
    do { fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec]) } catch {
      throw SaveFileIOError(end: "opening \(name)", errno: error as? Errno ?? .ioError)
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

  /// Reads and checks the header; returns its JSON part (the caller's to
  /// decode), whose CRC matched.
  public func readHeader() throws -> [UInt8] {
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
    return json
  }

  /// Puts the stream bytes of as many records as fit in `buffer` (at least
  /// `SaveFormat.maxRecord` bytes) into it, each verified before it is
  /// expanded; returns their count, and whether the end record has been
  /// verified with nothing after it. Filling the buffer from many small
  /// records (a page of data, a short zero run) keeps the writes to the
  /// device large.
  public func readRecords(into buffer: UnsafeMutableRawBufferPointer) throws -> (
    count: Int, last: Bool
  ) {
    try read(into: buffer, tagged: false)
  }

  /// `readRecords` for a sparse restore: each record goes into `buffer` as
  /// a segment header of the sparse form (`SparseMigration.segmentHeader`:
  /// data or zeros, and its stream length) followed, for data, by its
  /// verified, expanded bytes. Zero records take no room but their header,
  /// so nothing is memset. Returns the bytes used, and whether the end
  /// record has been verified.
  public func readTaggedRecords(into buffer: UnsafeMutableRawBufferPointer) throws -> (
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

  /// A record header read but not yet used: its record did not fit the last buffer.
  private var peeked: SaveRecordHeader?
  /// Leading bytes of each buffer known to be zero, so runs of zero records
  /// cost no memset once a buffer has been cleared.
  private var zeroPrefix: [UnsafeMutableRawPointer: Int] = [:]

  private func readRecordHead() throws -> SaveRecordHeader {
    let start = position
    var head = [UInt8](repeating: 0, count: SaveRecordHeader.size(version: version))
    guard try fill(&head, 0, head.count) == head.count else { throw truncated() }
    let record = try SaveRecordHeader(decoding: head, version: version, at: start, name: name)
    // Version 3: the header's kind and lengths are under the chain too.
    if version != 2 { crc = head.withUnsafeBytes { cvfu_crc32c(crc, $0.baseAddress! + 8, 8) } }
    return record
  }

  /// Reads, verifies and expands one record's body into `target` (`offset` bytes into its buffer).
  private func readBody(
    _ head: SaveRecordHeader, into target: UnsafeMutableRawBufferPointer, at offset: Int
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
        throw SaveFileIOError(end: "reading \(name)", errno: error as? Errno ?? .ioError)
      }
      if n == 0 { break }
      done += n
      position += UInt64(n)
      bytesRead.store(position, ordering: .relaxed)
    }
    return done
  }
}
