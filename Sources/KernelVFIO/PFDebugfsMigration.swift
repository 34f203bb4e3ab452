import SystemPackage
import VFIODevice
import VFIOUser
import XeStream

/// VFIO migration of a VF on plain vfio-pci through its PF's debugfs controls,
/// arc for arc as `xe-vfio-pci` drives the same PF functions (protocol/xe-kernel-facts.md §2.2):
///
/// | arc | control |
/// |---|---|
/// | RUNNING → RUNNING_P2P | write `pause` (a paused VF keeps BAR access, runs no work: P2P is STOP) |
/// | RUNNING_P2P ↔ STOP | nothing |
/// | RUNNING_P2P → RUNNING | write `resume` |
/// | STOP → STOP_COPY | write `save`; the stream reads `migration_data` |
/// | STOP_COPY → STOP | end the stream; read `save` (finish: EIO unless all was produced) |
/// | STOP → RESUMING | write `restore`; the stream writes `migration_data` |
/// | RESUMING → STOP | end the stream; read `restore` (finish: waits up to 20 s, validates) |
///
/// The PF's errnos reach the client as they are, as from `xe-vfio-pci`. The
/// state is this object's, as `mig_state` is the VFIO driver's: an arc that
/// fails leaves it where it was. A failed migration stops the VF (`stop`, as
/// `xe_sriov_vfio_error`), ERROR until a reset.
public final class PFDebugfsMigration {
  public let controls: PFVFControls
  /// Bound on one blocking read or write of `migration_data`.
  public let timeout: Duration
  public private(set) var state = MigrationState.running
  public private(set) var failed = false
  private var stream: MigrationDataFile?

  /// `state` and `failed`: where a live update's old process left them.
  public init(
    controls: PFVFControls, timeout: Duration = .seconds(10), state: MigrationState = .running,
    failed: Bool = false
  ) {
    self.controls = controls
    self.timeout = timeout
    self.state = state
    self.failed = failed
  }

  /// As `xe-vfio-pci`: no PRE_COPY, the hardware cannot track dirty pages.
  public var flags: MigrationFlags { [.stopCopy, .p2p] }

  public func step(from: MigrationState, to: MigrationState) throws(Errno) -> MigrationStream? {
    guard from == state else { throw .invalidArgument }
    var opened: MigrationStream?
    switch (from, to) {
    case (.running, .runningP2P): try controls.trigger(.pause)
    case (.runningP2P, .stop), (.stop, .runningP2P): break
    case (.runningP2P, .running): try controls.trigger(.resume)
    case (.stop, .stopCopy):
      let file = try newStream { () throws(Errno) in try controls.trigger(.save) }
      opened = .source(DataFileSource(file))
    case (.stopCopy, .stop):
      endStream()
      try controls.finish(.save)
    case (.stop, .resuming):
      let file = try newStream { () throws(Errno) in try controls.trigger(.restore) }
      opened = .sink(DataFileSink(file))
    case (.resuming, .stop):
      endStream()
      try controls.finish(.restore)
    default:
      throw .invalidArgument
    }
    state = to
    return opened
  }

  /// Starts the PF's side, then a stream over `migration_data`. A read or
  /// write of the last stream that is still blocked in the PF would take
  /// this stream's bytes: until it returns, EBUSY.
  private func newStream(_ start: () throws(Errno) -> Void) throws(Errno) -> MigrationDataFile {
    if let stream, stream.callInFlight { throw .resourceBusy }
    try start()
    endStream()
    let file = MigrationDataFile(io: controls.dataIO, timeout: timeout)
    stream = file
    return file
  }

  private func endStream() {
    stream?.invalidate()
  }

  public func stopCopySize() throws(Errno) -> UInt64 { try controls.migrationSize() }

  /// The server gave up: the PF stops the VF (only an FLR revives it).
  /// Returns the PF's errno if the stop failed.
  @discardableResult public func migrationFailed() -> Errno? {
    failed = true
    endStream()
    do throws(Errno) { try controls.trigger(.stop) } catch { return error }
    return nil
  }

  /// A VF reset through the server. `deviceReset` is the FLR
  /// (VFIO_DEVICE_RESET); the PF learns of it from the GuC and cancels any
  /// save or restore, but asynchronously and with no file to wait on. So
  /// then `reset` is written: the PF's reset_vf starts its FLR handling
  /// (a no-op when the GuC's notice already did) and waits until every GT
  /// is READY, so the next migration meets a settled PF. Returns the PF's
  /// errno if that failed; the device's own reset error is thrown.
  @discardableResult public func reset(device deviceReset: () throws(Errno) -> Void) throws(Errno)
    -> Errno?
  {
    endStream()
    try deviceReset()
    state = .running
    failed = false
    do throws(Errno) { try controls.trigger(.reset) } catch { return error }
    return nil
  }
}

/// A backend that migrates through `PFDebugfsMigration`: the whole of
/// `MigrationCapable` comes from it. The backend resets through
/// `pfMigration.reset(device:)`.
public protocol PFDebugfsMigratable: MigrationCapable {
  var pfMigration: PFDebugfsMigration { get }
  /// For the failure of the PF's `stop` after a failed migration.
  func logPFError(_ message: String)
}

extension PFDebugfsMigratable {
  /// The Xe PF's debugfs `migration_data` is its packet stream.
  public var sparseStreamTransform: (any MigrationStreamTransform)? {
    SparseMigration.transform
  }

  public var migrationFlags: MigrationFlags { pfMigration.flags }

  public var migrationState: MigrationState {
    get throws(Errno) { pfMigration.failed ? .error : pfMigration.state }
  }

  public func migrationStep(from: MigrationState, to: MigrationState) throws(Errno)
    -> MigrationStream?
  {
    try pfMigration.step(from: from, to: to)
  }

  public func stopCopySize() throws(Errno) -> UInt64 { try pfMigration.stopCopySize() }

  public func migrationFailed() {
    if let error = pfMigration.migrationFailed() {
      logPFError("migration failed, and the PF's stop of the VF failed too: \(error.name)")
    }
  }
}
