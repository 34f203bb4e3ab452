import CVFIOUser
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// Why talking to a control socket failed.
public enum ControlClientError: Error, Equatable, CustomStringConvertible {
  case system(Errno)
  /// The server hung up.
  case closed
  /// The server sent something that is not the protocol.
  case malformed(String)
  /// The server answered with an error (instead of the greeting, or to a command).
  case refused(errorClass: String, description: String)

  public var description: String {
    switch self {
    case .system(let errno): "\(errno.name) (\(errno))"
    case .closed: "the server closed the control connection"
    case .malformed(let why): "not the control protocol: \(why)"
    case .refused(let errorClass, let why): "\(errorClass): \(why)"
    }
  }
}

/// A control channel client (protocol/control.md): `xe-vfio-user info` on a
/// live server, and the tests.
public final class ControlClient {
  public let fd: Int32
  /// The greeting's `xe-vfio-user` object.
  public private(set) var greeting: JSON = .null
  private var pending: [UInt8] = []
  private var nextID: Int64 = 1
  /// Events that arrived while a reply was awaited, oldest first (`nextEvent` takes them).
  public private(set) var events: [JSON] = []

  /// Connects and reads the greeting (an error line in its place is thrown as `.refused`).
  public init(path: String, timeoutMilliseconds: Int32 = 5000) throws(ControlClientError) {
    let fd = cvfu_connect_unix(path)
    guard fd >= 0 else { throw .system(Errno(rawValue: -fd)) }
    self.fd = fd
    _ = cvfu_set_recv_timeout_ms(fd, timeoutMilliseconds)
    _ = cvfu_set_send_timeout_ms(fd, timeoutMilliseconds)
    let first: JSON
    do throws(ControlClientError) {
      first = try readMessage()
    } catch {
      close(fd)
      throw error
    }
    if let failure = Self.failure(first) {
      close(fd)
      throw failure
    }
    guard let greeting = first["xe-vfio-user"] else {
      close(fd)
      throw .malformed("no greeting: \(first.serialized())")
    }
    self.greeting = greeting
  }

  deinit { close(fd) }

  private static func failure(_ reply: JSON) -> ControlClientError? {
    guard let error = reply["error"] else { return nil }
    return .refused(
      errorClass: error["class"]?.string ?? "?", description: error["desc"]?.string ?? "?")
  }

  /// Runs `command` and returns its `return` value (an error reply is thrown).
  public func execute(_ command: String, arguments: JSON? = nil) throws(ControlClientError) -> JSON
  {
    let id = JSON.int(nextID)
    nextID += 1
    var request: [(String, JSON)] = [("execute", .string(command))]
    if let arguments { request.append(("arguments", arguments)) }
    request.append(("id", id))
    try send(line: Array(JSON.object(request).serialized().utf8))
    var reply = try readMessage()
    while reply["event"] != nil {
      events.append(reply)
      reply = try readMessage()
    }
    if let failure = Self.failure(reply) { throw failure }
    guard reply["id"] == id, let value = reply["return"] else {
      throw .malformed("unexpected reply: \(reply.serialized())")
    }
    return value
  }

  /// The next event: one that came with a reply, else the next line the
  /// server sends (within the receive timeout), which must be an event.
  public func nextEvent() throws(ControlClientError) -> JSON {
    if !events.isEmpty { return events.removeFirst() }
    let message = try readMessage()
    guard message["event"] != nil else {
      throw .malformed("expected an event: \(message.serialized())")
    }
    return message
  }

  /// Sets how long a read waits for the server (5 s unless told otherwise).
  public func setReceiveTimeout(milliseconds: Int32) {
    _ = cvfu_set_recv_timeout_ms(fd, milliseconds)
  }

  /// Sends `line` and a newline as they are.
  public func send(line: [UInt8]) throws(ControlClientError) {
    let bytes = line + [0x0A]
    var sent = 0
    while sent < bytes.count {
      let n = bytes.withUnsafeBytes {
        Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL))
      }
      if n < 0, errno == EINTR { continue }
      guard n > 0 else { throw .system(Errno(rawValue: errno)) }
      sent += n
    }
  }

  /// The next line the server sends, parsed.
  public func readMessage() throws(ControlClientError) -> JSON {
    let line = try readLine()
    do throws(JSON.ParseError) { return try JSON.parse(line) } catch {
      throw .malformed("\(error)")
    }
  }

  /// The next line the server sends, without its newline.
  public func readLine() throws(ControlClientError) -> [UInt8] {
    var chunk = [UInt8](repeating: 0, count: 16 << 10)
    while true {
      if let newline = pending.firstIndex(of: 0x0A) {
        let line = Array(pending[..<newline])
        pending.removeFirst(newline + 1)
        return line
      }
      let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
      if n < 0, errno == EINTR { continue }
      if n < 0 { throw .system(Errno(rawValue: errno)) }
      guard n > 0 else { throw .closed }
      pending += chunk[0..<n]
    }
  }
}
