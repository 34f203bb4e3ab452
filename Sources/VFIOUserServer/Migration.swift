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
