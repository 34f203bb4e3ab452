import CVFIOUser
import Logging
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// What the server is doing, for logs, tests, `info` and the control channel.
/// The connection thread records each field where it changes (a client
/// attaching or leaving, a migration state set, a DMA map or unmap, a
/// SET_IRQS, a reset), never per REGION_READ or REGION_WRITE; the device
/// itself is only ever asked on the connection thread.
public struct ServerSnapshot: Sendable, Equatable {
  /// The client being served: who it is (SO_PEERCRED) and since when.
  public struct Client: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    /// Wall clock (seconds since the epoch) and CLOCK_MONOTONIC milliseconds at accept.
    public var since: Int64
    public var sinceMonotonicMilliseconds: Int64
    /// VERSION was answered.
    public var negotiated = false
  }
  /// Something that went wrong, with when (seconds since the epoch).
  public struct Event: Sendable, Equatable {
    public var description: String
    public var at: Int64
  }

  public var clientConnected = false
  public var client: Client?
  public var connectionsServed = 0
  public var clientsRefused = 0
  public var dmaRegions = 0
  /// Bytes of guest memory the DMA windows cover.
  public var dmaBytes: UInt64 = 0
  public var irqFDs = 0
  /// Vectors with an eventfd the client wired, per interrupt index.
  public var irqVectorsWired: [Int] = []
  /// The client started DMA (dirty page) logging and has not stopped it.
  public var dirtyLogging = false
  /// Whether the device migrates, and its state as last recorded by the
  /// thread that owns it (nil when the device could not tell).
  public var migratable = false
  public var migrationState: MigrationState?
  public var lastEnd: ConnectionEnd?
  public var lastEndAt: Int64?
  /// The last request refused with an error, or connection broken.
  public var lastError: Event?
  public var stopping = false
  /// MIG_DATA_WRITE data received straight into device memory, never buffered (all clients).
  public var migrationBytesPlaced: UInt64 = 0
  /// This process took over from another (live update): the last handover.
  public var liveUpdate: LiveUpdateInfo?
}

/// The last live update that made this process the server.
public struct LiveUpdateInfo: Sendable, Equatable {
  /// Updates since the server was first started (this one included).
  public var count: Int
  /// Wall clock (seconds since the epoch) of this update, and of the first start.
  public var at: Int64
  public var firstStarted: Int64
  /// The process this one took over from.
  public var previousPID: Int32
  /// From the old process's last served message to this one's first wait.
  public var pauseMilliseconds: Int64
  public init(
    count: Int, at: Int64, firstStarted: Int64, previousPID: Int32, pauseMilliseconds: Int64
  ) {
    self.count = count
    self.at = at
    self.firstStarted = firstStarted
    self.previousPID = previousPID
    self.pauseMilliseconds = pauseMilliseconds
  }
}

extension ServerStatistics {
  /// Records the live update that made this process the server.
  public func recordLiveUpdate(_ info: LiveUpdateInfo) { update { $0.liveUpdate = info } }
}

/// Shared counters, updated by the connection thread and read anywhere.
public final class ServerStatistics: Sendable {
  private let state = Locked(ServerSnapshot())
  /// The per message type counters, kept without a lock.
  public let counters: ServerCounters
  /// What changed, for the control channel's listeners.
  public let events = ServerEvents()
  /// What the control channel asks of the connection thread.
  public let requests = DeviceRequests()
  public init(counting: Bool = true) { counters = ServerCounters(counting: counting) }
  public var snapshot: ServerSnapshot { state.withLock { $0 } }
  func update(_ body: (inout ServerSnapshot) -> Void) { state.withLock { body(&$0) } }

  /// Records `description` as the last error, now.
  func recordError(_ description: String) {
    let now = Int64(time(nil))
    update { $0.lastError = .init(description: description, at: now) }
  }
}

/// Who is at the other end of a connected Unix socket (SO_PEERCRED).
public struct Peer: Sendable, Equatable {
  public var pid: Int32 = 0
  public var uid = UInt32.max
  public var gid = UInt32.max

  public init(socket: Int32) {
    _ = cvfu_peer_cred(socket, &pid, &uid, &gid)
  }
}

extension ServerLimits {
  /// Whether --allow-uid and --allow-gid let `peer` in; a refusal is logged.
  /// The device socket and the control socket apply it alike.
  public func admits(_ peer: Peer, logger: Logger, as what: String) -> Bool {
    guard allows(uid: peer.uid, gid: peer.gid) else {
      logger.warning(
        "refusing \(what) pid \(peer.pid) uid \(peer.uid) gid \(peer.gid): not an allowed uid or gid (--allow-uid, --allow-gid)"
      )
      return false
    }
    return true
  }
}

