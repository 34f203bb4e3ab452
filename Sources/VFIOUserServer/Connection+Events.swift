import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// The connection thread's side of the control channel: events where state
/// changes, the check for a guest that uses a device it never enabled again
/// after a reset, and the requests the control channel hands over. The
/// dispatcher calls in here with one line at each point; the request path
/// pays one flag test per message for each of `awaitingEnable` and
/// `DeviceRequests.pending`.
extension Connection {
  /// After each message: its service time, and a control request if one waits.
  @inline(__always)
  func messageServed() {
    stats.counters.served()
    if stats.requests.pending { serveControlRequest() }
  }

  /// The device's migration state, just recorded.
  func noteMigrationState(_ state: MigrationState?) {
    stats.events.noteMigrationState(state, counters: stats.counters)
  }

  /// The device was reset (its state follows through `noteMigrationState`).
  func noteReset(_ cause: ResetCause) {
    stats.counters.deviceReset()
    let (awaiting, arming) = stats.events.noteReset(cause)
    awaitingEnable = awaiting
    if awaiting { watchForEnable(arming: arming) }
  }

  /// A guest restored or migrated in by a VMM that does not carry vfio-user
  /// device state (QEMU 11.1 included) mostly never reaches the server: with
  /// PCI COMMAND cleared, its VMM maps no BAR, and its driver's MMIO goes
  /// nowhere. What the server does see is the device left disabled under an
  /// attached client long after a reset, which a booting guest's firmware
  /// never does. A short-lived thread per arming (a reset is rare) checks
  /// once, `enableGraceMilliseconds` later.
  private func watchForEnable(arming: UInt64) {
    let (stats, logger, grace) = (stats, logger, limits.enableGraceMilliseconds)
    let failed = startThread(name: "vfio-user-watch", stackSize: 64 << 10) {
      usleep(UInt32(clamping: grace * 1000))
      let now = stats.snapshot
      guard !now.stopping, now.clientConnected, stats.events.takeLeftDisabled(arming: arming)
      else { return }
      let seconds = (grace + 999) / 1000
      logger.error(
        "the device is still disabled \(seconds) s after a reset cleared it under a guest that had enabled it (PCI COMMAND memory and bus master off, no BAR access): if this VM was restored from a save or arrived by migration, its VF state is lost: QEMU does not carry vfio-user device state, and the guest's driver believes the VF is still programmed (a VM left paused also looks like this)"
      )
      stats.counters.deviceUsedWithoutEnable()
      stats.events.noteLeftDisabled(seconds: seconds)
    }
    if let failed { logger.warning("cannot watch for the device being enabled again: \(failed)") }
  }

  /// A REGION_WRITE (or one of WRITE_MULTI's) to config space: PCI COMMAND
  /// (offset 4, 2 bytes) written whole or in part.
  func noteConfigWrite(offset: UInt64, _ data: UnsafeRawBufferPointer) {
    let end = offset + UInt64(data.count)
    guard offset <= 4, end > 4 else { return }
    var command: UInt16 = 0
    for i in 0..<min(2, Int(end - 4)) {
      command |= UInt16(data[Int(4 - offset) + i]) << UInt16(8 * i)
    }
    awaitingEnable = stats.events.noteCommandWrite(command)
  }

  /// A region access while the device waits to be enabled: a BAR's is the
  /// guest driving a device it believes programmed. Said once per reset.
  func noteAccessAwaitingEnable(region: UInt32, offset: UInt64, write: Bool) {
    guard region <= VFIOPCIRegion.bar5 else { return }
    awaitingEnable = false
    // The grace's watch may have named this reset already.
    guard stats.events.takeAwaitingEnable() else { return }
    let access =
      "\(write ? "REGION_WRITE" : "REGION_READ") BAR\(region) +0x\(String(offset, radix: 16))"
    logger.error(
      "the guest used the device (\(access)) after a reset without enabling it again (PCI COMMAND memory and bus master off since the reset): its driver believes the VF is still programmed. Likely cause: the VM was restored or migrated by a VMM that does not carry vfio-user device state, or the device was reset behind the guest's back; the VF's state is lost and the guest driver must reinitialize it"
    )
    stats.counters.deviceUsedWithoutEnable()
    stats.events.noteUsedWithoutEnable(access)
  }

  /// The control channel's request, between two of the client's messages.
  func serveControlRequest() {
    guard let request = stats.requests.take() else { return }
    switch request {
    case .resume: stats.requests.finish(resume())
    case .handover(let job):
      let result = job.body(self)
      job.result.withLock { $0 = result }
      stats.requests.finish(.handedOver)
      // Handed over: everything this connection holds is the successor's,
      // and this process is about to exit. Touch nothing.
      if case .success = result { while true { pause() } }
    }
  }

  /// `resume`: a stopped device back to RUNNING with its state, as the CLI's
  /// `resume` does through a device socket of its own.
  private func resume() -> DeviceRequests.Outcome {
    guard let migratable else { return .unchanged(.running) }
    guard let state = deviceMigrationState() else {
      return .refused("the device cannot tell its migration state")
    }
    switch state {
    case .running: return .unchanged(.running)
    case .resuming, .error:
      return .refused(
        "the device is in \(state) and holds an incomplete state; it cannot run until it is reset")
    default:
      do throws(Errno) {
        _ = try migration.set(.running, on: migratable)
      } catch {
        recordMigrationState()
        return .refused("\(state) → RUNNING failed: \(error.name)")
      }
      dropStaleSparseStream()
      recordMigrationState()
      logger.notice("migration state \(state) → RUNNING (resume, from the control channel)")
      return .done(from: state, to: .running)
    }
  }

  func interruptSignalled(index: UInt32, vector: UInt32) {
    stats.counters.interruptSignalled()
  }
}
