import DeviceReport
import Testing
import VFIOUser
import XeVF

/// The decoder on the simulated VF's real config space, read through its region
/// interface as `info` reads it through the socket.
@Suite("decodePCI on the simulated VF")
struct SimulatedVFTests {
  @Test func bmgHeaderAndBARsAfterReset() throws {
    let vf = try SimulatedConfig(profile: .bmg, vramSize: 256 << 20)
    #expect(vf.bytes.count == 4096)
    let pci = vf.decode()

    #expect(pci.vendorID == 0x8086)
    #expect(pci.deviceID == 0xE211)
    #expect(PCINames.vendor(pci.vendorID) == "Intel Corporation")
    #expect(pci.classCode == 0x0380)
    #expect(pci.className == "Display controller")

    // Reset: no decoding, no bus mastering; the status word has only its capability list.
    #expect(pci.command.raw == 0)
    #expect(!pci.command.io && !pci.command.memory && !pci.command.busMaster)
    #expect(!pci.command.intxDisable)
    #expect(pci.status.raw == 0x10)
    #expect(pci.status.capabilitiesList && !pci.status.interruptPending)

    // BAR0 (registers) and BAR2 (VRAM), each over two dwords; BAR1 and BAR3 are their
    // upper halves, BAR4 and BAR5 are absent. Unassigned and not decoded.
    #expect(pci.bars.map(\.index) == [0, 2])
    let bar0 = try #require(pci.bars.first)
    #expect(bar0.kind == "memory" && bar0.is64Bit && !bar0.prefetchable)
    #expect(bar0.size == 16 << 20 && bar0.address == 0 && !bar0.enabled)
    let bar2 = try #require(pci.bars.last)
    #expect(bar2.kind == "memory" && bar2.is64Bit && bar2.prefetchable)
    #expect(bar2.size == 256 << 20 && bar2.address == 0 && !bar2.enabled)

    #expect(pci.extended.isEmpty)  // no extended capabilities at 0x100
  }

  @Test func bmgCapabilityChain() throws {
    let pci = try SimulatedConfig(profile: .bmg, vramSize: 256 << 20).decode()
    #expect(pci.capabilities.map(\.offset) == [0x40, 0x80])
    #expect(pci.capabilities.map(\.id) == [0x10, 0x11])
    #expect(pci.capabilities.map(\.name) == ["Express", "MSI-X"])

    let express = try #require(pci.capabilities[0].express)
    #expect(pci.capabilities[0].msix == nil && pci.capabilities[0].msi == nil)
    #expect(express.version == 2)
    #expect(express.deviceType == 0 && express.deviceTypeName == "Endpoint")
    #expect(express.interruptMessageNumber == 0)
    let devCap = express.deviceCapabilities
    #expect(devCap.raw == 1 << 28 | 1 << 15)
    #expect(devCap.functionLevelReset && devCap.roleBasedErrorReporting && !devCap.extendedTag)
    #expect(devCap.maxPayloadBytes == 128 && devCap.phantomFunctions == 0)
    // Device Control 0x2810: relaxed ordering, no snoop, 128-byte payload, 512-byte reads.
    let devCtl = express.deviceControl
    #expect(devCtl.raw == 0x2810)
    #expect(devCtl.relaxedOrdering && devCtl.noSnoop)
    #expect(!devCtl.correctableErrorReporting && !devCtl.extendedTag && !devCtl.auxPower)
    #expect(devCtl.maxPayloadBytes == 128 && devCtl.maxReadRequestBytes == 512)
    #expect(express.deviceStatus.raw == 0)
    // A VF reports no link.
    #expect(express.linkCapabilities.maxSpeed == "unknown")
    #expect(express.linkCapabilities.maxWidth == 0)
    #expect(express.linkCapabilities.aspm == "not supported")
    #expect(express.linkControl.aspm == "Disabled")
    #expect(express.linkControl.readCompletionBoundaryBytes == 64)
    #expect(express.linkStatus.speed == "unknown" && express.linkStatus.width == 0)

    let msix = try #require(pci.capabilities[1].msix)
    #expect(pci.capabilities[1].express == nil)
    #expect(!msix.enabled && !msix.functionMasked)
    #expect(msix.tableSize == XeSimRegisters.msixVectors)
    #expect(msix.table.bar == 0 && msix.table.offset == XeSimRegisters.msixTable)
    #expect(msix.pba.bar == 0 && msix.pba.offset == XeSimRegisters.msixPBA)
  }

  @Test func programmedCommandBARsAndMSIX() throws {
    var vf = try SimulatedConfig(profile: .bmg, vramSize: 256 << 20)
    try vf.write(
      XePCIConfig.commandMemory | XePCIConfig.commandBusMaster | XePCIConfig.commandINTxDisable,
      at: 0x04)
    try vf.write(UInt32(0xC100_0000), at: 0x10)
    try vf.write(UInt32(0x2), at: 0x14)
    try vf.write(UInt32(0x9000_0000), at: 0x18)
    try vf.write(XePCIConfig.msixEnable | XePCIConfig.msixFunctionMask, at: 0x82)
    try vf.reread()
    let pci = vf.decode()

    #expect(pci.command.raw == 0x406)
    #expect(!pci.command.io && pci.command.memory && pci.command.busMaster)
    #expect(pci.command.intxDisable)
    #expect(pci.bars.map(\.address) == [0x2_C100_0000, 0x9000_0000])
    #expect(pci.bars.allSatisfy { $0.enabled })
    let msix = try #require(pci.capabilities.last?.msix)
    #expect(msix.enabled && msix.functionMasked)
  }

  @Test func ptlHasNoVRAMBAR() throws {
    let vf = try SimulatedConfig(profile: .ptl)
    let pci = vf.decode()
    #expect(pci.vendorID == 0x8086 && pci.deviceID == 0xB080)
    #expect(pci.classCode == 0x0380)
    #expect(pci.bars.map(\.index) == [0])
    #expect(pci.bars.first?.size == 16 << 20)
    #expect(pci.capabilities.map(\.id) == [0x10, 0x11])
    #expect(pci.capabilities.first?.express?.deviceCapabilities.functionLevelReset == true)
    #expect(pci.capabilities.last?.msix?.tableSize == 16)
  }

  /// `info` passes the region sizes sorted by index: a BAR with no region (a short list)
  /// still decodes, with size 0.
  @Test func barWithoutARegionSize() throws {
    let vf = try SimulatedConfig(profile: .bmg, vramSize: 256 << 20)
    let pci = DecodedPCI(vf.bytes, regionSizes: [])
    #expect(pci.bars.map(\.index) == [0, 2])  // their type bits are not zero
    #expect(pci.bars.map(\.size) == [0, 0])
  }
}
