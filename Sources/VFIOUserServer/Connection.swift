import CVFIOUser
import Logging
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// Why a connection ended.
public enum ConnectionEnd: Sendable, Equatable {
  case clientClosed
  case protocolError(String)
  /// The client sent half a message and went quiet, or stopped reading its replies.
  case timedOut(String)
  case shutdown
}

/// One client driving one device. Every request, reply and device callback
/// of the connection runs on its single thread, in arrival order: the device,
/// the DMA table and the migration stream have exactly one owner, so no lock
/// is ever held across I/O to the client.
final class Connection {
  let channel: MessageChannel
  let backend: any VFIODeviceBackend
  let limits: ServerLimits
  var logger: Logger
  let stats: ServerStatistics

  var negotiated = false
  /// A reset left the device disabled and the guest has not enabled it again (Connection+Events).
  var awaitingEnable = false
  /// Read once: asking the log handler per message costs more than the request itself.
  let traceEnabled: Bool
  var clientCapabilities = Capabilities()
  /// The capabilities JSON of the client's VERSION, as sent (live update re-reads it).
  var clientCapabilityJSON: String?
  var dmaLayout: DMATransferLayout = .spec
  var writeMultipleNegotiated = false
  var dma: DMATable
  /// Bytes the DMA windows cover (for the control channel).
  var dmaBytes: UInt64 = 0
  /// What the device and the server allow together, offered in VERSION.
  let dmaLimits: DMALimits
  let regions: [RegionDescription?]
  let irqDescriptions: [IRQDescription]
  /// The indexes this client's SET_IRQS changed and did not disable again:
  /// the ones disabled when it leaves. (A kernel refuses to disable an index
  /// that is not enabled, so the others are left alone.)
  var irqIndexesSet: [Bool]
  /// Per index, the vectors the client gave an eventfd (for the control channel).
  var irqVectorsWired: [[Bool]]
  /// Present when the device migrates. The device owns the migration state;
  /// the session holds this client's stream.
  let migratable: MigrationCapable?
  var migration = MigrationSession()
  /// The client negotiated the sparse migration stream in VERSION.
  var sparseMigration = false
  /// The sparse form of the session's current stream, made on its first use.
  var sparseStream: MigrationStream?
  /// Present when the device logs the pages its DMA dirties.
  let dmaLoggingDevice: (any DMALoggingCapable)?
  /// The logging the client started, while it runs.
  var dmaLogging: DMALoggingSession?

  /// Reply buffer. Replies to pipelined requests queue up at its front
  /// (`txUsed` bytes) and leave in one sendmsg once no request is buffered.
  let tx: UnsafeMutableRawBufferPointer
  var txUsed = 0
  /// Queued reply bytes beyond which the queue is flushed before the next request.
  static let coalesceLimit = 64 * 1024
  /// Reads at least this large go out straight from device memory when the backend allows.
  static let directReadThreshold = 16 * 1024
  var deferred: [() -> Void] = []
  /// Set when a send to the client timed out: the connection ends with it.
  var brokenEnd: ConnectionEnd?
  var shuttingDown: Bool { stats.snapshot.stopping }
  /// Called just before the socket is closed: the server forgets the
  /// descriptor first, so that a `stop` on another thread never shuts down
  /// whatever socket reuses its number once it is closed.
  var willCloseSocket: (() -> Void)?

  // Server-to-client requests (DMA_READ / DMA_WRITE for windows without an fd).
  var nextRequestID: UInt16 = 0x8000
  var outstanding: [UInt16: DMAJob] = [:]
  var abandoned: Set<UInt16> = []

