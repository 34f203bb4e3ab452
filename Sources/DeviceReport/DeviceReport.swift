import VFIOUser

/// What `info` reports: a vfio-user device as a client sees it. The PCI part is
/// decoded from the config space read through the socket (`decodePCI`); only the
/// names of classes and capabilities come from tables (`PCINames`). Encoded as
/// JSON with numbers as numbers and flags as booleans; `raw` fields keep the
/// register values.
public struct DeviceReport: Codable, Equatable, Sendable {
  public struct ProtocolVersion: Codable, Equatable, Sendable {
    public var major: Int
    public var minor: Int

    public init(major: Int, minor: Int) {
      self.major = major
      self.minor = minor
    }
  }
  public struct CommandRegister: Codable, Equatable, Sendable {
    public var raw: Int
    public var io: Bool
    public var memory: Bool
    public var busMaster: Bool
    public var intxDisable: Bool
  }
  public struct StatusRegister: Codable, Equatable, Sendable {
    public var raw: Int
    public var capabilitiesList: Bool
    public var interruptPending: Bool
  }
  public struct BAR: Codable, Equatable, Sendable {
    public var index: Int
    /// "memory" or "io".
    public var kind: String
    public var is64Bit: Bool
    public var prefetchable: Bool
    /// The address software programmed; 0 is unassigned.
    public var address: UInt64
    /// From DEVICE_GET_REGION_INFO, the way the kernel reports a BAR's size.
    public var size: UInt64
    /// Memory (or I/O) decoding is on in the command register.
    public var enabled: Bool
  }
  public struct Capability: Codable, Equatable, Sendable {
    public var offset: Int
    public var id: Int
    public var name: String
    public var express: Express?
    public var msix: MSIX?
    public var msi: MSI?
    public var powerManagement: PowerManagement?
  }
  public struct Express: Codable, Equatable, Sendable {
    public struct DeviceCapabilities: Codable, Equatable, Sendable {
      public var raw: Int
      public var maxPayloadBytes: Int
      public var phantomFunctions: Int
      public var extendedTag: Bool
      public var roleBasedErrorReporting: Bool
      public var functionLevelReset: Bool
    }
    public struct DeviceControl: Codable, Equatable, Sendable {
      public var raw: Int
      public var correctableErrorReporting: Bool
      public var nonFatalErrorReporting: Bool
      public var fatalErrorReporting: Bool
      public var unsupportedRequestReporting: Bool
      public var relaxedOrdering: Bool
      public var extendedTag: Bool
      public var phantomFunctions: Bool
      public var auxPower: Bool
      public var noSnoop: Bool
      public var maxPayloadBytes: Int
      public var maxReadRequestBytes: Int
    }
    public struct DeviceStatus: Codable, Equatable, Sendable {
      public var raw: Int
      public var correctableError: Bool
      public var nonFatalError: Bool
      public var fatalError: Bool
      public var unsupportedRequest: Bool
      public var auxPower: Bool
      public var transactionsPending: Bool
    }
    public struct LinkCapabilities: Codable, Equatable, Sendable {
      public var raw: Int
      public var port: Int
      /// "2.5GT/s" ... "64GT/s", or "unknown" (0, as VFs report).
      public var maxSpeed: String
      public var maxWidth: Int
      public var aspm: String
    }
    public struct LinkControl: Codable, Equatable, Sendable {
      public var raw: Int
      public var aspm: String
      public var readCompletionBoundaryBytes: Int
      public var disabled: Bool
      public var commonClock: Bool
    }
    public struct LinkStatus: Codable, Equatable, Sendable {
      public var raw: Int
      public var speed: String
      public var width: Int
    }
    public var version: Int
    public var deviceType: Int
    public var deviceTypeName: String
    public var interruptMessageNumber: Int
    public var deviceCapabilities: DeviceCapabilities
    public var deviceControl: DeviceControl
    public var deviceStatus: DeviceStatus
    public var linkCapabilities: LinkCapabilities
    public var linkControl: LinkControl
    public var linkStatus: LinkStatus
  }
  public struct MSIX: Codable, Equatable, Sendable {
    public struct Location: Codable, Equatable, Sendable {
      public var bar: Int
      public var offset: Int
    }
    public var enabled: Bool
    public var functionMasked: Bool
    public var tableSize: Int
    public var table: Location
    public var pba: Location
  }
  public struct MSI: Codable, Equatable, Sendable {
    public var enabled: Bool
    public var vectorsCapable: Int
    public var vectorsEnabled: Int
    public var is64Bit: Bool
    public var perVectorMasking: Bool
  }
  public struct PowerManagement: Codable, Equatable, Sendable {
    public var version: Int
  }
  public struct ExtendedCapability: Codable, Equatable, Sendable {
    public var offset: Int
    public var id: Int
    public var version: Int
    public var name: String
  }
  public struct DeviceFlags: Codable, Equatable, Sendable {
    public var raw: Int
    public var pci: Bool
    public var reset: Bool
  }
  public struct Region: Codable, Equatable, Sendable {
    public struct Flags: Codable, Equatable, Sendable {
      public var raw: Int
      public var read: Bool
      public var write: Bool
      public var mmap: Bool
      public var msixMappable: Bool
    }
    public struct Area: Codable, Equatable, Sendable {
      public var offset: UInt64
      public var size: UInt64

