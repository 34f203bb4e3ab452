import SystemPackage
import VFIOUser

/// Why a client call failed.
public enum VFIOUserClientError: Error, Equatable, CustomStringConvertible {
  /// The server answered with an error reply.
  case server(Errno, command: UInt16)
  /// The server broke the protocol (wrong reply id or command, bad layout).
  case protocolViolation(String)
  /// The server closed the connection.
  case disconnected
  /// A local system call failed.
  case system(Errno)
  /// No reply within the timeout.
  case timedOut

  public var errno: Errno? {
    if case .server(let e, _) = self { return e }
    return nil
  }

  public var description: String {
    switch self {
    case .server(let e, let command):
      "\(Command(rawValue: command)?.description ?? "command \(command)") failed: \(e.name) (\(e))"
    case .protocolViolation(let why): "protocol violation: \(why)"
    case .disconnected: "the server closed the connection"
    case .system(let e): "system error: \(e)"
    case .timedOut: "timed out waiting for the server"
    }
  }
}
