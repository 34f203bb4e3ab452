import Foundation
import TestSupport
import Testing
import XeVF

typealias Reg = XeSimRegisters

/// Register-level helpers for the simulated VF as QEMU's CPU side sees it
/// (BAR0 at `QEMUSession.bar0`).
extension QEMUSession {
  func bar0(_ offset: UInt64) -> UInt64 { Self.bar0 + offset }

  /// Runs one transfer of the VF's DMA engine and returns its final STATUS.
  @discardableResult
  func runDMA(
    toDevice: Bool, deviceOffset: UInt64, clientAddress: UInt64, length: UInt32,
    vector: UInt8? = nil,
    timeout: Double = 20
  ) throws -> UInt32 {
    try qtest.writeq(bar0(Reg.DMA.src), toDevice ? clientAddress : deviceOffset)
    try qtest.writeq(bar0(Reg.DMA.dst), toDevice ? deviceOffset : clientAddress)
    try qtest.writel(bar0(Reg.DMA.len), length)
    try qtest.writel(
      bar0(Reg.DMA.ctrl),
      Reg.DMA.control(toDevice: toDevice, vector: vector ?? 0, interrupt: vector != nil))
    try qtest.writel(bar0(Reg.DMA.doorbell), 1)
    var status: UInt32 = Reg.DMA.statusBusy
    let finished = try waitUntil(timeout: timeout, interval: 0.002) {
      status = try qtest.readl(bar0(Reg.DMA.status))
      return status & Reg.DMA.statusBusy == 0
        && status & (Reg.DMA.statusDone | Reg.DMA.statusError) != 0
    }
    guard finished else {
      throw InteropError("DMA did not finish within \(timeout) s (STATUS 0x\(hex(status)))")
    }
    // Clear done/error so the next transfer starts from a clean STATUS.
    try qtest.writel(bar0(Reg.DMA.status), Reg.DMA.statusDone | Reg.DMA.statusError)
    return status
  }

  /// Programs MSI-X table entry `vector` (QEMU emulates the table) to write
  /// `data` at guest-physical `address` and unmasks it.
  func programMSIX(vector: Int, address: UInt64, data: UInt32, masked: Bool = false) throws {
    let entry = bar0(Reg.msixTable + UInt64(vector) * Reg.msixEntrySize)
    try qtest.writel(entry, UInt32(truncatingIfNeeded: address))
    try qtest.writel(entry + 4, UInt32(truncatingIfNeeded: address >> 32))
    try qtest.writel(entry + 8, data)
    try qtest.writel(entry + Reg.msixVectorControl, masked ? Reg.msixVectorMasked : 0)
  }

  func setMSIXMask(vector: Int, masked: Bool) throws {
    let entry = bar0(Reg.msixTable + UInt64(vector) * Reg.msixEntrySize)
    try qtest.writel(entry + Reg.msixVectorControl, masked ? Reg.msixVectorMasked : 0)
  }

  /// Sets MSI-X Enable (function mask clear) in the capability's Message Control.
  func enableMSIX() throws {
    let control = UInt32(XePCIConfig.msixCap + 2)
    try setConfig16(
      control, try config16(control) & ~XePCIConfig.msixFunctionMask | XePCIConfig.msixEnable)
  }
}

/// A recognisable byte pattern.
func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
  (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ ($0 >> 8)) }
}

/// Compares bytes, reporting only where they first differ (not both arrays).
func expectBytes(
  _ got: [UInt8], _ expected: [UInt8], _ what: Comment? = nil,
  sourceLocation: SourceLocation = #_sourceLocation
) {
  guard got != expected else { return }
  let detail: String
  if got.count != expected.count {
    detail = "\(got.count) bytes, expected \(expected.count)"
  } else {
    let i = zip(got, expected).enumerated().first { $0.element.0 != $0.element.1 }!.offset
    let wrong = zip(got, expected).filter { $0 != $1 }.count
    detail =
      "\(wrong) of \(got.count) bytes differ, first at \(i): 0x\(hex(got[i])) instead of 0x\(hex(expected[i]))"
  }
  Issue.record("\(what.map { "\($0): " } ?? "")\(detail)", sourceLocation: sourceLocation)
}
