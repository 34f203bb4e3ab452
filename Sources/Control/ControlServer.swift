import CVFIOUser
import Logging
import Synchronization
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserServer
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// What the control channel says of the served device, beyond what the
/// engine records: fixed for the server's life.
public struct ControlIdentity: Sendable, Equatable {
  /// One line, as `serve` logs it ("simulated Xe VF bmg [8086:e211], 256 MiB VRAM").
  public var device: String
  /// "simulated" or "kernel".
  public var backend: String
  /// The device socket ("fd N" when serving an inherited descriptor).
  public var socket: String
  /// The server's version.
  public var version: String

  public init(device: String, backend: String, socket: String, version: String) {
    self.device = device
    self.backend = backend
    self.socket = socket
    self.version = version
  }
}

/// The control socket beside a device socket (protocol/control.md): JSON
/// text, one object a line, modelled on QMP. Each control client has a
/// thread of its own (up to `maxClients`), which reads what the connection
/// thread published (`ServerStatistics`) and never touches the device: a
/// control client that is slow, never reads or sends garbage holds only its
/// own thread, and a send it does not read for `sendTimeoutMilliseconds`
/// disconnects it. After `qmp_capabilities` a client also gets the server's
/// events, from a bounded queue of its own (`ServerEvents`): one that falls
/// behind loses events (counted), never the device's time.
public final class ControlServer: Sendable {
  /// The protocol's version, in the greeting.
  public static let protocolVersion = 2
  /// The longest request line; a longer one gets an error and a hang-up.
  public static let maxLineBytes = 64 * 1024

  public let maxClients: Int
  public let sendTimeoutMilliseconds: Int32
  /// Events a client's queue holds before new ones are dropped.
  public let eventQueueCapacity: Int
  /// How long `resume` waits for the attached client's next message.
  public let requestTimeoutMilliseconds: Int
  private let logLevel: RuntimeLogLevel?
  private let server: VFIOUserServer
  private let identity: ControlIdentity
  private let logger: Logger
  private let listener = Locked<Int32>(-1)
  private let path = Locked<String?>(nil)
  private let clients = Locked<Set<Int32>>([])
  private let stopping = Atomic<Bool>(false)
  private let finished = VFIODevice.Semaphore(value: 0)
  private let refusedClients = Atomic<Int>(0)
  private let servedClients = Atomic<Int>(0)
  /// `live-update`: the serve process hands itself to a new binary (the
  /// argument, or its own). Returns the answer, and whether the process must
  /// end right after the reply is sent (the update succeeded). Without it the
  /// command is refused.
  private let liveUpdate: (@Sendable (String?) -> (ControlProtocol.Answer, exit: Bool))?
  /// Set once a live update succeeded: this process only sends its reply.
  private let handedOver = Atomic<Bool>(false)
  /// Parks the accept loop while a live update hands the listener on.
  public let acceptHold = AcceptHold()

  /// - Parameter logLevel: what `set-log-level` changes; without it the command is refused.
  public init(
    server: VFIOUserServer, identity: ControlIdentity, logger: Logger, maxClients: Int = 128,
    sendTimeoutMilliseconds: Int32 = 5000, eventQueueCapacity: Int = 256,
    requestTimeoutMilliseconds: Int = 5000, logLevel: RuntimeLogLevel? = nil,
    liveUpdate: (@Sendable (String?) -> (ControlProtocol.Answer, exit: Bool))? = nil
  ) {
    self.liveUpdate = liveUpdate
    self.eventQueueCapacity = eventQueueCapacity
    self.requestTimeoutMilliseconds = requestTimeoutMilliseconds
    self.logLevel = logLevel
    self.server = server
    self.identity = identity
    self.logger = logger
    self.maxClients = maxClients
    self.sendTimeoutMilliseconds = sendTimeoutMilliseconds
  }

  /// The socket path, once listening.
  public var socketPath: String? { path.withLock { $0 } }

  /// Creates and listens on `socketPath` (a stale socket file is replaced, as for the device socket).
  public func listen(socketPath: String) throws(Errno) {
    let fd = cvfu_listen_unix(socketPath, 16)
    guard fd >= 0 else { throw Errno(rawValue: -fd) }
    listener.withLock { $0 = fd }
    path.withLock { $0 = socketPath }
  }

  /// Serves on an already listening socket (a live update's successor).
  public func listen(fd: Int32, socketPath: String?) {
    listener.withLock { $0 = fd }
    path.withLock { $0 = socketPath }
  }

  /// The listening socket (lent), to hand to a live update's successor.
  public var listeningDescriptor: Int32 { listener.withLock { $0 } }

  /// Starts accepting control clients on a thread of its own.
  public func start() {
    let failed = startThread(name: "control-accept") { [self] in
      acceptLoop()
      finished.signal()
    }
    if let failed {
      logger.error("cannot start the control channel's thread: \(failed)")
      finished.signal()
    }
  }

