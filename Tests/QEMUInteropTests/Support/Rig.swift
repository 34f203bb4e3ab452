import Foundation
import TestSupport

/// Our server and a QEMU attached to it, in a private directory under /tmp.
/// `close()` stops both and removes the directory (set XE_VFU_KEEP=1 to keep
/// the logs: server.log, qemu-*.log, qemu-trace-*.log).
final class Rig {
  let directory: String
  let server: ServeProcess
  private(set) var qemu: QEMUSession!

  init(_ tag: String, server arguments: [String] = [], qemu options: QEMUOptions? = QEMUOptions())
    throws
  {
    directory = try makeScratchDirectory(tag)
    server = try ServeProcess(
      arguments, directory: directory, socketName: "vfu.sock",
      logPath: directory + "/server.log", tracing: true, waitUntilServing: true)
    if let options { try attach(options) }
  }

  /// Starts a (new) QEMU on the server's socket.
  @discardableResult
  func attach(_ options: QEMUOptions = QEMUOptions()) throws -> QEMUSession {
    qemu = try QEMUSession(directory: directory, socketPath: server.socketPath, options: options)
    return qemu
  }

  func close() {
    qemu?.process.stop()
    server.stop(grace: 5, keepDirectory: true)
    if ProcessInfo.processInfo.environment["XE_VFU_KEEP"] == nil {
      try? FileManager.default.removeItem(atPath: directory)
    } else {
      print("kept \(directory)")
    }
  }

  /// The last lines of both logs, for failure messages.
  var logs: String {
    let tail = { (text: String) in text.split(separator: "\n").suffix(25).joined(separator: "\n") }
    return "server log:\n\(tail(server.log))\nQEMU log:\n\(tail(qemu?.process.log ?? ""))"
  }
}
