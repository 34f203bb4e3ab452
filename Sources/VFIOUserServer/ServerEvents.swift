import CVFIOUser
import Synchronization
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// Something that changed in the server, as the control channel announces
/// it (protocol/control.md, "Events"). Posted only where state changes,
/// never per REGION_READ or REGION_WRITE.
public enum ServerEvent: Sendable, Equatable {
  case clientConnected(pid: Int32, uid: UInt32, gid: UInt32)
  case clientDisconnected(pid: Int32, end: ConnectionEnd)
  /// The device's migration state as recorded (nil: the device could not tell).
  case deviceStateChanged(from: MigrationState?, to: MigrationState?)
  case migrationStarted(direction: MigrationDirection)
  case migrationFinished(direction: MigrationDirection, bytes: UInt64)
  case migrationFailed(direction: MigrationDirection, state: MigrationState?, reason: String)
  case deviceReset(cause: ResetCause)
  /// The guest reached a BAR after a reset without enabling the device again.
  case usedWithoutEnable(access: String)
  /// A client left the device disabled this long after a reset cleared it.
  case leftDisabled(seconds: Int)
}

/// A save leaves through MIG_DATA_READ, a load arrives through MIG_DATA_WRITE.
public enum MigrationDirection: String, Sendable { case save, load }

public enum ResetCause: String, Sendable {
  case clientRequest = "client-request"
  case clientLeft = "client-left"
}

/// An event with the wall-clock time it was posted.
public struct StampedEvent: Sendable, Equatable {
  public var event: ServerEvent
  public var seconds: Int64
  public var microseconds: Int64
}

/// One listener's bounded queue (a control client after `qmp_capabilities`).
/// The connection thread appends under its lock, which the listener's thread
/// takes only to move the events out: no I/O is ever done under it. A full
/// queue drops the new event and counts it; an eventfd wakes the listener
/// when its queue stops being empty.
public final class EventSubscription: Sendable {
  private struct Queue {
    var events: [StampedEvent] = []
    var dropped: UInt64 = 0
  }
  public let capacity: Int
  /// Readable (poll) while events wait.
  public let wakeFD: Int32
  public let pid: Int32
  private let queue: Locked<Queue>
  private let droppedTotal = Atomic<UInt64>(0)

  init?(capacity: Int, pid: Int32) {
    // EFD_NONBLOCK and EFD_CLOEXEC are O_NONBLOCK and O_CLOEXEC (Glibc exports only those).
    let fd = cvfu_eventfd(0, Int32(O_NONBLOCK | O_CLOEXEC))
    guard fd >= 0 else { return nil }
    wakeFD = fd
    self.capacity = capacity
    self.pid = pid
    var initial = Queue()
    initial.events.reserveCapacity(capacity)
    queue = Locked(initial)
  }

  deinit { close(wakeFD) }

  /// False when the queue is full and `event` was dropped.
  func offer(_ event: StampedEvent) -> Bool {
    let (accepted, wake) = queue.withLock { q -> (Bool, Bool) in
      guard q.events.count < capacity else {
        q.dropped += 1
        return (false, false)
      }
      q.events.append(event)
      return (true, q.events.count == 1)
    }
    if !accepted { droppedTotal.add(1, ordering: .relaxed) }
    if wake { _ = cvfu_eventfd_signal(wakeFD) }
    return accepted
  }

  /// The waiting events, and how many were dropped since the last call.
  public func take() -> (events: [StampedEvent], dropped: UInt64) {
    _ = cvfu_eventfd_drain(wakeFD)
    return queue.withLock { q in
      var events: [StampedEvent] = []
      events.reserveCapacity(capacity)
      swap(&events, &q.events)
      defer { q.dropped = 0 }
      return (events, q.dropped)
    }
  }

  /// Events dropped for this listener since it subscribed.
  public var dropped: UInt64 { droppedTotal.load(ordering: .relaxed) }
  public var queued: Int { queue.withLock { $0.events.count } }
}

/// The server's events and the state they are derived from. The connection
/// thread posts; each control client that asked for events has a queue.
public final class ServerEvents: Sendable {
  /// What the connection thread remembers between state changes: the
  /// migration under way, and whether a reset left an enabled device disabled.
  struct Tracker {
    var state: MigrationState?
    var direction: MigrationDirection?
    var bytesAtStart: UInt64 = 0
    /// The client set COMMAND's memory or bus-master bit since the last reset.
    var enabled = false
    /// A reset cleared an enabled device, and nothing enabled it since.
    var awaitingEnable = false
    /// A reset came before the state the next `noteMigrationState` records.
    var resetPending = false
    /// Counts the resets that arm the check; a watch acts only on its own.
    var armings: UInt64 = 0
  }
  private let subscribers = Locked<[EventSubscription]>([])
  private let postedCount = Atomic<UInt64>(0)
  private let droppedCount = Atomic<UInt64>(0)
  let tracker = Locked(Tracker())

  /// A queue of `capacity` events for a listener (nil when no eventfd can be had).
  public func subscribe(capacity: Int = 256, pid: Int32) -> EventSubscription? {
    guard let subscription = EventSubscription(capacity: capacity, pid: pid) else { return nil }
    subscribers.withLock { $0.append(subscription) }
    return subscription
  }

  public func unsubscribe(_ subscription: EventSubscription) {
    subscribers.withLock { $0.removeAll { $0 === subscription } }
  }