  /// Serves the client at the other end of `channel`, whose receive buffer
  /// `Connection.receiveCapacity(limits)` sized.
  init(
    channel: MessageChannel, backend: any VFIODeviceBackend, limits: ServerLimits, logger: Logger,
    stats: ServerStatistics
  ) {
    self.backend = backend
    self.limits = limits
    self.logger = logger
    self.stats = stats
    traceEnabled = logger.logLevel <= .trace
    self.channel = channel
    // Until VERSION: a client that has not negotiated sends nothing larger.
    channel.maxMessageSize = ServerLimits.maxVersionMessage
    channel.maxFDs = Int(limits.maxMsgFDs)
    channel.partialMessageTimeoutMilliseconds = limits.partialMessageTimeoutMilliseconds
    tx = .allocate(byteCount: limits.maxMessageSize + Self.coalesceLimit + 64, alignment: 16)
    dmaLimits = limits.dma(for: backend.dmaLimits)
    dma = DMATable(
      pageSize: dmaLimits.pageSizes & (~dmaLimits.pageSizes &+ 1),
      limit: Int(dmaLimits.maxWindows), limits: dmaLimits)
    irqDescriptions = (0..<backend.irqCount).map {
      backend.irq($0) ?? IRQDescription(index: $0, count: 0, flags: [])
    }
    irqIndexesSet = Array(repeating: false, count: irqDescriptions.count)
    irqVectorsWired = irqDescriptions.map { Array(repeating: false, count: Int($0.count)) }
    regions = (0..<backend.regionCount).map { backend.region($0) }
    migratable = backend as? MigrationCapable
    dmaLoggingDevice = backend as? any DMALoggingCapable
    offerMigDataWritesInParts()
  }

  deinit { tx.deallocate() }

  /// Receive buffer bytes of a connection's channel: the largest message and room to read ahead.
  static func receiveCapacity(_ limits: ServerLimits) -> Int { limits.maxMessageSize + 64 * 1024 }

  /// Serves until the client hangs up, breaks the protocol, or the server stops.
  func run() -> ConnectionEnd {
    backend.attach(host: self)
    recordMigrationState()
    awaitingEnable = stats.events.awaitingEnable
    let wake = ThreadWake()
    channel.wake = wake
    stats.requests.setWake(wake)
    defer {
      stats.requests.setWake(nil)
      channel.wake = nil
      teardown()
    }
    while true {
      if let brokenEnd { return brokenEnd }
      let result: ReceiveResult
      do {
        result = try channel.receive()
      } catch {
        return receiveFailed(error)
      }
      switch consume result {
      case .closed:
        return closedEnd
      case .interrupted:
        // Woken between two messages for a control request.
        if stats.requests.pending { serveControlRequest() }
      case .parted(let header, let head):
        switch migDataWriteInPlace(header, head: head) {
        case .declined: continue  // received whole next
        case .ended(let end):
          flush()
          return end
        case .served:
          stats.counters.received(header.command, bytes: header.size)
          stats.counters.migrationWritten(Int(header.payloadSize) - MigDataHeader.size)
          runDeferredWork()
          if txUsed > Self.coalesceLimit || !channel.hasBufferedMessage { flush() }
          messageServed()
        }
      case .oversized(let header):
        stats.counters.received(header.command, bytes: header.size)
        logger.warning(
          "message \(header.messageID) (\(commandName(header.command))) of \(header.size) bytes exceeds the limit \(channel.maxMessageSize); discarded"
        )
        if header.isCommand, header.wantsReply { sendError(to: header, .argListTooLong) }
      case .message(var message):
        stats.counters.received(message.header.command, bytes: message.header.size)
        // Descriptors no handler took close with the message.
        if message.header.isReply {
          handleReply(header: message.header, payload: message.payload)
        } else if let end = dispatch(&message) {
          flush()
          return end
        }
        runDeferredWork()
        if txUsed > Self.coalesceLimit || !channel.hasBufferedMessage { flush() }
        messageServed()
      }
    }
  }

  /// How the connection ends when the client closed its end.
  var closedEnd: ConnectionEnd { shuttingDown ? .shutdown : .clientClosed }

  /// How the connection ends when receiving failed.
  func receiveFailed(_ error: Errno) -> ConnectionEnd {
    if shuttingDown { return .shutdown }
    if error == .timedOut {
      let why =
        "the client sent part of a message and nothing more for \(limits.partialMessageTimeoutMilliseconds) ms"
      logger.warning("\(why): disconnecting it")
      stats.recordError(why)
      return .timedOut(why)
    }
    logger.error("unframeable message or socket error, closing: \(error)")
    stats.recordError("unframeable message or socket error: \(error.name)")
    return .protocolError("\(error)")
  }

  func runDeferredWork() {
    while !deferred.isEmpty {
      let work = deferred
      deferred = []
      for item in work { item() }
    }
  }

