import CVFIOUser

/// A way to wake one thread from a blocking wait (`cvfu_wake`): made on the
/// thread that waits, used from any other. The waiting thread brackets the
/// wait it allows to be woken (`MessageChannel.wake` does, for the wait for
/// a client's next message); a woken wait returns EINTR.
public final class ThreadWake: @unchecked Sendable {
  // Written only by the C functions, with atomics.
  let state: UnsafeMutablePointer<cvfu_wake>

  /// Binds the wake to the calling thread.
  public init() {
    state = .allocate(capacity: 1)
    cvfu_wake_init(state)
  }

  deinit { state.deallocate() }

  /// Just before a wait that may be woken, on the bound thread.
  @inline(__always) public func enter() { cvfu_wake_enter(state) }
  /// Just after it.
  @inline(__always) public func leave() { cvfu_wake_leave(state) }

  /// Interrupts the thread's wait if it is in one; false when it was not
  /// waiting (try again later).
  @discardableResult
  public func wakeUp() -> Bool { cvfu_wake_up(state) != 0 }
}
