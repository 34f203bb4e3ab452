import SystemPackage
import Testing
import VFIOUser

@testable import XeVF

@Suite struct RegisterFileTests {
  typealias Reg = XeSimRegisters

  /// Writes a distinct value into every scratch register of both GTs.
  func fillScratch(_ vf: SimulatedXeVF) throws {
    for gt in 0..<2 {
      for n in 0..<Reg.scratchCount {
        try vf.setReg32(Reg.scratch(gt: gt, index: n), 0xA000_0000 | UInt32(gt << 8 | n))
      }
    }
  }

  func expectScratchCleared(_ vf: SimulatedXeVF) throws {
    for gt in 0..<2 {
      for n in 0..<Reg.scratchCount {
        #expect(try vf.reg32(Reg.scratch(gt: gt, index: n)) == 0)
        #expect(vf.scratch(gt: gt, index: n) == 0)
      }
    }
  }

  @Test func scratchRegistersReadBack() throws {
    let vf = try SimulatedXeVF()
    try fillScratch(vf)
    #expect(Reg.vfSwFlag(2) == 0x19_0248)
    #expect(Reg.mediaVFSwFlag(3) == 0x19_031C)
    for gt in 0..<2 {
      for n in 0..<Reg.scratchCount {
        let expected = 0xA000_0000 | UInt32(gt << 8 | n)
        #expect(try vf.reg32(Reg.scratch(gt: gt, index: n)) == expected)
        #expect(vf.scratch(gt: gt, index: n) == expected)
      }
    }
    // Narrow writes change only their bytes.
    try vf.writeValue(0, Reg.vfSwFlag(0) + 2, UInt16(0xBEEF))
    #expect(try vf.reg32(Reg.vfSwFlag(0)) == 0xBEEF_0000)
    try vf.writeValue(0, Reg.vfSwFlag(0) + 1, UInt8(0x12))
    #expect(try vf.reg32(Reg.vfSwFlag(0)) == 0xBEEF_1200)
    #expect(try vf.readValue(0, Reg.vfSwFlag(0) + 3, as: UInt8.self) == 0xBE)
  }

  @Test func flrThroughDeviceControlClearsState() throws {
    let vf = try SimulatedXeVF()
    try fillScratch(vf)
    try vf.enableBusMaster()
    try vf.setMSIXControl(XePCIConfig.msixEnable)
    try vf.setCfg32(0x10, 0xC000_0000)
    let devCtl = UInt64(XePCIConfig.pcieCap + XePCIConfig.devCtl)
    let before = try vf.cfg16(devCtl)
    try vf.setCfg16(devCtl, before | XePCIConfig.devCtlInitiateFLR)
    #expect(vf.resetCount == 1)
    #expect(try vf.cfg16(devCtl) == before)  // bit 15 reads 0
    try expectScratchCleared(vf)
    #expect(try vf.cfg16(0x04) == 0)
    #expect(try vf.cfg32(0x10) == 0x4)
    #expect(try vf.cfg16(UInt64(XePCIConfig.msixCap + 2)) & XePCIConfig.msixEnable == 0)
  }

  @Test func flrByteWriteToDeviceControlHighByte() throws {
    let vf = try SimulatedXeVF()
    try fillScratch(vf)
    try vf.writeValue(7, UInt64(XePCIConfig.pcieCap + XePCIConfig.devCtl + 1), UInt8(0x80))
    #expect(vf.resetCount == 1)
    try expectScratchCleared(vf)
  }

  @Test func deviceControlStorageWithoutFLR() throws {
    let vf = try SimulatedXeVF()
    try fillScratch(vf)
    let devCtl = UInt64(XePCIConfig.pcieCap + XePCIConfig.devCtl)
    try vf.setCfg16(devCtl, 0x0000)
    #expect(try vf.cfg16(devCtl) == 0)
    try vf.setCfg16(devCtl, 0x7FFF)
    #expect(try vf.cfg16(devCtl) == 0x79FF)
    #expect(vf.resetCount == 0)
    #expect(vf.scratch(gt: 1, index: 3) != 0)
  }

  @Test func deviceResetClearsState() throws {
    let vf = try SimulatedXeVF()
    try fillScratch(vf)
    try vf.enableBusMaster()
    try vf.reset()
    try expectScratchCleared(vf)
    #expect(vf.command == 0)
  }