  /// Releases everything the client gave: in-flight transfers, DMA windows
  /// (the device is told first), interrupt eventfds (every index it set up
  /// disabled);
  /// then resets the device so the next client finds it clean, unless
  /// configured to keep its state and that state is whole.
  private func teardown() {
    // What the client did before it hung up comes before this, as the
    // kernel orders it; ThreadSanitizer needs telling (nothing in other builds).
    cvfu_tsan_saw_hang_up()
    abortDMAJobs()
    let windows = dma.windows
    if !windows.isEmpty {
      do throws(Errno) { try backend.dmaUnmap(windows) } catch {
        // The client is gone, and its memory with it: released regardless.
        logger.error(
          "the device refused to unmap the \(windows.count) DMA windows of a client that left (\(error.name)); released anyway"
        )
      }
    }
    dma.removeAll()
    dmaBytes = 0
    if let dmaLoggingDevice { stopDMALogging(dmaLoggingDevice, why: "as the client left") }
    for irq in irqDescriptions where irqIndexesSet[Int(irq.index)] {
      do throws(Errno) { try backend.setIRQs(.disable(irq.index)) } catch {
        logger.warning("disabling interrupt index \(irq.index) after hang-up failed: \(error.name)")
      }
    }
    deferred = []
    // A server shutting down keeps no state for a next client: no drain, no settling.
    let stateAtEnd = shuttingDown ? deviceMigrationState() : nil
    let keep =
      !limits.resetOnDisconnect
      && (shuttingDown ? stateAtEnd == .running : settleMigrationAfterHangUp())
    if !keep {
      do {
        try backend.reset()
        migration.deviceWasReset()
        noteReset(.clientLeft)
      } catch {
        logger.warning("device reset after hang-up failed: \(error)")
        returnToRunningWithoutReset()
      }
    }
    migration.closeStream()
    sparseStream = nil
    if shuttingDown, let stateAtEnd, stateAtEnd != .running {
      // A stop mid-migration must not leave the device claiming half a state.
      let now = deviceMigrationState().map { "\($0)" } ?? "an unknown state"
      logger.notice(
        "shutting down with the device in \(stateAtEnd): migration stream invalidated, device reset, now \(now)"
      )
    }
    backend.attach(host: nil)
    let stateAfter = deviceMigrationState()
    stats.update {
      $0.dmaRegions = 0
      $0.dmaBytes = 0
      $0.irqFDs = backend.eventFDCount
      $0.irqVectorsWired = irqDescriptions.map { _ in 0 }
      $0.dirtyLogging = false
      $0.migrationState = stateAfter
    }
    noteMigrationState(stateAfter)
    willCloseSocket?()
    channel.close()
  }

  /// Records the device's migration state for the control channel (after
  /// anything that may have changed it: a SET, a reset, the client leaving).
  func recordMigrationState() {
    guard migratable != nil else { return }
    let state = deviceMigrationState()
    stats.update { $0.migrationState = state }
    noteMigrationState(state)
  }

  /// The device's migration state (RUNNING for a device without migration),
  /// or nil when the device cannot tell.
  func deviceMigrationState() -> MigrationState? {
    guard let migratable else { return .running }
    do throws(Errno) { return try migratable.migrationState } catch {
      logger.warning("the device cannot tell its migration state: \(error.name)")
      return nil
    }
  }

  /// Under `--on-disconnect keep`: whether the device's state survives the
  /// client that left. A source (STOP_COPY) goes back through its own arcs to
  /// the state its save started from (RUNNING, or STOP for a device found
  /// stopped), as a cancelled migration does: the rest of the save is drained
  /// and dropped, the save finished, the VF resumed, every byte of its state
  /// kept. A device left in STOP or RUNNING_P2P stays there until a client
  /// moves it: resuming it could run a VF whose state already runs elsewhere.
  /// A destination in RESUMING holds part of a state and ERROR none that can
  /// be trusted: those are reset.
  /// A device whose reset failed (it has none, or the kernel found it busy)
  /// must still not stay mid-migration for the next client: its own arcs take
  /// it back to RUNNING, the driver refusing a restore that is incomplete.
  private func returnToRunningWithoutReset() {
    guard let migratable, let state = deviceMigrationState(), state != .running else { return }
    do throws(Errno) {
      _ = try migration.set(.running, on: migratable)
      logger.warning(
        "device not reset: returned from \(state) to RUNNING through its migration arcs")
    } catch {
      let at = deviceMigrationState().map { "\($0)" } ?? "an unknown state"
      logger.error(
        "device not reset and it could not leave \(state) (\(error.name)): it stays in \(at)")
    }
  }

