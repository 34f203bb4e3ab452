import Foundation
import SystemPackage
import TestSupport
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

extension ProtocolFiles {
  /// Empty when the file is missing or unreadable; `fixtureFilesLoad` reports why.
  static let vectors: [Vector] = (try? load("messages.json", as: [Vector].self)) ?? []

  static func vector(_ name: String) throws -> Vector {
    guard let vector = vectors.first(where: { $0.name == name }) else {
      throw FixtureError("no vector named \(name)")
    }
    return vector
  }
}

extension Array where Element == UInt8 {
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
