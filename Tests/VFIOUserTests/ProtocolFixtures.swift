import Foundation
import SystemPackage
import Testing
import VFIOUser

// Loads the wire contract in `protocol/` (messages.json, malformed.json) so the
// codec tests check the Swift codecs against bytes produced independently of them.

/// A JSON value decoded exactly: integers stay `UInt64` (no `Double` rounding).
indirect enum JSONValue: Decodable, Sendable, Equatable {
  case null
  case bool(Bool)
  case integer(UInt64)
  case string(String)
  case array([JSONValue])
  case object([String: JSONValue])

  init(from decoder: any Decoder) throws {
    let container = try decoder.singleValueContainer()
    if container.decodeNil() {
      self = .null
    } else if let value = try? container.decode(Bool.self) {
      self = .bool(value)
    } else if let value = try? container.decode(UInt64.self) {
      self = .integer(value)
    } else if let value = try? container.decode(String.self) {
      self = .string(value)
    } else if let value = try? container.decode([JSONValue].self) {
      self = .array(value)
    } else {
      self = .object(try container.decode([String: JSONValue].self))
    }
  }
}

struct FixtureError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// Typed access to one `fields.header` / `fields.payload` object; a missing key
/// or a value of the wrong JSON type throws, naming the key.
struct Fields: Sendable {
  var values: [String: JSONValue]

  func value(_ key: String) throws -> JSONValue {
    guard let value = values[key] else { throw FixtureError("missing field \(key)") }
    return value
  }

  func integer<T: FixedWidthInteger>(_ key: String, as type: T.Type = T.self) throws -> T {
    guard case .integer(let raw) = try value(key), let result = T(exactly: raw) else {
      throw FixtureError("field \(key) is not a \(T.self)")
    }
    return result
  }

  func u16(_ key: String) throws -> UInt16 { try integer(key) }
  func u32(_ key: String) throws -> UInt32 { try integer(key) }
  func u64(_ key: String) throws -> UInt64 { try integer(key) }

  func string(_ key: String) throws -> String {
    guard case .string(let text) = try value(key) else {
      throw FixtureError("field \(key) is not a string")
    }
    return text
  }

  func optionalString(_ key: String) throws -> String? {
    switch try value(key) {
    case .null: return nil
    case .string(let text): return text
    default: throw FixtureError("field \(key) is neither a string nor null")
    }
  }

  /// A byte string written as lowercase hex.
  func bytes(_ key: String) throws -> [UInt8] {
    guard let bytes = [UInt8](hex: try string(key)) else {
      throw FixtureError("field \(key) is not hex")
    }
    return bytes
  }

  func objects(_ key: String) throws -> [Fields] {
    guard case .array(let items) = try value(key) else {
      throw FixtureError("field \(key) is not an array")
    }
    return try items.map { item in
      guard case .object(let object) = item else {
        throw FixtureError("an element of \(key) is not an object")
      }
      return Fields(values: object)
    }
  }

  func integers<T: FixedWidthInteger>(_ key: String, as type: T.Type = T.self) throws -> [T] {
    guard case .array(let items) = try value(key) else {
      throw FixtureError("field \(key) is not an array")
    }
    return try items.map { item in
      guard case .integer(let raw) = item, let result = T(exactly: raw) else {
        throw FixtureError("an element of \(key) is not a \(T.self)")
      }
      return result
    }
  }
}

/// One golden message of protocol/messages.json.
struct Vector: Decodable, Sendable, CustomTestStringConvertible {
  struct FieldSet: Decodable, Sendable {
    var header: [String: JSONValue]
    var payload: [String: JSONValue]
  }

  var name: String
  var command: UInt16
  var direction: String
  var kind: String
  var codec: String
  var fds: Int
  var hex: String
  var fields: FieldSet
  var note: String

  var testDescription: String { name }
  var header: Fields { Fields(values: fields.header) }
  var payload: Fields { Fields(values: fields.payload) }
  var bytes: [UInt8]? { [UInt8](hex: hex) }
}

/// One entry of protocol/malformed.json.
struct MalformedCase: Decodable, Sendable, CustomTestStringConvertible {
  var name: String
  var hex: String
  var expect: String
  var layer: String
  var afterVersion: Bool
  var note: String
  var parseError: String?
  var setup: [String]?
  /// Descriptors to send with the message (SCM_RIGHTS).
  var fds: Int?
  /// `hex` is only the head: the sender pads with zeros up to the header's size.
  var fillToSize: Bool?
  /// The reaction of a device without migration support, where it differs.
  var expectNoMigration: String?
  /// The reaction of a device without DMA logging, where it differs.
  var expectNoDMALogging: String?
  /// The reaction of the kernel backend, where it differs.
  var expectKernel: String?

  enum CodingKeys: String, CodingKey {
    case name, hex, expect, layer, note, setup, fds
    case afterVersion = "after_version"
    case parseError = "parse_error"
    case fillToSize = "fill_to_size"
    case expectNoMigration = "expect_no_migration"
    case expectNoDMALogging = "expect_no_dma_logging"
    case expectKernel = "expect_kernel"
  }

  var testDescription: String { name }
  var bytes: [UInt8]? { [UInt8](hex: hex) }

