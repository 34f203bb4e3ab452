import CVFIOUser
import SystemPackage
import VFIOUser

/// The save file: a header that identifies the device, the migration stream
/// cut into CRC-checked records, and an end record that seals its length
/// (protocol/save-format.md). The CRCs are chained, each record's seeded with
/// the one before, so a damaged, missing, repeated or reordered record, and
/// a file cut short, are all caught before the destination may run. A record
/// holds its stream bytes as they are, as a count of zero bytes (zero pages
/// of VRAM packets), or as a zstd frame (where compressing pays).
public enum SaveFormat {
  public static let magic = Array("XEVFUSAV".utf8)
  /// What `save` writes; `restore` also reads version 2 (records stored as they are).
  public static let version: UInt32 = 3
  public static let readableVersions: ClosedRange<UInt32> = 2...3
  /// magic, version, JSON length, JSON CRC, reserved, file length.
  public static let fixedHeaderSize = 32
  /// The file-length field, filled in once a seekable output is complete.
  public static let fileLengthOffset: Int64 = 24
  public static let maxHeaderJSON = 1 << 20
  /// Version 2: length u32, CRC u32.
  public static let recordHeaderSizeV2 = 8
  /// Version 3: body length u32, CRC u32, stream length u32, kind u8, 3 reserved.
  public static let recordHeaderSize = 16
  /// No record expands to more stream bytes than this (nor holds a longer
  /// body), so a reader never buffers more.
  public static let maxRecord = 16 << 20
  public static let endMagic = Array("XEVFUEND".utf8)
  /// The end record's body: magic, stream bytes u64, records u64.
  public static let endBodySize = 24
}

/// How a version 3 record holds its stream bytes.
public enum SaveRecordKind: UInt8, Sendable {
  /// The body is the stream bytes.
  case stored = 1
  /// No body: the stream bytes are zeros (whole zero pages of VRAM packets).
  case zeros = 2
  /// The body is one zstd frame (with its content checksum) of the stream bytes.
  case zstd = 3
  /// The end record: its body is `SaveFormat.endBodySize` bytes.
  case end = 4
}

/// Why a save file cannot be restored, said so a person can act on it.
public struct SaveFileError: Error, CustomStringConvertible {
  public var description: String
  public init(_ description: String) { self.description = description }
}

/// A checkpoint that could not be opened or read: "reading NAME: EIO
/// (Input/output error)", the errno's name to search for and its text.
public struct SaveFileIOError: Error, CustomStringConvertible {
  public var end: String
  public var errno: Errno
  public var description: String { "\(end): \(errno.name) (\(errno))" }
}

extension SaveFormat {
  /// The file-length field's bytes, patched in at `fileLengthOffset` once a
  /// seekable output is complete.
  public static func fileLengthField(_ length: UInt64) -> [UInt8] { le(length) }
}

extension SaveFormat {
  /// `file`, a version 3 checkpoint of stored records only, in format 2, as
  /// saved before version 3 (8-byte record headers, the CRC chained over the
  /// data only, no file length): for the package's tests and fuzz seeds,
  /// which check that version 2 still reads. `save` writes version 3 only.
  package static func versionTwo(of file: [UInt8]) throws(SaveFileError) -> [UInt8] {
    let records = try SaveRecordHeader.records(of: file)
    guard let first = records.first, records.allSatisfy({ $0.kind == .stored || $0.kind == .end })
    else { throw SaveFileError("versionTwo: not a version 3 checkpoint of stored records") }
    var v2 = Array(file[..<Int(first.start)])
    v2[8] = 2
    v2.replaceSubrange(24..<32, with: le(UInt64(0)))
    var crc: UInt32 = load(file, 16)
    for record in records {
      let start = Int(record.start) + recordHeaderSize
      let body = file[start..<(start + record.bodyLength)]
      crc = body.withUnsafeBytes { cvfu_crc32c(crc, $0.baseAddress, $0.count) }
      v2 += le(UInt32(record.kind == .end ? 0 : record.bodyLength)) + le(crc) + body
    }
    return v2
  }
}

/// One record's header as the file states it (its CRC is the one it
/// states, not yet checked): the reader's view of a record, and what a tool
/// or a test that looks inside a checkpoint sees.
public struct SaveRecordHeader: Equatable, Sendable {
  public var kind: SaveRecordKind
  public var bodyLength: Int
  public var streamLength: Int
  public var crc: UInt32
  /// Where the record starts in the file.
  public var start: UInt64

  /// The header's size in a file of `version`.
  public static func size(version: UInt32) -> Int {
    version == 2 ? SaveFormat.recordHeaderSizeV2 : SaveFormat.recordHeaderSize
  }

  /// Decodes and checks the header `head` (`size(version:)` bytes) of the
  /// record at `start` of the file `name`: a kind, length or reserved byte
  /// that the format does not allow is a damaged header.
  public init(decoding head: [UInt8], version: UInt32, at start: UInt64, name: String)
    throws(SaveFileError)
  {
    if version == 2 {
      // Length u32 (0: the end record), CRC u32 over the data.
      let length = Int(load(head, 0) as UInt32)
      guard length <= SaveFormat.maxRecord else {
        throw SaveFileError(
          "\(name): damaged record header at byte \(start) (length \(length)); the file is damaged")
      }
      self.init(
        kind: length == 0 ? .end : .stored, bodyLength: length, streamLength: length,
        crc: load(head, 4), start: start)
      return
    }
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
    self.init(
      kind: kind, bodyLength: length, streamLength: streamLength, crc: load(head, 4), start: start)
  }

  public init(kind: SaveRecordKind, bodyLength: Int, streamLength: Int, crc: UInt32, start: UInt64)
  {
    self.kind = kind
    self.bodyLength = bodyLength
    self.streamLength = streamLength
    self.crc = crc
    self.start = start
  }

  /// The records of a whole checkpoint in memory, up to and including its
  /// end record (or as far as whole headers go), each header checked but no
  /// checksum: where each record is, for tools and tests that look inside a
  /// file. A damaged header throws as it does for `SaveFileReader`.
  public static func records(of file: [UInt8]) throws(SaveFileError) -> [SaveRecordHeader] {
    guard file.count >= SaveFormat.fixedHeaderSize else { return [] }
    let version: UInt32 = load(file, 8)
    let size = Self.size(version: version)
    var at = SaveFormat.fixedHeaderSize + Int(load(file, 12) as UInt32)
    var records: [SaveRecordHeader] = []
    while at + size <= file.count {
      let record = try SaveRecordHeader(
        decoding: Array(file[at..<(at + size)]), version: version, at: UInt64(at), name: "file")
      records.append(record)
      if record.kind == .end { break }
      at += size + record.bodyLength
    }
    return records
  }
}

func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
  withUnsafeBytes(of: value.littleEndian) { Array($0) }
}

func load<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int) -> T {
  bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
}