      public init(offset: UInt64, size: UInt64) {
        self.offset = offset
        self.size = size
      }
    }
    public struct RegionType: Codable, Equatable, Sendable {
      public var type: Int
      public var subtype: Int

      public init(type: Int, subtype: Int) {
        self.type = type
        self.subtype = subtype
      }
    }
    public var index: Int
    public var name: String
    public var size: UInt64
    public var flags: Flags
    public var mmapAreas: [Area]
    public var type: RegionType?

    public init(
      index: Int, name: String, size: UInt64, flags: Flags, mmapAreas: [Area], type: RegionType?
    ) {
      self.index = index
      self.name = name
      self.size = size
      self.flags = flags
      self.mmapAreas = mmapAreas
      self.type = type
    }
  }
  public struct IRQ: Codable, Equatable, Sendable {
    public struct Flags: Codable, Equatable, Sendable {
      public var raw: Int
      public var eventfd: Bool
      public var maskable: Bool
      public var automasked: Bool
      public var noresize: Bool
    }
    public var index: Int
    public var name: String
    public var count: Int
    public var flags: Flags

    public init(index: Int, name: String, count: Int, flags: Flags) {
      self.index = index
      self.name = name
      self.count = count
      self.flags = flags
    }
  }
  public struct Migration: Codable, Equatable, Sendable {
    public struct Flags: Codable, Equatable, Sendable {
      public var raw: UInt64
      public var stopCopy: Bool
      public var p2p: Bool
      public var preCopy: Bool
    }
    public var supported: Bool
    public var flags: Flags?
    /// MIG_DEVICE_STATE, e.g. "RUNNING".
    public var state: String?
    /// Why the device does not migrate, e.g. "ENOTTY".
    public var error: String?

    public init(
      supported: Bool, flags: Flags? = nil, state: String? = nil, error: String? = nil
    ) {
      self.supported = supported
      self.flags = flags
      self.state = state
      self.error = error
    }
  }
  /// DMA logging (DEVICE_FEATURE DMA_LOGGING_*, probed): how the device
  /// knows its pages is in the server's log, which the protocol cannot carry.
  public struct DMALogging: Codable, Equatable, Sendable {
    public var supported: Bool
    /// Why not, e.g. "ENOTTY".
    public var error: String?

    public init(supported: Bool, error: String? = nil) {
      self.supported = supported
      self.error = error
    }
  }
  /// What the server advertised in VERSION (the spec's defaults for absent keys).
  public struct ServerLimits: Codable, Equatable, Sendable {
    public var maxDataXferSize: Int
    public var maxDMAMaps: Int
    public var maxMsgFDs: Int
    public var pgsizes: UInt64
    public var writeMultiple: Bool

    public init(
      maxDataXferSize: Int, maxDMAMaps: Int, maxMsgFDs: Int, pgsizes: UInt64, writeMultiple: Bool
    ) {
      self.maxDataXferSize = maxDataXferSize
      self.maxDMAMaps = maxDMAMaps
      self.maxMsgFDs = maxMsgFDs
      self.pgsizes = pgsizes
      self.writeMultiple = writeMultiple
    }
  }

