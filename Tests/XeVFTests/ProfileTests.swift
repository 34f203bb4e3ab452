import SystemPackage
import Testing
import VFIODevice
import VFIOUser

@testable import XeVF

@Suite struct ProfileTests {
  @Test func profilesHaveTheirIdentity() {
    #expect(XeProfile.allProfiles.map(\.name) == ["bmg", "ptl", "wcl"])
    #expect(XeProfile.named("BMG") == .bmg)
    #expect(XeProfile.named("nope") == nil)
    #expect(XeProfile.default == .bmg)
    #expect(XeProfile.bmg.deviceID == 0xE211)
    #expect(XeProfile.ptl.deviceID == 0xB080)
    #expect(XeProfile.wcl.deviceID == 0xFD80)
    for profile in XeProfile.allProfiles {
      #expect(profile.vendorID == 0x8086)
      #expect(profile.classCode == 0x03_8000)
      #expect(profile.gtCount == 2)
      #expect(profile.ggttPTECount == 16384)
    }
    #expect(XeProfile.bmg.hasVRAM && XeProfile.bmg.defaultVRAMSize == 256 << 20)
    #expect(!XeProfile.ptl.hasVRAM && !XeProfile.wcl.hasVRAM)
    #expect(XeProfile.bmg.gmdID == 0x0500_4000)  // 20.01
  }

  @Test func badVRAMSizesAreRefused() {
    #expect(throws: Errno.invalidArgument) { try SimulatedXeVF(profile: .bmg, vramSize: 3 << 20) }
    #expect(throws: Errno.invalidArgument) { try SimulatedXeVF(profile: .bmg, vramSize: 512 << 10) }
    #expect(throws: Errno.invalidArgument) { try SimulatedXeVF(profile: .ptl, vramSize: 1 << 20) }
    #expect(throws: Never.self) { try SimulatedXeVF(profile: .ptl, vramSize: 0) }
    #expect(throws: Never.self) { try SimulatedXeVF(profile: .bmg, vramSize: 1 << 20) }
  }

  @Test func deviceDescription() throws {
    let vf = try SimulatedXeVF(profile: .bmg)
    #expect(vf.deviceFlags == [.pci, .reset])
    #expect(vf.regionCount == 9)
    #expect(vf.irqCount == 5)
    #expect(vf.region(0)?.size == 16 << 20)
    #expect(vf.region(0)?.mmap == nil)
    let bar2 = try #require(vf.region(2))
    #expect(bar2.size == 256 << 20 && bar2.readable && bar2.writable)
    #expect(bar2.mmap == MmapSource(fd: try #require(vf.vramFD), offset: 0))
    #expect(bar2.sparseAreas == [SparseMmapArea(offset: 0, size: 256 << 20)])
    for index: UInt32 in [1, 3, 4, 5, 6, 8] { #expect(vf.region(index)?.size == 0) }
    #expect(vf.region(7)?.size == 4096)
    #expect(vf.region(9) == nil)

    #expect(vf.irq(VFIOPCIIRQ.intx)?.count == 0)
    #expect(vf.irq(VFIOPCIIRQ.msi)?.count == 0)
    #expect(
      vf.irq(VFIOPCIIRQ.msix)
        == IRQDescription(index: 2, count: 16, flags: .eventfd))
    #expect(
      vf.irq(VFIOPCIIRQ.err)
        == IRQDescription(
          index: 3, count: 1, flags: [.eventfd, .noresize]))
    #expect(
      vf.irq(VFIOPCIIRQ.req)
        == IRQDescription(
          index: 4, count: 1, flags: [.eventfd, .noresize]))
    #expect(
      vf.irq(VFIOPCIIRQ.intx)?.flags
        == [.eventfd, .maskable, .automasked])
    #expect(vf.irq(5) == nil)
  }

  @Test(arguments: [XeProfile.ptl, .wcl])
  func integratedProfilesHaveNoBAR2(profile: XeProfile) throws {
    let vf = try SimulatedXeVF(profile: profile)
    #expect(vf.region(2)?.size == 0)
    #expect(vf.region(2)?.mmap == nil)
    #expect(vf.vramFD == nil && vf.vramSize == 0)
    #expect(vf.deviceMemorySize == XeSimRegisters.sramSize)
    #expect(throws: Errno.invalidArgument) { try vf.readBytes(2, 0, count: 4) }
    try vf.setCfg32(0x18, 0xFFFF_FFFF)
    #expect(try vf.cfg32(0x18) == 0)
  }
}
