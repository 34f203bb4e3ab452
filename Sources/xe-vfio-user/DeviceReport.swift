import MigrationTools
import VFIOUser

/// What `info` reports: a vfio-user device as a client sees it. The PCI part is
/// decoded from the config space read through the socket; only the names of
/// classes and capabilities come from tables. Encoded as JSON with numbers as
/// numbers and flags as booleans; `raw` fields keep the register values.
struct DeviceReport: Codable, Equatable {
  struct ProtocolVersion: Codable, Equatable {
    var major: Int
    var minor: Int
  }
  struct CommandRegister: Codable, Equatable {
    var raw: Int
    var io: Bool
    var memory: Bool
    var busMaster: Bool
    var intxDisable: Bool
  }
  struct StatusRegister: Codable, Equatable {
    var raw: Int
    var capabilitiesList: Bool
    var interruptPending: Bool
  }
  struct BAR: Codable, Equatable {
    var index: Int
    /// "memory" or "io".
    var kind: String
    var is64Bit: Bool
    var prefetchable: Bool
    /// The address software programmed; 0 is unassigned.
    var address: UInt64
    /// From DEVICE_GET_REGION_INFO, the way the kernel reports a BAR's size.
    var size: UInt64
    /// Memory (or I/O) decoding is on in the command register.
    var enabled: Bool
  }
  struct Capability: Codable, Equatable {
    var offset: Int
    var id: Int
    var name: String
    var express: Express?
    var msix: MSIX?
    var msi: MSI?
    var powerManagement: PowerManagement?
  }
  struct Express: Codable, Equatable {
    struct DeviceCapabilities: Codable, Equatable {
      var raw: Int
      var maxPayloadBytes: Int
      var phantomFunctions: Int
      var extendedTag: Bool
      var roleBasedErrorReporting: Bool
      var functionLevelReset: Bool
    }
    struct DeviceControl: Codable, Equatable {
      var raw: Int
      var correctableErrorReporting: Bool
      var nonFatalErrorReporting: Bool
      var fatalErrorReporting: Bool
      var unsupportedRequestReporting: Bool
      var relaxedOrdering: Bool
      var extendedTag: Bool
      var phantomFunctions: Bool
      var auxPower: Bool
      var noSnoop: Bool
      var maxPayloadBytes: Int
      var maxReadRequestBytes: Int
    }
    struct DeviceStatus: Codable, Equatable {
      var raw: Int
      var correctableError: Bool
      var nonFatalError: Bool
      var fatalError: Bool
      var unsupportedRequest: Bool
      var auxPower: Bool
      var transactionsPending: Bool
    }
    struct LinkCapabilities: Codable, Equatable {
      var raw: Int
      var port: Int
      /// "2.5GT/s" ... "64GT/s", or "unknown" (0, as VFs report).
      var maxSpeed: String
      var maxWidth: Int
      var aspm: String
    }
    struct LinkControl: Codable, Equatable {
      var raw: Int
      var aspm: String
      var readCompletionBoundaryBytes: Int
      var disabled: Bool
      var commonClock: Bool
    }
    struct LinkStatus: Codable, Equatable {
      var raw: Int
      var speed: String
      var width: Int
    }
    var version: Int
    var deviceType: Int
    var deviceTypeName: String
    var interruptMessageNumber: Int
    var deviceCapabilities: DeviceCapabilities
    var deviceControl: DeviceControl
    var deviceStatus: DeviceStatus
    var linkCapabilities: LinkCapabilities
    var linkControl: LinkControl
    var linkStatus: LinkStatus
  }
  struct MSIX: Codable, Equatable {
    struct Location: Codable, Equatable {
      var bar: Int
      var offset: Int
    }
    var enabled: Bool
    var functionMasked: Bool
    var tableSize: Int
    var table: Location
    var pba: Location
  }
  struct MSI: Codable, Equatable {
    var enabled: Bool
    var vectorsCapable: Int
    var vectorsEnabled: Int
    var is64Bit: Bool
    var perVectorMasking: Bool
  }
  struct PowerManagement: Codable, Equatable {
    var version: Int
  }
  struct ExtendedCapability: Codable, Equatable {
    var offset: Int
    var id: Int
    var version: Int
    var name: String
  }
  struct DeviceFlags: Codable, Equatable {
    var raw: Int
    var pci: Bool
    var reset: Bool
  }
  struct Region: Codable, Equatable {
    struct Flags: Codable, Equatable {
      var raw: Int
      var read: Bool
      var write: Bool
      var mmap: Bool
      var msixMappable: Bool
    }
    struct Area: Codable, Equatable {
      var offset: UInt64
      var size: UInt64
    }
    struct RegionType: Codable, Equatable {
      var type: Int
      var subtype: Int
    }
    var index: Int
    var name: String
    var size: UInt64
    var flags: Flags
    var mmapAreas: [Area]
    var type: RegionType?
  }
  struct IRQ: Codable, Equatable {
    struct Flags: Codable, Equatable {
      var raw: Int
      var eventfd: Bool
      var maskable: Bool
      var automasked: Bool
      var noresize: Bool
    }
    var index: Int
    var name: String
    var count: Int
    var flags: Flags
  }
  struct Migration: Codable, Equatable {
    struct Flags: Codable, Equatable {
      var raw: UInt64
      var stopCopy: Bool
      var p2p: Bool
      var preCopy: Bool
    }
    var supported: Bool
    var flags: Flags?
    /// MIG_DEVICE_STATE, e.g. "RUNNING".
    var state: String?
    /// Why the device does not migrate, e.g. "ENOTTY".
    var error: String?
  }
  /// DMA logging (DEVICE_FEATURE DMA_LOGGING_*, probed): how the device
  /// knows its pages is in the server's log, which the protocol cannot carry.
  struct DMALogging: Codable, Equatable {
    var supported: Bool
    /// Why not, e.g. "ENOTTY".
    var error: String?
  }
  /// What the server advertised in VERSION (the spec's defaults for absent keys).
  struct ServerLimits: Codable, Equatable {
    var maxDataXferSize: Int
    var maxDMAMaps: Int
    var maxMsgFDs: Int
    var pgsizes: UInt64
    var writeMultiple: Bool
  }

