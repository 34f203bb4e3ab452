import SystemPackage

/// The plain BAR0 state: the GMD_IDs, the per-GT scratch registers and the
/// VF's slice of the GGTT. Everything here is cleared by an FLR.
struct RegisterFile {
  let gmdID: UInt32
  let mediaGMDID: UInt32
  /// `scratch[gt][n]`: VF_SW_FLAG(n) on the primary GT, MED_VF_SW_FLAG(n) on the media GT.
  private(set) var scratch: [[UInt32]]
  /// The VF's GGTT PTEs, from the start of the window; empty while all are
  /// zero, so an idle device does not hold (and touch) 128 KiB of zeros.
  private var ptes: [UInt64] = []
  /// PTEs in the VF's quota.
  let ggttCount: Int

  /// The VF's GGTT PTEs, from the start of the window.
  var ggtt: [UInt64] { ptes.isEmpty ? Array(repeating: 0, count: ggttCount) : ptes }
  /// Whether the PTEs take memory (a non-zero one was written or restored).
  var ptesAllocated: Bool { !ptes.isEmpty }

  init(profile: XeProfile) {
    gmdID = profile.gmdID
    mediaGMDID = profile.mediaGMDID
    scratch = Array(
      repeating: Array(repeating: 0, count: XeSimRegisters.scratchCount),
      count: min(profile.gtCount, 2))
    ggttCount = profile.ggttPTECount
  }

  mutating func reset() {
    for gt in scratch.indices {
      scratch[gt] = Array(repeating: 0, count: XeSimRegisters.scratchCount)
    }
    ptes = []
  }

  /// Restores GT `gt`'s scratch registers (a migration's MMIO packet).
  mutating func load(scratch values: [UInt32], gt: Int) {
    guard scratch.indices.contains(gt), values.count == scratch[gt].count else { return }
    scratch[gt] = values
  }

  /// Restores the VF's GGTT PTEs (a migration's GGTT packet).
  mutating func load(ggtt ptes: [UInt64]) {
    guard ptes.count == ggttCount else { return }
    self.ptes = ptes
  }

  private func scratchSlot(_ offset: UInt64) -> (gt: Int, index: Int)? {
    for gt in scratch.indices {
      let base = XeSimRegisters.scratch(gt: gt, index: 0)
      if offset >= base, offset < base + 4 * UInt64(XeSimRegisters.scratchCount) {
        return (gt, Int((offset - base) / 4))
      }
    }
    return nil
  }

  /// The register dword at `offset` (4-aligned); 0 where nothing is modelled.
  func read(offset: UInt64) -> UInt32 {
    if offset == XeSimRegisters.gmdID { return gmdID }
    if offset == XeSimRegisters.mediaGMDID, scratch.count > 1 { return mediaGMDID }
    if let slot = scratchSlot(offset) { return scratch[slot.gt][slot.index] }
    return 0
  }

  /// Writes the bits of `mask` into the register dword at `offset`; read-only
  /// and unmodelled registers ignore it.
  mutating func write(offset: UInt64, value: UInt32, mask: UInt32) {
    guard let slot = scratchSlot(offset) else { return }
    scratch[slot.gt][slot.index] = scratch[slot.gt][slot.index] & ~mask | value & mask
  }

  /// `offset` is from the start of the GGTT window. Outside the quota reads 0.
  func readGGTT(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) {
    guard offset + UInt64(buffer.count) <= UInt64(ggttCount * 8), !ptes.isEmpty else {
      buffer.initializeMemory(as: UInt8.self, repeating: 0)
      return
    }
    ptes.withUnsafeBytes {
      buffer.copyMemory(
        from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count]))
    }
  }

  /// `offset` is from the start of the GGTT window. Outside the quota writes are dropped.
  mutating func writeGGTT(offset: UInt64, from data: UnsafeRawBufferPointer) {
    guard offset + UInt64(data.count) <= UInt64(ggttCount * 8) else { return }
    if ptes.isEmpty {
      if !data.contains(where: { $0 != 0 }) { return }
      ptes = Array(repeating: 0, count: ggttCount)
    }
    ptes.withUnsafeMutableBytes {
      UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + data.count])
        .copyMemory(from: data)
    }
  }
}

