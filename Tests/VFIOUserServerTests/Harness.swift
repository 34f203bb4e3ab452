import CVFIOUser
import Foundation
import Logging
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

/// A server on a fresh socket in a private directory, stopped by `close()`.
final class RunningServer: @unchecked Sendable {
  let server: VFIOUserServer
  let directory: String
  let path: String

  init(backend: any VFIODeviceBackend, limits: ServerLimits = ServerLimits()) throws {
    directory = NSTemporaryDirectory() + "xvu-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    path = directory + "/vfu.sock"
    var logger = Logger(label: "test-server")
    logger.logLevel =
      ProcessInfo.processInfo.environment["XVU_TEST_LOG"] != nil ? .trace : .critical
    server = VFIOUserServer(backend: backend, limits: limits, logger: logger)
    try server.listen(socketPath: path)
    server.start()
  }

  func connect(
    capabilities: Capabilities = VFIOUserClient.defaultCapabilities,
    dmaLayout: DMATransferLayout = .spec
  ) throws -> VFIOUserClient {
    try VFIOUserClient.connect(path: path, capabilities: capabilities, dmaLayout: dmaLayout)
  }

  /// Waits until the server has noticed a hang-up (or `condition` holds).
  func waitFor(_ condition: (ServerSnapshot) -> Bool, timeout: Double = 5) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
      if condition(server.statistics.snapshot) { return true }
      usleep(2000)
    }
    return condition(server.statistics.snapshot)
  }

  func close() {
    server.stop()
    try? FileManager.default.removeItem(atPath: directory)
  }
}

/// Runs `body` against a server of `backend`, stopping it afterwards.
func withServer<D: VFIODeviceBackend>(
  _ backend: D, limits: ServerLimits = ServerLimits(), _ body: (RunningServer, D) throws -> Void
) throws {
  let running = try RunningServer(backend: backend, limits: limits)
  defer { running.close() }
  try body(running, backend)
}

func expectServerError(
  _ errno: Errno, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void
) {
  do {
    try body()
    Issue.record("expected \(errno.name), got success", sourceLocation: sourceLocation)
  } catch let error as VFIOUserClientError {
    #expect(
      error == .server(errno, command: commandOf(error)), "expected \(errno.name), got \(error)",
      sourceLocation: sourceLocation)
  } catch {
    Issue.record("expected \(errno.name), got \(error)", sourceLocation: sourceLocation)
  }
}

private func commandOf(_ error: VFIOUserClientError) -> UInt16 {
  if case .server(_, let command) = error { return command }
  return 0
}

func makeEventFD() -> Int32 {
  let fd = cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC)
  precondition(fd >= 0)
  return fd
}

/// Reads an eventfd counter (0 when nothing was signalled).
func eventCount(_ fd: Int32) -> Int64 {
  let n = cvfu_eventfd_drain(fd)
  return n < 0 ? 0 : n
}

/// Polls `condition` (which may itself talk to the server) until it holds.
func eventually(timeout: Double = 5, _ condition: () throws -> Bool) rethrows -> Bool {
  let deadline = Date().addingTimeInterval(timeout)
  while Date() < deadline {
    if try condition() { return true }
    usleep(1000)
  }
  return try condition()
}

func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

/// The next message from the server, as `#require` would take it out of the
/// optional (which it cannot for a noncopyable message): none within the
/// timeout records an issue and throws.
func requireMessage(
  _ client: VFIOUserClient, timeoutMilliseconds: Int32? = nil, _ comment: Comment? = nil,
  sourceLocation: SourceLocation = #_sourceLocation
) throws -> ClientMessage {
  let message = try client.receiveMessage(timeoutMilliseconds: timeoutMilliseconds)
  let arrived = message != nil
  try #require(arrived, comment, sourceLocation: sourceLocation)
  guard let message else { preconditionFailure("#require(arrived) throws") }
  return message
}
