import SystemPackage
import VFIOUser

/// The data stream a device opens on STOP→STOP_COPY (to read) or STOP→RESUMING
/// (to write): the kernel's `data_fd`. Calls come from the connection thread.
public protocol MigrationStream: AnyObject {
  /// Fills `buffer` with the next bytes, blocking until the device produced them
  /// (a bounded wait: the backend throws ETIMEDOUT rather than block forever).
  /// Returns fewer bytes than asked only when the stream ended, and 0 after the end.
  /// A stream invalidated by a reset throws ENODEV.
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int
  /// Hands the device a prefix of `bytes` and returns its length (at least 1
  /// unless it throws); the caller repeats with the rest. May block (bounded)
  /// while the device's ring is full. Errors found while restoring surface here
  /// or at RESUMING→STOP.
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int
}

/// A device that migrates: the kernel's `vfio_migration_ops`, one arc at a time.
/// The server walks composite transitions with `vfio_mig_get_next_state()`
/// and calls `migrationStep` for each direct arc, in order, on the connection
/// thread. `VFIODeviceBackend.reset()` returns such a device to RUNNING and
/// invalidates any stream it opened (its later reads and writes throw ENODEV).
public protocol MigrationCapable: AnyObject {
  /// STOP_COPY, plus P2P and PRE_COPY where the device has them.
  var migrationFlags: MigrationFlags { get }
  /// Performs the direct arc `from` → `to`. Returns the data stream for
  /// STOP→STOP_COPY and STOP→RESUMING, nil otherwise. On failure the device is
  /// still in `from` (the server leaves its state there).
  func migrationStep(from: MigrationState, to: MigrationState) throws(Errno) -> MigrationStream?
  /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the device's estimate of the stop-copy bytes.
  func stopCopySize() throws(Errno) -> UInt64
  /// `vfio_mig_get_next_state` failed mid-walk: the device must stop (the PF's
  /// `xe_sriov_vfio_error`), as the kernel driver does.
  func migrationFailed()
}

/// The kernel's migration state machine: `vfio_mig_get_next_state()` and the
/// flags each state needs (`drivers/vfio/vfio_main.c`), shared by the server,
/// which walks composite transitions one arc at a time, and by backends and
/// tests.
public enum MigrationTransitions {
  private static let order: [MigrationState] = [
    .stop, .running, .stopCopy, .resuming, .runningP2P, .preCopy, .preCopyP2P, .error,
  ]

  /// `vfio_from_fsm_table`, rows and columns in `order`.
  private static let table: [[MigrationState]] = [
    // from STOP
    [
      .stop, .runningP2P, .stopCopy, .resuming, .runningP2P, .runningP2P, .runningP2P, .error,
    ],
    // from RUNNING
    [
      .runningP2P, .running, .runningP2P, .runningP2P, .runningP2P, .preCopy, .runningP2P, .error,
    ],
    // from STOP_COPY
    [.stop, .stop, .stopCopy, .stop, .stop, .error, .error, .error],
    // from RESUMING
    [.stop, .stop, .stop, .resuming, .stop, .stop, .stop, .error],
    // from RUNNING_P2P
    [.stop, .running, .stop, .stop, .runningP2P, .running, .preCopyP2P, .error],
    // from PRE_COPY
    [
      .running, .running, .preCopyP2P, .running, .running, .preCopy, .preCopyP2P, .error,
    ],
    // from PRE_COPY_P2P
    [
      .runningP2P, .runningP2P, .stopCopy, .runningP2P, .runningP2P, .preCopy, .preCopyP2P, .error,
    ],
    // from ERROR
    Array(repeating: .error, count: 8),
  ]

  /// `state_flags_table`: the flags a state needs (ERROR needs all, so no device has it).
  public static func required(_ state: MigrationState) -> MigrationFlags {
    switch state {
    case .running, .stop, .stopCopy, .resuming: [.stopCopy]
    case .runningP2P: [.stopCopy, .p2p]
    case .preCopy: [.stopCopy, .preCopy]
    case .preCopyP2P: [.stopCopy, .p2p, .preCopy]
    case .error: MigrationFlags(rawValue: ~0)
    }
  }

  public static func supported(_ state: MigrationState, _ flags: MigrationFlags) -> Bool {
    flags.isSuperset(of: required(state))
  }

  /// The next direct arc from `current` towards `target`, or nil where the
  /// kernel answers -EINVAL (unsupported state, ERROR, STOP_COPY → PRE_COPY…).
  public static func nextState(
    from current: MigrationState, to target: MigrationState, flags: MigrationFlags
  )
    -> MigrationState?
  {
    guard supported(current, flags), supported(target, flags) else { return nil }
    let column = order.firstIndex(of: target)!
    var next = table[order.firstIndex(of: current)!][column]
    while next != .error, !supported(next, flags) {
      next = table[order.firstIndex(of: next)!][column]
    }
    return next == .error ? nil : next
  }
}
