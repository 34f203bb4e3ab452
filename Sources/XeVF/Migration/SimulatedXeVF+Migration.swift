import SystemPackage
import VFIODevice
import VFIOUser
import XeStream

/// The device's side of migration: where its VFIO migration state is, and
/// the knobs a save reads.
struct VFMigration {
  /// Where the last arc left the device (the kernel driver's `mig_state`).
  var state = MigrationState.running
  /// The server gave up on a migration (`migrationFailed`): the VF is
  /// stopped and reports ERROR until a reset, whatever `state` says.
  var failed = false
  /// RESUMING was entered and no restore has completed since: the device
  /// holds part of another VF's state and must not run until a reset.
  var restorePending = false
  /// The restore stream RESUMING opened, kept until the restore completes so
  /// that RESUMING → STOP can tell an incomplete stream from a slow PF.
  var restoreStream: XeRestoreStream?
  var seed: UInt64 = 0
  var vramChunkSize: UInt64 = 512 << 20
}

/// `xe-vfio-pci`'s migration ops (protocol/xe-kernel-facts.md §2) over the simulated PF.
///
/// Each call comes from the connection thread, one direct arc at a time.
/// Blocking: RUNNING→RUNNING_P2P and RUNNING_P2P→RUNNING wait for the GuC up
/// to `PFTiming.control` per GT; RESUMING→STOP waits up to
/// `PFTiming.restore` per GT for the restore to finish, but only for a
/// complete stream (the trailer arrived): an incomplete one fails at once
/// (ENODATA, or EIO when the PF already failed the restore); DEVICE_RESET
/// waits up to `PFTiming.flr` per GT. Stream reads and writes block up to
/// `PFTiming.stream`.
extension SimulatedXeVF: MigrationCapable {
  /// xe has no PRE_COPY: no dirty tracking in the hardware.
  public var migrationFlags: MigrationFlags { [.stopCopy, .p2p] }

  public var sparseStreamTransform: (any MigrationStreamTransform)? {
    SparseMigration.transform
  }

  public func migrationStep(from: MigrationState, to: MigrationState) throws(Errno)
    -> MigrationStream?
  {
    guard from == migration.state else {
      logger.warning("migration arc \(from)→\(to) asked while the device is \(migration.state)")
      throw .invalidArgument
    }
    var stream: MigrationStream?
    switch (from, to) {
    case (.running, .runningP2P):
      // A paused VF keeps BAR accesses but runs no work: P2P is STOP here.
      try pf.pauseVF()
    case (.runningP2P, .stop), (.stop, .runningP2P):
      break
    case (.runningP2P, .running):
      guard !migration.restorePending else { throw .ioError }
      try pf.resumeVF()
      releaseHeldWork()
    case (.stop, .stopCopy):
      let id = pf.openStream()
      do throws(Errno) { try pf.triggerSaveVF(saveContent()) } catch {
        pf.closeStream()
        throw error
      }
      stream = .source(XeSaveStream(pf: pf, memory: vramSize > 0 ? memory : nil, id: id))
    case (.stopCopy, .stop):
      pf.closeStream()
      try pf.finishSaveVF()
    case (.stop, .resuming):
      let id = pf.openStream()
      do throws(Errno) { try pf.triggerRestoreVF() } catch {
        pf.closeStream()
        throw error
      }
      migration.restorePending = true
      let sink = XeRestoreStream(pf: pf, memory: vramSize > 0 ? memory : nil, id: id)
      migration.restoreStream = sink
      stream = .sink(sink)
    case (.resuming, .stop):
      pf.closeStream()
      if let missing = migration.restoreStream?.missing { try refuseIncompleteRestore(missing) }
      if let excess = migration.restoreStream?.excess {
        logger.error("RESUMING → STOP: the restore is refused: \(excess)")
        throw .invalidArgument
      }
      apply(try pf.finishRestoreVF())
      migration.restorePending = false
      migration.restoreStream = nil
    default:
      throw .invalidArgument
    }
    migration.state = to
    return stream
  }

  public func stopCopySize() throws(Errno) -> UInt64 { try pf.stopCopySize() }

  /// RESUMING → STOP on a stream without its trailer. The PF would wait
  /// `PFTiming.restore` per GT for a trailer that can no longer come (its
  /// stream is closed) and answer ETIMEDOUT; the framing already says the
  /// restore cannot complete, so this answers at once: EIO when the PF has
  /// already failed the restore (the data was bad, which says more), else
  /// ENODATA. The PF is left as it is, restoring; the device stays in
  /// RESUMING (the server then stops the VF, `migrationFailed`) and a reset
  /// returns both to READY.
  private func refuseIncompleteRestore(_ missing: String) throws(Errno) {
    if let failed = pf.restoreFailure() {
      logger.error(
        "RESUMING → STOP: the restore failed on GT\(failed.gt) (\(failed.cause.name)), and \(missing)"
      )
      throw .ioError
    }
    logger.error("RESUMING → STOP: the restore is incomplete: \(missing)")
    throw .noData
  }

  /// `xe_sriov_vfio_error`: the PF stops the VF; only an FLR revives it.
  /// Until then the device reports ERROR.
  public func migrationFailed() {
    migration.failed = true
    do throws(Errno) { try pf.stopVF() } catch {
      logger.warning("stopping the VF failed: \(error)")
    }
  }
}

extension SimulatedXeVF {
  // MARK: Knobs and inspection