  var socket: String
  var protocolVersion: ProtocolVersion
  var vendorID: Int
  var deviceID: Int
  var vendorName: String?
  var subsystemVendorID: Int
  var subsystemID: Int
  var revision: Int
  var classCode: Int
  var className: String
  var headerType: Int
  var command: CommandRegister
  var status: StatusRegister
  /// 0: none; 1-4: INTA-INTD.
  var interruptPin: Int
  var bars: [BAR]
  var capabilities: [Capability]
  var extendedCapabilities: [ExtendedCapability]
  var deviceFlags: DeviceFlags
  var regions: [Region]
  var irqs: [IRQ]
  var migration: Migration
  var dmaLogging: DMALogging
  var server: ServerLimits
  /// A kernel device's address and migration path, from its server's record
  /// (`ServedRecord`); nil for the simulated VF or a server on another host.
  var kernelDevice: KernelDevice?

  struct KernelDevice: Codable, Equatable {
    var address: String
    var pid: Int
    /// vfio, pf-debugfs or none.
    var migrationPath: String
    /// The server's line about it, with the reason when none.
    var migrationDetail: String
    /// The device, its driver and the IOMMU path the server uses.
    var opened: String?

    init(_ record: ServedRecord) {
      opened = record.opened
      address = record.device
      pid = record.pid
      migrationPath = String(record.migration.prefix { $0 != ":" })
      migrationDetail = record.migration
    }
  }
}

// Each flags word as the report spells it: its raw value and a Bool for each known bit.

extension DeviceReport.DeviceFlags {
  init(_ flags: VFIODeviceFlags) {
    self.init(raw: Int(flags.rawValue), pci: flags.contains(.pci), reset: flags.contains(.reset))
  }
}

extension DeviceReport.Region.Flags {
  init(_ flags: VFIORegionFlags, msixMappable: Bool) {
    self.init(
      raw: Int(flags.rawValue), read: flags.contains(.read), write: flags.contains(.write),
      mmap: flags.contains(.mmap), msixMappable: msixMappable)
  }
}

