/// The PF's control state of one VF on one GT: the bitmap of
/// `enum xe_gt_sriov_control_bits`, bit numbers as in the kernel (WIP = 1,
/// MISMATCH last). READY is the empty set. SAVE_* and RESTORE_* are sub-states
/// of PAUSED.
public struct PFState: OptionSet, Sendable, Hashable, CustomStringConvertible {
  public let rawValue: UInt64
  public init(rawValue: UInt64) { self.rawValue = rawValue }
  private init(bit: Int) { rawValue = 1 << UInt64(bit) }

  public static let ready: PFState = []

  public static let wip = PFState(bit: 1)
  public static let flrWIP = PFState(bit: 2)
  public static let flrPrepare = PFState(bit: 3)
  public static let flrSendStart = PFState(bit: 4)
  public static let flrWaitGuC = PFState(bit: 5)
  public static let flrGuCDone = PFState(bit: 6)
  public static let flrSync = PFState(bit: 7)
  public static let flrResetConfig = PFState(bit: 8)
  public static let flrResetData = PFState(bit: 9)
  public static let flrResetMMIO = PFState(bit: 10)
  public static let flrSendFinish = PFState(bit: 11)
  public static let flrFailed = PFState(bit: 12)
  public static let pauseWIP = PFState(bit: 13)
  public static let pauseSendPause = PFState(bit: 14)
  public static let pauseWaitGuC = PFState(bit: 15)
  public static let pauseGuCDone = PFState(bit: 16)
  public static let pauseFailed = PFState(bit: 17)
  public static let paused = PFState(bit: 18)
  public static let saveWIP = PFState(bit: 19)
  public static let saveProcessData = PFState(bit: 20)
  public static let saveWaitData = PFState(bit: 21)
  public static let saveDataDone = PFState(bit: 22)
  public static let saveFailed = PFState(bit: 23)
  public static let saved = PFState(bit: 24)
  public static let restoreWIP = PFState(bit: 25)
  public static let restoreProcessData = PFState(bit: 26)
  public static let restoreWaitData = PFState(bit: 27)
  public static let restoreDataDone = PFState(bit: 28)
  public static let restoreFailed = PFState(bit: 29)
  public static let restored = PFState(bit: 30)
  public static let resumeWIP = PFState(bit: 31)
  public static let resumeSendResume = PFState(bit: 32)
  public static let resumeFailed = PFState(bit: 33)
  public static let resumed = PFState(bit: 34)
  public static let stopWIP = PFState(bit: 35)
  public static let stopSendStop = PFState(bit: 36)
  public static let stopFailed = PFState(bit: 37)
  public static let stopped = PFState(bit: 38)
  public static let mismatch = PFState(bit: 39)

  /// Every *_FAILED bit: `pf_exit_vf_mismatch` clears them with MISMATCH.
  static let failures: PFState = [
    .stopFailed, .pauseFailed, .resumeFailed, .flrFailed, .saveFailed, .restoreFailed,
  ]

  private static let names: [(PFState, String)] = [
    (.wip, "WIP"), (.flrWIP, "FLR_WIP"), (.flrPrepare, "FLR_PREPARE"),
    (.flrSendStart, "FLR_SEND_START"), (.flrWaitGuC, "FLR_WAIT_GUC"),
    (.flrGuCDone, "FLR_GUC_DONE"), (.flrSync, "FLR_SYNC"), (.flrResetConfig, "FLR_RESET_CONFIG"),
    (.flrResetData, "FLR_RESET_DATA"), (.flrResetMMIO, "FLR_RESET_MMIO"),
    (.flrSendFinish, "FLR_SEND_FINISH"), (.flrFailed, "FLR_FAILED"), (.pauseWIP, "PAUSE_WIP"),
    (.pauseSendPause, "PAUSE_SEND_PAUSE"), (.pauseWaitGuC, "PAUSE_WAIT_GUC"),
    (.pauseGuCDone, "PAUSE_GUC_DONE"), (.pauseFailed, "PAUSE_FAILED"), (.paused, "PAUSED"),
    (.saveWIP, "SAVE_WIP"), (.saveProcessData, "SAVE_PROCESS_DATA"),
    (.saveWaitData, "SAVE_WAIT_DATA"), (.saveDataDone, "SAVE_DATA_DONE"),
    (.saveFailed, "SAVE_FAILED"), (.saved, "SAVED"), (.restoreWIP, "RESTORE_WIP"),
    (.restoreProcessData, "RESTORE_PROCESS_DATA"), (.restoreWaitData, "RESTORE_WAIT_DATA"),
    (.restoreDataDone, "RESTORE_DATA_DONE"), (.restoreFailed, "RESTORE_FAILED"),
    (.restored, "RESTORED"), (.resumeWIP, "RESUME_WIP"), (.resumeSendResume, "RESUME_SEND_RESUME"),
    (.resumeFailed, "RESUME_FAILED"), (.resumed, "RESUMED"), (.stopWIP, "STOP_WIP"),
    (.stopSendStop, "STOP_SEND_STOP"), (.stopFailed, "STOP_FAILED"), (.stopped, "STOPPED"),
    (.mismatch, "MISMATCH"),
  ]

  public var description: String {
    isEmpty ? "READY" : Self.names.filter { contains($0.0) }.map(\.1).joined(separator: "|")
  }
}
