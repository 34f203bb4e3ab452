import CVFIOUser
import Control
import Foundation
import Logging
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// A simulated VF served in-process on a device socket, with its control
/// socket beside it, in a private directory; stopped by `close()`.
final class ControlledServer: @unchecked Sendable {
  let server: VFIOUserServer
  let control: ControlServer
  let directory: String
  let path: String
  var controlPath: String { path + ".control" }

  init(
    limits: ServerLimits = ServerLimits(), maxControlClients: Int = 128,
    sendTimeoutMilliseconds: Int32 = 5000, eventQueueCapacity: Int = 256,
    requestTimeoutMilliseconds: Int = 5000, logLevel: RuntimeLogLevel? = nil,
    counting: Bool = true
  ) throws {
    directory = NSTemporaryDirectory() + "xvu-ctl-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    path = directory + "/vf.sock"
    var logger = Logger(label: "test-control")
    logger.logLevel =
      ProcessInfo.processInfo.environment["XVU_TEST_LOG"] != nil ? .trace : .critical
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 4 << 20, logger: logger)
    server = VFIOUserServer(backend: vf, limits: limits, logger: logger, counting: counting)
    control = ControlServer(
      server: server,
      identity: ControlIdentity(
        device: "simulated Xe VF bmg (test)", backend: "simulated", socket: path,
        version: "test"),
      logger: logger, maxClients: maxControlClients,
      sendTimeoutMilliseconds: sendTimeoutMilliseconds, eventQueueCapacity: eventQueueCapacity,
      requestTimeoutMilliseconds: requestTimeoutMilliseconds, logLevel: logLevel)
    try server.listen(socketPath: path)
    try control.listen(socketPath: controlPath)
    control.start()
    server.start()
  }

  func connect() throws -> VFIOUserClient { try VFIOUserClient.connect(path: path) }
  func controlClient() throws -> ControlClient { try ControlClient(path: controlPath) }

  /// A control client that asked for events (`qmp_capabilities`).
  func listener() throws -> ControlClient {
    let client = try controlClient()
    _ = try client.execute("qmp_capabilities")
    return client
  }

  /// Polls query-status until `condition` holds (or `timeout` seconds pass).
  func waitForStatus(timeout: Double = 5, _ condition: (JSON) -> Bool) throws -> JSON {
    let client = try controlClient()
    let deadline = Date().addingTimeInterval(timeout)
    var status = try client.execute("query-status")
    while !condition(status), Date() < deadline {
      usleep(5000)
      status = try client.execute("query-status")
    }
    return status
  }

  func close() {
    server.stop()
    control.stop()
    try? FileManager.default.removeItem(atPath: directory)
  }
}

/// A raw control connection: bytes in, lines out, nothing checked.
final class RawControl {
  let fd: Int32
  init(_ path: String) throws {
    fd = cvfu_connect_unix(path)
    guard fd >= 0 else { throw POSIXError(.init(rawValue: -fd) ?? .EIO) }
    _ = cvfu_set_recv_timeout_ms(fd, 5000)
  }
  deinit { close(fd) }

  func send(_ bytes: [UInt8]) -> Bool {
    var sent = 0
    while sent < bytes.count {
      let n = bytes.withUnsafeBytes {
        Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL))
      }
      guard n > 0 else { return false }
      sent += n
    }
    return true
  }

  func send(_ text: String) -> Bool { send(Array(text.utf8)) }

  /// Everything until the server closes (or the receive timeout), split in lines.
  func readToEnd() -> [String] {
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
      let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
      guard n > 0 else { break }
      bytes += chunk[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self).split(separator: "\n").map(String.init)
  }
}
