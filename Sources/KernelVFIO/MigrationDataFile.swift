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
    core = Core(io: DescriptorIO(fd: fd), timeout: timeout)
  }

  /// A stream over other calls than read(2) and write(2) on a descriptor of
  /// its own (the PF's `migration_data`, opened once and kept).
  init(io: any StreamIO, timeout: Duration) {
    core = Core(io: io, timeout: timeout)
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

  /// A read or write is still blocked in the kernel (it outlived its
  /// time-out): the file it uses must not start another stream yet, or that
  /// call would take the new stream's first bytes.
  public var callInFlight: Bool { core.callInFlight }
}

/// A save stream (STOP_COPY) on a `MigrationDataFile`, for the device interface.
public final class DataFileSource: MigrationSource {
  public let file: MigrationDataFile
  public init(_ file: MigrationDataFile) { self.file = file }
  public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    try file.read(into: buffer)
  }
  public func close() { file.invalidate() }
}

/// A restore stream (RESUMING) on a `MigrationDataFile`.
public final class DataFileSink: MigrationSink {
  public let file: MigrationDataFile
  public init(_ file: MigrationDataFile) { self.file = file }
  public func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int { try file.write(bytes) }
  public func close() { file.invalidate() }
}

/// The system calls behind a stream, run on its worker thread.
protocol StreamIO: Sendable {
  func read(into buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Errno>
  func write(_ bytes: UnsafeRawBufferPointer) -> Result<Int, Errno>
  /// The stream is done with the file (once no call is in flight).
  func close()
}

/// A data_fd of the stream's own: read(2), write(2), closed with the stream.
private struct DescriptorIO: StreamIO {
  let fd: Int32
  func read(into buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Errno> {
    let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
    return n >= 0 ? .success(n) : .failure(Errno(rawValue: errno))
  }
  func write(_ bytes: UnsafeRawBufferPointer) -> Result<Int, Errno> {
    let n = Glibc.write(fd, bytes.baseAddress, bytes.count)
    return n >= 0 ? .success(n) : .failure(Errno(rawValue: errno))
  }
  func close() { _ = Glibc.close(fd) }
}

/// The state the worker thread shares with callers, all under `condition`.
private final class Core: @unchecked Sendable {
  let timeout: Duration
  private let condition = ConditionLock()
  /// nil once closed.
  private var io: (any StreamIO)?
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

  init(io: any StreamIO, timeout: Duration) {
    self.io = io
    self.timeout = timeout
  }

  var isInvalidated: Bool {
    condition.lock()
    defer { condition.unlock() }
    return invalidated
  }

  var callInFlight: Bool {
    condition.lock()
    defer { condition.unlock() }
    return inFlight
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
    if !inFlight {
      io?.close()
      io = nil
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
      guard let current = job, !invalidated, let file = io else { break }
      job = nil
      condition.unlock()
      switch current {
      case .read(let count):
        var bytes = [UInt8](repeating: 0, count: count)
        let outcome = bytes.withUnsafeMutableBytes { file.read(into: $0) }.map {
          Array(bytes[0..<$0])
        }
        condition.lock()
        readResult = outcome
      case .write(let bytes):
        let outcome = bytes.withUnsafeBytes { file.write($0) }
        condition.lock()
        writeResult = outcome
      }
      inFlight = false
      condition.broadcast()
    }
    io?.close()
    io = nil
    condition.unlock()
  }
}
