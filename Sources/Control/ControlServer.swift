import CVFIOUser
import Logging
import Synchronization
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserServer

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
/// disconnects it.
public final class ControlServer: Sendable {
  /// The protocol's version, in the greeting.
  public static let protocolVersion = 1
  /// The longest request line; a longer one gets an error and a hang-up.
  public static let maxLineBytes = 64 * 1024

  public let maxClients: Int
  public let sendTimeoutMilliseconds: Int32
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

  public init(
    server: VFIOUserServer, identity: ControlIdentity, logger: Logger, maxClients: Int = 128,
    sendTimeoutMilliseconds: Int32 = 5000
  ) {
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
    while let client = acceptNext(
      fd, stopping: { stopping.load(ordering: .acquiring) }, logger: logger,
      what: "control accept")
    {
      admit(client)
    }
    // Every client's blocking recv or send ends with its socket shut down.
    clients.withLock { for client in $0 { _ = shutdown(client, Int32(SHUT_RDWR)) } }
    for _ in 0..<2000 where !clients.withLock({ $0.isEmpty }) { usleep(1000) }
    _ = close(fd)
    listener.withLock { $0 = -1 }
    if let socketPath = path.withLock({ $0 }) { _ = unlink(socketPath) }
  }

  /// Applies the device socket's peer policy and the client cap, then serves the client.
  private func admit(_ client: Int32) {
    _ = cvfu_set_send_timeout_ms(client, sendTimeoutMilliseconds)
    let peer = Peer(socket: client)
    let (pid, uid, gid) = (peer.pid, peer.uid, peer.gid)
    guard server.limits.admits(peer, logger: logger, as: "control client") else {
      refuse(
        client, "permission denied: uid \(uid) gid \(gid) is not allowed (--allow-uid, --allow-gid)"
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
      refuse(client, "too many control clients (at most \(maxClients) at once)")
      return
    }
    servedClients.add(1, ordering: .relaxed)
    let failed = startThread(name: "control-client", stackSize: 256 << 10) { [self] in
      serve(client)
      clients.withLock { _ = $0.remove(client) }
      _ = close(client)
    }
    if let failed {
      logger.error("cannot start a thread for a control client: \(failed)")
      clients.withLock { _ = $0.remove(client) }
      _ = close(client)
    }
  }

  /// An error line in place of the greeting, then the hang-up. The socket
  /// is non-blocking here: the accept loop never waits on a refused client.
  private func refuse(_ client: Int32, _ why: String) {
    refusedClients.add(1, ordering: .relaxed)
    _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
    _ = Self.send(client, ControlProtocol.error(.genericError, why, id: nil))
    _ = close(client)
  }

  /// One control client: the greeting, then a reply to each request line.
  private func serve(_ client: Int32) {
    guard Self.send(client, ControlProtocol.greeting(version: identity.version)) else { return }
    var pending: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 16 << 10)
    while !stopping.load(ordering: .relaxed) {
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
        let reply = ControlProtocol.reply(to: line) { [self] command in answer(command) }
        guard Self.send(client, reply) else { return }
      }
      pending.removeFirst(start)
      guard pending.count <= Self.maxLineBytes else { return tooLong(client) }
    }
  }

  private func tooLong(_ client: Int32) {
    _ = Self.send(
      client,
      ControlProtocol.error(
        .genericError, "request line longer than \(Self.maxLineBytes) bytes: disconnecting",
        id: nil))
  }

  /// The reply to a known command's execution, or nil for an unknown one.
  private func answer(_ command: String) -> JSON? {
    switch command {
    case "qmp_capabilities": return .object([])
    case "query-commands":
      return .array(ControlProtocol.commands.map { .object([("name", .string($0))]) })
    case "query-status":
      return ControlProtocol.status(
        server.statistics.snapshot, identity: identity, serverPID: getpid(),
        now: cvfu_monotonic_ms(),
        control: .init(
          socket: socketPath, clients: clients.withLock { $0.count },
          served: servedClients.load(ordering: .relaxed),
          refused: refusedClients.load(ordering: .relaxed)))
    case "query-stats":
      return ControlProtocol.stats(server.statistics.counters, server.statistics.snapshot)
    default: return nil
    }
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
