import Testing

@testable import DeviceReport

/// The tables, including the names no simulated device reaches.
@Suite("PCINames")
struct PCINamesTests {
  @Test func vendor() {
    #expect(PCINames.vendor(0x8086) == "Intel Corporation")
    #expect(PCINames.vendor(0x10DE) == nil)
  }

  @Test(arguments: [
    (0x03_0000, "VGA compatible controller"), (0x03_0100, "XGA compatible controller"),
    (0x03_0200, "3D controller"), (0x03_8000, "Display controller"),
    (0x02_0000, "Network controller"), (0x06_0400, "Bridge"),
    (0x12_0000, "Processing accelerators"),
    (0x40_0000, "Coprocessor"), (0x14_0000, "Unassigned class"), (0xFF_0000, "Unassigned class"),
  ])
  func classNames(code: Int, name: String) {
    #expect(PCINames.class(code) == name)
  }

  @Test func capabilities() {
    #expect(PCINames.capability(0x01) == "Power Management")
    #expect(PCINames.capability(0x05) == "MSI")
    #expect(PCINames.capability(0x10) == "Express")
    #expect(PCINames.capability(0x11) == "MSI-X")
    #expect(PCINames.capability(0x13) == "PCI Advanced Features")
    #expect(PCINames.capability(0x0A) == "Capability 0a")
    #expect(PCINames.capability(0x00) == "Capability 00")
  }

  @Test func extendedCapabilities() {
    #expect(PCINames.extendedCapability(0x0002) == "Virtual Channel")
    #expect(PCINames.extendedCapability(0x0009) == "Virtual Channel")
    #expect(PCINames.extendedCapability(0x000E) == "Alternative Routing-ID Interpretation (ARI)")
    #expect(PCINames.extendedCapability(0x0024) == "VF Resizable BAR")
    #expect(PCINames.extendedCapability(0x0025) == "Extended Capability 0025")
  }

  @Test func expressTypesAndLinkSpeeds() {
    #expect(PCINames.expressType(0) == "Endpoint")
    #expect(PCINames.expressType(4) == "Root Port")
    #expect(PCINames.expressType(10) == "Root Complex Event Collector")
    #expect(PCINames.expressType(3) == "Unknown type 3")
    #expect(
      (0...7).map(PCINames.linkSpeed) == [
        "unknown", "2.5GT/s", "5GT/s", "8GT/s", "16GT/s", "32GT/s", "64GT/s", "unknown",
      ])
  }
}
