import Glibc
import SystemPackage

/// The PF's timeouts (defaults from the kernel, `pf_get_default_timeout` and
/// friends) and the simulated work times. Tests scale them down with
/// `scaled(by:)`; the work times default to zero so the simulator is fast.
public struct PFTiming: Sendable, Equatable {
  /// PAUSE_WIP, RESUME_WIP, STOP_WIP: how long pause/resume/stop wait (1 s).
  public var control: Duration = .seconds(1)
  /// An H2G the GuC never answers fails after this (`HZ / 2`).
  public var gucAck: Duration = .milliseconds(500)
  /// FLR_WIP: how long `wait_flr` waits (5 s).
  public var flr: Duration = .seconds(5)
  /// RESTORE_WIP: how long finish_restore waits for the restore to complete (20 s).
  public var restore: Duration = .seconds(20)
  /// One VRAM chunk copy fence (`PF_VRAM_SAVE_RESTORE_TIMEOUT`, 5 s).
  public var vramChunk: Duration = .seconds(5)
  /// Bound on one blocking `read()` / `write()` of the data stream. The kernel
  /// waits forever; the PF fails a stuck chunk after `vramChunk`, so this
  /// fires only when the PF side is wedged.
  public var stream: Duration = .seconds(10)
  /// Simulated GuC turnaround: the G2H PAUSE_DONE / FLR_DONE arrives this
  /// long after the H2G, and each GuC save/restore takes this long.
  public var gucLatency: Duration = .zero
  /// Simulated PCIe FLR, spent by `reset()` between reset_prepare and the
  /// GuC's notification (the kernel's `pcie_flr` waits 100 ms).
  public var flrHardware: Duration = .zero

  public init() {}

  /// The kernel's values.
  public static let kernel = PFTiming()

  /// No wait at all: for a PF whose work runs inline
  /// (`SimulatedPF.runsWorkInline`), where whatever can happen has happened
  /// before a wait looks, so a wait that would not end at once never ends.
  public static let immediate = PFTiming().scaled(by: 0)

  /// Every duration multiplied by `factor` (0.05 turns 1 s into 50 ms).
  public func scaled(by factor: Double) -> PFTiming {
    func scale(_ d: Duration) -> Duration { d * factor }
    var t = self
    t.control = scale(control)
    t.gucAck = scale(gucAck)
    t.flr = scale(flr)
    t.restore = scale(restore)
    t.vramChunk = scale(vramChunk)
    t.stream = scale(stream)
    t.gucLatency = scale(gucLatency)
    t.flrHardware = scale(flrHardware)
    return t
  }
}

/// Faults the simulated PF injects, for tests. Set them on the device
/// (`SimulatedXeVF.pfFaults`) or the PF; they take effect at the next
/// matching event.
public struct PFFaults: Sendable, Equatable {
  /// The PF→GuC requests of protocol/xe-kernel-facts.md §5.2 and §7.2.
  public enum Command: Sendable, Hashable, CaseIterable {
    case pause, resume, stop, flrStart, flrFinish
    /// PF2GUC_SAVE_RESTORE_VF: the size query, the save and the restore.
    case query, save, restore
  }

  /// How the GuC answers, with the PF's reaction (protocol/xe-kernel-facts.md §5.2).
  public enum GuCFault: Sendable, Equatable {
    /// -EBUSY this many times, then success: the PF requeues and retries.
    case busy(times: Int)
    /// -EIO, "rejected": MISMATCH, then X_FAILED.
    case rejected
    /// Any other errno: X_FAILED.
    case error(Errno)
    /// No answer. PAUSE and FLR_START are acknowledged but their G2H done
    /// event never comes, so the caller's wait times out; the other requests
    /// fail with ETIMEDOUT after `PFTiming.gucAck`.
    case timeout
  }

  public struct Site: Sendable, Hashable {
    public var command: Command
    public var gt: Int
  }

  /// Faults by request and GT; `busy` entries count down and disappear.
  public var guc: [Site: GuCFault] = [:]
  /// The VRAM chunk with this index (0-based, per save or restore) never
  /// completes: the PF gives up with ETIME after `PFTiming.vramChunk`.
  public var vramChunkTimeout: Int?
  /// One-shot, taken by the next `read()`: after copying this many bytes
  /// (if it asked for more) a signal interrupts it and it fails with EINTR.
  /// The copied bytes are consumed from the stream and lost, as on the PF
  /// (protocol/xe-kernel-facts.md §6.2); the stream goes on after them, corrupt.
  public var interruptRead: Int?
  /// The GuC's FLR notification reaches the PF this long after the hardware FLR.
  public var flrNotificationDelay: Duration = .zero
  /// Model a kernel without `reset_prepare` (before FLR_PREPARE): with a late
  /// notification `wait_flr` then returns before the PF has seen the FLR.
  public var skipFLRPrepare = false

  public init() {}

  /// Sets (or clears, with nil) the fault of `command` on `gt`, or on every GT.
  public mutating func inject(_ fault: GuCFault?, on command: Command, gt: Int? = nil) {
    for g in gt.map({ [$0] }) ?? [0, 1] { guc[Site(command: command, gt: g)] = fault }
  }
}

extension Errno {
  static let structureNeedsCleaning = Errno(rawValue: Glibc.EUCLEAN)
  static let timerExpired = Errno(rawValue: Glibc.ETIME)
}
