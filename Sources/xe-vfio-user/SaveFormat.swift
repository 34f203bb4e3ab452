import CVFIOUser
import FoundationEssentials
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// The save file: a header that identifies the device, the migration stream
/// cut into CRC-checked records, and an end record that seals its length
/// (protocol/save-format.md). The CRCs are chained, each record's seeded with
/// the one before, so a damaged, missing, repeated or reordered record, and
/// a file cut short, are all caught before the destination may run.
enum SaveFormat {
  static let magic = Array("XEVFUSAV".utf8)
  static let version: UInt32 = 2
  /// magic, version, JSON length, JSON CRC, reserved, file length.
  static let fixedHeaderSize = 32
  /// The file-length field, filled in once a seekable output is complete.
  static let fileLengthOffset: Int64 = 24
  static let maxHeaderJSON = 1 << 20
  /// length u32, CRC u32.
  static let recordHeaderSize = 8
  /// Records are cut at this size, so a reader never buffers more.
  static let maxRecord = 16 << 20
  static let endMagic = Array("XEVFUEND".utf8)
  /// The end record's body: magic, stream bytes u64, records u64.
  static let endBodySize = 24
}

/// The header's JSON part.
struct SaveFileHeader: Codable {
  var identity: DeviceIdentity
  var estimatedBytes: UInt64
  var created: String
  var source: String
}

/// Builds a save file's bytes around the stream: the header first, then each
/// chunk of the stream as records, then the end record.
struct SaveFileWriter {
  /// False only in `bench`, to measure what the checksums cost.
  var checksummed = true
  private(set) var crc: UInt32 = 0
  private(set) var streamBytes: UInt64 = 0
  private(set) var records: UInt64 = 0

  /// The header's bytes; its JSON CRC seeds the record chain.
  mutating func header(_ header: SaveFileHeader) throws -> [UInt8] {
    let json = Array(try JSONEncoder().encode(header))
    crc = json.withUnsafeBytes { cvfu_crc32c(0, $0.baseAddress, $0.count) }
    var bytes = SaveFormat.magic
    bytes += le(SaveFormat.version) + le(UInt32(json.count)) + le(crc) + le(UInt32(0))
    bytes += le(UInt64(0))  // file length: unknown until the end
    return bytes + json
  }

  /// The 8-byte record header for `data` (at most `SaveFormat.maxRecord` bytes).
  mutating func recordHeader(for data: UnsafeRawBufferPointer) -> [UInt8] {
    if checksummed { crc = cvfu_crc32c(crc, data.baseAddress, data.count) }
    streamBytes += UInt64(data.count)
    records += 1
    return le(UInt32(data.count)) + le(crc)
  }

  /// The end record.
  func end() -> [UInt8] {
    let body = SaveFormat.endMagic + le(streamBytes) + le(records)
    let sealed = body.withUnsafeBytes { cvfu_crc32c(crc, $0.baseAddress, $0.count) }
    return le(UInt32(0)) + le(sealed) + body
  }
}

/// Why a save file cannot be restored, said so a person can act on it.
struct SaveFileError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// Reads and checks a save file from `input`: `readHeader()`, then
/// `nextRecord(into:)` until it returns nil after a verified end record.
/// Nothing unverified is ever returned.
final class SaveFileReader {
  let input: FileDescriptor
  let name: String
  /// The file's whole length when known (header field or file size), for messages.
  private(set) var declaredLength: UInt64 = 0
  private(set) var position: UInt64 = 0
  private var crc: UInt32 = 0
  private var streamBytes: UInt64 = 0
  private var records: UInt64 = 0

  init(input: FileDescriptor, name: String) {
    self.input = input
    self.name = name
  }

  func readHeader() throws -> SaveFileHeader {
    var fixed = [UInt8](repeating: 0, count: SaveFormat.fixedHeaderSize)
    let got = try fill(&fixed, 0, fixed.count)
    guard got >= 8, Array(fixed[0..<8]) == SaveFormat.magic else {
      throw SaveFileError("\(name) is not an xe-vfio-user save file (bad magic)")
    }
    let version: UInt32 = load(fixed, 8)
    guard version == SaveFormat.version else {
      throw SaveFileError(
        "\(name): save file format \(version) is not supported (this is \(SaveFormat.version))")
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

  /// Reads the next record into `buffer` (at least `SaveFormat.maxRecord`
  /// bytes) and returns its length once its CRC checks out, or nil after the
  /// end record has been verified and nothing follows it.
  func nextRecord(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
    var head = [UInt8](repeating: 0, count: SaveFormat.recordHeaderSize)
    let start = position
    guard try fill(&head, 0, head.count) == head.count else { throw truncated() }
    let length = Int(load(head, 0) as UInt32)
    let expected: UInt32 = load(head, 4)
    if length == 0 { return try end(expected) }
    guard length <= SaveFormat.maxRecord else {
      throw SaveFileError(
        "\(name): damaged record header at byte \(start) (length \(length)); the file is damaged")
    }
    let record = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
    guard try fill(record) == length else { throw truncated() }
    crc = cvfu_crc32c(crc, record.baseAddress, length)
    guard crc == expected else {
      throw SaveFileError(
        "\(name): checksum mismatch in the record at bytes \(start)–\(position); the file is damaged"
      )
    }
    streamBytes += UInt64(length)
    records += 1
    return length
  }

  private func end(_ expected: UInt32) throws -> Int? {
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
    return nil
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
