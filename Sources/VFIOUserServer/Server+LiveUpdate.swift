import CVFIOUser
import LiveUpdate
import Logging
import Synchronization
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// Keeps an accept loop still while a live update runs, so no client is
/// accepted by a process that is handing its listener on. The accept thread
/// waits in a wakeable accept (`acceptNext(wake:)`) and parks when asked.
/// The device socket's loop and the control socket's each have one.
public final class AcceptHold: Sendable {
  private let requested = Atomic<Bool>(false)
  private let parked = VFIODevice.Semaphore(value: 0)
  private let released = VFIODevice.Semaphore(value: 0)
  private let wake = Locked<ThreadWake?>(nil)

  public init() {}

  public var isRequested: Bool { requested.load(ordering: .acquiring) }
  /// The accept thread offers its wake (nil: it is going away).
  public func setWake(_ thread: ThreadWake?) { wake.withLock { $0 = thread } }

  /// On the accept thread: waits until released.
  public func park() {
    parked.signal()
    released.wait()
  }

  /// Asks the accept loop to park and waits for it; false when it did not
  /// within the time (it is not running).
  public func hold(timeoutMilliseconds: Int) -> Bool {
    requested.store(true, ordering: .releasing)
    var left = timeoutMilliseconds
    while left > 0 {
      wake.withLock { _ = $0?.wakeUp() }
      if parked.wait(timeout: .milliseconds(10)) { return true }
      left -= 10
    }
    release()
    return false
  }

  public func release() {
    requested.store(false, ordering: .releasing)
    released.signal()
  }
}

/// A connection a live update brought, waiting for the accept loop to start it.
final class AdoptedConnection: @unchecked Sendable {
  let connection: Connection
  let socket: Int32
  let pid: Int32
  init(_ connection: Connection, socket: Int32, pid: Int32) {
    self.connection = connection
    self.socket = socket
    self.pid = pid
  }
}

/// The connection thread's part of a live update, run between two messages.
public final class HandoverJob: @unchecked Sendable {
  let body: (Connection?) -> Result<LiveUpdateReport, HandoverRefusal>
  let result = Locked<Result<LiveUpdateReport, HandoverRefusal>?>(nil)
  init(_ body: @escaping (Connection?) -> Result<LiveUpdateReport, HandoverRefusal>) {
    self.body = body
  }
}

/// What a live update did, as the old server saw it.
public struct LiveUpdateReport: Sendable, Equatable {
  public var successorPID: Int32
  public var successorVersion: String
  /// From the moment requests stopped being served to the successor's ready.
  public var handoverMilliseconds: Int64
  public var withClient: Bool
  /// When requests stopped being served (CLOCK_MONOTONIC ms): the successor
  /// reports the whole pause from it.
  public var pausedAt: Int64
}

extension VFIOUserServer {
  /// Hands the listening socket, the attached client's connection and the
  /// device to `successor`, at a message boundary, with `process` (the
  /// caller's section and descriptors) first in the record. On success the
  /// successor owns everything: the caller must end this process at once
  /// without any clean-up (`_exit`), since the device, the sockets and the
  /// client's memory are the successor's. On failure nothing has changed and
  /// this server carries on serving.
  public func handOver(
    to successor: Successor, process: HandoverEncoder,
    requestTimeoutMilliseconds: Int = 5000, readyTimeoutMilliseconds: Int32 = 30_000
  ) -> Result<LiveUpdateReport, HandoverRefusal> {
    guard slot.backend is HandoverCapable else {
      successor.abandon("the device cannot be handed over")
      return .failure(
        HandoverRefusal(
          "this device's backend cannot be handed to a new process: the server carries on"))
    }
    guard !statistics.snapshot.stopping else {
      successor.abandon("the server is stopping")
      return .failure(HandoverRefusal("the server is stopping"))
    }
    guard hold.hold(timeoutMilliseconds: 2000) else {
      successor.abandon("the accept loop did not pause")
      return .failure(HandoverRefusal("the accept loop did not pause"))
    }
    let job = HandoverJob { [self] connection in
      transfer(connection, to: successor, process: process, readyTimeout: readyTimeoutMilliseconds)
    }
    let result: Result<LiveUpdateReport, HandoverRefusal>
    if statistics.snapshot.clientConnected {
      switch statistics.requests.submit(
        .handover(job), timeoutMilliseconds: requestTimeoutMilliseconds)
      {
      case nil:
        result = .failure(
          HandoverRefusal(
            "the connection did not come between two of its client's messages within \(requestTimeoutMilliseconds) ms"
          ))
      case .refused(let why)?: result = .failure(HandoverRefusal(why))
      default:
        result =
          job.result.withLock { $0 } ?? .failure(HandoverRefusal("the connection ended meanwhile"))
      }
    } else {
      result = job.body(nil)
    }
    if case .failure(let refusal) = result {
      hold.release()
      let exit = successor.abandon(refusal.reason)
      return .failure(HandoverRefusal(refusal.reason + exit))
    }
    return result
  }

