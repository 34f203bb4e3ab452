import CJSONC

/// A JSON value, read and written with json-c: the control protocol's codec
/// (protocol/control.md). Object members keep their order.
public indirect enum JSON: Sendable, Equatable {
  case null
  case bool(Bool)
  case int(Int64)
  /// A number above Int64.max (json-c keeps those as unsigned).
  case uint(UInt64)
  case double(Double)
  case string(String)
  case array([JSON])
  case object([(String, JSON)])

  public static func == (a: JSON, b: JSON) -> Bool {
    switch (a, b) {
    case (.null, .null): true
    case (.bool(let x), .bool(let y)): x == y
    case (.int(let x), .int(let y)): x == y
    case (.uint(let x), .uint(let y)): x == y
    case (.int(let x), .uint(let y)), (.uint(let y), .int(let x)): x >= 0 && UInt64(x) == y
    case (.double(let x), .double(let y)): x == y
    case (.string(let x), .string(let y)): x == y
    case (.array(let x), .array(let y)): x == y
    case (.object(let x), .object(let y)):
      x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    default: false
    }
  }

  /// A member of an object (the first of that name), or nil.
  public subscript(key: String) -> JSON? {
    guard case .object(let members) = self else { return nil }
    return members.first { $0.0 == key }?.1
  }

  public var string: String? {
    if case .string(let s) = self { return s }
    return nil
  }

  /// An integer as Int64 (nil for anything else, or one above Int64.max).
  public var integer: Int64? {
    switch self {
    case .int(let n): n
    case .uint(let n): Int64(exactly: n)
    default: nil
    }
  }

  public var array: [JSON]? {
    if case .array(let a) = self { return a }
    return nil
  }

  public var bool: Bool? {
    if case .bool(let b) = self { return b }
    return nil
  }

  /// Why a text is not one JSON value.
  public struct ParseError: Error, Equatable, CustomStringConvertible {
    public var description: String
  }

  /// Parses exactly one JSON value (strict RFC 8259: no comments, trailing
  /// commas or bare words), nothing after it but whitespace.
  public static func parse(_ bytes: some Collection<UInt8>) throws(ParseError) -> JSON {
    let text = Array(bytes)
    guard let tokener = json_tokener_new() else { throw ParseError(description: "out of memory") }
    defer { json_tokener_free(tokener) }
    json_tokener_set_flags(tokener, JSON_TOKENER_STRICT)
    let root: OpaquePointer? = text.withUnsafeBufferPointer { buffer in
      buffer.withMemoryRebound(to: CChar.self) {
        json_tokener_parse_ex(tokener, $0.baseAddress, Int32($0.count))
      }
    }
    let error = json_tokener_get_error(tokener)
    guard let root else {
      // Cut short (or a bare number, which only the end of input ends).
      if error == json_tokener_continue { throw ParseError(description: "incomplete JSON value") }
      let why = json_tokener_error_desc(error).map { String(cString: $0) } ?? "parse error"
      throw ParseError(description: why)
    }
    defer { json_object_put(root) }
    let end = Int(json_tokener_get_parse_end(tokener))
    guard text[min(end, text.count)...].allSatisfy({ [0x20, 0x09, 0x0A, 0x0D].contains($0) })
    else { throw ParseError(description: "trailing bytes after the JSON value") }
    return value(root)
  }

  private static func value(_ object: OpaquePointer?) -> JSON {
    guard let object else { return .null }
    switch json_object_get_type(object) {
    case json_type_boolean: return .bool(json_object_get_boolean(object) != 0)
    case json_type_int:
      let signed = json_object_get_int64(object)
      if signed == Int64.max { return .uint(json_object_get_uint64(object)) }
      return .int(signed)
    case json_type_double: return .double(json_object_get_double(object))
    case json_type_string:
      let count = Int(json_object_get_string_len(object))
      let base = json_object_get_string(object)!
      return .string(
        String(
          decoding: UnsafeRawBufferPointer(start: base, count: count), as: UTF8.self))
    case json_type_array:
      let count = json_object_array_length(object)
      return .array((0..<count).map { value(json_object_array_get_idx(object, $0)) })
    case json_type_object:
      var members: [(String, JSON)] = []
      var it = json_object_iter_begin(object)
      var end = json_object_iter_end(object)
      while json_object_iter_equal(&it, &end) == 0 {
        members.append(
          (
            String(cString: json_object_iter_peek_name(&it)),
            value(json_object_iter_peek_value(&it))
          ))
        json_object_iter_next(&it)
      }
      return .object(members)
    default: return .null
    }
  }

  private func make() -> OpaquePointer? {
    switch self {
    case .null: return nil
    case .bool(let b): return json_object_new_boolean(b ? 1 : 0)
    case .int(let n): return json_object_new_int64(n)
    case .uint(let n): return json_object_new_uint64(n)
    case .double(let d): return json_object_new_double(d)
    case .string(let s):
      // With its length: a string may hold a NUL.
      var bytes = Array(s.utf8)
      let count = Int32(bytes.count)
      bytes.append(0)
      return bytes.withUnsafeBufferPointer { buffer in
        buffer.withMemoryRebound(to: CChar.self) {
          json_object_new_string_len($0.baseAddress!, count)
        }
      }
    case .array(let items):
      let array = json_object_new_array()
      for item in items { json_object_array_add(array, item.make()) }
      return array
    case .object(let members):
      let object = json_object_new_object()
      for (key, value) in members { json_object_object_add(object, key, value.make()) }
      return object
    }
  }

  /// The value as JSON text: one line, or indented with `pretty`. Never contains a newline
  /// unless pretty (json-c escapes one inside a string).
  public func serialized(pretty: Bool = false) -> String {
    guard let object = make() else { return "null" }
    defer { json_object_put(object) }
    let flags =
      (pretty ? JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED : JSON_C_TO_STRING_PLAIN)
      | JSON_C_TO_STRING_NOSLASHESCAPE
    return String(cString: json_object_to_json_string_ext(object, flags))
  }
}
