import SystemPackage
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

// Errors a person can act on: each says where it happened and what to do.

/// A server that refused the connection with EBUSY: it serves another client
/// (`info` then asks its control socket instead).
public struct BusyServerError: Error, CustomStringConvertible {
  public var end: String
  public init(end: String) { self.end = end }
  public var description: String {
    "\(end): the server is busy with another client (EBUSY); it serves one client at a time, so stop the VMM or command using it first"
  }
}

/// A failure at run time (not a usage mistake): printed as "Error: …" without the usage text.
public struct CLIError: Error, CustomStringConvertible {
  public var description: String
  public init(_ description: String) { self.description = description }
}

/// "ENOSPC (No space left on device)": the name to search for and the text to read.
public func describe(_ errno: Errno) -> String { "\(errno.name) (\(errno))" }

/// One line for any error the migration commands meet.
public func describe(_ error: Error) -> String {
  switch error {
  case let e as VFIOUserClientError:
    switch e {
    case .server(let errno, let command):
      "\(Command(rawValue: command)?.description ?? "command \(command)") failed: \(describe(errno))"
    case .system(let errno): "connection lost: \(describe(errno))"
    case .disconnected: "the server closed the connection"
    case .timedOut: "no reply within \(migrationTimeout / 1000) s"
    case .protocolViolation(let why): "protocol violation: \(why)"
    }
  case let e as Errno: describe(e)
  default: "\(error)"
  }
}

/// An error on one named end: a server socket (`--from /tmp/a.sock`) or a file.
public struct EndError: Error, CustomStringConvertible {
  public var end: String
  public var underlying: Error
  public init(end: String, underlying: Error) {
    self.end = end
    self.underlying = underlying
  }
  public var description: String { "\(end): \(describe(underlying))" }
}

/// Whether `error` says the peer is gone (nothing more can be asked of it).
public func isHangUp(_ error: Error) -> Bool {
  guard let e = error as? VFIOUserClientError else { return false }
  switch e {
  case .disconnected: return true
  case .system(let errno): return errno == .brokenPipe || errno == .connectionReset
  default: return false
  }
}

/// Runs `body`, naming `end` in whatever it throws.
public func on<T>(_ end: String, _ body: () throws -> T) throws -> T {
  do { return try body() } catch let e as EndError { throw e } catch {
    throw EndError(end: end, underlying: error)
  }
}

/// Migration steps a command takes, for error reports that say where it failed.
public enum MigrationStep: String, Sendable {
  case connect = "connect"
  case probe = "check migration support"
  case identity = "compare devices"
  case resuming = "destination RUNNING → RESUMING"
  case stopCopy = "source → STOP_COPY"
  case stream = "stream STOP_COPY data"
  case restoreStream = "stream the saved state into the device"
  case finishSave = "source STOP_COPY → STOP"
  case finishRestore = "destination RESUMING → STOP"
  case start = "destination STOP → RUNNING"
}

public struct StepError: Error, CustomStringConvertible {
  public var step: MigrationStep
  public var underlying: Error
  public init(step: MigrationStep, underlying: Error) {
    self.step = step
    self.underlying = underlying
  }
  public var description: String { "\(step.rawValue) failed: \(describe(underlying))" }
}

public func step<T>(_ step: MigrationStep, _ body: () throws -> T) throws -> T {
  do { return try body() } catch let e as StepError { throw e } catch {
    throw StepError(step: step, underlying: error)
  }
}

/// Connects to the server that `option` (e.g. `--from`) names, with a message
/// that says what to do when it is absent or busy, the same for every command.
/// `sparse` offers the sparse migration stream (the client's
/// `sparseMigration` says whether the server took it).
public func connectServer(_ path: String, option: String, sparse: Bool = false) throws
  -> VFIOUserClient
{
  do {
    let client = try VFIOUserClient.connect(
      path: path,
      capabilities: sparse ? VFIOUserClient.sparseCapabilities : VFIOUserClient.defaultCapabilities)
    client.timeoutMilliseconds = migrationTimeout
    return client
  } catch {
    let end = "\(option) \(path)"
    switch error {
    case .server(.resourceBusy, _):
      throw BusyServerError(end: end)
    case .server(.permissionDenied, _):
      throw CLIError(
        "\(end): the server does not serve this user (EACCES); see its --allow-uid and --allow-gid")
    case .system(.permissionDenied):
      throw CLIError(
        "\(end): no permission to connect to the socket (EACCES); see its mode and group")
    case .system(.noSuchFileOrDirectory):
      throw CLIError("\(end): no such socket (ENOENT); is the server running?")
    case .system(.connectionRefused):
      throw CLIError("\(end): no server is listening there (ECONNREFUSED)")
    default:
      throw EndError(end: end, underlying: error)
    }
  }
}