/// What an accept loop's wait gave.
public enum Accepted: ~Copyable {
  case client(OwnedFileDescriptor)
  /// Woken (`ThreadWake`) with no client: the loop has something to do first.
  case woken
}

/// The next client accepted on `listener`, retrying after a pause while the
/// process is out of descriptors or memory; nil once `stopping` (a client
/// accepted meanwhile is closed) or when accepting failed for good (logged).
/// The device socket's accept loop and the control socket's share it; with
/// `wake`, its wait can be woken.
public func acceptNext(
  _ listener: Int32, stopping: () -> Bool, logger: Logger, what: String, wake: ThreadWake? = nil
) -> Accepted? {
  while true {
    wake?.enter()
    let client = cvfu_accept_wakeable(listener, wake != nil ? 1 : 0)
    wake?.leave()
    if client == -EINTR, wake != nil, !stopping() { return .woken }
    if stopping() {
      if client >= 0 { _ = close(client) }
      return nil
    }
    if client >= 0 { return .client(OwnedFileDescriptor(taking: FileDescriptor(rawValue: client))) }
    if -client == EMFILE || -client == ENFILE || -client == ENOMEM {
      logger.error("\(what) failed: \(Errno(rawValue: -client)); retrying")
      usleep(100_000)
      continue
    }
    logger.error("\(what) failed: \(Errno(rawValue: -client)); no longer accepting")
    return nil
  }
}

/// Hands the (non-Sendable) device from one connection thread to the next.
/// Only one connection runs at a time and thread start/join order the
/// hand-over, so the device is never touched by two threads at once. Nothing
/// else passes between clients: what outlives one (a device left in STOP, its
/// registers and memory) is the device's own state.
final class DeviceSlot: @unchecked Sendable {
  let backend: any VFIODeviceBackend
  init(_ backend: any VFIODeviceBackend) { self.backend = backend }
}

/// A vfio-user server for one device on one Unix socket, serving one client
/// at a time. A second client gets an EBUSY error reply to its VERSION and is
/// disconnected; when the client leaves, its mappings and eventfds are released,
/// the device is reset, and the next client is accepted.
public final class VFIOUserServer: Sendable {
  public let statistics: ServerStatistics
  public let limits: ServerLimits
  let slot: DeviceSlot
  let logger: Logger
  let listener = Locked<Int32>(-1)
  let activeSocket = Locked<Int32>(-1)
  let path = Locked<String?>(nil)
  private let finished = VFIODevice.Semaphore(value: 0)
  /// Holds the accept loop still during a live update (Server+LiveUpdate).
  let hold = AcceptHold()
  /// A connection a live update brought, served first (Server+LiveUpdate).
  let adopted = Locked<AdoptedConnection?>(nil)
  private let connectionThreadSetup: (@Sendable () -> Void)?

  /// - Parameter connectionThreadSetup: runs first on each client's thread
  ///   (the benchmark pins it to a CPU with it).
  /// - Parameter counting: count and time every message (`bench` turns it off for its baseline).
  public init(
    backend: any VFIODeviceBackend, limits: ServerLimits = ServerLimits(), logger: Logger,
    connectionThreadSetup: (@Sendable () -> Void)? = nil, counting: Bool = true
  ) {
    statistics = ServerStatistics(counting: counting)
    slot = DeviceSlot(backend)
    self.limits = limits
    self.logger = logger
    self.connectionThreadSetup = connectionThreadSetup
    // No connection thread owns the device yet: its first state is read here.
    let migrationState: MigrationState?
    if let migratable = backend as? MigrationCapable {
      migrationState = try? migratable.migrationState
    } else {
      migrationState = .running
    }
    statistics.update {
      $0.migratable = backend is MigrationCapable
      $0.migrationState = migrationState
      $0.irqVectorsWired = Array(repeating: 0, count: Int(backend.irqCount))
    }
    statistics.events.tracker.withLock { $0.state = migrationState }
  }

  /// The socket path when the server created its own socket.
  public var socketPath: String? { path.withLock { $0 } }

