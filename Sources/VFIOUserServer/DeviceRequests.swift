import Synchronization
import VFIODevice
import VFIOUser
import VFIOUserSocket

/// A request from the control channel that only the connection thread may
/// carry out, since it alone touches the device: `resume` while a client is
/// attached. The control thread leaves it here; the connection thread
/// checks one flag after each message it serves (a relaxed load) and runs
/// it there, between two of the client's messages, never inside one. A
/// connection waiting for a client that sends nothing is woken (`ThreadWake`)
/// to take it.
public final class DeviceRequests: Sendable {
  public enum Request: Sendable {
    case resume
    /// A live update's handover (Server+LiveUpdate).
    case handover(HandoverJob)
  }
  /// What became of a request.
  public enum Outcome: Sendable, Equatable {
    /// Done: the state before and after.
    case done(from: MigrationState, to: MigrationState)
    /// Nothing to do (the device already runs).
    case unchanged(MigrationState)
    case refused(String)
    /// The live update's handover ran (its result is in the job).
    case handedOver
  }
  private enum Slot {
    case empty
    case waiting(Request)
    case running
    case finished(Outcome)
  }
  private let slot = Locked<Slot>(.empty)
  private let flag = Atomic<Bool>(false)
  private let answered = VFIODevice.Semaphore(value: 0)
  /// The connection thread's wake, while it has one (`Connection.run`).
  private let waker = Locked<ThreadWake?>(nil)

  /// The connection thread offers its wake (nil: it is going away).
  func setWake(_ wake: ThreadWake?) { waker.withLock { $0 = wake } }

  /// Whether a request waits: the connection thread's per-message check.
  @inline(__always)
  var pending: Bool { flag.load(ordering: .relaxed) }

  /// Hands `request` to the connection thread and waits up to `timeout`
  /// milliseconds for it to be picked up; nil when it was not (the client
  /// sent nothing meanwhile: the request is withdrawn), or when another
  /// request is under way.
  public func submit(_ request: Request, timeoutMilliseconds: Int) -> Outcome? {
    let placed = slot.withLock { s -> Bool in
      guard case .empty = s else { return false }
      s = .waiting(request)
      return true
    }
    guard placed else { return .refused("another request is under way") }
    flag.store(true, ordering: .releasing)
    // Woken every few milliseconds until taken: a wake that lands just before
    // the connection begins to wait is lost, and the next one finds it waiting.
    var picked = false
    var left = timeoutMilliseconds
    while !picked, left > 0 {
      waker.withLock { _ = $0?.wakeUp() }
      let slice = min(left, 10)
      picked = answered.wait(timeout: .milliseconds(slice))
      left -= slice
    }
    if !picked {
      let withdrawn = slot.withLock { s -> Bool in
        guard case .waiting = s else { return false }
        s = .empty
        return true
      }
      flag.store(false, ordering: .relaxed)
      // Taken meanwhile: it is running, and its answer follows.
      if withdrawn { return nil }
      answered.wait()
    }
    return slot.withLock { s -> Outcome? in
      defer { s = .empty }
      if case .finished(let outcome) = s { return outcome }
      return nil
    }
  }

  /// The waiting request, taken by the connection thread.
  func take() -> Request? {
    flag.store(false, ordering: .relaxed)
    return slot.withLock { s -> Request? in
      guard case .waiting(let request) = s else { return nil }
      s = .running
      return request
    }
  }

  func finish(_ outcome: Outcome) {
    slot.withLock { $0 = .finished(outcome) }
    answered.signal()
  }
}
