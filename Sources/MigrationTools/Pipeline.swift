import Dispatch
import Synchronization
import VFIODevice
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

// The copy pipeline the migration commands move their streams through.

/// Lets a value be handed to one other thread that becomes its only user.
public final class Handoff<T>: @unchecked Sendable {
  public let value: T
  public init(_ value: T) { self.value = value }
}

/// Moves a stream in buffers of `bufferSize` bytes from `produce`, run on a
/// thread of its own, to `consume`, run on the caller's, through a pool of
/// `slots` buffers: the next read overlaps the previous write, so the copy
/// runs at the slower side's pace. `produce` fills a buffer and says how many
/// bytes it holds and whether the stream ended. The first error on either side
/// stops both and is rethrown once the producer's thread has finished, so no
/// buffer is freed under it.
public func pipeline(
  bufferSize: Int, slots: Int = 4,
  produce: @escaping (UnsafeMutableRawBufferPointer) throws -> (count: Int, last: Bool),
  consume: (UnsafeRawBufferPointer) throws -> Void
) throws -> UInt64 {
  let pool = (0..<slots).map { _ in
    UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
  }
  defer { pool.forEach { $0.deallocate() } }
  // Semaphores start at zero and are signalled up: libdispatch traps when one
  // is destroyed below its initial value, which an early exit would cause.
  let free = DispatchSemaphore(value: 0)
  for _ in 0..<slots { free.signal() }
  let filled = DispatchSemaphore(value: 0)
  let producerDone = DispatchSemaphore(value: 0)
  let results = Locked([(count: Int, last: Bool)](repeating: (0, false), count: slots))
  let producerError = Locked<Error?>(nil)
  let cancelled = Atomic<Bool>(false)
  let job = Handoff((produce, pool))
  DispatchQueue.global().async {
    let (produce, buffers) = job.value
    var slot = 0
    while true {
      free.wait()
      if cancelled.load(ordering: .acquiring) { break }
      do {
        let result = try produce(buffers[slot])
        results.withLock { $0[slot] = result }
        filled.signal()
        if result.last { break }
      } catch {
        producerError.withLock { $0 = error }
        results.withLock { $0[slot] = (-1, true) }
        filled.signal()
        break
      }
      slot = (slot + 1) % slots
    }
    producerDone.signal()
  }
  defer {
    // Wake a producer waiting for a buffer, then wait for it to finish.
    cancelled.store(true, ordering: .releasing)
    for _ in 0..<slots { free.signal() }
    producerDone.wait()
  }
  var total: UInt64 = 0
  var slot = 0
  while true {
    filled.wait()
    let result = results.withLock { $0[slot] }
    if result.count < 0 { throw producerError.withLock { $0 }! }
    if result.count > 0 {
      try consume(UnsafeRawBufferPointer(rebasing: pool[slot][0..<result.count]))
    }
    total += UInt64(result.count)
    free.signal()
    if result.last { return total }
    slot = (slot + 1) % slots
  }
}

/// A chunk both ends accept.
public func migrationChunk(_ clients: VFIOUserClient...) -> Int {
  Int(clients.map { $0.serverCapabilities.effectiveMaxDataXferSize }.min() ?? 1 << 20)
}

/// How long a migration command waits for one reply: longer than the PF's
/// slowest bounded step (restore completion, 20 s for each of two GTs).
public let migrationTimeout: Int32 = 60_000
