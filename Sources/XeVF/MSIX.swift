import VFIODevice
import VFIOUser

/// The device side of MSI-X: the vector table and pending bits in BAR0.
///
/// A raised vector is delivered only while MSI-X is enabled, the function is
/// not masked and the vector's own mask bit is clear; otherwise its pending
/// bit is set and it is delivered (and the bit cleared) once all three allow
/// it, as the PCI spec requires.
///
/// QEMU's vfio-user client emulates the MSI-X table itself: it never writes
/// the device's copy, and masks vectors by re-pointing their eventfds through
/// SET_IRQS. So the per-vector mask bits here count only once a client has
/// written the table since the last reset; until then (the QEMU case) masking
/// is the client's business and only enable and function mask apply.
struct MSIXState {
  static let vectors = XeSimRegisters.msixVectors
  static let tableBytes = UInt64(vectors) * XeSimRegisters.msixEntrySize

  /// Four dwords per entry: address low, address high, data, vector control.
  private(set) var table: [UInt32]
  /// Bit n: vector n is pending.
  private(set) var pending: UInt64 = 0
  /// Whether the client drives this table (it wrote it since the last reset).
  private(set) var clientDrivesTable = false
  /// Bit n: vector n was raised while the VF was paused; it is raised on resume.
  var held: UInt64 = 0

  init() { table = Self.resetTable }

  private static var resetTable: [UInt32] {
    (0..<vectors * 4).map { $0 % 4 == 3 ? XeSimRegisters.msixVectorMasked : 0 }
  }

  mutating func reset() {
    table = Self.resetTable
    pending = 0
    clientDrivesTable = false
    held = 0
  }

  func isMasked(_ vector: Int) -> Bool {
    clientDrivesTable && table[vector * 4 + 3] & XeSimRegisters.msixVectorMasked != 0
  }

  /// `dword` indexes the table in 4-byte units.
  func readTable(dword: Int) -> UInt32 { table[dword] }

  /// Writes the bits of `mask`; only the mask bit of vector control is writable.
  /// Returns true when a vector control changed (pending vectors may now go out).
  mutating func writeTable(dword: Int, value: UInt32, mask: UInt32) -> Bool {
    let writable = dword % 4 == 3 ? mask & XeSimRegisters.msixVectorMasked : mask
    let wasDriven = clientDrivesTable
    clientDrivesTable = true
    let old = table[dword]
    table[dword] = old & ~writable | value & writable
    return (dword % 4 == 3 && old != table[dword]) || !wasDriven
  }

  /// The PBA dword `dword` (0 or 1).
  func readPBA(dword: Int) -> UInt32 { UInt32(truncatingIfNeeded: pending >> (32 * UInt64(dword))) }

  /// Raises `vector`; returns true when it must be delivered now, false when
  /// it was left pending.
  mutating func raise(_ vector: Int, functionOpen: Bool) -> Bool {
    if functionOpen && !isMasked(vector) { return true }
    pending |= 1 << UInt64(vector)
    return false
  }

  /// Clears and returns the pending vectors that may be delivered now.
  mutating func takeDeliverable(functionOpen: Bool) -> [UInt32] {
    guard functionOpen, pending != 0 else { return [] }
    var ready: [UInt32] = []
    for vector in 0..<Self.vectors where pending & 1 << UInt64(vector) != 0 && !isMasked(vector) {
      pending &= ~(1 << UInt64(vector))
      ready.append(UInt32(vector))
    }
    return ready
  }
}

extension SimulatedXeVF {
  /// Raises MSI-X `vector` through the client's eventfd, or leaves it pending.
  func raiseMSIX(_ vector: UInt32) {
    guard vector < UInt32(MSIXState.vectors) else {
      logger.warning(
        "DMA completion asks for MSI-X vector \(vector), the device has \(MSIXState.vectors)")
      return
    }
    if workHeld {  // no interrupts while paused
      msix.held |= 1 << UInt64(vector)
      return
    }
    if msix.raise(Int(vector), functionOpen: config.msixOpen) {
      deliver(vector)
    } else {
      logger.trace("MSI-X vector \(vector) pending")
    }
  }

  /// Sends the pending vectors that masking no longer holds back.
  func deliverPendingMSIX() {
    guard !workHeld else { return }
    for vector in msix.takeDeliverable(functionOpen: config.msixOpen) { deliver(vector) }
  }

  /// Signals the client's eventfd for `vector`, honouring its SET_IRQS masking.
  private func deliver(_ vector: UInt32) {
    guard host != nil else {
      logger.debug("MSI-X vector \(vector) dropped: no client")
      return
    }
    interruptTap?(VFIOPCIIRQ.msix, vector)
    host?.interruptSignalled(index: VFIOPCIIRQ.msix, vector: vector)
    irqs.trigger(index: VFIOPCIIRQ.msix, vector: vector)
  }
}

extension MSIXState {
  /// The table, PBA and held vectors as the GuC blob carries them.
  var gucRecord: GuCVFState.MSIX {
    GuCVFState.MSIX(
      table: table, pending: pending, clientDrivesTable: clientDrivesTable, held: held)
  }

  mutating func load(_ saved: GuCVFState.MSIX) {
    guard saved.table.count == table.count else { return }
    table = saved.table
    pending = saved.pending
    clientDrivesTable = saved.clientDrivesTable
    held = saved.held
  }

  /// Clears and returns the vectors held while paused.
  mutating func takeHeld() -> [UInt32] {
    defer { held = 0 }
    return (0..<UInt32(Self.vectors)).filter { held & 1 << UInt64($0) != 0 }
  }
}