extension DeviceReport.IRQ.Flags {
  init(_ flags: VFIOIRQInfoFlags) {
    self.init(
      raw: Int(flags.rawValue), eventfd: flags.contains(.eventfd),
      maskable: flags.contains(.maskable), automasked: flags.contains(.automasked),
      noresize: flags.contains(.noresize))
  }
}

extension DeviceReport.Migration.Flags {
  init(_ flags: MigrationFlags) {
    self.init(
      raw: flags.rawValue, stopCopy: flags.contains(.stopCopy), p2p: flags.contains(.p2p),
      preCopy: flags.contains(.preCopy))
  }
}

/// Little-endian reads from a config space image; bytes past its end read as 0.
struct ConfigBytes {
  let bytes: [UInt8]
  func u8(_ offset: Int) -> Int { offset >= 0 && offset < bytes.count ? Int(bytes[offset]) : 0 }
  func u16(_ offset: Int) -> Int { u8(offset) | u8(offset + 1) << 8 }
  func u32(_ offset: Int) -> Int { u16(offset) | u16(offset + 2) << 16 }
  func bit(_ value: Int, _ n: Int) -> Bool { value >> n & 1 != 0 }
}

extension DeviceReport {
  /// The PCI header, BARs and capabilities of `config`; `regionSizes[i]` is the size
  /// of region i (BAR i for i < 6).
  static func decodePCI(_ config: ConfigBytes, regionSizes: [UInt64]) -> (
    header: (command: CommandRegister, status: StatusRegister), bars: [BAR],
    capabilities: [Capability], extended: [ExtendedCapability]
  ) {
    let c = config
    let commandRaw = c.u16(0x04)
    let command = CommandRegister(
      raw: commandRaw, io: c.bit(commandRaw, 0), memory: c.bit(commandRaw, 1),
      busMaster: c.bit(commandRaw, 2), intxDisable: c.bit(commandRaw, 10))
    let statusRaw = c.u16(0x06)
    let status = StatusRegister(
      raw: statusRaw, capabilitiesList: c.bit(statusRaw, 4), interruptPending: c.bit(statusRaw, 3))

    var bars: [BAR] = []
    var index = 0
    while index < 6 {
      let low = c.u32(0x10 + 4 * index)
      let size = index < regionSizes.count ? regionSizes[index] : 0
      let isIO = low & 1 != 0
      let is64Bit = !isIO && (low >> 1) & 3 == 2
      defer { index += is64Bit ? 2 : 1 }
      guard low != 0 || size != 0 else { continue }  // not implemented
      var address = UInt64(low & (isIO ? ~3 : ~0xF) & 0xFFFF_FFFF)
      if is64Bit { address |= UInt64(c.u32(0x10 + 4 * (index + 1))) << 32 }
      bars.append(
        BAR(
          index: index, kind: isIO ? "io" : "memory", is64Bit: is64Bit,
          prefetchable: !isIO && c.bit(low, 3), address: address, size: size,
          enabled: isIO ? command.io : command.memory))
    }

    var capabilities: [Capability] = []
    if status.capabilitiesList {
      var offset = c.u8(0x34) & 0xFC
      var seen = Set<Int>()
      while offset >= 0x40, offset <= 0xFC, seen.insert(offset).inserted {
        capabilities.append(capability(c, at: offset))
        offset = c.u8(offset + 1) & 0xFC
      }
    }

    // Extended capabilities from 0x100 (PCIe config space is 4 KiB): id, version, next.
    var extended: [ExtendedCapability] = []
    var offset = 0x100
    var seen = Set<Int>()
    while offset >= 0x100, offset + 4 <= c.bytes.count, seen.insert(offset).inserted {
      let header = c.u32(offset)
      if header == 0 || header == 0xFFFF_FFFF { break }
      let id = header & 0xFFFF
      extended.append(
        ExtendedCapability(
          offset: offset, id: id, version: header >> 16 & 0xF,
          name: PCINames.extendedCapability(id)))
      offset = header >> 20 & 0xFFC
    }
    return ((command, status), bars, capabilities, extended)
  }

