import SystemPackage
import VFIODevice

#if canImport(Glibc)
  import Glibc
#endif

/// A migration `data_fd` with bounded reads and writes.
///
/// The kernel's migration file blocks until the device has produced (or can
/// take) data, and it cannot be polled (it has no poll op, so it always looks
/// ready). So each read(2) and write(2) runs on a worker thread of the
/// stream's own, and the caller waits at most `timeout` for it: on time-out
/// the caller gets ETIMEDOUT and the connection stays responsive.
///
/// Nothing is lost to a time-out. A read still in flight keeps its bytes for
/// the next `read`, and bytes already gathered by a read that then timed out
/// are put back in front of them, so the stream's order is kept. A write in
/// flight cannot be taken back: after a write times out the stream is
/// poisoned (EIO), since how much of it the device took is unknown.
public final class MigrationDataFile: Sendable {
  private let core: Core
  public var timeout: Duration { core.timeout }

  /// Takes ownership of `fd`.
  public init(fd: Int32, timeout: Duration = .seconds(10)) {
    core = Core(fd: fd, timeout: timeout)
  }

  deinit { core.invalidate() }

  /// Fills `buffer` with the next bytes of the stream. Returns fewer than
  /// asked only at the end of the stream (read(2) returned 0) or, in
  /// PRE_COPY, when the device has nothing more for now (ENOMSG); 0 after the
  /// end. Throws ETIMEDOUT when the device produced nothing for `timeout`,
  /// ENODEV once invalidated.
  public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    try core.read(into: buffer)
  }

  /// Hands the device a prefix of `bytes` (at most 1 MiB) and returns its
  /// length. Throws ETIMEDOUT when the device took nothing for `timeout`,
  /// after which the stream answers EIO; ENODEV once invalidated.
  public func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    try core.write(bytes)
  }

  /// Reset, hang-up or a new stream: later calls throw ENODEV. The descriptor
  /// is closed now, or by the worker once its call in flight returns.
  public func invalidate() { core.invalidate() }

  public var isInvalidated: Bool { core.isInvalidated }
}

/// The state the worker thread shares with callers, all under `condition`.
private final class Core: @unchecked Sendable {
  let timeout: Duration
  private let condition = ConditionLock()
  private var fd: Int32
  private var started = false
  private enum Job {
    case read(Int)
    case write([UInt8])
  }
  private var job: Job?
  private var inFlight = false
  private var readResult: Result<[UInt8], Errno>?
  private var writeResult: Result<Int, Errno>?
  /// Bytes read from the file and not handed out yet.
  private var pending: [UInt8] = []
  private var endOfStream = false
  private var invalidated = false
  private var poisoned = false

  init(fd: Int32, timeout: Duration) {
    self.fd = fd
    self.timeout = timeout
  }

  var isInvalidated: Bool {
    condition.lock()
    defer { condition.unlock() }
    return invalidated
  }

  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    condition.lock()
    defer { condition.unlock() }
    let deadline = ContinuousClock.now + timeout
    var filled = 0
    func putBack() {
      pending = Array(UnsafeRawBufferPointer(rebasing: buffer[0..<filled])) + pending
    }
    while filled < buffer.count {
      if invalidated { throw Errno(rawValue: ENODEV) }
      if let outcome = readResult {
        readResult = nil
        switch outcome {
        case .success(let bytes):
          if bytes.isEmpty { endOfStream = true } else { pending += bytes }
        case .failure(let error) where error.rawValue == ENOMSG:
          return filled  // PRE_COPY: nothing more for now
        case .failure(let error)
        where error == .interrupted || error == .resourceTemporarilyUnavailable:
          break
        case .failure(let error):
          putBack()
          throw error
        }
        continue
      }
      if !pending.isEmpty {
        let n = min(pending.count, buffer.count - filled)
        pending.withUnsafeBytes {
          (buffer.baseAddress! + filled).copyMemory(from: $0.baseAddress!, byteCount: n)
        }
        pending.removeFirst(n)
        filled += n
        continue
      }
      if endOfStream { break }
      if !inFlight { submit(.read(buffer.count - filled)) }
      while readResult == nil, !invalidated {
        guard condition.wait(until: deadline) else { break }
      }
      if readResult == nil, !invalidated {
        putBack()  // what this call gathered stays first in line for the next read
        throw .timedOut
      }
    }
    return filled
  }

  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    condition.lock()
    defer { condition.unlock() }
    let deadline = ContinuousClock.now + timeout
    while true {
      if invalidated { throw Errno(rawValue: ENODEV) }
      if poisoned { throw .ioError }
      guard !bytes.isEmpty else { return 0 }
      let chunk = UnsafeRawBufferPointer(rebasing: bytes[0..<min(bytes.count, 1 << 20)])
      submit(.write(Array(chunk)))
      while writeResult == nil, !invalidated {
        guard condition.wait(until: deadline) else { break }
      }
      if invalidated { throw Errno(rawValue: ENODEV) }
      guard let outcome = writeResult else {
        poisoned = true
        throw .timedOut
      }
      writeResult = nil
      switch outcome {
      case .success(let n) where n > 0: return n
      case .success: throw .ioError
      case .failure(let error)
      where error == .interrupted || error == .resourceTemporarilyUnavailable:
        continue
      case .failure(let error): throw error
      }
    }
  }

  func invalidate() {
    condition.lock()
    defer { condition.unlock() }
    guard !invalidated else { return }
    invalidated = true
    pending = []
    if !inFlight, fd >= 0 {
      close(fd)
      fd = -1
    }
    condition.broadcast()
  }

  /// Queues one system call for the worker (lock held).
  private func submit(_ next: Job) {
    job = next
    inFlight = true
    if !started {
      started = startThread(name: "vfio-mig-data") { [self] in work() } == nil
      if !started {  // no worker: the call fails now instead of waiting out its deadline
        job = nil
        inFlight = false
        if case .read = next {
          readResult = .failure(.noMemory)
        } else {
          writeResult = .failure(.noMemory)
        }
      }
    }
    condition.broadcast()
  }

  private func work() {
    condition.lock()
    while true {
      while job == nil, !invalidated { condition.wait() }
      guard let current = job, !invalidated else { break }
      job = nil
      let descriptor = fd
      condition.unlock()
      switch current {
      case .read(let count):
        var bytes = [UInt8](repeating: 0, count: count)
        let n = bytes.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress, count) }
        let outcome: Result<[UInt8], Errno> =
          n >= 0 ? .success(Array(bytes[0..<n])) : .failure(Errno(rawValue: errno))
        condition.lock()
        readResult = outcome
      case .write(let bytes):
        let n = bytes.withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, bytes.count) }
        let outcome: Result<Int, Errno> = n >= 0 ? .success(n) : .failure(Errno(rawValue: errno))
        condition.lock()
        writeResult = outcome
      }
      inFlight = false
      condition.broadcast()
    }
    if fd >= 0 {
      close(fd)
      fd = -1
    }
    condition.unlock()
  }
}
