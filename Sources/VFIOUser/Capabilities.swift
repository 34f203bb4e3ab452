import CJSONC

/// The `capabilities` object of VFIO_USER_VERSION, parsed and written with json-c.
public struct Capabilities: Equatable, Sendable {
  public struct TwinSocket: Equatable, Sendable {
    public var supported: Bool
    public var fdIndex: UInt32?
    public init(supported: Bool, fdIndex: UInt32? = nil) {
      self.supported = supported
      self.fdIndex = fdIndex
    }
  }

  /// The legacy (v1) migration object QEMU still sends; accepted and ignored.
  public struct LegacyMigration: Equatable, Sendable {
    public var pgsize: UInt64?
    public var maxBitmapSize: UInt64?
    public init(pgsize: UInt64? = nil, maxBitmapSize: UInt64? = nil) {
      self.pgsize = pgsize
      self.maxBitmapSize = maxBitmapSize
    }
  }

  public var maxMsgFDs: UInt32?
  public var maxDataXferSize: UInt32?
  public var maxDMAMaps: UInt32?
  public var pgsizes: UInt64?
  public var writeMultiple: Bool?
  public var twinSocket: TwinSocket?
  public var migration: LegacyMigration?
  /// `"xe_vfio_user": {"sparse_migration": N}`: this project's own extension,
  /// the version of the sparse migration stream (protocol/sparse-migration.md)
  /// a client offers and the server echoes. Only our client offers it, so a
  /// VMM's connection never sees it in the reply.
  public var sparseMigration: UInt32?
  /// Keys this side does not know; kept so the server can log them.
  public var unknownKeys: [String] = []

  public init(
    maxMsgFDs: UInt32? = nil, maxDataXferSize: UInt32? = nil, maxDMAMaps: UInt32? = nil,
    pgsizes: UInt64? = nil, writeMultiple: Bool? = nil, twinSocket: TwinSocket? = nil,
    migration: LegacyMigration? = nil
  ) {
    self.maxMsgFDs = maxMsgFDs
    self.maxDataXferSize = maxDataXferSize
    self.maxDMAMaps = maxDMAMaps
    self.pgsizes = pgsizes
    self.writeMultiple = writeMultiple
    self.twinSocket = twinSocket
    self.migration = migration
  }

  /// The sparse migration stream's version this code speaks.
  public static let sparseMigrationVersion: UInt32 = 1

  /// Defaults the spec gives for absent keys.
  public static let defaultMaxMsgFDs: UInt32 = 1
  public static let defaultMaxDataXferSize: UInt32 = 1_048_576
  public static let defaultMaxDMAMaps: UInt32 = 65535
  public static let defaultPgsizes: UInt64 = 4096

  public var effectiveMaxMsgFDs: UInt32 { maxMsgFDs ?? Self.defaultMaxMsgFDs }
  public var effectiveMaxDataXferSize: UInt32 { maxDataXferSize ?? Self.defaultMaxDataXferSize }
  public var effectiveMaxDMAMaps: UInt32 { maxDMAMaps ?? Self.defaultMaxDMAMaps }
  public var effectivePgsizes: UInt64 { pgsizes ?? Self.defaultPgsizes }

  public enum ParseError: Error, Equatable, CustomStringConvertible {
    case malformedJSON(String)
    case notAnObject(String)
    case wrongType(key: String, expected: String)
    case outOfRange(key: String)

    public var description: String {
      switch self {
      case .malformedJSON(let why): "malformed capabilities JSON: \(why)"
      case .notAnObject(let key): "\(key) is not a JSON object"
      case .wrongType(let key, let expected): "capability \(key) must be \(expected)"
      case .outOfRange(let key): "capability \(key) is out of range"
      }
    }
  }

