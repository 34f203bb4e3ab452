import SystemPackage
import VFIOUser

/// One client's hold on a device's migration: walks a SET MIG_DEVICE_STATE
/// one direct arc at a time, and keeps the data stream the last arc opened.
/// The device owns the migration state (`MigrationCapable.migrationState`);
/// the session keeps none of it, only the stream, so a device left in STOP by
/// one client is in STOP for the next with nothing carried between them.
///
/// Why the walk stays on this side of the interface, calling single arcs:
/// the simulated VF and a PF-debugfs backend implement arcs, not paths (as
/// the kernel's drivers do under their `set_device_state` loops). A kernel
/// VFIO backend could hand a whole path to VFIO_DEVICE_FEATURE and let the
/// kernel walk it, but taking it one arc at a time costs it nothing (each arc
/// is a SET the kernel accepts), and it keeps one walk with the server's
/// rules in one place: a save being left is drained first, only the final
/// arc may open a stream, a restore that fails to validate ends in ERROR.
///
/// Used on the connection's thread only, like the device. That is also why
/// the kernel's lock cycle (state mutex → migration file lock → mmap_lock →
/// memory_lock → state mutex, protocol/xe-kernel-facts.md §3) has no equivalent here: the
/// migration state, the stream, the DMA table and reset are all touched on
/// that one thread, one request at a time, so no lock orders exist between
/// them. A MIG_DATA_READ runs to completion (bounded by the device's
/// timeouts) before the next request, a DEVICE_RESET say, is even read, and
/// the reset then kills the stream (`deviceWasReset`). No server lock is held
/// while the device blocks, and the device never calls back into the server
/// from its own threads.
public struct MigrationSession {
  /// The stream the last arc opened, while the device is in its state.
  public private(set) var stream: MigrationStream?
  /// A reset or hang-up killed the stream: data commands answer ENODEV until
  /// a new one opens.
  public private(set) var streamInvalidated = false
  /// While the device is in a save state (PRE_COPY, STOP_COPY): the state
  /// the walk that entered it started from (RUNNING, STOP or RUNNING_P2P).
  /// A save the client abandons returns the device there, so a device that
  /// was stopped (its state already running elsewhere) is not resumed.
  public private(set) var saveOrigin: MigrationState?

  public init() {}

  /// Walks from the device's state to `target`, one arc at a time, as the
  /// kernel's drivers do. An unreachable target is EINVAL with no move at
  /// all. On a failed arc the device stays at the last good step (where it
  /// says it is), except that a failed RESUMING → STOP (the restored data did
  /// not validate) makes the device stop and report ERROR (`migrationFailed`).
  ///
  /// Leaving STOP_COPY reads and drops what the client left unread, so a
  /// cancelled save ends cleanly: the PF refuses to finish a save still in
  /// progress (EIO), which would strand the source in STOP_COPY. Returns the
  /// bytes dropped.
  @discardableResult
  public mutating func set(_ target: MigrationState, on device: MigrationCapable) throws(Errno)
    -> UInt64
  {
    let flags = device.migrationFlags
    var current = try device.migrationState
    // A stream the device no longer serves (it reset itself: a config-space FLR) is dead.
    if let stream, !stream.isServed(in: current) { invalidateStream() }
    guard
      current == target
        || MigrationTransitions.nextState(from: current, to: target, flags: flags) != nil
    else { throw .invalidArgument }
    var drained: UInt64 = 0
    let origin = current
    while current != target {
      guard let next = MigrationTransitions.nextState(from: current, to: target, flags: flags)
      else {
        device.migrationFailed()
        throw .invalidArgument
      }
      let opened: MigrationStream?
      do throws(Errno) {
        if current == .stopCopy, case .source(let source)? = stream {
          drained += try Self.drain(source)
        }
        opened = try device.migrationStep(from: current, to: next)
      } catch {
        if current == .resuming {
          closeStream()
          device.migrationFailed()
        }
        throw error
      }
      // Leaving a data state ends its stream.
      if current == .stopCopy || current == .resuming { closeStream() }
      if next.isSaving {
        // A walk from RESUMING passed through STOP: that is where it was.
        if !current.isSaving { saveOrigin = origin.isSteady ? origin : .stop }
      } else {
        saveOrigin = nil
      }
      current = next
      if let opened {
        // Only the final arc may open a stream (the kernel fputs one opened mid-path).
        guard next == target else {
          opened.close()
          throw .invalidArgument
        }
        stream = opened
        streamInvalidated = false
      }
    }
    return drained
  }