  /// Writes the record, sends it with every descriptor, and waits for the
  /// successor's ready; commits then. With `connection` on its thread, else
  /// with no client (the accept loop parked).
  private func transfer(
    _ connection: Connection?, to successor: Successor, process: HandoverEncoder,
    readyTimeout: Int32
  ) -> Result<LiveUpdateReport, HandoverRefusal> {
    let pausedAt = cvfu_monotonic_ms()
    let device = slot.backend as! HandoverCapable
    if let why = connection?.handoverRefusal ?? device.handoverRefusal {
      return .failure(HandoverRefusal(why))
    }
    var record = HandoverRecord()
    record.sections.append((.process, process.bytes))
    var listeners = HandoverEncoder(descriptors: process.descriptors)
    listeners.descriptor(FileDescriptor(rawValue: listener.withLock { $0 }))
    listeners.optional(path.withLock { $0 }) { $0.string($1) }
    listeners.i64(pausedAt)
    record.sections.append((.listeners, listeners.bytes))
    var descriptors = listeners.descriptors
    if let connection {
      var out = HandoverEncoder(descriptors: descriptors)
      let client = statistics.snapshot.client
      out.u32(UInt32(bitPattern: client?.pid ?? 0))
      out.u32(client?.uid ?? .max)
      out.u32(client?.gid ?? .max)
      out.i64(client?.since ?? 0)
      connection.exportHandover(into: &out)
      record.sections.append((.connection, out.bytes))
      descriptors = out.descriptors
    }
    let state: HandoverState
    do throws(HandoverRefusal) { state = try device.exportHandover() } catch {
      return .failure(error)
    }
    var out = HandoverEncoder(descriptors: descriptors)
    out.bytes(state.bytes)
    out.int(state.descriptors.count)
    for fd in state.descriptors { out.descriptor(fd) }
    record.sections.append((.device, out.bytes))
    // From here a failure calls the update off with the device's export
    // undone, once the successor is gone (it may have touched what both share).
    func calledOff(_ error: HandoverRefusal) -> Result<LiveUpdateReport, HandoverRefusal> {
      let exit = successor.abandon(error.reason)
      device.handoverAbandoned()
      return .failure(HandoverRefusal(error.reason + exit))
    }
    do throws(HandoverRefusal) {
      try successor.link.send(.state, record.encoded(), descriptors: out.descriptors)
      let answer = try successor.link.receive(timeoutMilliseconds: readyTimeout)
      switch answer.kind {
      case .ready:
        try successor.link.send(.commit)
      case .refused:
        throw HandoverRefusal(
          "the new binary refused the state: \(String(decoding: answer.payload, as: UTF8.self))")
      default:
        throw HandoverRefusal("the new binary answered \(answer.kind) instead of ready")
      }
    } catch {
      return calledOff(error)
    }
    let report = LiveUpdateReport(
      successorPID: successor.pid, successorVersion: successor.hello?.version ?? "",
      handoverMilliseconds: cvfu_monotonic_ms() - pausedAt, withClient: connection != nil,
      pausedAt: pausedAt)
    logger.notice(
      "live update: handed over to pid \(report.successorPID) (\(report.successorVersion)) in \(report.handoverMilliseconds) ms\(connection != nil ? " with the attached client" : ""); this process exits"
    )
    return .success(report)
  }

  /// The successor's side: takes the listening socket and the attached
  /// client's connection from `record` (the device came first, as this
  /// server's backend). The connection starts with `start()`.
  public func adopt(_ record: HandoverRecord, descriptors: inout OwnedFileDescriptors)
    throws(HandoverRefusal) -> (pausedAt: Int64, client: Int32?)
  {
    guard let bytes = record.section(.listeners) else {
      throw HandoverRefusal("the handover state has no listening socket")
    }
    var input = HandoverDecoder(bytes, what: "listeners")
    let index = try input.descriptor(count: descriptors.count)
    guard let socket = descriptors.take(index) else { throw input.corrupt() }
    let socketPath = try input.optional { input throws(HandoverRefusal) in try input.string() }
    let pausedAt = try input.i64()
    try input.finish()
    let raw = socket.release().rawValue
    listener.withLock { $0 = raw }
    path.withLock { $0 = socketPath }
    guard let bytes = record.section(.connection) else {
      try (slot.backend as? HandoverCapable)?.adoptDMAWindows([])
      return (pausedAt, nil)
    }
    var connectionInput = HandoverDecoder(bytes, what: "connection")
    let pid = Int32(bitPattern: try connectionInput.u32())
    let uid = try connectionInput.u32()
    let gid = try connectionInput.u32()
    let since = try connectionInput.i64()
    var connectionLogger = logger
    connectionLogger[metadataKey: "client"] = "pid \(pid)"
    let connection = try Connection.importHandover(
      &connectionInput, descriptors: &descriptors, backend: slot.backend, limits: limits,
      logger: connectionLogger, stats: statistics)
    guard case .socket(let client) = connection.channel.transport else {
      throw HandoverRefusal("the connection has no socket")
    }
    // The windows are this process's now: the device learns their addresses.
    try (slot.backend as? HandoverCapable)?.adoptDMAWindows(connection.dma.windows)
    let monotonic = cvfu_monotonic_ms() - (Int64(time(nil)) - since) * 1000
    statistics.update {
      $0.clientConnected = true
      $0.client = .init(
        pid: pid, uid: uid, gid: gid, since: since, sinceMonotonicMilliseconds: monotonic,
        negotiated: connection.negotiated)
      $0.connectionsServed += 1
      $0.dmaRegions = connection.dma.count
      $0.dmaBytes = connection.dmaBytes
      $0.dirtyLogging = connection.dmaLogging != nil
      $0.irqVectorsWired = connection.irqVectorsWired.map { $0.filter { $0 }.count }
      $0.irqFDs = slot.backend.eventFDCount
    }
    adopted.withLock {
      $0 = AdoptedConnection(connection, socket: client.rawValue, pid: pid)
    }
    return (pausedAt, pid)
  }
}