  /// Parses the version JSON (`{"capabilities": {...}}`). A missing
  /// `capabilities` object means every capability takes its default.
  public static func parse(json: String) throws(ParseError) -> Capabilities {
    let bytes = Array(json.utf8)
    guard let tokener = json_tokener_new() else { throw .malformedJSON("out of memory") }
    defer { json_tokener_free(tokener) }
    // Strict RFC 8259: no comments, trailing commas, leading zeros or bare words.
    json_tokener_set_flags(tokener, JSON_TOKENER_STRICT)
    let root: OpaquePointer? = bytes.withUnsafeBufferPointer { buffer in
      buffer.withMemoryRebound(to: CChar.self) {
        json_tokener_parse_ex(tokener, $0.baseAddress, Int32($0.count))
      }
    }
    guard let root else {
      let err = json_tokener_get_error(tokener)
      let text = json_tokener_error_desc(err).map { String(cString: $0) } ?? "parse error"
      // A document cut short parses as "continue": report it as truncated.
      if err == json_tokener_continue { throw .malformedJSON("truncated") }
      if hasTrailingBytes(bytes) { throw .malformedJSON("trailing bytes after the JSON value") }
      throw .malformedJSON(text)
    }
    defer { json_object_put(root) }
    guard json_tokener_get_parse_end(tokener) == bytes.count else {
      throw .malformedJSON("trailing bytes after the JSON value")
    }
    guard json_object_get_type(root) == json_type_object else { throw .notAnObject("version data") }
    var caps = Capabilities()
    var object: OpaquePointer?
    guard json_object_object_get_ex(root, "capabilities", &object) != 0, let object else {
      return caps
    }
    guard json_object_get_type(object) == json_type_object else {
      throw .notAnObject("capabilities")
    }

    for (key, value) in entries(of: object) {
      switch key {
      case "max_msg_fds": caps.maxMsgFDs = UInt32(try integer(value, key, max: UInt64(UInt32.max)))
      case "max_data_xfer_size":
        caps.maxDataXferSize = UInt32(try integer(value, key, min: 1, max: UInt64(UInt32.max)))
      case "max_dma_maps":
        caps.maxDMAMaps = UInt32(try integer(value, key, max: UInt64(UInt32.max)))
      case "pgsizes": caps.pgsizes = try integer(value, key, min: 1, max: UInt64.max)
      case "write_multiple": caps.writeMultiple = try boolean(value, key)
      case "twin_socket":
        guard json_object_get_type(value) == json_type_object else { throw .notAnObject(key) }
        var twin = TwinSocket(supported: false)
        for (k, v) in entries(of: value!) {
          switch k {
          case "supported": twin.supported = try boolean(v, "twin_socket.supported")
          case "fd_index": twin.fdIndex = UInt32(try integer(v, "twin_socket.fd_index", max: 252))
          default: caps.unknownKeys.append("twin_socket.\(k)")
          }
        }
        caps.twinSocket = twin
      case "migration":
        guard json_object_get_type(value) == json_type_object else { throw .notAnObject(key) }
        var legacy = LegacyMigration()
        for (k, v) in entries(of: value!) {
          switch k {
          case "pgsize": legacy.pgsize = try integer(v, "migration.pgsize", max: UInt64(Int64.max))
          case "max_bitmap_size":
            legacy.maxBitmapSize = try integer(
              v, "migration.max_bitmap_size", max: UInt64(Int64.max))
          default: caps.unknownKeys.append("migration.\(k)")
          }
        }
        caps.migration = legacy
      case "xe_vfio_user":
        guard json_object_get_type(value) == json_type_object else { throw .notAnObject(key) }
        for (k, v) in entries(of: value!) {
          switch k {
          case "sparse_migration":
            caps.sparseMigration = UInt32(
              try integer(v, "xe_vfio_user.sparse_migration", max: UInt64(UInt32.max)))
          default: caps.unknownKeys.append("xe_vfio_user.\(k)")
          }
        }
      default:
        caps.unknownKeys.append(key)
      }
    }
    return caps
  }