  /// The message as sent: `hex`, padded with zeros to the header's size when `fill_to_size` is set.
  var message: [UInt8]? {
    guard var bytes else { return nil }
    if fillToSize == true, bytes.count >= 8 {
      let size = Int(
        UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24)
      if size > bytes.count { bytes += [UInt8](repeating: 0, count: size - bytes.count) }
    }
    return bytes
  }
}

enum ProtocolFiles {
  /// `<repo>/protocol`, found from this file's path (`<repo>/Tests/VFIOUserTests/`).
  static let directory: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent()
    .deletingLastPathComponent()
    .deletingLastPathComponent()
    .appendingPathComponent("protocol", isDirectory: true)

  static func load<T: Decodable>(_ file: String, as type: T.Type) throws -> T {
    let data = try Data(contentsOf: directory.appendingPathComponent(file))
    return try JSONDecoder().decode(T.self, from: data)
  }

  /// Empty when the file is missing or unreadable; `fixtureFilesLoad` reports why.
  static let vectors: [Vector] = (try? load("messages.json", as: [Vector].self)) ?? []
  static let malformed: [MalformedCase] =
    (try? load("malformed.json", as: [MalformedCase].self)) ?? []

  static func vector(_ name: String) throws -> Vector {
    guard let vector = vectors.first(where: { $0.name == name }) else {
      throw FixtureError("no vector named \(name)")
    }
    return vector
  }
}

extension Array where Element == UInt8 {
  /// Parses lowercase or uppercase hex without separators.
  init?(hex: String) {
    let digits = Array(hex.utf8)
    guard digits.count.isMultiple(of: 2) else { return nil }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(digits.count / 2)
    var index = 0
    while index < digits.count {
      guard let high = Self.nibble(digits[index]), let low = Self.nibble(digits[index + 1]) else {
        return nil
      }
      bytes.append(high << 4 | low)
      index += 2
    }
    self = bytes
  }

  private static func nibble(_ digit: UInt8) -> UInt8? {
    switch digit {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
    default: nil
    }
  }

  var hexString: String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(count * 2)
    for byte in self {
      out.append(digits[Int(byte >> 4)])
      out.append(digits[Int(byte & 0xF)])
    }
    return String(decoding: out, as: UTF8.self)
  }
}

// Decoding helpers for the codecs that take raw buffers.

func decodeHeader(_ bytes: [UInt8]) throws -> MessageHeader {
  try bytes.withUnsafeBytes { try MessageHeader(decoding: $0) }
}

func decodeRegionAccess(_ payload: [UInt8]) throws -> RegionAccessHeader {
  try payload.withUnsafeBytes { try RegionAccessHeader(decoding: $0) }
}

func decodeDMAAccess(_ payload: [UInt8], layout: DMATransferLayout) throws -> DMAAccessHeader {
  try payload.withUnsafeBytes { try DMAAccessHeader(decoding: $0, layout: layout) }
}

func decodeMigData(_ payload: [UInt8]) throws -> MigDataHeader {
  try payload.withUnsafeBytes { try MigDataHeader(decoding: $0) }
}

/// Decodes a client->server request payload with the codec of its command; the
/// server runs the same codecs, so a throw here is the server's EINVAL.
func decodeRequestPayload(command: UInt16, _ payload: [UInt8]) throws {
  switch Command(rawValue: command) {
  case .version: _ = try VersionPayload(decoding: payload)
  case .dmaMap: _ = try DMAMapRequest(decoding: payload)
  case .dmaUnmap: _ = try DMAUnmapPayload(decoding: payload)
  case .deviceGetInfo: _ = try DeviceInfoPayload(decoding: payload)
  case .deviceGetRegionInfo: _ = try RegionInfoPayload(decoding: payload)
  case .deviceGetRegionIOFDs: _ = try RegionIOFDsPayload(decoding: payload)
  case .deviceGetIRQInfo: _ = try IRQInfoPayload(decoding: payload)
  case .deviceSetIRQs: _ = try IRQSetPayload(decoding: payload)
  case .regionRead, .regionWrite: _ = try decodeRegionAccess(payload)
  case .dmaRead, .dmaWrite: _ = try decodeDMAAccess(payload, layout: .spec)
  case .regionWriteMulti: _ = try WriteMultiPayload(decoding: payload)
  case .deviceFeature: _ = try DeviceFeaturePayload(decoding: payload)
  case .migDataRead, .migDataWrite: _ = try decodeMigData(payload)
  case .deviceReset, nil: break
  }
}

extension Capabilities.ParseError {
  /// The case name, as malformed.json's `parse_error` spells it.
  var caseName: String {
    switch self {
    case .malformedJSON: "malformedJSON"
    case .notAnObject: "notAnObject"
    case .wrongType: "wrongType"
    case .outOfRange: "outOfRange"
    }
  }
}

@Test func fixtureFilesLoad() throws {
  let vectors = try ProtocolFiles.load("messages.json", as: [Vector].self)
  let malformed = try ProtocolFiles.load("malformed.json", as: [MalformedCase].self)
  #expect(!vectors.isEmpty)
  #expect(!malformed.isEmpty)
  #expect(vectors.count == ProtocolFiles.vectors.count)
  #expect(malformed.count == ProtocolFiles.malformed.count)
  #expect(Set(vectors.map(\.name)).count == vectors.count, "vector names are unique")
  #expect(Set(malformed.map(\.name)).count == malformed.count, "corpus names are unique")
}