  /// The listeners now.
  public var subscriptions: [EventSubscription] { subscribers.withLock { $0 } }

  /// Events posted, and dropped from a full queue (one per listener that missed it).
  public var posted: UInt64 { postedCount.load(ordering: .relaxed) }
  public var dropped: UInt64 { droppedCount.load(ordering: .relaxed) }

  func post(_ event: ServerEvent) {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    let stamped = StampedEvent(
      event: event, seconds: Int64(now.tv_sec), microseconds: Int64(now.tv_nsec / 1000))
    postedCount.add(1, ordering: .relaxed)
    let missed = subscribers.withLock { list in list.count { !$0.offer(stamped) } }
    if missed > 0 { droppedCount.add(UInt64(missed), ordering: .relaxed) }
  }

  static let saving: Set<MigrationState> = [.stopCopy, .preCopy, .preCopyP2P]

  /// The device's migration state as the connection thread just recorded
  /// it: DEVICE_STATE_CHANGED, and a migration's start, end or failure.
  func noteMigrationState(_ state: MigrationState?, counters: ServerCounters) {
    let events = tracker.withLock { t -> [ServerEvent] in
      let reset = t.resetPending
      t.resetPending = false
      guard state != t.state else { return [] }
      var out: [ServerEvent] = [.deviceStateChanged(from: t.state, to: state)]
      defer { t.state = state }
      let bytes = { (d: MigrationDirection) in
        d == .save ? counters.migrationBytesRead : counters.migrationBytesWritten
      }
      if let direction = t.direction {
        let going = direction == .save ? Self.saving.contains(state ?? .error) : state == .resuming
        if going { return out }
        t.direction = nil
        let finished: Bool
        switch direction {
        case .save: finished = !reset && t.state == .stopCopy && state == .stop
        case .load: finished = !reset && [.stop, .running, .runningP2P].contains(state)
        }
        if finished {
          out.append(
            .migrationFinished(direction: direction, bytes: bytes(direction) &- t.bytesAtStart))
        } else {
          let from = t.state.map { "\($0)" } ?? "an unknown state"
          let why =
            reset
            ? "device reset in \(from)"
            : state == .error
              ? "the device entered ERROR"
              : "left \(from) for \(state.map { "\($0)" } ?? "an unknown state")"
          out.append(.migrationFailed(direction: direction, state: state, reason: why))
        }
      }
      if let state {
        let direction: MigrationDirection? =
          Self.saving.contains(state) ? .save : state == .resuming ? .load : nil
        if let direction {
          t.direction = direction
          t.bytesAtStart = bytes(direction)
          out.append(.migrationStarted(direction: direction))
        }
      }
      return out
    }
    for event in events { post(event) }
  }

  /// The device was reset: DEVICE_RESET, and a device the guest had enabled
  /// now waits to be enabled again. Returns whether it does, and which arming
  /// of the check this reset is (a watch acts only on its own).
  func noteReset(_ cause: ResetCause) -> (awaiting: Bool, arming: UInt64) {
    let result = tracker.withLock { t -> (Bool, UInt64) in
      t.resetPending = true
      if t.enabled { t.awaitingEnable = true }
      t.enabled = false
      if t.awaitingEnable { t.armings &+= 1 }
      return (t.awaitingEnable, t.armings)
    }
    post(.deviceReset(cause: cause))
    return result
  }

  /// The watch of `arming` ends: true (and disarmed, said once) when the
  /// device still waits to be enabled since that very reset.
  func takeLeftDisabled(arming: UInt64) -> Bool {
    tracker.withLock { t in
      guard t.awaitingEnable, t.armings == arming else { return false }
      t.awaitingEnable = false
      return true
    }
  }

  /// The client wrote PCI COMMAND: memory space or bus master on enables the
  /// device. Returns whether the device still waits to be enabled.
  func noteCommandWrite(_ command: UInt16) -> Bool {
    tracker.withLock { t in
      t.enabled = command & 0x6 != 0
      if t.enabled { t.awaitingEnable = false }
      return t.awaitingEnable
    }
  }

  /// The device waits to be enabled since a reset (read when a client arrives).
  var awaitingEnable: Bool { tracker.withLock { $0.awaitingEnable } }

  /// Whether the client enabled the device since the last reset, and whether
  /// it waits to be enabled again: a live update carries both.
  var enableTracking: (enabled: Bool, awaiting: Bool) {
    tracker.withLock { ($0.enabled, $0.awaitingEnable) }
  }
  func restoreEnableTracking(enabled: Bool, awaiting: Bool) {
    tracker.withLock {
      $0.enabled = enabled
      $0.awaitingEnable = awaiting
    }
  }

  /// A client left the device disabled after a reset (`takeLeftDisabled` disarmed it).
  func noteLeftDisabled(seconds: Int) {
    post(.leftDisabled(seconds: seconds))
  }

  /// Disarms the check: true when it was still armed (so this is the once).
  func takeAwaitingEnable() -> Bool {
    tracker.withLock { t in
      defer { t.awaitingEnable = false }
      return t.awaitingEnable
    }
  }

  /// The guest used the device without enabling it (`takeAwaitingEnable`
  /// disarmed the check): said once per reset.
  func noteUsedWithoutEnable(_ access: String) {
    post(.usedWithoutEnable(access: access))
  }
}
