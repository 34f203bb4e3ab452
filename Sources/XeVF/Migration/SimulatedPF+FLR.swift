import Logging
import SystemPackage

extension SimulatedPF {
  // MARK: FLR

  /// `xe_gt_sriov_pf_control_prepare_flr`: the VFIO driver's reset_prepare,
  /// before the hardware FLR, so `wait_flr` cannot miss a late notification.
  public func prepareFLR(gt g: Int) throws(Errno) {
    try locked { () throws(Errno) in
      startWorkers()
      guard enter(g, .flrWIP) else { throw .alreadyInProcess }
      enterWIP(g)
      enter(g, .flrPrepare)
    }
  }

  /// `pf_begin_vf_flr`, on the GuC's NOTIFY_VF_FLR.
  func beginFLR(_ g: Int) -> Errno? {
    if enter(g, .flrWIP) {
      enterWIP(g)
    } else if !exit(g, .flrPrepare) {
      return .alreadyInProcess
    }
    enterExpecting(g, .flrSendStart)
    queue(g)
    return nil
  }

  /// `xe_gt_sriov_pf_control_wait_flr`.
  public func waitFLR(gt g: Int) throws(Errno) {
    try locked { () throws(Errno) in
      if has(g, .flrFailed) { throw .ioError }
      guard has(g, .flrWIP) else { return }
      guard waitDone(g, timingValue.flr) else { throw .timedOut }
      if has(g, .flrFailed) { throw .ioError }
    }
  }

  func exitFLRWIP(_ g: Int) {
    guard exit(g, .flrWIP) else { return }
    gts[g].state.subtract([
      .flrPrepare, .flrSendFinish, .flrResetMMIO, .flrResetData, .flrResetConfig, .flrGuCDone,
      .flrWaitGuC, .flrSendStart,
    ])
    syncFLR()
  }

  func exitFLRSendStart(_ g: Int) -> Bool {
    guard exit(g, .flrSendStart) else { return false }
    enterExpecting(g, .flrWaitGuC)
    if let error = guc(.flrStart, gt: g) {
      exit(g, .flrWaitGuC)
      sendFailed(g, error, retry: .flrSendStart, failed: .flrFailed)
    } else {
      exitMismatch(g)
      if !gucSilent(.flrStart, gt: g) { schedule(.flrDone, gt: g, after: timingValue.gucLatency) }
    }
    return true
  }

  func exitFLRGuCDone(_ g: Int) -> Bool {
    guard exit(g, .flrGuCDone) else { return false }
    enterExpecting(g, .flrSync)
    syncFLR()
    return true
  }

  /// RESET_CONFIG → RESET_DATA → RESET_MMIO → SEND_FINISH. The device itself
  /// cleared its registers at the hardware FLR; these steps are bookkeeping.
  func exitFLRStep(_ g: Int, _ step: PFState, next: PFState) -> Bool {
    guard exit(g, step) else { return false }
    enterExpecting(g, next)
    queue(g)
    return true
  }

  func exitFLRSendFinish(_ g: Int) -> Bool {
    guard exit(g, .flrSendFinish) else { return false }
    if let error = guc(.flrFinish, gt: g) {
      sendFailed(g, error, retry: .flrSendFinish, failed: .flrFailed)
    } else {
      enterReady(g)
    }
    return true
  }

  /// `xe_sriov_pf_control_sync_flr`: the checkpoint every GT reaches before
  /// any leaves FLR_SYNC.
  func syncFLR() {
    for g in gts.indices {
      if has(g, .flrSync) { continue }
      if has(g, .flrWIP) || has(g, .flrFailed) { return }
    }
    for g in gts.indices where exit(g, .flrSync) {
      enterExpecting(g, .flrResetConfig)
      queue(g)
    }
  }
}
