import Logging
import SystemPackage
import VFIODevice
import XeStream

/// The PF side of one simulated VF: the per-GT control state machine of
/// `xe_gt_sriov_pf_control.c`, the migration rings and the GuC it talks to
/// (protocol/xe-kernel-facts.md §4–§7, §14, §15).
///
/// Threads and locking. Each GT has a worker thread, as each GT has a work
/// item on the PF's workqueue; it advances the GT's state bits, talks to the
/// simulated GuC and produces (save) or consumes (restore) ring packets.
/// Callers — the device's connection thread, tests — enter through the
/// public operations, which queue work and wait for the GT's completion.
/// One `ConditionLock` guards every mutable field; waits release it, and the
/// simulated work times (GuC latency, a stuck VRAM fence) are waits too, so
/// no thread sleeps holding it. Packet payloads are immutable values; VRAM
/// bytes are never touched here: the save stream copies them out and the
/// restore stream writes them in, on the caller's thread. Nothing is held
/// across I/O to the client: the server calls stream reads and writes from
/// its connection thread and the lock is held only while bytes move between
/// memory buffers.
///
/// The workers start on the first control operation (a pause, a reset) and
/// end when the device is deallocated (`shutdown()`).
public final class SimulatedPF: @unchecked Sendable {
  /// `XE_GT_SRIOV_PF_MIGRATION_RING_SIZE`: packets per GT ring.
  public static let ringSize = 5

  enum Event: Equatable {
    /// G2H PAUSE_DONE.
    case pauseDone
    /// G2H FLR_DONE.
    case flrDone
    /// G2H NOTIFY_VF_FLR: the GuC saw the VF's PCIe FLR.
    case flrNotify
  }

  /// Per (GT, VF) state: `xe_gt_sriov_control_state` plus the GT's migration data.
  struct GT {
    var state: PFState = []
    /// The control state's `completion done`: false while WIP is set.
    var done = true
    /// The GT's work item is queued.
    var queued = false
    var events: [(deadline: ContinuousClock.Instant, event: Event)] = []
    var ring: [PFPacket] = []
    /// The most packets the ring held since the last save or restore started.
    var ringHighWater = 0
    /// Save: the packet types still to produce, in order, and the next VRAM offset.
    var saveRemaining: [XePacketType] = []
    var vramOffset: UInt64 = 0
    /// Restore: state the worker validated, applied to the device at finish.
    var staged = StagedRestore()
    /// VRAM chunks the worker has handled in this save or restore.
    var vramChunks = 0
    /// Why the last save or restore failed.
    var failure: Errno?
  }

  let cond = ConditionLock()
  var gts: [GT]
  var timingValue = PFTiming.kernel
  var faultsValue = PFFaults()
  var workersStarted = false
  var workInlineValue = false
  var isShutDown = false
  /// The reader's position in the save stream (device level, like the kernel's
  /// descriptor / pending / trailer), and what the save is made of.
  var cursor = SaveCursor()
  var content: SaveContent?
  /// The open data stream; a stream whose id differs is invalid (ENODEV).
  var activeStream: Int?
  var nextStreamID = 1

  // The VF's provisioning, fixed for its life.
  public let gtCount: Int
  let gmdIDs: [UInt32]
  let identity: XeMigrationDescriptor
  let vramSize: UInt64
  let ggttBytes: Int
  let sramSize: Int?
  let logger: Logger

  init(profile: XeProfile, vramSize: UInt64, logger: Logger) {
    gts = Array(repeating: GT(), count: profile.gtCount)
    gtCount = profile.gtCount
    gmdIDs = [profile.gmdID, profile.mediaGMDID]
    identity = XeMigrationDescriptor(profile: profile)
    self.vramSize = vramSize
    ggttBytes = profile.ggttPTECount * 8
    sramSize = profile.hasVRAM ? nil : Int(XeSimRegisters.sramSize)
    self.logger = logger
  }

  // MARK: Knobs and inspection

  public var timing: PFTiming {
    get { locked { timingValue } }
    set { locked { timingValue = newValue } }
  }

  public var faults: PFFaults {
    get { locked { faultsValue } }
    set { locked { faultsValue = newValue } }
  }