/// BAR0 decoding: which block an access lands in, and the width rules.
extension SimulatedXeVF {
  typealias Reg = XeSimRegisters

  static func validateBAR0(offset: UInt64, count: Int) throws(Errno) {
    guard count == 1 || count == 2 || count == 4 || count == 8, offset % UInt64(count) == 0,
      offset < Reg.bar0Size, UInt64(count) <= Reg.bar0Size - offset
    else { throw .invalidArgument }
  }

  /// The SRAM window, on profiles whose device memory is SRAM.
  private func sramOffset(_ offset: UInt64) -> UInt64? {
    guard vramSize == 0, offset >= Reg.sram, offset < Reg.sram + Reg.sramSize else { return nil }
    return offset - Reg.sram
  }

  func readBAR0(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
    try Self.validateBAR0(offset: offset, count: buffer.count)
    if offset >= Reg.ggttWindow {
      registers.readGGTT(offset: offset - Reg.ggttWindow, into: buffer)
    } else if let at = sramOffset(offset) {
      buffer.copyMemory(
        from: UnsafeRawBufferPointer(memory.buffer(offset: at, length: UInt64(buffer.count))))
    } else if buffer.count == 8 {
      store(UInt64(readDword(offset)) | UInt64(readDword(offset + 4)) << 32, into: buffer)
    } else {
      store(UInt64(readDword(offset & ~3) >> (8 * (offset & 3))), into: buffer)
    }
  }

  func writeBAR0(offset: UInt64, from data: UnsafeRawBufferPointer) throws(Errno) {
    try Self.validateBAR0(offset: offset, count: data.count)
    if offset >= Reg.ggttWindow {
      registers.writeGGTT(offset: offset - Reg.ggttWindow, from: data)
    } else if let at = sramOffset(offset) {
      memory.buffer(offset: at, length: UInt64(data.count)).copyMemory(from: data)
    } else {
      var value: UInt64 = 0
      for (i, byte) in data.enumerated() { value |= UInt64(byte) << (8 * i) }
      if data.count == 8 {
        writeDword(offset, value: UInt32(truncatingIfNeeded: value), mask: ~0)
        writeDword(offset + 4, value: UInt32(truncatingIfNeeded: value >> 32), mask: ~0)
      } else {
        let shift = 8 * (offset & 3)
        let lanes = UInt32(truncatingIfNeeded: (UInt64(1) << (8 * UInt64(data.count))) - 1) << shift
        writeDword(offset & ~3, value: UInt32(truncatingIfNeeded: value << shift), mask: lanes)
      }
    }
  }

  private func store(_ value: UInt64, into buffer: UnsafeMutableRawBufferPointer) {
    for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
  }

  private func readDword(_ offset: UInt64) -> UInt32 {
    switch offset {
    case Reg.DMA.base..<Reg.DMA.base + Reg.DMA.blockSize: dma.read(offset: offset - Reg.DMA.base)
    case Reg.msixTable..<Reg.msixTable + MSIXState.tableBytes:
      msix.readTable(dword: Int((offset - Reg.msixTable) / 4))
    case Reg.msixPBA..<Reg.msixPBA + 8: msix.readPBA(dword: Int((offset - Reg.msixPBA) / 4))
    default: registers.read(offset: offset)
    }
  }

  private func writeDword(_ offset: UInt64, value: UInt32, mask: UInt32) {
    switch offset {
    case Reg.DMA.base..<Reg.DMA.base + Reg.DMA.blockSize:
      if let transfer = dma.write(offset: offset - Reg.DMA.base, value: value, mask: mask) {
        ringDoorbell(transfer)
      }
    case Reg.msixTable..<Reg.msixTable + MSIXState.tableBytes:
      if msix.writeTable(dword: Int((offset - Reg.msixTable) / 4), value: value, mask: mask) {
        deliverPendingMSIX()
      }
    case Reg.msixPBA..<Reg.msixPBA + 8: break  // read-only
    default: registers.write(offset: offset, value: value, mask: mask)
    }
  }
}