  /// Stops accepting, disconnects every control client, removes the socket file.
  public func stop() {
    if !stopping.exchange(true, ordering: .acquiringAndReleasing) {
      let fd = listener.withLock { $0 }
      if fd >= 0 { _ = shutdown(fd, Int32(SHUT_RDWR)) }
    }
    finished.wait()
    finished.signal()
  }

  private func acceptLoop() {
    let fd = listener.withLock { $0 }
    guard fd >= 0 else { return }
    let wake = ThreadWake()
    acceptHold.setWake(wake)
    defer { acceptHold.setWake(nil) }
    while true {
      if acceptHold.isRequested {
        acceptHold.park()
        continue
      }
      guard
        let accepted = acceptNext(
          fd, stopping: { stopping.load(ordering: .acquiring) }, logger: logger,
          what: "control accept", wake: wake)
      else { break }
      if case .client(let client) = consume accepted { admit(client) }
    }
    // Every client's blocking recv or send ends with its socket shut down.
    clients.withLock { for client in $0 { _ = shutdown(client, Int32(SHUT_RDWR)) } }
    for _ in 0..<2000 where !clients.withLock({ $0.isEmpty }) { usleep(1000) }
    _ = close(fd)
    listener.withLock { $0 = -1 }
    if let socketPath = path.withLock({ $0 }) { _ = unlink(socketPath) }
  }

  /// Applies the device socket's peer policy and the client cap, then serves the client.
  private func admit(_ owned: consuming OwnedFileDescriptor) {
    // Lent to the serving thread through `clients` (for a shutdown at stop);
    // the handoff owns it, and its thread closes it.
    let client = owned.descriptor.rawValue
    _ = cvfu_set_send_timeout_ms(client, sendTimeoutMilliseconds)
    let peer = Peer(socket: client)
    let (pid, uid, gid) = (peer.pid, peer.uid, peer.gid)
    guard server.limits.admits(peer, logger: logger, as: "control client") else {
      refuse(
        owned, "permission denied: uid \(uid) gid \(gid) is not allowed (--allow-uid, --allow-gid)"
      )
      return
    }
    let admitted = clients.withLock {
      guard $0.count < maxClients else { return false }
      $0.insert(client)
      return true
    }
    guard admitted else {
      logger.warning("refusing control client pid \(pid): \(maxClients) control clients already")
      refuse(owned, "too many control clients (at most \(maxClients) at once)")
      return
    }
    servedClients.add(1, ordering: .relaxed)
    let handoff = DescriptorHandoff(owned)
    let failed = startThread(name: "control-client", stackSize: 256 << 10) { [self] in
      guard let socket = handoff.take() else { return }
      serve(client, pid: pid)
      // Out of the set before it closes: a stop never shuts down a reused number.
      clients.withLock { _ = $0.remove(client) }
      socket.close()
    }
    if let failed {
      logger.error("cannot start a thread for a control client: \(failed)")
      clients.withLock { _ = $0.remove(client) }
    }
  }

  /// An error line in place of the greeting, then the hang-up. The socket
  /// is non-blocking here: the accept loop never waits on a refused client.
  private func refuse(_ owned: consuming OwnedFileDescriptor, _ why: String) {
    refusedClients.add(1, ordering: .relaxed)
    let client = owned.descriptor.rawValue
    _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
    _ = Self.send(client, ControlProtocol.error(.genericError, why, id: nil))
    owned.close()
  }

