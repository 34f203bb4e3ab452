import SystemPackage
import VFIOUser

/// The kernel calls VFIO migration v2 needs (VFIO_DEVICE_FEATURE
/// MIG_DEVICE_STATE and MIG_DATA_SIZE); `KernelVFIODevice` is the real one.
public protocol MigrationDriver: AnyObject {
  /// MIG_DEVICE_STATE SET: the kernel performs the arc; returns the new data_fd (owned by the caller) or -1.
  func setMigrationState(_ state: MigrationState) throws(Errno) -> Int32
  func migrationState() throws(Errno) -> MigrationState
  func stopCopySize() throws(Errno) -> UInt64
}

extension KernelVFIODevice: MigrationDriver {}

/// VFIO migration v2 through the kernel, one direct arc at a time (the caller
/// walks `vfio_mig_get_next_state`, as the kernel itself would): each arc is
/// one MIG_DEVICE_STATE SET, and a data_fd the kernel hands back becomes the
/// stream, with bounded reads and writes.
///
/// The stream's lifetime follows the kernel's: a new data_fd replaces the
/// old one; an arc into a state without data (STOP, RUNNING, RUNNING_P2P)
/// ends it, while PRE_COPY → PRE_COPY_P2P → STOP_COPY keeps the fd PRE_COPY
/// opened; a reset kills it. A dead stream answers ENODEV.
public final class KernelMigration {
  public let flags: MigrationFlags
  public let timeout: Duration
  let driver: MigrationDriver
  public private(set) var stream: MigrationDataFile?

  public init(driver: MigrationDriver, flags: MigrationFlags, timeout: Duration = .seconds(10)) {
    self.driver = driver
    self.flags = flags
    self.timeout = timeout
  }

  /// Performs the arc into `state`; returns the stream it opened, if any.
  public func step(to state: MigrationState) throws(Errno) -> MigrationDataFile? {
    let fd = try driver.setMigrationState(state)
    if fd >= 0 {
      stream?.invalidate()
      let opened = MigrationDataFile(fd: fd, timeout: timeout)
      stream = opened
      return opened
    }
    if ![.stopCopy, .preCopy, .preCopyP2P, .resuming].contains(state) {
      stream?.invalidate()  // the kernel ended it with the state that had it
      stream = nil
    }
    return nil
  }

  /// VFIO_DEVICE_RESET returned the device to RUNNING: the stream is dead.
  public func deviceReset() {
    stream?.invalidate()
    stream = nil
  }

  public func stopCopySize() throws(Errno) -> UInt64 { try driver.stopCopySize() }

  /// The kernel's state, for logs.
  public var kernelState: String { (try? driver.migrationState()).map { "\($0)" } ?? "unknown" }
}
