// Payload encoding and whole-message helpers; the byte codec is ByteCursor.swift.

import SystemPackage

/// A payload with a fixed wire layout. Decoding validates everything the
/// layout alone can tell (sizes, reserved bits); semantic checks against the
/// device happen in the server.
public protocol WirePayload: Equatable, Sendable {
  init(decoding bytes: UnsafeRawBufferPointer) throws(Errno)
  var encodedSize: Int { get }
  func encode(into bytes: UnsafeMutableRawBufferPointer)
}

extension WirePayload {
  public func encoded() -> [UInt8] {
    var out = [UInt8](repeating: 0, count: encodedSize)
    out.withUnsafeMutableBytes { encode(into: $0) }
    return out
  }

  public init(decoding bytes: [UInt8]) throws(Errno) {
    let result: Result<Self, Errno> = bytes.withUnsafeBytes { raw in
      do throws(Errno) { return .success(try Self(decoding: raw)) } catch { return .failure(error) }
    }
    self = try result.get()
  }
}

/// Builds a whole message (header plus payload) as bytes; used by clients,
/// tests and the golden vectors, never on the server's hot path.
public func encodeMessage(
  id: UInt16, command: UInt16, flags: MessageHeader.Flags = .command, error: UInt32 = 0,
  payload: [UInt8]
) -> [UInt8] {
  var out = [UInt8](repeating: 0, count: MessageHeader.size + payload.count)
  out.withUnsafeMutableBytes { raw in
    MessageHeader(
      messageID: id, command: command, size: UInt32(raw.count), flags: flags, error: error
    ).encode(into: raw)
  }
  out.replaceSubrange(MessageHeader.size..., with: payload)
  return out
}

/// `withUnsafeBytes` for a body with typed throws (the standard one rethrows untyped).
public func decodeBytes<T>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws(Errno) -> T)
  throws(Errno) -> T
{
  let result: Result<T, Errno> = bytes.withUnsafeBytes { raw in
    do throws(Errno) { return .success(try body(raw)) } catch { return .failure(error) }
  }
  return try result.get()
}