  /// Creates and listens on `socketPath` (a stale socket file is replaced).
  public func listen(socketPath: String) throws(Errno) {
    let fd = cvfu_listen_unix(socketPath, 8)
    guard fd >= 0 else { throw Errno(rawValue: -fd) }
    listener.withLock { $0 = fd }
    path.withLock { $0 = socketPath }
  }

  /// Serves on an already listening socket (the `--fd` convention).
  public func listen(fd: Int32) {
    listener.withLock { $0 = fd }
  }

  /// Starts accepting clients on a thread of its own.
  public func start() {
    let failed = startThread(name: "vfio-user-accept") { [self] in
      acceptLoop()
      finished.signal()
    }
    if let failed {
      logger.error("cannot start the accept thread: \(failed)")
      finished.signal()
    }
  }

  /// Blocks until `stop()` has completed.
  public func wait() {
    finished.wait()
    finished.signal()
  }

  /// Stops accepting, disconnects the client (its state is released as on a
  /// hang-up), waits for that to finish, and removes the socket file.
  public func stop() {
    let alreadyStopping = statistics.snapshot.stopping
    statistics.update { $0.stopping = true }
    if !alreadyStopping {
      let fd = listener.withLock { $0 }
      if fd >= 0 { _ = shutdown(fd, Int32(SHUT_RDWR)) }
      // Under the lock: the connection forgets its socket under it before closing it.
      activeSocket.withLock { if $0 >= 0 { _ = shutdown($0, Int32(SHUT_RDWR)) } }
    }
    wait()
  }

  private func acceptLoop() {
    let fd = listener.withLock { $0 }
    var connectionDone: VFIODevice.Semaphore?
    if let connection = adopted.withLock({ $0.take() }) {
      connectionDone = serve(adopted: connection)
    }
    let wake = ThreadWake()
    hold.setWake(wake)
    defer { hold.setWake(nil) }
    while true {
      if hold.isRequested {
        hold.park()
        continue
      }
      guard
        let accepted = acceptNext(
          fd, stopping: { statistics.snapshot.stopping }, logger: logger, what: "accept",
          wake: wake)
      else { break }
      guard case .client(let client) = consume accepted else { continue }  // woken: a hold asked for
      let peer = Peer(socket: client.descriptor.rawValue)
      let (pid, uid, gid) = (peer.pid, peer.uid, peer.gid)
      guard limits.admits(peer, logger: logger, as: "client") else {
        refuse(client, .permissionDenied)
        continue
      }
      if statistics.snapshot.clientConnected {
        // The previous client may be on its way out (a VMM restarting): give its
        // teardown a moment before turning the newcomer away.
        if let previous = connectionDone,
          previous.wait(timeout: .milliseconds(300))
        {
          previous.signal()
        } else {
          logger.warning("refusing a second client (pid \(pid)): one client is already connected")
          refuse(client, .resourceBusy)
          continue
        }
      }
      connectionDone?.wait()
      connectionDone = serve(client, pid: pid, uid: uid, gid: gid)
    }
    activeSocket.withLock { if $0 >= 0 { _ = shutdown($0, Int32(SHUT_RDWR)) } }
    connectionDone?.wait()
    _ = close(fd)
    listener.withLock { $0 = -1 }
    if let socketPath = path.withLock({ $0 }) { _ = unlink(socketPath) }
    logger.info("server stopped")
  }

  private func serve(_ client: consuming OwnedFileDescriptor, pid: Int32, uid: UInt32, gid: UInt32)
    -> VFIODevice.Semaphore
  {
    var connectionLogger = logger
    connectionLogger[metadataKey: "client"] = "pid \(pid)"
    logger.info("client connected (pid \(pid), uid \(uid), gid \(gid))")
    let since = Int64(time(nil))
    let monotonic = cvfu_monotonic_ms()
    statistics.update {
      $0.clientConnected = true
      $0.client = .init(
        pid: pid, uid: uid, gid: gid, since: since, sinceMonotonicMilliseconds: monotonic)
      $0.connectionsServed += 1
    }
    statistics.events.post(.clientConnected(pid: pid, uid: uid, gid: gid))
    let raw = client.descriptor.rawValue
    activeSocket.withLock { $0 = raw }
    // Room for two of the largest messages each way, so a 1 MiB reply is one
    // sendmsg rather than a dozen wake-ups (the kernel caps it at wmem_max).
    _ = cvfu_socket_buffers(raw, Int32(clamping: 2 * limits.maxMessageSize))
    _ = cvfu_set_send_timeout_ms(raw, limits.sendTimeoutMilliseconds)
    // Closed with the handoff if the client's thread never starts.
    let handoff = DescriptorHandoff(client)
    return serve(pid: pid, logger: connectionLogger) { [self, connectionLogger] in
      let channel = MessageChannel(
        socket: handoff.take()!, capacity: Connection.receiveCapacity(limits))
      return Connection(
        channel: channel, backend: slot.backend, limits: limits, logger: connectionLogger,
        stats: statistics)
    }
  }