  /// Whether the GTs' work items run on the calling thread instead of on
  /// worker threads: whenever a caller would release the lock (at the end
  /// of an operation, or to wait), the work a worker would then do runs
  /// first, to the end. The same state machine, serialised and without
  /// thread wake-ups, for the fuzz targets (Tests/Fuzz), where a run is one
  /// input after another and the timing is not what is fuzzed
  /// (`PFTiming.immediate` goes with it: no wait need last). Set it before
  /// the first operation; the workers, once started, stay.
  public var runsWorkInline: Bool {
    get { locked { workInlineValue } }
    set { locked { workInlineValue = newValue && !workersStarted } }
  }

  /// The state bits of GT `gt`.
  public func state(gt: Int) -> PFState { locked { gts[gt].state } }

  /// The most packets GT `gt`'s ring held since the last save or restore started.
  public func ringHighWater(gt: Int) -> Int { locked { gts[gt].ringHighWater } }

  /// Why GT `gt`'s last save or restore failed, as the worker saw it (the
  /// caller sees EIO).
  public func failure(gt: Int) -> Errno? { locked { gts[gt].failure } }

  /// Whether the VF does no work: a GT is paused or stopped.
  var workHeld: Bool {
    locked { gts.contains { !$0.state.isDisjoint(with: [.paused, .stopped]) } }
  }

  // MARK: Locking helpers

