/// Names, as lspci prints them, of what the config space encodes as numbers.
public enum PCINames {
  public static func vendor(_ id: Int) -> String? { id == 0x8086 ? "Intel Corporation" : nil }

  public static func `class`(_ code: Int) -> String {
    let base = code >> 16 & 0xFF
    let sub = code >> 8 & 0xFF
    if base == 0x03 {
      switch sub {
      case 0x00: return "VGA compatible controller"
      case 0x01: return "XGA compatible controller"
      case 0x02: return "3D controller"
      default: return "Display controller"
      }
    }
    let names: [Int: String] = [
      0x00: "Unclassified device", 0x01: "Mass storage controller", 0x02: "Network controller",
      0x04: "Multimedia controller", 0x05: "Memory controller", 0x06: "Bridge",
      0x07: "Communication controller", 0x08: "Generic system peripheral",
      0x09: "Input device controller", 0x0A: "Docking station", 0x0B: "Processor",
      0x0C: "Serial bus controller", 0x0D: "Wireless controller", 0x0E: "Intelligent controller",
      0x0F: "Satellite communications controller", 0x10: "Encryption controller",
      0x11: "Signal processing controller", 0x12: "Processing accelerators",
      0x13: "Non-Essential Instrumentation", 0x40: "Coprocessor",
    ]
    return names[base] ?? "Unassigned class"
  }

  static func capability(_ id: Int) -> String {
    switch id {
    case 0x01: "Power Management"
    case 0x05: "MSI"
    case 0x09: "Vendor Specific Information"
    case 0x10: "Express"
    case 0x11: "MSI-X"
    case 0x12: "SATA HBA"
    case 0x13: "PCI Advanced Features"
    default: "Capability \(hex(id, 2))"
    }
  }

  static func extendedCapability(_ id: Int) -> String {
    switch id {
    case 0x0001: "Advanced Error Reporting"
    case 0x0002, 0x0009: "Virtual Channel"
    case 0x0003: "Device Serial Number"
    case 0x000B: "Vendor Specific Information"
    case 0x000D: "Access Control Services"
    case 0x000E: "Alternative Routing-ID Interpretation (ARI)"
    case 0x000F: "Address Translation Service (ATS)"
    case 0x0010: "Single Root I/O Virtualization (SR-IOV)"
    case 0x0013: "Page Request Interface (PRI)"
    case 0x0015: "Physical Resizable BAR"
    case 0x0017: "Transaction Processing Hints"
    case 0x0018: "Latency Tolerance Reporting"
    case 0x001B: "Process Address Space ID (PASID)"
    case 0x0024: "VF Resizable BAR"
    default: "Extended Capability \(hex(id, 4))"
    }
  }

  static func expressType(_ type: Int) -> String {
    switch type {
    case 0: "Endpoint"
    case 1: "Legacy Endpoint"
    case 4: "Root Port"
    case 5: "Upstream Port"
    case 6: "Downstream Port"
    case 7: "PCI-Express to PCI/PCI-X Bridge"
    case 8: "PCI/PCI-X to PCI-Express Bridge"
    case 9: "Root Complex Integrated Endpoint"
    case 10: "Root Complex Event Collector"
    default: "Unknown type \(type)"
    }
  }

  static func linkSpeed(_ code: Int) -> String {
    switch code {
    case 1: "2.5GT/s"
    case 2: "5GT/s"
    case 3: "8GT/s"
    case 4: "16GT/s"
    case 5: "32GT/s"
    case 6: "64GT/s"
    default: "unknown"
    }
  }

  /// `value` in lower-case hexadecimal, zero-padded to `width` digits (as
  /// MigrationTools' `hex`, which this module does not depend on for one line).
  private static func hex(_ value: Int, _ width: Int) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: max(0, width - digits.count)) + digits
  }
}