  /// One control client: the greeting, then a reply to each request line,
  /// and once it asked (`qmp_capabilities`) the server's events between them.
  private func serve(_ client: Int32, pid: Int32) {
    guard Self.send(client, ControlProtocol.greeting(version: identity.version)) else { return }
    var subscription: EventSubscription?
    defer { if let subscription { server.statistics.events.unsubscribe(subscription) } }
    var pending: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 16 << 10)
    while !stopping.load(ordering: .relaxed) {
      var ready = [
        pollfd(fd: client, events: Int16(POLLIN), revents: 0),
        pollfd(fd: subscription?.wakeFD ?? -1, events: Int16(POLLIN), revents: 0),
      ]
      let polled = poll(&ready, 2, -1)
      if polled < 0, errno == EINTR { continue }
      guard polled > 0 else { return }
      if let subscription, ready[1].revents != 0 {
        guard sendEvents(client, subscription) else { return }
      }
      guard ready[0].revents != 0 else { continue }
      let n = chunk.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
      if n < 0, errno == EINTR { continue }
      guard n > 0 else { return }
      pending += chunk[0..<n]
      var start = 0
      while let newline = pending[start...].firstIndex(of: 0x0A) {
        var line = pending[start..<newline]
        start = newline + 1
        guard line.count <= Self.maxLineBytes else { return tooLong(client) }
        if line.last == 0x0D { line = line.dropLast() }
        if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
        let reply = ControlProtocol.reply(to: line) { [self] command, arguments in
          // Subscribed before the reply leaves: every event after it reaches the client.
          if command == "qmp_capabilities", subscription == nil {
            subscription = server.statistics.events.subscribe(
              capacity: eventQueueCapacity, pid: pid)
          }
          return answer(command, arguments)
        }
        let sent = Self.send(client, reply)
        // Handed over: the successor owns everything; nothing here may run on.
        if handedOver.load(ordering: .acquiring) { _exit(0) }
        guard sent else { return }
      }
      pending.removeFirst(start)
      guard pending.count <= Self.maxLineBytes else { return tooLong(client) }
    }
  }

  /// Sends the events waiting in `subscription`, and after them how many
  /// were dropped since the last send (EVENTS_DROPPED).
  private func sendEvents(_ client: Int32, _ subscription: EventSubscription) -> Bool {
    let (events, dropped) = subscription.take()
    for event in events where !Self.send(client, ControlProtocol.event(event)) { return false }
    guard dropped > 0 else { return true }
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return Self.send(
      client,
      ControlProtocol.event(
        "EVENTS_DROPPED", .object([("count", .uint(dropped))]), seconds: Int64(now.tv_sec),
        microseconds: Int64(now.tv_nsec / 1000)))
  }

  private func tooLong(_ client: Int32) {
    _ = Self.send(
      client,
      ControlProtocol.error(
        .genericError, "request line longer than \(Self.maxLineBytes) bytes: disconnecting",
        id: nil))
  }

  /// A command's execution, or nil for an unknown one.
  private func answer(_ command: String, _ arguments: JSON) -> ControlProtocol.Answer? {
    switch command {
    case "qmp_capabilities": return .value(.object([]))
    case "query-commands":
      return .value(.array(ControlProtocol.commands.map { .object([("name", .string($0))]) }))
    case "query-status":
      return .value(
        ControlProtocol.status(
          server.statistics.snapshot, identity: identity, serverPID: getpid(),
          now: cvfu_monotonic_ms(),
          control: .init(
            socket: socketPath, clients: clients.withLock { $0.count },
            served: servedClients.load(ordering: .relaxed),
            refused: refusedClients.load(ordering: .relaxed))))
    case "query-stats":
      return .value(ControlProtocol.stats(server.statistics))
    case "resume": return resume()
    case "set-log-level": return setLogLevel(arguments["level"])
    case "live-update":
      guard let liveUpdate else {
        return .failure(.genericError, "this server cannot be live-updated")
      }
      if let binary = arguments["binary"], binary.string == nil {
        return .failure(.genericError, "'binary' must be a string (a path)")
      }
      let (answer, exit) = liveUpdate(arguments["binary"]?.string)
      if exit { handedOver.store(true, ordering: .releasing) }
      return answer
    default: return nil
    }
  }

  /// `resume`: carried out by the connection thread, between two messages
  /// of the attached client (it alone touches the device).
  private func resume() -> ControlProtocol.Answer {
    guard server.statistics.snapshot.clientConnected else {
      return .failure(
        .genericError,
        "no client is attached: resume through the device socket (xe-vfio-user resume -s \(identity.socket))"
      )
    }
    switch server.statistics.requests.submit(
      .resume, timeoutMilliseconds: requestTimeoutMilliseconds)
    {
    case nil:
      return .failure(
        .genericError,
        "the connection did not come between two of its client's messages within \(requestTimeoutMilliseconds) ms (a long request under way): the device is served only there; nothing was done"
      )
    case .done(let from, let to)?:
      logger.notice("resume (control socket): device \(from) → \(to)")
      return .value(
        .object([("from", .string("\(from)")), ("to", .string("\(to)")), ("changed", .bool(true))]))
    case .unchanged(let state)?:
      return .value(
        .object([
          ("from", .string("\(state)")), ("to", .string("\(state)")), ("changed", .bool(false)),
        ]))
    case .refused(let why)?:
      return .failure(.genericError, why)
    case .handedOver?:
      return .failure(.genericError, "the connection answered a live update")
    }
  }

  private func setLogLevel(_ argument: JSON?) -> ControlProtocol.Answer {
    let names = Logger.Level.allCases.map(\.rawValue)
    guard let name = argument?.string, let level = Logger.Level(rawValue: name) else {
      return .failure(.genericError, "'level' is one of \(names.joined(separator: ", "))")
    }
    guard let logLevel else {
      return .failure(.genericError, "this server's log level cannot be changed while it runs")
    }
    let before = logLevel.level
    logLevel.level = level
    logger.notice("log level \(before) → \(level) (set-log-level)")
    return .value(.object([("from", .string(before.rawValue)), ("to", .string(level.rawValue))]))
  }

  /// Sends `value` and a newline, all of it: false when the client is gone
  /// or did not read for the send timeout (it is then disconnected).
  static func send(_ fd: Int32, _ value: JSON) -> Bool {
    let bytes = Array((value.serialized() + "\n").utf8)
    var sent = 0
    while sent < bytes.count {
      let n = bytes.withUnsafeBytes {
        Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL))
      }
      if n < 0, errno == EINTR { continue }
      guard n > 0 else { return false }
      sent += n
    }
    return true
  }
}
