import CVFIOUser
import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// What a successor says first: the state versions it reads, who it is.
public struct HandoverHello: Sendable, Equatable {
  public var minimumVersion: UInt32
  public var maximumVersion: UInt32
  public var pid: Int32
  /// The successor binary's version (`xe-vfio-user --version`).
  public var version: String

  public init(minimumVersion: UInt32, maximumVersion: UInt32, pid: Int32, version: String) {
    self.minimumVersion = minimumVersion
    self.maximumVersion = maximumVersion
    self.pid = pid
    self.version = version
  }

  public func encoded() -> [UInt8] {
    var out = HandoverEncoder()
    out.u32(minimumVersion)
    out.u32(maximumVersion)
    out.u32(UInt32(bitPattern: pid))
    out.string(version)
    return out.bytes
  }

  public init(decoding bytes: [UInt8]) throws(HandoverRefusal) {
    var input = HandoverDecoder(bytes, what: "the successor's hello")
    minimumVersion = try input.u32()
    maximumVersion = try input.u32()
    pid = Int32(bitPattern: try input.u32())
    version = try input.string()
    try input.finish()
  }

  /// Whether the successor reads what this build writes.
  public var readsThisVersion: Bool {
    (minimumVersion...max(minimumVersion, maximumVersion)).contains(HandoverRecord.version)
  }
}

/// The descriptor number a successor finds its end of the handover socket at.
public let successorHandoverFD: Int32 = 3

/// A new server process started to take over, and its end of the handover.
public final class Successor: @unchecked Sendable {
  public let pid: pid_t
  public let binary: String
  public let link: HandoverLink
  public private(set) var hello: HandoverHello?
  private var reaped = false

  /// Starts `binary serve --handover-fd 3` with the handover socket as
  /// descriptor 3 (and standard input, output and error shared: its log goes
  /// where this server's goes), then waits for its hello.
  public init(binary: String, timeoutMilliseconds: Int32) throws(HandoverRefusal) {
    self.binary = binary
    guard access(binary, X_OK) == 0 else {
      throw HandoverRefusal(
        "the new binary \(binary) cannot be run: \(Errno(rawValue: errno))")
    }
    let (link, childEnd): (HandoverLink, HandoverLink)
    do throws(Errno) { (link, childEnd) = try HandoverLink.pair() } catch {
      throw HandoverRefusal("cannot make the handover socket: \(error)")
    }
    self.link = link
    let arguments = [binary, "serve", "--handover-fd", "\(successorHandoverFD)"]
    let argv = arguments.map { strdup($0) } + [nil]
    defer { for pointer in argv { free(pointer) } }
    var pid: pid_t = 0
    // dup2 clears close-on-exec on the copy; everything else above 3 is closed.
    let dups: [Int32] = [childEnd.descriptor.rawValue, successorHandoverFD]
    let rc = cvfu_spawn(&pid, binary, argv, nil, dups, 1, successorHandoverFD + 1, 0)
    childEnd.close()
    guard rc == 0 else {
      throw HandoverRefusal("cannot start the new binary \(binary): \(Errno(rawValue: rc))")
    }
    self.pid = pid
    do throws(HandoverRefusal) {
      let message = try link.receive(timeoutMilliseconds: timeoutMilliseconds)
      guard message.kind == .hello, message.descriptors.isEmpty else {
        throw HandoverRefusal("the new binary said \(message.kind) before hello")
      }
      let hello = try HandoverHello(decoding: message.payload)
      self.hello = hello
      guard hello.readsThisVersion else {
        throw HandoverRefusal(
          "the new binary (\(hello.version)) reads state versions \(hello.minimumVersion)–\(hello.maximumVersion), not \(HandoverRecord.version)"
        )
      }
    } catch {
      let exit = abandon(error.reason)
      throw HandoverRefusal("the new binary \(binary) did not take over: \(error.reason)\(exit)")
    }
  }

  /// Calls the update off: tells the successor (if it still listens), waits
  /// a moment for it to exit, kills it otherwise, and reaps it. Returns how
  /// it ended, for the message (", it exited with status 3").
  @discardableResult
  public func abandon(_ reason: String) -> String {
    try? link.send(.abort, Array(reason.utf8))
    link.close()
    return reap(graceMilliseconds: 2000)
  }

  /// Reaps the successor, killing it after `graceMilliseconds`.
  private func reap(graceMilliseconds: Int) -> String {
    guard !reaped else { return "" }
    reaped = true
    var status: Int32 = 0
    var waited = 0
    while true {
      let r = waitpid(pid, &status, WNOHANG)
      if r == pid { break }
      if r < 0, errno != EINTR { return "" }
      if waited >= graceMilliseconds {
        kill(pid, SIGKILL)
        while waitpid(pid, &status, 0) < 0, errno == EINTR {}
        return " (it did not exit: killed)"
      }
      usleep(10_000)
      waited += 10
    }
    let signal = status & 0x7f
    if signal != 0 { return " (it was killed by signal \(signal))" }
    let code = (status >> 8) & 0xff
    return code == 0 ? "" : " (it exited with status \(code))"
  }
}