  public var socket: String
  public var protocolVersion: ProtocolVersion
  public var vendorID: Int
  public var deviceID: Int
  public var vendorName: String?
  public var subsystemVendorID: Int
  public var subsystemID: Int
  public var revision: Int
  public var classCode: Int
  public var className: String
  public var headerType: Int
  public var command: CommandRegister
  public var status: StatusRegister
  /// 0: none; 1-4: INTA-INTD.
  public var interruptPin: Int
  public var bars: [BAR]
  public var capabilities: [Capability]
  public var extendedCapabilities: [ExtendedCapability]
  public var deviceFlags: DeviceFlags
  public var regions: [Region]
  public var irqs: [IRQ]
  public var migration: Migration
  public var dmaLogging: DMALogging
  public var server: ServerLimits
  /// A kernel device's address and migration path, from its server's record;
  /// nil for the simulated VF or a server on another host.
  public var kernelDevice: KernelDevice?

  public struct KernelDevice: Codable, Equatable, Sendable {
    public var address: String
    public var pid: Int
    /// vfio, pf-debugfs or none.
    public var migrationPath: String
    /// The server's line about it, with the reason when none.
    public var migrationDetail: String
    /// The device, its driver and the IOMMU path the server uses.
    public var opened: String?

    /// From a server's record: `migration` is its line about the migration
    /// path, which starts with the path's name ("none: <reason>").
    public init(address: String, pid: Int, migration: String, opened: String?) {
      self.address = address
      self.pid = pid
      migrationPath = String(migration.prefix { $0 != ":" })
      migrationDetail = migration
      self.opened = opened
    }
  }

  public init(
    socket: String, protocolVersion: ProtocolVersion, vendorID: Int, deviceID: Int,
    vendorName: String?, subsystemVendorID: Int, subsystemID: Int, revision: Int, classCode: Int,
    className: String, headerType: Int, command: CommandRegister, status: StatusRegister,
    interruptPin: Int, bars: [BAR], capabilities: [Capability],
    extendedCapabilities: [ExtendedCapability], deviceFlags: DeviceFlags, regions: [Region],
    irqs: [IRQ], migration: Migration, dmaLogging: DMALogging, server: ServerLimits,
    kernelDevice: KernelDevice?
  ) {
    self.socket = socket
    self.protocolVersion = protocolVersion
    self.vendorID = vendorID
    self.deviceID = deviceID
    self.vendorName = vendorName
    self.subsystemVendorID = subsystemVendorID
    self.subsystemID = subsystemID
    self.revision = revision
    self.classCode = classCode
    self.className = className
    self.headerType = headerType
    self.command = command
    self.status = status
    self.interruptPin = interruptPin
    self.bars = bars
    self.capabilities = capabilities
    self.extendedCapabilities = extendedCapabilities
    self.deviceFlags = deviceFlags
    self.regions = regions
    self.irqs = irqs
    self.migration = migration
    self.dmaLogging = dmaLogging
    self.server = server
    self.kernelDevice = kernelDevice
  }
}

// Each flags word as the report spells it: its raw value and a Bool for each known bit.

extension DeviceReport.DeviceFlags {
  public init(_ flags: VFIODeviceFlags) {
    self.init(raw: Int(flags.rawValue), pci: flags.contains(.pci), reset: flags.contains(.reset))
  }
}

extension DeviceReport.Region.Flags {
  public init(_ flags: VFIORegionFlags, msixMappable: Bool) {
    self.init(
      raw: Int(flags.rawValue), read: flags.contains(.read), write: flags.contains(.write),
      mmap: flags.contains(.mmap), msixMappable: msixMappable)
  }
}

extension DeviceReport.IRQ.Flags {
  public init(_ flags: VFIOIRQInfoFlags) {
    self.init(
      raw: Int(flags.rawValue), eventfd: flags.contains(.eventfd),
      maskable: flags.contains(.maskable), automasked: flags.contains(.automasked),
      noresize: flags.contains(.noresize))
  }
}

extension DeviceReport.Migration.Flags {
  public init(_ flags: MigrationFlags) {
    self.init(
      raw: flags.rawValue, stopCopy: flags.contains(.stopCopy), p2p: flags.contains(.p2p),
      preCopy: flags.contains(.preCopy))
  }
}