  static func capability(_ c: ConfigBytes, at offset: Int) -> Capability {
    let id = c.u8(offset)
    var capability = Capability(
      offset: offset, id: id, name: PCINames.capability(id))
    switch id {
    case 0x01:
      capability.powerManagement = PowerManagement(version: c.u16(offset + 2) & 7)
    case 0x05:
      let control = c.u16(offset + 2)
      capability.msi = MSI(
        enabled: c.bit(control, 0), vectorsCapable: 1 << (control >> 1 & 7),
        vectorsEnabled: 1 << (control >> 4 & 7), is64Bit: c.bit(control, 7),
        perVectorMasking: c.bit(control, 8))
    case 0x10:
      capability.express = express(c, at: offset)
    case 0x11:
      let control = c.u16(offset + 2)
      let table = c.u32(offset + 4)
      let pba = c.u32(offset + 8)
      capability.msix = MSIX(
        enabled: c.bit(control, 15), functionMasked: c.bit(control, 14),
        tableSize: (control & 0x7FF) + 1, table: .init(bar: table & 7, offset: table & ~7),
        pba: .init(bar: pba & 7, offset: pba & ~7))
    default:
      break
    }
    return capability
  }

  static func express(_ c: ConfigBytes, at offset: Int) -> Express {
    let flags = c.u16(offset + 2)
    let type = flags >> 4 & 0xF
    let devCap = c.u32(offset + 4)
    let devCtl = c.u16(offset + 8)
    let devSta = c.u16(offset + 0x0A)
    let lnkCap = c.u32(offset + 0x0C)
    let lnkCtl = c.u16(offset + 0x10)
    let lnkSta = c.u16(offset + 0x12)
    return Express(
      version: flags & 0xF, deviceType: type, deviceTypeName: PCINames.expressType(type),
      interruptMessageNumber: flags >> 9 & 0x1F,
      deviceCapabilities: .init(
        raw: devCap, maxPayloadBytes: 128 << (devCap & 7), phantomFunctions: devCap >> 3 & 3,
        extendedTag: c.bit(devCap, 5), roleBasedErrorReporting: c.bit(devCap, 15),
        functionLevelReset: c.bit(devCap, 28)),
      deviceControl: .init(
        raw: devCtl, correctableErrorReporting: c.bit(devCtl, 0),
        nonFatalErrorReporting: c.bit(devCtl, 1), fatalErrorReporting: c.bit(devCtl, 2),
        unsupportedRequestReporting: c.bit(devCtl, 3), relaxedOrdering: c.bit(devCtl, 4),
        extendedTag: c.bit(devCtl, 8), phantomFunctions: c.bit(devCtl, 9),
        auxPower: c.bit(devCtl, 10), noSnoop: c.bit(devCtl, 11),
        maxPayloadBytes: 128 << (devCtl >> 5 & 7), maxReadRequestBytes: 128 << (devCtl >> 12 & 7)),
      deviceStatus: .init(
        raw: devSta, correctableError: c.bit(devSta, 0), nonFatalError: c.bit(devSta, 1),
        fatalError: c.bit(devSta, 2), unsupportedRequest: c.bit(devSta, 3),
        auxPower: c.bit(devSta, 4), transactionsPending: c.bit(devSta, 5)),
      linkCapabilities: .init(
        raw: lnkCap, port: lnkCap >> 24 & 0xFF, maxSpeed: PCINames.linkSpeed(lnkCap & 0xF),
        maxWidth: lnkCap >> 4 & 0x3F,
        aspm: ["not supported", "L0s", "L1", "L0s L1"][lnkCap >> 10 & 3]),
      linkControl: .init(
        raw: lnkCtl, aspm: ["Disabled", "L0s Enabled", "L1 Enabled", "L0s L1 Enabled"][lnkCtl & 3],
        readCompletionBoundaryBytes: c.bit(lnkCtl, 3) ? 128 : 64, disabled: c.bit(lnkCtl, 4),
        commonClock: c.bit(lnkCtl, 6)),
      linkStatus: .init(
        raw: lnkSta, speed: PCINames.linkSpeed(lnkSta & 0xF), width: lnkSta >> 4 & 0x3F))
  }
}

/// Names, as lspci prints them, of what the config space encodes as numbers.
enum PCINames {
  static func vendor(_ id: Int) -> String? { id == 0x8086 ? "Intel Corporation" : nil }

  static func `class`(_ code: Int) -> String {
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
}