  /// The simulated PF, for tests and tools: state bits, GT-level controls.
  public var simulatedPF: SimulatedPF { pf }
  /// The VFIO migration state the device is in: the one copy, which GET
  /// MIG_DEVICE_STATE reads. ERROR after `migrationFailed`, until a reset.
  public var migrationState: MigrationState { migration.failed ? .error : migration.state }
  /// The PF's timeouts and simulated work times.
  public var pfTiming: PFTiming {
    get { pf.timing }
    set { pf.timing = newValue }
  }
  /// Whether the PF's work runs on the calling thread (`SimulatedPF.runsWorkInline`).
  public var pfRunsWorkInline: Bool {
    get { pf.runsWorkInline }
    set { pf.runsWorkInline = newValue }
  }
  /// Faults the PF injects.
  public var pfFaults: PFFaults {
    get { pf.faults }
    set { pf.faults = newValue }
  }
  /// Seeds the order in which the GTs' packets interleave in a save.
  public var migrationSeed: UInt64 {
    get { migration.seed }
    set { migration.seed = newValue }
  }
  /// The largest VRAM packet a save produces (the kernel's 512 MiB).
  public var vramChunkSize: UInt64 {
    get { migration.vramChunkSize }
    set { migration.vramChunkSize = max(newValue, 1) }
  }
  /// What a destination must match, for a save file's header.
  public var migrationIdentity: XeMigrationIdentity {
    XeMigrationIdentity(
      profile: profile.name, deviceID: profile.deviceID, revisionID: profile.revisionID,
      vramSize: vramSize, ggttQuota: profile.ggttQuota)
  }

  // MARK: Pause semantics

  /// The VF runs no work: a GT is paused or stopped. BAR accesses still
  /// work and are kept, but DMA doorbells and interrupts wait for resume.
  public var workHeld: Bool { pf.workHeld }

  /// Starts what a pause held back: the doorbell (after the current reply,
  /// like any doorbell), the vectors raised meanwhile, pending MSI-X.
  func releaseHeldWork() {
    guard !workHeld else { return }
    if let transfer = dma.held {
      dma.held = nil
      ringDoorbell(transfer)
    }
    for vector in msix.takeHeld() { raiseMSIX(vector) }
    deliverPendingMSIX()
  }

  // MARK: FLR

  /// The FLR flow of protocol/xe-kernel-facts.md §14: reset_prepare (FLR_PREPARE on every
  /// GT), the hardware reset, the GuC's FLR notification, then reset_done
  /// waiting for the PF to finish. PF errors are logged, as the VFIO driver
  /// does; the open stream is invalidated and the device is RUNNING again.
  func resetWithPF(hardware: () -> Void) {
    let faults = pf.faults
    if !faults.skipFLRPrepare {
      do throws(Errno) { try pf.prepareFLRVF() } catch { logger.debug("FLR prepare: \(error)") }
    }
    hardware()
    let settle = pf.timing.flrHardware
    sleep(for: settle)
    pf.notifyFLR()
    do throws(Errno) { try pf.waitFLRVF() } catch { logger.warning("PF FLR: \(error)") }
    pf.closeStream()
    migration.state = .running
    migration.failed = false
    migration.restorePending = false
    migration.restoreStream = nil
  }

  // MARK: Save and restore

  /// GGTT_PTE_VFID, bits 11:2.
  static let pteVFIDMask: UInt64 = 0x3FF << 2

  /// Captures what the PF saves. The VF is paused, so this is its state.
  func saveContent() -> SaveContent {
    let gts = profile.gtCount
    let sram = vramSize == 0 ? withDeviceMemory { Array($0) } : nil
    let guc = (0..<gts).map { g in
      g == 0
        ? GuCVFState(
          gt: 0, gmdID: profile.gmdID, engine: dma.gucRecord, msix: msix.gucRecord,
          sram: sram
        ).encoded
        : GuCVFState(gt: g, gmdID: profile.mediaGMDID).encoded
    }
    return SaveContent(
      guc: guc, mmio: registers.scratch.map { [UInt8](littleEndian: $0) },
      // The hardware stamps the VFID on the VF's PTEs; the save clears it.
      ggtt: [UInt8](littleEndian: registers.ggtt.map { $0 & ~Self.pteVFIDMask }),
      vramChunkSize: migration.vramChunkSize, seed: migration.seed)
  }

  /// Applies what a completed restore staged (VRAM is already in place).
  func apply(_ staged: [StagedRestore]) {
    for (g, state) in staged.enumerated() {
      if let mmio = state.mmio { registers.load(scratch: mmio, gt: g) }
      if let ggtt = state.ggtt {
        let vfid = UInt64(vfid) << 2
        registers.load(ggtt: ggtt.map { $0 & ~Self.pteVFIDMask | vfid })
      }
      guard let guc = state.guc else { continue }
      if let engine = guc.engine { dma.load(engine) }
      if let table = guc.msix { msix.load(table) }
      if let sram = guc.sram, sram.count == Int(memory.size) {
        memory.buffer(offset: 0, length: memory.size).copyBytes(from: sram)
      }
    }
  }
}

/// The provisioning a migration destination must match (protocol/xe-kernel-facts.md §7.5):
/// same device and revision, same GGTT quota, at least the VRAM.
public struct XeMigrationIdentity: Sendable, Equatable, Codable {
  public var profile: String
  public var deviceID: UInt16
  public var revisionID: UInt8
  public var vramSize: UInt64
  public var ggttQuota: UInt64

  public init(
    profile: String, deviceID: UInt16, revisionID: UInt8, vramSize: UInt64, ggttQuota: UInt64
  ) {
    self.profile = profile
    self.deviceID = deviceID
    self.revisionID = revisionID
    self.vramSize = vramSize
    self.ggttQuota = ggttQuota
  }

  /// Whether a VF of this identity can take a stream saved from `source`
  /// (the profile name is informative only).
  public func canRestore(from source: XeMigrationIdentity) -> Bool {
    deviceID == source.deviceID && revisionID == source.revisionID
      && ggttQuota == source.ggttQuota && vramSize >= source.vramSize
  }
}
