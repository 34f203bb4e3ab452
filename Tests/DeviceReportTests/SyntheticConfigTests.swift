import DeviceReport
import Testing

/// What the simulated VF does not have: I/O and 32-bit BARs, MSI, power
/// management, a root complex endpoint with a link, and extended capabilities.
@Suite("decodePCI on built config spaces")
struct SyntheticConfigTests {
  @Test func ioAnd32BitAnd64BitBARs() {
    var image = ConfigImage.header()
    image.put(UInt16(1 << 0), at: 0x04)  // I/O decoding only
    image.put(UInt32(0xE001), at: 0x10)  // I/O
    image.put(UInt32(0xF000_0008), at: 0x14)  // 32-bit, prefetchable
    image.put(UInt32(0xF100_000C), at: 0x1C)  // 64-bit, prefetchable, over BAR3 and BAR4
    image.put(UInt32(0x1), at: 0x20)
    let pci = DecodedPCI(image.bytes, regionSizes: [0x100, 1 << 20, 0, 2 << 20, 0, 0])

    #expect(pci.bars.map(\.index) == [0, 1, 3])
    let io = pci.bars[0]
    #expect(io.kind == "io" && !io.is64Bit && !io.prefetchable)
    #expect(io.address == 0xE000 && io.size == 0x100 && io.enabled)
    let bar1 = pci.bars[1]
    #expect(bar1.kind == "memory" && !bar1.is64Bit && bar1.prefetchable)
    #expect(bar1.address == 0xF000_0000 && bar1.size == 1 << 20 && !bar1.enabled)
    let bar3 = pci.bars[2]
    #expect(bar3.kind == "memory" && bar3.is64Bit && bar3.prefetchable)
    #expect(bar3.address == 0x1_F100_0000 && bar3.size == 2 << 20 && !bar3.enabled)
    #expect(pci.className == "Network controller")
  }

  @Test func everyDecodedCapability() throws {
    var image = ConfigImage.header(capabilitiesAt: 0x40)
    image.capability(0x01, at: 0x40, next: 0x50, control: 3)  // PM version 3
    // MSI: enabled, 4 vectors capable, 2 enabled, 64-bit, per-vector masking.
    image.capability(0x05, at: 0x50, next: 0x60, control: 0x195)
    image.capability(0x09, at: 0x60, next: 0x70)
    image.capability(0x42, at: 0x70, next: 0x80)
    // Express v2, root complex integrated endpoint, message 3.
    image.capability(0x10, at: 0x80, next: 0, control: 0x692)
    image.put(UInt32(0x31), at: 0x84)  // 256-byte payload, 2 phantom bits, extended tag
    image.put(UInt16(0x212F), at: 0x88)  // errors reported, ext tag, 256/512 bytes
    image.put(UInt16(0x21), at: 0x8A)  // correctable error, transactions pending
    image.put(UInt32(0x0700_0D04), at: 0x8C)  // port 7, 16GT/s, x16, L0s L1
    image.put(UInt16(0x4A), at: 0x90)  // L1, RCB 128, common clock
    image.put(UInt16(0x83), at: 0x92)  // 8GT/s x8
    let pci = DecodedPCI(image.bytes)

    #expect(pci.capabilities.map(\.offset) == [0x40, 0x50, 0x60, 0x70, 0x80])
    #expect(
      pci.capabilities.map(\.name) == [
        "Power Management", "MSI", "Vendor Specific Information", "Capability 42", "Express",
      ])
    #expect(pci.capabilities[0].powerManagement?.version == 3)
    let msi = try #require(pci.capabilities[1].msi)
    #expect(msi.enabled && msi.is64Bit && msi.perVectorMasking)
    #expect(msi.vectorsCapable == 4 && msi.vectorsEnabled == 2)
    #expect(pci.capabilities[2...3].allSatisfy { $0.msi == nil && $0.express == nil })

    let e = try #require(pci.capabilities[4].express)
    #expect(e.version == 2 && e.deviceType == 9 && e.interruptMessageNumber == 3)
    #expect(e.deviceTypeName == "Root Complex Integrated Endpoint")
    #expect(e.deviceCapabilities.maxPayloadBytes == 256)
    #expect(e.deviceCapabilities.phantomFunctions == 2 && e.deviceCapabilities.extendedTag)
    #expect(!e.deviceCapabilities.functionLevelReset)
    let dc = e.deviceControl
    #expect(dc.correctableErrorReporting && dc.nonFatalErrorReporting)
    #expect(dc.fatalErrorReporting && dc.unsupportedRequestReporting && dc.extendedTag)
    #expect(!dc.relaxedOrdering && !dc.noSnoop)
    #expect(dc.maxPayloadBytes == 256 && dc.maxReadRequestBytes == 512)
    #expect(e.deviceStatus.correctableError && e.deviceStatus.transactionsPending)
    #expect(!e.deviceStatus.fatalError)
    let lc = e.linkCapabilities
    #expect(lc.port == 7 && lc.maxSpeed == "16GT/s" && lc.maxWidth == 16 && lc.aspm == "L0s L1")
    #expect(e.linkControl.aspm == "L1 Enabled" && e.linkControl.readCompletionBoundaryBytes == 128)
    #expect(e.linkControl.commonClock && !e.linkControl.disabled)
    #expect(e.linkStatus.speed == "8GT/s" && e.linkStatus.width == 8)
  }

  @Test func extendedCapabilities() {
    var image = ConfigImage.header()
    image.extended(0x0001, version: 2, at: 0x100, next: 0x140)
    image.extended(0x0010, at: 0x140, next: 0x200)
    image.extended(0x1234, at: 0x200, next: 0)
    let pci = DecodedPCI(image.bytes)
    #expect(pci.extended.map(\.offset) == [0x100, 0x140, 0x200])
    #expect(pci.extended.map(\.id) == [0x0001, 0x0010, 0x1234])
    #expect(pci.extended.map(\.version) == [2, 1, 1])
    #expect(
      pci.extended.map(\.name) == [
        "Advanced Error Reporting", "Single Root I/O Virtualization (SR-IOV)",
        "Extended Capability 1234",
      ])
  }

  @Test func capabilityPointerWithoutTheStatusBitIsIgnored() {
    var image = ConfigImage.header()
    image.put(UInt8(0x40), at: 0x34)
    image.capability(0x05, at: 0x40, next: 0)
    let pci = DecodedPCI(image.bytes)
    #expect(!pci.status.capabilitiesList)
    #expect(pci.capabilities.isEmpty)
  }
}