  /// The device was reset (DEVICE_RESET, a hang-up under the reset policy, a
  /// server shutdown): it is RUNNING, and an open stream is dead from now on.
  public mutating func deviceWasReset() {
    if stream != nil { invalidateStream() }
    saveOrigin = nil
  }

  /// Closes the stream, if any, without marking it invalidated (the client left).
  public mutating func closeStream() {
    stream?.close()
    stream = nil
  }

  private mutating func invalidateStream() {
    closeStream()
    streamInvalidated = true
  }

  /// The save stream for MIG_DATA_READ: ENODEV once a reset killed the
  /// stream, EINVAL when the device is in no state that reads.
  public func source() throws(Errno) -> any MigrationSource {
    if case .source(let source)? = stream { return source }
    if streamInvalidated, stream == nil { throw Errno(rawValue: 19) }  // ENODEV
    throw .invalidArgument
  }

  /// The restore stream for MIG_DATA_WRITE, with the errnos of `source()`.
  public func sink() throws(Errno) -> any MigrationSink {
    if case .sink(let sink)? = stream { return sink }
    if streamInvalidated, stream == nil { throw Errno(rawValue: 19) }  // ENODEV
    throw .invalidArgument
  }

  /// Fills `buffer` from `source`: reads until it is full or the stream ends
  /// (a read of 0), so a MIG_DATA_READ reply is short only at the end of the
  /// stream, whatever lengths the device's reads return. Returns the bytes read.
  ///
  /// Where a hang-up or a reset is still noticed while a read blocks: every
  /// read is bounded (`MigrationSource.read` waits at most the device's
  /// timeout), there are at most `buffer.count` of them, and `stillWanted` is
  /// asked before each read after the first (the connection answers false
  /// once its client has hung up, and the fill stops there). So the
  /// connection's thread is back to its socket within one read's bound of a
  /// hang-up, and a DEVICE_RESET queued behind the request is handled, in
  /// arrival order, as soon as the request ends.
  public static func fill(
    _ buffer: UnsafeMutableRawBufferPointer, from source: any MigrationSource,
    while stillWanted: () -> Bool
  ) throws(Errno) -> Int {
    var filled = 0
    while filled < buffer.count {
      if filled > 0, !stillWanted() { break }
      let n = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
      if n == 0 { break }
      filled += n
    }
    return filled
  }

  /// `fill`, except that the bytes completing `buffer` may come back as a
  /// span of device memory instead of being copied (`MigrationSource.read(gathering:)`):
  /// `count` bytes are in `buffer`, then `span`'s. Short only at the end of the stream.
  public static func gather(
    _ buffer: UnsafeMutableRawBufferPointer, from source: any MigrationSource,
    while stillWanted: () -> Bool
  ) throws(Errno) -> (count: Int, span: UnsafeRawBufferPointer?) {
    var filled = 0
    while filled < buffer.count {
      if filled > 0, !stillWanted() { break }
      let (n, span) = try source.read(
        gathering: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
      filled += n
      if let span { return (filled, span) }
      if n == 0 { break }
    }
    return (filled, nil)
  }

  /// Reads `source` to its end (each read bounded by the device's timeouts);
  /// returns the bytes dropped.
  public static func drain(_ source: any MigrationSource) throws(Errno) -> UInt64 {
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { scratch.deallocate() }
    var total: UInt64 = 0
    while true {
      let n = try source.read(into: scratch)
      if n == 0 { return total }
      total += UInt64(n)
    }
  }
}

extension MigrationState {
  /// The states of a save in progress, which a client that leaves abandons.
  var isSaving: Bool { self == .stopCopy || self == .preCopy || self == .preCopyP2P }
  /// The states a device rests in between migrations, with its state whole.
  var isSteady: Bool { self == .running || self == .stop || self == .runningP2P }
}
