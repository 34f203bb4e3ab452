import CVFIOUser
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

// Threads, a lock, a condition variable and a semaphore on pthreads, so the
// server, the device model and the CLI need neither Foundation (`Thread`,
// `NSLock`, `NSCondition`) nor Dispatch (`DispatchSemaphore`). Linking
// Foundation statically costs the `serve` process megabytes of resident pages.
//
// Every lock in the project is a pthread mutex (`Locked`, `ConditionLock`),
// not `Synchronization.Mutex`: ThreadSanitizer intercepts pthread_mutex_lock
// and pthread_mutex_unlock and so sees the order a lock imposes. `Mutex` on
// Linux takes and releases its futex inline with atomics TSan does see, but
// when contended goes through the standard library's uninstrumented slow path
// (a priority-inheriting futex whose owner the kernel hands over), so two
// accesses under one contended `Mutex` look like a race to TSan.

/// Starts a detached thread that runs `body`, as Foundation's `Thread` does.
///
/// - Parameters:
///   - name: the thread's name for `top` and debuggers; the kernel keeps 15 bytes.
///   - stackSize: bytes of stack (address space; pages are touched as used),
///     or nil for the process default (`RLIMIT_STACK`).
/// - Returns: the error when no thread could be created (`body` does not run).
@discardableResult
public func startThread(
  name: String? = nil, stackSize: Int? = nil, _ body: @escaping @Sendable () -> Void
) -> Errno? {
  var attributes = pthread_attr_t()
  pthread_attr_init(&attributes)
  defer { pthread_attr_destroy(&attributes) }
  pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
  if let stackSize {
    let rc = pthread_attr_setstacksize(&attributes, max(stackSize, 16384))
    if rc != 0 { return Errno(rawValue: rc) }
  }
  let start = Unmanaged.passRetained(ThreadStart(name: name, body: body)).toOpaque()
  var thread = pthread_t()
  let rc = pthread_create(
    &thread, &attributes,
    { argument in
      let start = Unmanaged<ThreadStart>.fromOpaque(argument!).takeRetainedValue()
      if let name = start.name { _ = cvfu_set_thread_name(name) }
      start.body()
      return nil
    }, start)
  guard rc == 0 else {
    Unmanaged<ThreadStart>.fromOpaque(start).release()
    return Errno(rawValue: rc)
  }
  return nil
}

private final class ThreadStart {
  let name: String?
  let body: @Sendable () -> Void
  init(name: String?, body: @escaping @Sendable () -> Void) {
    self.name = name
    self.body = body
  }
}

/// Blocks the calling thread for `duration` (no-op when not positive).
public func sleep(for duration: Duration) {
  guard duration > .zero else { return }
  var request = timespec(duration)
  var remaining = timespec()
  while nanosleep(&request, &remaining) != 0, errno == EINTR { request = remaining }
}

extension timespec {
  /// A relative time of `duration` (not negative; capped at 68 years, so a
  /// deadline computed from it cannot overflow).
  init(_ duration: Duration) {
    let (seconds, attoseconds) = duration.components
    self.init(
      tv_sec: Int(min(seconds, Int64(Int32.max))), tv_nsec: Int(attoseconds / 1_000_000_000))
  }
}

/// The pthread mutex behind both of the project's locks (`Locked`,
/// `ConditionLock`), on the heap: its address must not change while in use.
struct PthreadMutex: ~Copyable {
  let pointer = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

  init() { pthread_mutex_init(pointer, nil) }

  deinit {
    pthread_mutex_destroy(pointer)
    pointer.deallocate()
  }

  func lock() { pthread_mutex_lock(pointer) }
  func unlock() { pthread_mutex_unlock(pointer) }
}

/// A value reachable only under a lock, as with `Synchronization.Mutex` (the
/// same `withLock`), on a pthread mutex that ThreadSanitizer understands
/// (see the top of this file). The value goes in and results come out as
/// `sending`, as with `Mutex`, so a non-`Sendable` value can be shared safely.
public final class Locked<Value>: @unchecked Sendable {
  private let mutex = PthreadMutex()
  /// Guarded by `mutex`.
  private var value: Value

  public init(_ initialValue: consuming sending Value) { value = initialValue }

  /// Runs `body` with the value, the lock held (not reentrant: `body` must
  /// not take this lock again).
  public func withLock<Result, E: Error>(
    _ body: (inout sending Value) throws(E) -> sending Result
  ) throws(E) -> sending Result {
    mutex.lock()
    defer { mutex.unlock() }
    return try body(&value)
  }
}

/// A mutex with a condition variable, like Foundation's `NSCondition`: lock,
/// wait (which unlocks while waiting), signal or broadcast. Timed waits use
/// the monotonic clock, so a change of wall-clock time never fires or delays them.
public final class ConditionLock: @unchecked Sendable {
  private let mutexStorage = PthreadMutex()
  private var mutex: UnsafeMutablePointer<pthread_mutex_t> { mutexStorage.pointer }
  private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

  public init() {
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(condition, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    pthread_cond_destroy(condition)
    condition.deallocate()
  }

  public func lock() { mutexStorage.lock() }
  public func unlock() { mutexStorage.unlock() }

  public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    lock()
    defer { unlock() }
    return try body()
  }

  /// Waits (lock held) for a signal; may also wake spuriously.
  public func wait() { pthread_cond_wait(condition, mutex) }

  /// Waits (lock held) for a signal until `deadline`; returns false when it
  /// passed. May also wake spuriously (returning true).
  public func wait(until deadline: ContinuousClock.Instant) -> Bool {
    wait(timeout: ContinuousClock.now.duration(to: deadline))
  }

  /// Waits (lock held) for a signal for at most `timeout`; returns false when
  /// it passed. May also wake spuriously (returning true).
  public func wait(timeout: Duration) -> Bool {
    guard timeout > .zero else { return false }
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    let relative = timespec(timeout)
    var deadline = timespec(
      tv_sec: now.tv_sec + relative.tv_sec, tv_nsec: now.tv_nsec + relative.tv_nsec)
    if deadline.tv_nsec >= 1_000_000_000 {
      deadline.tv_sec += 1
      deadline.tv_nsec -= 1_000_000_000
    }
    return pthread_cond_timedwait(condition, mutex, &deadline) != ETIMEDOUT
  }

  public func signal() { pthread_cond_signal(condition) }
  public func broadcast() { pthread_cond_broadcast(condition) }
}

/// A counting semaphore, like `DispatchSemaphore`: `wait` takes one unit,
/// blocking until `signal` provides it.
public final class Semaphore: @unchecked Sendable {
  private let condition = ConditionLock()
  /// Guarded by `condition`.
  private var value: Int

  public init(value: Int = 0) { self.value = value }

  public func signal() {
    condition.withLock {
      value += 1
      condition.signal()
    }
  }

  public func wait() {
    condition.withLock {
      while value == 0 { condition.wait() }
      value -= 1
    }
  }

  /// Takes a unit if one comes within `timeout`; returns whether it did.
  public func wait(timeout: Duration) -> Bool {
    let deadline = ContinuousClock.now + timeout
    return condition.withLock {
      while value == 0 {
        if !condition.wait(until: deadline) { break }
      }
      guard value > 0 else { return false }
      value -= 1
      return true
    }
  }
}