  /// Whether `bytes` is one complete JSON value followed by more bytes (for a clearer message).
  private static func hasTrailingBytes(_ bytes: [UInt8]) -> Bool {
    guard let tokener = json_tokener_new() else { return false }
    defer { json_tokener_free(tokener) }
    let value: OpaquePointer? = bytes.withUnsafeBufferPointer { buffer in
      buffer.withMemoryRebound(to: CChar.self) {
        json_tokener_parse_ex(tokener, $0.baseAddress, Int32($0.count))
      }
    }
    guard let value else { return false }
    json_object_put(value)
    return json_tokener_get_parse_end(tokener) < bytes.count
  }

  private static func entries(of object: OpaquePointer) -> [(String, OpaquePointer?)] {
    var result: [(String, OpaquePointer?)] = []
    var it = json_object_iter_begin(object)
    var end = json_object_iter_end(object)
    while json_object_iter_equal(&it, &end) == 0 {
      let name = String(cString: json_object_iter_peek_name(&it))
      result.append((name, json_object_iter_peek_value(&it)))
      json_object_iter_next(&it)
    }
    return result
  }

  private static func integer(_ value: OpaquePointer?, _ key: String, min: UInt64 = 0, max: UInt64)
    throws(ParseError) -> UInt64
  {
    guard let value, json_object_get_type(value) == json_type_int else {
      throw .wrongType(key: key, expected: "an integer")
    }
    // json-c keeps a number above INT64_MAX as a uint64 (get_int64 clamps it);
    // pgsizes is a 64-bit bitmap, and an emulated IOMMU offers every size from 4 KiB.
    guard json_object_get_int64(value) >= 0 else { throw .outOfRange(key: key) }
    let unsigned = json_object_get_uint64(value)
    guard unsigned >= min, unsigned <= max else { throw .outOfRange(key: key) }
    return unsigned
  }

  private static func boolean(_ value: OpaquePointer?, _ key: String) throws(ParseError) -> Bool {
    guard let value, json_object_get_type(value) == json_type_boolean else {
      throw .wrongType(key: key, expected: "a boolean")
    }
    return json_object_get_boolean(value) != 0
  }

  /// The version JSON for these capabilities, keys in a fixed order.
  public func json() -> String {
    let caps = json_object_new_object()
    func add(_ key: String, _ value: OpaquePointer?) { json_object_object_add(caps, key, value) }
    if let maxMsgFDs { add("max_msg_fds", json_object_new_int64(Int64(maxMsgFDs))) }
    if let maxDataXferSize {
      add("max_data_xfer_size", json_object_new_int64(Int64(maxDataXferSize)))
    }
    if let maxDMAMaps { add("max_dma_maps", json_object_new_int64(Int64(maxDMAMaps))) }
    if let pgsizes { add("pgsizes", json_object_new_uint64(pgsizes)) }
    if let writeMultiple { add("write_multiple", json_object_new_boolean(writeMultiple ? 1 : 0)) }
    if let twinSocket {
      let twin = json_object_new_object()
      json_object_object_add(
        twin, "supported", json_object_new_boolean(twinSocket.supported ? 1 : 0))
      if let fdIndex = twinSocket.fdIndex {
        json_object_object_add(twin, "fd_index", json_object_new_int64(Int64(fdIndex)))
      }
      add("twin_socket", twin)
    }
    if let migration {
      let mig = json_object_new_object()
      if let pgsize = migration.pgsize {
        json_object_object_add(mig, "pgsize", json_object_new_int64(Int64(pgsize)))
      }
      if let max = migration.maxBitmapSize {
        json_object_object_add(mig, "max_bitmap_size", json_object_new_int64(Int64(max)))
      }
      add("migration", mig)
    }
    if let sparseMigration {
      let ours = json_object_new_object()
      json_object_object_add(
        ours, "sparse_migration", json_object_new_int64(Int64(sparseMigration)))
      add("xe_vfio_user", ours)
    }
    let root = json_object_new_object()
    json_object_object_add(root, "capabilities", caps)
    defer { json_object_put(root) }
    return String(cString: json_object_to_json_string_ext(root, JSON_C_TO_STRING_PLAIN))
  }
}