  func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    cond.lock()
    defer {
      if workInlineValue { runInlineWork() }
      cond.unlock()
    }
    return try body()
  }

  /// Waits (lock held) until `condition` holds or `timeout` passes; returns
  /// whether it holds. The lock is released while waiting.
  func wait(_ timeout: Duration, until condition: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
      if workInlineValue {
        runInlineWork()
        if condition() { return true }
      }
      if isShutDown || !cond.wait(until: nextWake(deadline)) { return condition() }
    }
    return true
  }

  /// Runs (lock held) the work the workers would do now, until none is left.
  private func runInlineWork() {
    while !isShutDown, gts.indices.contains(where: { step($0) }) {}
  }

  /// When a waiter must look again: at `deadline`, or earlier at a G2H
  /// event's time when the work runs inline (no worker wakes for it).
  private func nextWake(_ deadline: ContinuousClock.Instant) -> ContinuousClock.Instant {
    guard workInlineValue, let event = gts.flatMap({ $0.events.map(\.deadline) }).min() else {
      return deadline
    }
    return min(event, deadline)
  }

  /// Lets `duration` pass (lock held, released meanwhile): simulated work.
  func spend(_ duration: Duration) {
    guard duration > .zero else { return }
    let deadline = ContinuousClock.now + duration
    while !isShutDown, cond.wait(until: deadline) {}
  }

  // MARK: Workers

  func startWorkers() {
    guard !workersStarted, !workInlineValue, !isShutDown else { return }
    workersStarted = true
    for g in gts.indices {
      if let error = startThread(name: "xe-pf-gt\(g)", { [self] in workerLoop(g) }) {
        logger.error("cannot start the PF worker of GT\(g): \(error)")
      }
    }
  }

  /// Stops the workers (the device is going away). Later operations fail with ENODEV.
  func shutdown() {
    locked {
      isShutDown = true
      activeStream = nil
      cond.broadcast()
    }
  }

  private func workerLoop(_ g: Int) {
    cond.lock()
    defer { cond.unlock() }
    while !isShutDown {
      if step(g) { continue }
      if let next = gts[g].events.map(\.deadline).min() {
        _ = cond.wait(until: next)
      } else {
        cond.wait()
      }
    }
  }

  /// One step of GT `g`'s work (lock held): a G2H event that is due, or a
  /// pass of the state machine when the work item is queued. Returns
  /// whether there was anything to do.
  private func step(_ g: Int) -> Bool {
    let now = ContinuousClock.now
    if let due = gts[g].events.firstIndex(where: { $0.deadline <= now }) {
      handle(gts[g].events.remove(at: due).event, gt: g)
      return true
    }
    guard gts[g].queued else { return false }
    gts[g].queued = false
    if process(g) { gts[g].queued = true }
    return true
  }

  /// `pf_queue_vf`: the GT's worker has something to do.
  func queue(_ g: Int) {
    gts[g].queued = true
    cond.broadcast()
  }

  /// Delivers a G2H event after `delay` (at once when zero).
  func schedule(_ event: Event, gt g: Int, after delay: Duration) {
    if delay <= .zero {
      handle(event, gt: g)
    } else {
      gts[g].events.append((ContinuousClock.now + delay, event))
      cond.broadcast()
    }
  }

  private func handle(_ event: Event, gt g: Int) {
    switch event {
    case .pauseDone:
      guard exit(g, .pauseWaitGuC) else { return enterMismatch(g) }  // out of order
      if enter(g, .pauseGuCDone) { queue(g) }
    case .flrDone:
      guard exit(g, .flrWaitGuC) else { return enterMismatch(g) }
      if enter(g, .flrGuCDone) { queue(g) }
    case .flrNotify:
      if let error = beginFLR(g) { logger.debug("GT\(g) FLR notification: \(error)") }
    }
  }

  /// `pf_process_vf_state_machine`: one step, in the kernel's priority order.
  /// Returns true when the GT must be processed again.
  private func process(_ g: Int) -> Bool {
    if exitFLRSendStart(g) { return true }
    if has(g, .flrWaitGuC) { return false }
    if exitFLRGuCDone(g) { return true }
    if exitFLRStep(g, .flrResetConfig, next: .flrResetData) { return true }
    if exitFLRStep(g, .flrResetData, next: .flrResetMMIO) { return true }
    if exitFLRStep(g, .flrResetMMIO, next: .flrSendFinish) { return true }
    if exitFLRSendFinish(g) { return true }
    if exitSend(g, .stopSendStop) { return true }
    if exitPauseSendPause(g) { return true }
    // The kernel requeues while waiting for PAUSE_DONE; the event queues it here.
    if has(g, .pauseWaitGuC) { return false }
    if exitPauseGuCDone(g) { return true }
    // Deliberate deviation: the kernel goes on saving or restoring during an
    // FLR, and a restore that completes while the FLR waits at its checkpoint
    // leaves WIP and ends the FLR early (wait_flr returns before READY).
    // Here an FLR in progress holds the data work back; READY discards it.
    if has(g, .flrWIP) { return exitSend(g, .resumeSendResume) }
    if has(g, .saveWaitData) { return false }
    if handleSave(g) { return true }
    if has(g, .restoreWaitData) { return false }
    if handleRestore(g) { return true }
    if exitSend(g, .resumeSendResume) { return true }
    return false
  }

  // MARK: The simulated GuC

  /// The GuC's answer to `command` on GT `g`: nil on success. A `timeout`
  /// fault on a request without a G2H done event costs `gucAck`.
  func guc(_ command: PFFaults.Command, gt g: Int) -> Errno? {
    let site = PFFaults.Site(command: command, gt: g)
    switch faultsValue.guc[site] {
    case nil:
      return nil
    case .busy(let times):
      faultsValue.guc[site] = times > 1 ? .busy(times: times - 1) : nil
      return .resourceBusy
    case .rejected:
      return .ioError
    case .error(let error):
      return error
    case .timeout:
      if command == .pause || command == .flrStart { return nil }  // acked; no G2H follows
      spend(timingValue.gucAck)
      return .timedOut
    }
  }

  /// Whether the GuC stays silent after acknowledging `command`.
  func gucSilent(_ command: PFFaults.Command, gt g: Int) -> Bool {
    faultsValue.guc[PFFaults.Site(command: command, gt: g)] == .timeout
  }

  // MARK: State bits (lock held)

  func has(_ g: Int, _ bits: PFState) -> Bool { gts[g].state.contains(bits) }

  /// `pf_enter_vf_state`: sets the bit; false when it was already set.
  @discardableResult func enter(_ g: Int, _ bit: PFState) -> Bool {
    gts[g].state.insert(bit).inserted
  }

  /// `pf_exit_vf_state`: clears the bit; false when it was not set.
  @discardableResult func exit(_ g: Int, _ bit: PFState) -> Bool {
    gts[g].state.remove(bit) != nil
  }

  /// Enters `bit`, or flags a state machine bug (MISMATCH) when it was set.
  func enterExpecting(_ g: Int, _ bit: PFState) {
    if !enter(g, bit) { enterMismatch(g) }
  }

  func enterMismatch(_ g: Int) {
    if enter(g, .mismatch) { logger.debug("GT\(g) VF state mismatch: \(gts[g].state)") }
  }

  /// `pf_exit_vf_mismatch` also clears every *_FAILED bit.
  func exitMismatch(_ g: Int) {
    gts[g].state.subtract(PFState.failures.union(.mismatch))
  }

  func enterWIP(_ g: Int) {
    if enter(g, .wip) { gts[g].done = false }
  }

  /// `pf_exit_vf_wip`: leaves every WIP sub-machine and completes `done`.
  func exitWIP(_ g: Int) {
    guard exit(g, .wip) else { return }
    exitFLRWIP(g)
    if exit(g, .stopWIP) { exit(g, .stopSendStop) }
    exitTransfer(g, wip: .saveWIP, [.saveProcessData, .saveWaitData, .saveDataDone])
    exitTransfer(g, wip: .restoreWIP, [.restoreProcessData, .restoreWaitData, .restoreDataDone])
    if exit(g, .pauseWIP) {
      gts[g].state.subtract([.pauseSendPause, .pauseWaitGuC, .pauseGuCDone])
    }
    if exit(g, .resumeWIP) { exit(g, .resumeSendResume) }
    gts[g].done = true
    cond.broadcast()
  }

  /// Leaves SAVE_WIP or RESTORE_WIP: the ring is freed (`ring_free`).
  private func exitTransfer(_ g: Int, wip: PFState, _ substates: PFState) {
    guard exit(g, wip) else { return }
    if !gts[g].ring.isEmpty {
      logger.notice("GT\(g): unprocessed migration data left in the ring")
      gts[g].ring.removeAll()
    }
    gts[g].state.subtract(substates)
  }

  /// `pf_enter_vf_ready`.
  func enterReady(_ g: Int) {
    gts[g].state.subtract([.paused, .stopped, .resumed, .saved, .restored])
    exitMismatch(g)
    exitWIP(g)
  }

  /// Waits (lock held) for GT `g`'s completion.
  func waitDone(_ g: Int, _ timeout: Duration) -> Bool { wait(timeout) { gts[g].done } }

  // MARK: Pause, resume, stop

  /// `xe_gt_sriov_pf_control_pause_vf`.
  public func pause(gt g: Int) throws(Errno) {
    try locked { () throws(Errno) in
      startWorkers()
      if has(g, .stopped) { throw .notPermitted }
      if has(g, .paused) { throw .staleNFSFileHandle }
      guard enter(g, .pauseWIP) else { throw .alreadyInProcess }
      enterWIP(g)
      enterExpecting(g, .pauseSendPause)
      queue(g)
      guard waitDone(g, timingValue.control) else { throw .timedOut }
      if has(g, .paused) { return }
      throw has(g, .pauseFailed) ? .ioError : .canceled
    }
  }

  /// `xe_gt_sriov_pf_control_resume_vf`.
  public func resume(gt g: Int) throws(Errno) {
    try locked { () throws(Errno) in
      startWorkers()
      guard has(g, .paused) else { throw .notPermitted }
      if has(g, .saveWIP) || has(g, .restoreWIP) { throw .resourceBusy }
      guard enter(g, .resumeWIP) else { throw .alreadyInProcess }
      enterWIP(g)
      enterExpecting(g, .resumeSendResume)
      queue(g)
      guard waitDone(g, timingValue.control) else { throw .timedOut }
      if has(g, .resumed) { return }
      throw has(g, .resumeFailed) ? .ioError : .canceled
    }
  }

  /// `xe_gt_sriov_pf_control_stop_vf`: only an FLR leaves STOPPED.
  public func stop(gt g: Int) throws(Errno) {
    try locked { () throws(Errno) in
      startWorkers()
      if has(g, .stopped) { throw .staleNFSFileHandle }
      guard enter(g, .stopWIP) else { throw .alreadyInProcess }
      enterWIP(g)
      enterExpecting(g, .stopSendStop)
      queue(g)
      guard waitDone(g, timingValue.control) else { throw .timedOut }
      if has(g, .stopped) { return }
      throw has(g, .stopFailed) ? .ioError : .canceled
    }
  }

  /// `pf_exit_vf_pause_send_pause`: the H2G, then PAUSE_DONE from the GuC.
  private func exitPauseSendPause(_ g: Int) -> Bool {
    guard exit(g, .pauseSendPause) else { return false }
    enterExpecting(g, .pauseWaitGuC)  // the GuC may answer before the H2G returns
    if let error = guc(.pause, gt: g) {
      exit(g, .pauseWaitGuC)
      sendFailed(g, error, retry: .pauseSendPause, failed: .pauseFailed)
    } else {
      exitMismatch(g)
      if !gucSilent(.pause, gt: g) { schedule(.pauseDone, gt: g, after: timingValue.gucLatency) }
    }
    return true
  }

  private func exitPauseGuCDone(_ g: Int) -> Bool {
    guard exit(g, .pauseGuCDone) else { return false }
    enterExpecting(g, .paused)
    exit(g, .resumed)
    exitMismatch(g)
    exitWIP(g)
    return true
  }

  /// RESUME and STOP: one H2G each, no G2H.
  private func exitSend(_ g: Int, _ send: PFState) -> Bool {
    guard exit(g, send) else { return false }
    let resume = send == .resumeSendResume
    if let error = guc(resume ? .resume : .stop, gt: g) {
      sendFailed(g, error, retry: send, failed: resume ? .resumeFailed : .stopFailed)
      return true
    }
    if resume {
      enter(g, .resumed)
      gts[g].state.subtract([.paused, .saved, .restored])
    } else {
      enterExpecting(g, .stopped)
      gts[g].state.subtract([.resumed, .paused, .saved, .restored])
    }
    exitMismatch(g)
    exitWIP(g)
    return true
  }

  /// The kernel's reaction to a failed H2G: EBUSY requeues, EIO means the
  /// GuC rejected it (MISMATCH, then failed), anything else just fails.
  func sendFailed(_ g: Int, _ error: Errno, retry: PFState, failed: PFState) {
    switch error {
    case .resourceBusy:
      enterExpecting(g, retry)
      queue(g)
    default:
      if error == .ioError { enterMismatch(g) }
      enter(g, failed)
      exitWIP(g)
    }
  }

  // MARK: Device level (all GTs)

  /// The device-level loop of `xe_sriov_pf_control.c`: every GT is tried, and
  /// once one has failed the result is EUCLEAN (`result = result ? -EUCLEAN : err`,
  /// so a failure on the first GT turns into EUCLEAN whatever the second does).
  func allGTs(_ operation: (Int) throws(Errno) -> Void) throws(Errno) {
    var result: Errno?
    // Not `gts.indices`: the callers do not hold the lock, and the workers
    // write `gts` under it (ThreadSanitizer saw the race).
    for g in 0..<gtCount {
      var failure: Errno?
      do throws(Errno) { try operation(g) } catch { failure = error }
      result = result != nil ? .structureNeedsCleaning : failure
    }
    if let result { throw result }
  }

  /// Each GT in turn, stopping at the first error (save and restore control).
  func eachGT(_ operation: (Int) throws(Errno) -> Void) throws(Errno) {
    for g in 0..<gtCount { try operation(g) }
  }

  public func pauseVF() throws(Errno) { try allGTs { g throws(Errno) in try pause(gt: g) } }
  public func resumeVF() throws(Errno) { try allGTs { g throws(Errno) in try resume(gt: g) } }
  public func stopVF() throws(Errno) { try allGTs { g throws(Errno) in try stop(gt: g) } }
  public func prepareFLRVF() throws(Errno) {
    try allGTs { g throws(Errno) in try prepareFLR(gt: g) }
  }
  public func waitFLRVF() throws(Errno) { try allGTs { g throws(Errno) in try waitFLR(gt: g) } }

  /// The hardware FLR reached the GuC: NOTIFY_VF_FLR on every GT, after the
  /// `flrNotificationDelay` fault.
  func notifyFLR() {
    locked {
      startWorkers()
      for g in gts.indices { schedule(.flrNotify, gt: g, after: faultsValue.flrNotificationDelay) }
    }
  }

  /// Opens a data stream, closing any other: returns its id.
  func openStream() -> Int {
    locked {
      defer { nextStreamID += 1 }
      activeStream = nextStreamID
      return nextStreamID
    }
  }

  /// Invalidates the open stream: its later reads and writes fail with ENODEV.
  func closeStream() {
    locked {
      activeStream = nil
      cond.broadcast()
    }
  }

  /// ENODEV unless `stream` is the open stream (lock held).
  func check(stream: Int) throws(Errno) {
    guard activeStream == stream, !isShutDown else { throw .operationNotSupportedByDevice }
  }
}
