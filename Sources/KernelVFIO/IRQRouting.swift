import SystemPackage
import VFIOUser

/// Keeps the kernel's interrupt wiring in step with what the client asked
/// for: the client's eventfds go to VFIO_DEVICE_SET_IRQS as they are (so the
/// device's interrupts never pass through the server), INTx mask/unmask and
/// its resample (unmask) eventfd are forwarded. Knows the kernel's rules:
/// MSI and NORESIZE MSI-X must be disabled and re-enabled to grow, INTx
/// mask/unmask need INTx enabled, count 0 with DATA_NONE disables an index.
public struct KernelIRQRouting {
  struct IndexState: Equatable {
    /// Vectors the kernel has enabled for MSI/MSI-X (0: off).
    var enabled = 0
    /// The trigger eventfd the kernel holds per vector (-1: none).
    var triggers: [Int32]
    /// The INTx unmask eventfd the kernel holds (-1: none).
    var unmask: Int32 = -1
    /// The INTx mask state last sent.
    var masked = false
  }

  public let infos: [KernelIRQInfo]
  private var state: [IndexState]

  public init(_ infos: [KernelIRQInfo]) {
    self.infos = infos
    state = infos.map { IndexState(triggers: Array(repeating: -1, count: Int($0.count))) }
  }

  /// The trigger eventfds the kernel holds for `index`.
  public func kernelTriggers(_ index: UInt32) -> [Int32] { state[Int(index)].triggers }
  public func enabledVectors(_ index: UInt32) -> Int { state[Int(index)].enabled }

  /// Issues through `call` the SET_IRQS that make index `index` match:
  /// `triggers` (one per vector, -1 where none), the INTx `unmaskFD` and the
  /// `masked` state. A call that fails stops the walk and is rethrown; what
  /// went through before it is remembered.
  public mutating func apply(
    index: UInt32, triggers wanted: [Int32], unmaskFD: Int32, masked: [Bool],
    call: (KernelIRQSet) throws(Errno) -> Void
  ) throws(Errno) {
    let i = Int(index)
    guard i < infos.count, wanted.count == state[i].triggers.count else { throw .invalidArgument }
    let info = infos[i]
    let msi = index == VFIOPCIIRQ.msi || index == VFIOPCIIRQ.msix
    var changedSomething = false

    if wanted != state[i].triggers {
      changedSomething = true
      let highest = wanted.lastIndex { $0 >= 0 }
      if highest == nil, msi || index == VFIOPCIIRQ.intx {
        try call(.disable(index))
        state[i].enabled = 0
        state[i].triggers = wanted
        if index == VFIOPCIIRQ.intx {  // disabling INTx drops its unmask eventfd and mask
          state[i].unmask = -1
          state[i].masked = false
        }
      } else if msi, let highest {
        let need = highest + 1
        if state[i].enabled == 0 || (need > state[i].enabled && info.noResize) {
          if state[i].enabled > 0 {
            try call(.disable(index))
            state[i].enabled = 0
            state[i].triggers = Array(repeating: -1, count: wanted.count)
          }
          try call(.triggers(index, start: 0, Array(wanted[0..<need])))
          state[i].enabled = need
          state[i].triggers = wanted
        } else {
          // Enabled: only the vectors that changed (MSI-X without NORESIZE grows in place).
          for run in Self.changedRuns(state[i].triggers, wanted) {
            try call(.triggers(index, start: UInt32(run.lowerBound), Array(wanted[run])))
            state[i].triggers.replaceSubrange(run, with: wanted[run])
          }
          state[i].enabled = max(state[i].enabled, need)
        }
      } else {
        for run in Self.changedRuns(state[i].triggers, wanted) {
          try call(.triggers(index, start: UInt32(run.lowerBound), Array(wanted[run])))
          state[i].triggers.replaceSubrange(run, with: wanted[run])
        }
      }
    }

    guard index == VFIOPCIIRQ.intx, !state[i].triggers.isEmpty else { return }
    let intxOn = state[i].triggers[0] >= 0
    if unmaskFD != state[i].unmask, intxOn {
      changedSomething = true
      try call(
        KernelIRQSet(
          index: index, start: 0, count: 1,
          flags: VFIOIRQSetFlags.dataEventfd | VFIOIRQSetFlags.actionUnmask, fds: [unmaskFD]))
      state[i].unmask = unmaskFD
    }
    // Nothing else changed: the client masked or unmasked. Forwarded as asked
    // (the kernel automasks INTx by itself, so an unmask always goes through).
    if !changedSomething, intxOn, let wantMasked = masked.first {
      try call(
        KernelIRQSet(
          index: index, start: 0, count: 1,
          flags: VFIOIRQSetFlags.dataNone
            | (wantMasked ? VFIOIRQSetFlags.actionMask : VFIOIRQSetFlags.actionUnmask)))
      state[i].masked = wantMasked
    }
  }

  /// Contiguous runs of vectors whose eventfd differs.
  static func changedRuns(_ old: [Int32], _ new: [Int32]) -> [Range<Int>] {
    var runs: [Range<Int>] = []
    var start: Int?
    for v in 0...new.count {
      let differs = v < new.count && old[v] != new[v]
      if differs, start == nil { start = v }
      if !differs, let s = start {
        runs.append(s..<v)
        start = nil
      }
    }
    return runs
  }
}
