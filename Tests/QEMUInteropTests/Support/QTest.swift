import CVFIOUser
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A line-oriented Unix stream socket with a bounded wait on every read.
final class LineSocket {
  let fd: Int32
  private var buffer: [UInt8] = []
  let timeout: Double

  /// Connects to `path`, retrying while the listener is not up yet (QEMU
  /// creates its qtest and QMP sockets during start-up).
  init(path: String, timeout: Double = 15, alive: () -> Bool = { true }) throws {
    self.timeout = timeout
    var fd: Int32 = -1
    let deadline = Date().addingTimeInterval(timeout)
    while fd < 0 {
      fd = cvfu_connect_unix(path)
      if fd >= 0 { break }
      guard Date() < deadline, alive() else {
        throw InteropError("cannot connect to \(path): \(String(cString: strerror(-fd)))")
      }
      usleep(10_000)
    }
    self.fd = fd
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)  // every wait is bounded
  }

  deinit { close(fd) }

  func send(_ line: String) throws {
    var bytes = Array((line + "\n").utf8)
    var offset = 0
    let deadline = Date().addingTimeInterval(timeout)
    while offset < bytes.count {
      var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
      guard poll(&poller, 1, 1000) > 0 else {
        guard Date() < deadline else {
          throw InteropError("the peer stopped reading for \(timeout) s")
        }
        continue
      }
      let n = bytes.withUnsafeMutableBytes {
        write(fd, $0.baseAddress! + offset, $0.count - offset)
      }
      if n < 0, errno == EAGAIN || errno == EINTR { continue }
      guard n > 0 else {
        throw InteropError("write to socket failed: \(String(cString: strerror(errno)))")
      }
      offset += n
    }
    bytes.removeAll()
  }

  /// The next line (without the newline), or an error after `timeout` seconds.
  func readLine(timeout: Double? = nil) throws -> String {
    let deadline = Date().addingTimeInterval(timeout ?? self.timeout)
    while true {
      if let newline = buffer.firstIndex(of: 10) {
        let line = String(decoding: buffer[..<newline], as: UTF8.self)
        buffer.removeSubrange(...newline)
        return line.hasSuffix("\r") ? String(line.dropLast()) : line
      }
      let left = deadline.timeIntervalSinceNow
      guard left > 0 else { throw InteropError("no reply within \(timeout ?? self.timeout) s") }
      guard cvfu_wait_readable(fd, Int32(min(left, 1) * 1000) + 1) > 0 else { continue }
      var chunk = [UInt8](repeating: 0, count: 1 << 16)
      let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
      if n < 0, errno == EAGAIN || errno == EINTR { continue }
      guard n > 0 else { throw InteropError("the peer closed the socket") }
      buffer.append(contentsOf: chunk[..<n])
    }
  }
}

/// QEMU's qtest protocol (`-qtest unix:...`): port I/O, guest-physical memory
/// access and more, with no guest code running.
final class QTest {
  let socket: LineSocket
  /// "IRQ raise/lower" lines received while waiting for replies.
  private(set) var irqEvents: [String] = []

  init(path: String, alive: () -> Bool) throws {
    socket = try LineSocket(path: path, alive: alive)
  }

  /// Sends one command and returns the words after "OK".
  @discardableResult
  func command(_ text: String) throws -> [Substring] {
    try socket.send(text)
    while true {
      let line = try socket.readLine()
      if line.hasPrefix("IRQ") {
        irqEvents.append(line)
        continue
      }
      let words = line.split(separator: " ")
      guard words.first == "OK" else { throw InteropError("qtest '\(text)' failed: \(line)") }
      return Array(words.dropFirst())
    }
  }

  private func value(_ text: String) throws -> UInt64 {
    let words = try command(text)
    guard let word = words.first, word.hasPrefix("0x"),
      let value = UInt64(word.dropFirst(2), radix: 16)
    else {
      throw InteropError("qtest '\(text)': unexpected reply \(words)")
    }
    return value
  }

