import Testing
import VFIODevice

/// `Locked`, the project's one lock for a value (a pthread mutex, so that
/// ThreadSanitizer sees the order it imposes; see Threads.swift).
struct LockTests {
  /// Not `Sendable`: `Locked` shares it between threads as `Mutex` would.
  final class Tally {
    var count = 0
    var lastThread = -1
  }

  /// Two threads contend for the lock on every increment. Every increment
  /// counts, and under `scripts/sanitize.sh thread` TSan must see the
  /// accesses as ordered: with `Synchronization.Mutex` in place of `Locked`,
  /// the contended lock and unlock go through a futex TSan cannot see and it
  /// reports this test's accesses to the value as a data race.
  @Test func contendedIncrementsAreOrderedAndNoneIsLost() {
    let tally = Locked(Tally())
    let iterations = 20_000
    let ready = Semaphore()
    let go = Semaphore()
    let done = Semaphore()
    for thread in 0..<2 {
      let failed = startThread(name: "lock-test") {
        ready.signal()
        go.wait()
        for _ in 0..<iterations {
          tally.withLock {
            $0.count += 1
            $0.lastThread = thread
          }
        }
        done.signal()
      }
      #expect(failed == nil)
    }
    ready.wait()
    ready.wait()
    go.signal()
    go.signal()
    done.wait()
    done.wait()
    #expect(tally.withLock { $0.count } == 2 * iterations)
    #expect(tally.withLock { [0, 1].contains($0.lastThread) })
  }

  struct Refused: Error, Equatable {}

  /// A throwing body's typed error comes out as it is, its change to the
  /// value stays, and the lock is free again.
  @Test func aThrowingBodyReleasesTheLock() {
    let value = Locked(1)
    #expect(throws: Refused()) {
      try value.withLock { (number: inout Int) throws(Refused) in
        number = 2
        throw Refused()
      }
    }
    #expect(value.withLock { $0 } == 2)
  }
}