  /// Serves the connection a live update brought, as `serve` serves a new one.
  private func serve(adopted: AdoptedConnection) -> VFIODevice.Semaphore {
    activeSocket.withLock { $0 = adopted.socket }
    return serve(pid: adopted.pid, logger: adopted.connection.logger) {
      adopted.connection
    }
  }

  /// Runs the connection `make` gives on a thread of its own until it ends.
  /// (Whatever `make` would have taken goes with it if the thread never starts.)
  private func serve(
    pid: Int32, logger connectionLogger: Logger, make: @escaping @Sendable () -> Connection
  ) -> VFIODevice.Semaphore {
    let done = VFIODevice.Semaphore(value: 0)
    let failed = startThread(name: "vfio-user-client", stackSize: 1 << 20) {
      [self, connectionLogger] in
      connectionThreadSetup?()
      let end = {
        let connection = make()
        connection.willCloseSocket = { [self] in activeSocket.withLock { $0 = -1 } }
        return connection.run()
      }()
      // A client's buffers (messages up to maxMessageSize, a save's packets)
      // leave free pages scattered through malloc's heap, which glibc keeps
      // resident; the server idles between clients, so it gives them back.
      _ = cvfu_release_free_heap()
      let endedAt = Int64(time(nil))
      statistics.update {
        $0.clientConnected = false
        $0.client = nil
        $0.lastEnd = end
        $0.lastEndAt = endedAt
      }
      statistics.events.post(.clientDisconnected(pid: pid, end: end))
      connectionLogger.info(
        "client disconnected (\(end)); DMA and eventfds released\(limits.resetOnDisconnect ? ", device reset" : "")"
      )
      done.signal()
    }
    if let failed {
      logger.error("cannot start a thread for the client: \(failed); disconnecting it")
      activeSocket.withLock { $0 = -1 }
      statistics.update {
        $0.clientConnected = false
        $0.client = nil
      }
      done.signal()
    }
    return done
  }

  /// Serves one connected socket on the calling thread until the client
  /// leaves, as a client's thread does, without the accept loop: the
  /// dispatcher's fuzz target (Tests/Fuzz/Dispatch) drives a whole
  /// connection in-process this way. The socket is closed on return.
  package func serve(connected fd: Int32) -> ConnectionEnd {
    serve(
      MessageChannel(
        socket: OwnedFileDescriptor(taking: FileDescriptor(rawValue: fd)),
        capacity: Connection.receiveCapacity(limits)))
  }

  /// Serves a client over memory on the calling thread until it leaves, as
  /// `serve(connected:)` does: engine tests run this way without sockets
  /// or threads (`MemoryTransport`).
  package func serve(memory: MemoryTransport) -> ConnectionEnd {
    serve(MessageChannel(memory: memory, capacity: Connection.receiveCapacity(limits)))
  }

  private func serve(_ channel: MessageChannel) -> ConnectionEnd {
    Connection(
      channel: channel, backend: slot.backend, limits: limits, logger: logger, stats: statistics
    ).run()
  }

  /// A client not served: answer its first message with `errno` and hang up,
  /// on a short-lived thread so the active client is never delayed.
  private func refuse(_ client: consuming OwnedFileDescriptor, _ errno: Errno) {
    statistics.update { $0.clientsRefused += 1 }
    let timeout = limits.refusalTimeoutMilliseconds
    let handoff = DescriptorHandoff(client)
    _ = startThread(name: "vfio-user-busy") {
      guard let socket = handoff.take() else { return }
      let raw = socket.descriptor.rawValue
      let channel = MessageChannel(socket: socket, capacity: ServerLimits.maxVersionMessage)
      channel.maxFDs = 0
      if cvfu_wait_readable(raw, timeout) > 0,
        let request = try? channel.receive().commandHeader
      {
        var header = [UInt8](repeating: 0, count: MessageHeader.size)
        header.withUnsafeMutableBytes { request.errorReply(errno).encode(into: $0) }
        try? channel.send(bytes: header)
      }
      channel.close()
    }
  }
}
