import Foundation

/// The wire contract's files in `protocol/`, for every suite that checks
/// against them.
public enum ProtocolFiles {
  /// `<repo>/protocol`, found from this file's path (`<repo>/Tests/TestSupport/`).
  public static let directory: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent()
    .deletingLastPathComponent()
    .deletingLastPathComponent()
    .appendingPathComponent("protocol", isDirectory: true)

  public static func load<T: Decodable>(_ file: String, as type: T.Type) throws -> T {
    let data = try Data(contentsOf: directory.appendingPathComponent(file))
    return try JSONDecoder().decode(T.self, from: data)
  }

  /// protocol/malformed.json; empty when it cannot be read (the suites that
  /// use it also load it with `load` and report why).
  public static let malformed: [MalformedCase] =
    (try? load("malformed.json", as: [MalformedCase].self)) ?? []
}

/// A test's failure to use the contract's data (bad hex, an unknown kind).
public struct CorpusError: Error, CustomStringConvertible {
  public var description: String
  public init(_ description: String) { self.description = description }
}

/// The header fields of raw message bytes, as far as the bytes reach.
public struct RawHeader: Sendable {
  public var messageID: UInt16
  public var command: UInt16
  /// The header's message size, when the bytes reach it.
  public var declaredSize: UInt32?

  public init(_ bytes: [UInt8]) {
    func byte(_ i: Int) -> UInt32 { i < bytes.count ? UInt32(bytes[i]) : 0 }
    messageID = UInt16(byte(0) | byte(1) << 8)
    command = UInt16(byte(2) | byte(3) << 8)
    declaredSize = bytes.count >= 8 ? byte(4) | byte(5) << 8 | byte(6) << 16 | byte(7) << 24 : nil
  }
}