  func outb(_ port: UInt16, _ value: UInt8) throws {
    try command("outb 0x\(hex(port)) 0x\(hex(value))")
  }
  func outw(_ port: UInt16, _ value: UInt16) throws {
    try command("outw 0x\(hex(port)) 0x\(hex(value))")
  }
  func outl(_ port: UInt16, _ value: UInt32) throws {
    try command("outl 0x\(hex(port)) 0x\(hex(value))")
  }
  func inb(_ port: UInt16) throws -> UInt8 {
    UInt8(truncatingIfNeeded: try value("inb 0x\(hex(port))"))
  }
  func inw(_ port: UInt16) throws -> UInt16 {
    UInt16(truncatingIfNeeded: try value("inw 0x\(hex(port))"))
  }
  func inl(_ port: UInt16) throws -> UInt32 {
    UInt32(truncatingIfNeeded: try value("inl 0x\(hex(port))"))
  }

  func readl(_ address: UInt64) throws -> UInt32 {
    UInt32(truncatingIfNeeded: try value("readl 0x\(hex(address))"))
  }
  func readq(_ address: UInt64) throws -> UInt64 { try value("readq 0x\(hex(address))") }
  func writel(_ address: UInt64, _ value: UInt32) throws {
    try command("writel 0x\(hex(address)) 0x\(hex(value))")
  }
  func writeq(_ address: UInt64, _ value: UInt64) throws {
    try command("writeq 0x\(hex(address)) 0x\(hex(value))")
  }

  /// Bytes of guest-physical memory (or MMIO), as the CPU would read them.
  func read(_ address: UInt64, count: Int) throws -> [UInt8] {
    let words = try command("b64read 0x\(hex(address)) 0x\(hex(count))")
    guard let text = words.first, let data = Data(base64Encoded: String(text)), data.count == count
    else {
      throw InteropError("b64read of \(count) bytes at 0x\(hex(address)): bad reply")
    }
    return [UInt8](data)
  }

  func write(_ address: UInt64, _ bytes: [UInt8]) throws {
    try command(
      "b64write 0x\(hex(address)) 0x\(hex(bytes.count)) \(Data(bytes).base64EncodedString())")
  }

  func memset(_ address: UInt64, count: Int, value: UInt8) throws {
    try command("memset 0x\(hex(address)) 0x\(hex(count)) 0x\(hex(value))")
  }

  /// Sends commands in batches of `batch` before collecting their replies
  /// (QEMU blocks writing replies nobody reads, so a batch must fit the socket).
  func pipeline(_ commands: [String], batch: Int = 64) throws {
    var next = 0
    while next < commands.count {
      let slice = commands[next..<min(next + batch, commands.count)]
      for text in slice { try socket.send(text) }
      var replies = 0
      while replies < slice.count {
        let line = try socket.readLine()
        if line.hasPrefix("IRQ") {
          irqEvents.append(line)
          continue
        }
        guard line.hasPrefix("OK") else {
          throw InteropError("qtest burst failed at command \(next + replies): \(line)")
        }
        replies += 1
      }
      next += slice.count
    }
  }
}

func hex<T: BinaryInteger>(_ value: T) -> String { String(value, radix: 16) }

/// QMP (`-qmp unix:...`): JSON commands; events are kept, not returned.
final class QMP {
  let socket: LineSocket
  private(set) var events: [String] = []

  init(path: String, alive: () -> Bool) throws {
    socket = try LineSocket(path: path, alive: alive)
    let greeting = try socket.readLine()
    guard greeting.contains("\"QMP\"") else {
      throw InteropError("not a QMP greeting: \(greeting)")
    }
    _ = try execute("qmp_capabilities")
  }

  /// Runs `command` and returns its "return" value.
  @discardableResult
  func execute(_ command: String, _ arguments: [String: Any]? = nil) throws -> Any {
    var request: [String: Any] = ["execute": command]
    if let arguments { request["arguments"] = arguments }
    let data = try JSONSerialization.data(withJSONObject: request)
    try socket.send(String(decoding: data, as: UTF8.self))
    while true {
      let line = try socket.readLine()
      guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
      else {
        throw InteropError("QMP: not a JSON object: \(line)")
      }
      if let event = object["event"] as? String {
        events.append(event)
        continue
      }
      if let error = object["error"] { throw InteropError("QMP \(command) failed: \(error)") }
      if let value = object["return"] { return value }
    }
  }

  /// Waits for `event` (already received, or arriving within `timeout`).
  func waitForEvent(_ event: String, timeout: Double = 10) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while !events.contains(event) {
      let left = deadline.timeIntervalSinceNow
      guard left > 0 else {
        throw InteropError("QMP event \(event) did not arrive within \(timeout) s")
      }
      let line = try socket.readLine(timeout: left)
      if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
        let name = object["event"] as? String
      {
        events.append(name)
      }
    }
  }
}