  @Test func gmdIDIsReadOnly() throws {
    for profile in XeProfile.allProfiles {
      let vf = try SimulatedXeVF(profile: profile)
      #expect(try vf.reg32(Reg.gmdID) == profile.gmdID)
      #expect(try vf.reg32(Reg.mediaGMDID) == profile.mediaGMDID)
      try vf.setReg32(Reg.gmdID, 0)
      #expect(try vf.reg32(Reg.gmdID) == profile.gmdID)
    }
  }

  @Test func unknownRegistersReadZeroAndIgnoreWrites() throws {
    let vf = try SimulatedXeVF()
    try vf.setReg32(0x1000, 0xFFFF_FFFF)
    #expect(try vf.reg32(0x1000) == 0)
    try vf.setReg64(0x50_0000, ~0)  // reserved 4–8 MiB
    #expect(try vf.reg64(0x50_0000) == 0)
  }

  @Test func accessWidthAndAlignment() throws {
    let vf = try SimulatedXeVF()
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(0, 0, count: 3) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(0, 0, count: 16) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(0, 2, count: 4) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(0, 4, count: 8) }
    #expect(throws: Errno.invalidArgument) { try vf.writeBytes(0, 1, [0, 0]) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(0, 16 << 20, count: 4) }
    #expect(throws: Never.self) { try vf.readBytes(0, (16 << 20) - 8, count: 8) }
  }

  @Test func qwordAccessSplitsIntoDwords() throws {
    let vf = try SimulatedXeVF()
    try vf.setReg64(Reg.vfSwFlag(0), 0x1111_2222_3333_4444)
    #expect(try vf.reg32(Reg.vfSwFlag(0)) == 0x3333_4444)
    #expect(try vf.reg32(Reg.vfSwFlag(1)) == 0x1111_2222)
    #expect(try vf.reg64(Reg.vfSwFlag(0)) == 0x1111_2222_3333_4444)
  }

  @Test func ggttWindowBacksOnlyTheQuota() throws {
    let vf = try SimulatedXeVF()
    let window = Reg.ggttWindow
    let quotaEnd = window + UInt64(XeProfile.bmg.ggttPTECount * 8)
    try vf.setReg64(window, 0xDEAD_BEEF_0000_0003)
    try vf.setReg64(quotaEnd - 8, 0x1234_5678_9ABC_DEF1)
    #expect(try vf.reg64(window) == 0xDEAD_BEEF_0000_0003)
    #expect(try vf.reg32(window + 4) == 0xDEAD_BEEF)
    #expect(try vf.readValue(0, window + 1, as: UInt8.self) == 0)
    #expect(try vf.reg64(quotaEnd - 8) == 0x1234_5678_9ABC_DEF1)
    // Past the quota: reads 0, writes dropped.
    try vf.setReg64(quotaEnd, ~0)
    #expect(try vf.reg64(quotaEnd) == 0)
    try vf.setReg64((16 << 20) - 8, ~0)
    #expect(try vf.reg64((16 << 20) - 8) == 0)
    // An FLR scrubs the VF's GGTT.
    try vf.reset()
    #expect(try vf.reg64(window) == 0)
    #expect(try vf.reg64(quotaEnd - 8) == 0)
  }

  /// The GGTT slice holds no memory until a PTE is written non-zero, and
  /// gives it back at reset; reads see zeros meanwhile.
  @Test func ggttIsAllocatedOnFirstNonZeroWrite() {
    var file = RegisterFile(profile: .bmg)
    var word: UInt64 = 0xFFFF
    withUnsafeMutableBytes(of: &word) { file.readGGTT(offset: 8, into: $0) }
    #expect(word == 0)
    #expect(file.ggtt == Array(repeating: 0, count: XeProfile.bmg.ggttPTECount))
    var zero: UInt64 = 0
    withUnsafeBytes(of: &zero) { file.writeGGTT(offset: 16, from: $0) }
    #expect(file.ptesAllocated == false)
    var pte: UInt64 = 0x7000_0001
    withUnsafeBytes(of: &pte) { file.writeGGTT(offset: 16, from: $0) }
    #expect(file.ptesAllocated)
    withUnsafeMutableBytes(of: &word) { file.readGGTT(offset: 16, into: $0) }
    #expect(word == 0x7000_0001)
    #expect(file.ggtt[2] == 0x7000_0001)
    file.reset()
    #expect(file.ptesAllocated == false)
    withUnsafeMutableBytes(of: &word) { file.readGGTT(offset: 16, into: $0) }
    #expect(word == 0)
  }
}
