import SystemPackage
import VFIODevice
import VFIOUser

/// The kernel's migration state machine (`vfio_mig_get_next_state` and the
/// driver's set_device_state loop) and the open data stream, owned by one
/// connection.
///
/// Why the kernel's lock cycle (state mutex → migration file lock → mmap_lock
/// → memory_lock → state mutex, reference §1.5) has no equivalent here: the
/// migration state, the stream, the DMA table and reset are all touched only
/// on the connection's thread, one request at a time, so no lock orders exist
/// between them. A MIG_DATA_READ runs to completion (bounded by the device's
/// timeouts) before the next request — a DEVICE_RESET — is even read, and the
/// reset then drops the stream in `reset()` below. No server lock is held
/// while the device blocks, and the device never calls back into the server
/// from its own threads.
public struct MigrationController {
  private(set) var state: MigrationState = .running
  private(set) var stream: MigrationStream?
  /// A reset or hang-up killed the stream: data commands answer ENODEV until a new one opens.
  private(set) var streamInvalidated = false
  let flags: MigrationFlags

  init(flags: MigrationFlags) { self.flags = flags }

  /// The state as a new client finds it: a stream killed under the last
  /// client is no concern of the next (its data commands get EINVAL).
  var handedOver: MigrationController {
    var next = self
    next.streamInvalidated = false
    return next
  }

  // MARK: Transitions

  /// Walks from the current state to `target` one arc at a time. On a failed
  /// arc the state stays at the last good step, except that a failed
  /// RESUMING → STOP (the restored data did not validate) moves to ERROR: the
  /// device must not look healthy with half a state. An unreachable target is
  /// EINVAL with no move at all.
  ///
  /// Leaving STOP_COPY reads and drops what the client left unread, so a
  /// cancelled save ends cleanly: the PF refuses to finish a save still in
  /// progress (EIO), which would strand the source in STOP_COPY. Returns the
  /// bytes dropped.
  @discardableResult
  mutating func set(_ target: MigrationState, on device: MigrationCapable) throws(Errno) -> UInt64 {
    var drained: UInt64 = 0
    guard
      MigrationTransitions.nextState(from: state, to: target, flags: flags) != nil
        || state == target
    else {
      throw .invalidArgument
    }
    while state != target {
      guard let next = MigrationTransitions.nextState(from: state, to: target, flags: flags) else {
        device.migrationFailed()
        throw .invalidArgument
      }
      let opened: MigrationStream?
      do throws(Errno) {
        if state == .stopCopy, let stream { drained += try Self.drain(stream) }
        opened = try device.migrationStep(from: state, to: next)
      } catch {
        if state == .resuming {
          stream = nil
          state = .error
          device.migrationFailed()
        }
        throw error
      }
      if state == .stopCopy || state == .resuming { stream = nil }  // leaving a data state ends its stream
      state = next
      if let opened {
        // Only the final arc may open a stream (the kernel fputs one opened mid-path).
        guard next == target else { throw .invalidArgument }
        stream = opened
        streamInvalidated = false
      }
    }
    return drained
  }

  /// Reads `stream` to its end (each read bounded by the device's timeouts).
  private static func drain(_ stream: MigrationStream) throws(Errno) -> UInt64 {
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { scratch.deallocate() }
    var total: UInt64 = 0
    while true {
      let n = try stream.read(into: scratch)
      total += UInt64(n)
      if n < scratch.count { return total }
    }
  }

  /// Reset, hang-up or shutdown: the device went back to RUNNING (its own reset);
  /// an open stream is dead from now on.
  mutating func reset() {
    if stream != nil { streamInvalidated = true }
    stream = nil
    state = .running
  }

  /// The stream for a data command in one of `states`: ENODEV once a reset
  /// killed it, EINVAL in any other state.
  func stream(for states: Set<MigrationState>) throws(Errno) -> MigrationStream {
    if streamInvalidated, stream == nil { throw Errno(rawValue: 19) }  // ENODEV
    guard states.contains(state), let stream else { throw .invalidArgument }
    return stream
  }
}