  private func settleMigrationAfterHangUp() -> Bool {
    guard let migratable else { return true }
    guard let state = deviceMigrationState() else { return false }
    switch state {
    case .running:
      return true
    case .stop, .runningP2P:
      logger.notice("client left the device in \(state): it stays stopped, its state kept")
      return true
    case .stopCopy, .preCopy, .preCopyP2P:
      // Back where the save started: a source that was stopped stays stopped.
      let origin = migration.saveOrigin ?? .running
      do throws(Errno) {
        let dropped = try migration.set(origin, on: migratable)
        logger.warning(
          "client left the device in \(state): migration cancelled (\(dropped) unread bytes of the save dropped), device \(origin) with its state, as before the save"
        )
        return true
      } catch {
        let at = deviceMigrationState().map { "\($0)" } ?? "an unknown state"
        logger.error(
          "client left the device in \(state) and it could not return to \(origin) (\(error.name) at \(at)): device reset, its state lost"
        )
        return false
      }
    case .resuming, .error:
      logger.warning("client left the device in \(state): device reset (its state is incomplete)")
      return false
    }
  }

  func commandName(_ raw: UInt16) -> String {
    Command(rawValue: raw)?.description ?? "command \(raw)"
  }

  // MARK: Sending

  /// Where the handler of the current request writes its reply payload.
  var replyArea: UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(rebasing: tx[(txUsed + MessageHeader.size)...])
  }

  /// Queues the reply whose payload (`payloadSize` bytes) the handler wrote in
  /// `replyArea`. A reply with a descriptor or with `extra` bytes goes out at
  /// once, after the queue.
  func sendReply(
    to request: MessageHeader, payloadSize: Int, fd: FileDescriptor? = nil,
    extra: UnsafeRawBufferPointer? = nil
  ) {
    let length = MessageHeader.size + payloadSize
    MessageHeader(
      messageID: request.messageID, command: request.command,
      size: UInt32(length + (extra?.count ?? 0)),
      flags: .reply
    ).encode(into: UnsafeMutableRawBufferPointer(rebasing: tx[txUsed...]))
    guard fd != nil || extra != nil else {
      txUsed += length
      return
    }
    let reply = UnsafeRawBufferPointer(rebasing: tx[txUsed..<(txUsed + length)])
    flush()
    do {
      try channel.send(reply, extra ?? UnsafeRawBufferPointer(start: nil, count: 0), fd: fd)
    } catch {
      sendFailed(error, "reply to \(request.messageID)")
    }
  }

  /// A send that failed: a client gone is noticed by the next receive; one
  /// that stopped reading (the send timed out) is disconnected.
  func sendFailed(_ error: Errno, _ what: String) {
    guard error == .timedOut else {
      logger.debug("\(what) not sent: \(error)")
      return
    }
    guard brokenEnd == nil else { return }
    let why =
      "the client has not read its replies for \(limits.sendTimeoutMilliseconds) ms (\(what) not sent)"
    logger.warning("\(why): disconnecting it")
    stats.recordError(why)
    brokenEnd = .timedOut(why)
    channel.shutdown()
  }

  /// Sends the queued replies.
  func flush() {
    guard txUsed > 0 else { return }
    let queued = UnsafeRawBufferPointer(rebasing: tx[0..<txUsed])
    txUsed = 0
    do {
      try channel.send(queued)
    } catch {
      sendFailed(error, "replies")
    }
  }

  func sendError(to request: MessageHeader, _ errno: Errno) {
    // Counted and recorded here, where every error reply passes: never on a request that succeeds.
    stats.counters.failed(request.command)
    stats.recordError("\(commandName(request.command)) id=\(request.messageID): \(errno.name)")
    flush()
    var header = [UInt8](repeating: 0, count: MessageHeader.size)
    header.withUnsafeMutableBytes { request.errorReply(errno).encode(into: $0) }
    do {
      try channel.send(bytes: header)
    } catch {
      sendFailed(error, "error reply to \(request.messageID)")
    }
  }
}
