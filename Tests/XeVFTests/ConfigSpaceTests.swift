import SystemPackage
import Testing
import VFIOUser

@testable import XeVF

@Suite struct ConfigSpaceTests {
  @Test(arguments: XeProfile.allProfiles)
  func identity(profile: XeProfile) throws {
    let vf = try SimulatedXeVF(profile: profile)
    #expect(try vf.cfg16(0x00) == 0x8086)
    #expect(try vf.cfg16(0x02) == profile.deviceID)
    #expect(try vf.cfg32(0x08) == 0x0380_0000 | UInt32(profile.revisionID))
    #expect(try vf.cfg8(0x0E) == 0)  // header type 0
    #expect(try vf.cfg16(0x06) & XePCIConfig.statusCapList != 0)
    #expect(try vf.cfg16(0x2C) == 0x8086)
    #expect(try vf.cfg16(0x2E) == profile.subsystemID)
    #expect(try vf.cfg8(0x3D) == 0)  // no INTx pin
    #expect(try vf.cfg32(0x100) == 0)  // no extended capabilities
  }

  @Test func revisionIsConfigurable() throws {
    var profile = XeProfile.bmg
    profile.revisionID = 0x0B
    let vf = try SimulatedXeVF(profile: profile)
    #expect(try vf.cfg8(0x08) == 0x0B)
  }

  @Test func capabilityListHasPCIeWithFLRAndMSIXButNoPM() throws {
    let vf = try SimulatedXeVF()
    let caps = try vf.capabilities()
    #expect(caps.map(\.id) == [0x10, 0x11])
    #expect(!caps.contains { $0.id == 0x01 })

    let pcie = try #require(caps.first { $0.id == 0x10 }).offset
    let flags = try vf.cfg16(pcie + 2)
    #expect(flags & 0xF == 2)  // version 2
    #expect(flags >> 4 & 0xF == 0)  // PCI Express endpoint
    #expect(try vf.cfg32(pcie + 4) & 1 << 28 != 0)  // FLR capable

    let msix = try #require(caps.first { $0.id == 0x11 }).offset
    let control = try vf.cfg16(msix + 2)
    #expect(control & 0x7FF == 15)  // 16 vectors
    #expect(control & 0xC000 == 0)  // disabled, unmasked after reset
    let table = try vf.cfg32(msix + 4)
    let pba = try vf.cfg32(msix + 8)
    #expect(table & 7 == 0 && pba & 7 == 0)  // both in BAR0
    #expect(UInt64(table & ~7) == XeSimRegisters.msixTable)
    #expect(UInt64(pba & ~7) == XeSimRegisters.msixPBA)
    #expect(table & ~7 < 4 << 20 && pba & ~7 < 4 << 20)
  }

  @Test func bar0SizesAsA64BitNonPrefetchableBAR() throws {
    let vf = try SimulatedXeVF()
    #expect(try vf.cfg32(0x10) == 0x4)
    try vf.setCfg32(0x10, 0xFFFF_FFFF)
    try vf.setCfg32(0x14, 0xFFFF_FFFF)
    #expect(try vf.cfg32(0x10) == 0xFF00_0004)  // 16 MiB, 64-bit, memory
    #expect(try vf.cfg32(0x14) == 0xFFFF_FFFF)
    try vf.setCfg32(0x10, 0xC100_0000)
    try vf.setCfg32(0x14, 0x0000_0012)
    #expect(try vf.cfg32(0x10) == 0xC100_0004)
    #expect(try vf.cfg32(0x14) == 0x12)
  }

  @Test func bar2SizesAsA64BitPrefetchableBAR() throws {
    let vf = try SimulatedXeVF(profile: .bmg)
    #expect(try vf.cfg32(0x18) == 0xC)
    try vf.setCfg32(0x18, 0xFFFF_FFFF)
    try vf.setCfg32(0x1C, 0xFFFF_FFFF)
    #expect(try vf.cfg32(0x18) == 0xF000_000C)  // 256 MiB
    #expect(try vf.cfg32(0x1C) == 0xFFFF_FFFF)

    // 8 GiB: the size reaches into the upper dword. The memfd stays sparse.
    let big = try SimulatedXeVF(profile: .bmg, vramSize: 8 << 30)
    try big.setCfg32(0x18, 0xFFFF_FFFF)
    try big.setCfg32(0x1C, 0xFFFF_FFFF)
    #expect(try big.cfg32(0x18) == 0x0000_000C)
    #expect(try big.cfg32(0x1C) == 0xFFFF_FFFE)
  }

  @Test func absentBARsAndROMStayZero() throws {
    let vf = try SimulatedXeVF()
    for offset: UInt64 in [0x20, 0x24, 0x30] {
      try vf.setCfg32(offset, 0xFFFF_FFFF)
      #expect(try vf.cfg32(offset) == 0)
    }
  }

  @Test func commandRegisterKeepsOnlyItsWritableBits() throws {
    let vf = try SimulatedXeVF()
    try vf.setCfg16(0x04, 0xFFFF)
    #expect(try vf.cfg16(0x04) == 0x0406)
    try vf.setCfg16(0x04, 0x0001)  // IO space: not implemented
    #expect(try vf.cfg16(0x04) == 0)
  }

  @Test func readOnlyFieldsIgnoreWrites() throws {
    let vf = try SimulatedXeVF()
    try vf.setCfg32(0x00, 0x1234_5678)
    #expect(try vf.cfg32(0x00) == 0xE211_8086)
    try vf.writeValue(7, 0x3D, UInt8(1))
    #expect(try vf.cfg8(0x3D) == 0)
    try vf.writeValue(7, 0x3C, UInt8(11))  // interrupt line is writable
    #expect(try vf.cfg8(0x3C) == 11)
  }

  @Test func accessWidthAndAlignment() throws {
    let vf = try SimulatedXeVF()
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(7, 0, count: 3) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(7, 1, count: 2) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(7, 2, count: 4) }
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(7, 4094, count: 4) }
    #expect(throws: Errno.invalidArgument) { try vf.writeBytes(7, 0x3C, [0, 0, 0, 0, 0, 0, 0, 0]) }
    #expect(throws: Errno.invalidArgument) { try vf.writeBytes(7, 0x3D, [0, 0]) }
    #expect(throws: Errno.invalidArgument) { try vf.writeBytes(7, 0x04, [0, 0, 0]) }
    // A whole-space read, as QEMU's vfio-pci does at realize, is allowed.
    let all = try vf.readBytes(7, 0, count: 4096)
    #expect(all[0] == 0x86 && all[1] == 0x80)
    #expect(all[0x34] == UInt8(XePCIConfig.pcieCap))
  }
}
