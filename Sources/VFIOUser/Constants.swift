// Values shared with linux/vfio.h, which the vfio-user messages reuse.

// The flag words are option sets of their wire width: free to test and
// combine, and a decoded word keeps every bit it had, unknown ones included
// (`rawValue`), so that a strict decoder can refuse them explicitly.

/// VFIO_DEVICE_FLAGS_*: DEVICE_GET_INFO's `flags` (and `struct vfio_device_info`'s).
public struct VFIODeviceFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt32
  @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
  public static let reset = VFIODeviceFlags(rawValue: 1 << 0)
  public static let pci = VFIODeviceFlags(rawValue: 1 << 1)
  public static let caps = VFIODeviceFlags(rawValue: 1 << 7)
}

public enum VFIOPCIRegion {
  public static let bar0: UInt32 = 0
  public static let bar1: UInt32 = 1
  public static let bar2: UInt32 = 2
  public static let bar3: UInt32 = 3
  public static let bar4: UInt32 = 4
  public static let bar5: UInt32 = 5
  public static let rom: UInt32 = 6
  public static let config: UInt32 = 7
  public static let vga: UInt32 = 8
  /// VFIO_PCI_NUM_REGIONS: a PCI device reports at least this many.
  public static let count: UInt32 = 9

  public static func name(_ index: UInt32) -> String {
    switch index {
    case 0...5: "BAR\(index)"
    case rom: "ROM"
    case config: "config"
    case vga: "VGA"
    default: "region\(index)"
    }
  }
}

/// VFIO_REGION_INFO_FLAG_*: DEVICE_GET_REGION_INFO's `flags`.
public struct VFIORegionFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt32
  @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
  public static let read = VFIORegionFlags(rawValue: 1 << 0)
  public static let write = VFIORegionFlags(rawValue: 1 << 1)
  public static let mmap = VFIORegionFlags(rawValue: 1 << 2)
  public static let caps = VFIORegionFlags(rawValue: 1 << 3)
}

public enum VFIORegionCapID {
  public static let sparseMmap: UInt16 = 1
  public static let type: UInt16 = 2
  public static let msixMappable: UInt16 = 3
}

public enum VFIOPCIIRQ {
  public static let intx: UInt32 = 0
  public static let msi: UInt32 = 1
  public static let msix: UInt32 = 2
  public static let err: UInt32 = 3
  public static let req: UInt32 = 4
  /// VFIO_PCI_NUM_IRQS
  public static let count: UInt32 = 5

  public static func name(_ index: UInt32) -> String {
    switch index {
    case intx: "INTx"
    case msi: "MSI"
    case msix: "MSI-X"
    case err: "ERR"
    case req: "REQ"
    default: "irq\(index)"
    }
  }
}

/// VFIO_IRQ_INFO_*: DEVICE_GET_IRQ_INFO's `flags`.
public struct VFIOIRQInfoFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt32
  @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
  public static let eventfd = VFIOIRQInfoFlags(rawValue: 1 << 0)
  public static let maskable = VFIOIRQInfoFlags(rawValue: 1 << 1)
  public static let automasked = VFIOIRQInfoFlags(rawValue: 1 << 2)
  public static let noresize = VFIOIRQInfoFlags(rawValue: 1 << 3)
}

/// VFIO_IRQ_SET_DATA_* and VFIO_IRQ_SET_ACTION_*: DEVICE_SET_IRQS's `flags`,
/// exactly one of each kind in a valid request.
public struct VFIOIRQSetFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt32
  @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
  public static let dataNone = VFIOIRQSetFlags(rawValue: 1 << 0)
  public static let dataBool = VFIOIRQSetFlags(rawValue: 1 << 1)
  public static let dataEventfd = VFIOIRQSetFlags(rawValue: 1 << 2)
  public static let actionMask = VFIOIRQSetFlags(rawValue: 1 << 3)
  public static let actionUnmask = VFIOIRQSetFlags(rawValue: 1 << 4)
  public static let actionTrigger = VFIOIRQSetFlags(rawValue: 1 << 5)
  public static let dataTypeMask: VFIOIRQSetFlags = [.dataNone, .dataBool, .dataEventfd]
  public static let actionTypeMask: VFIOIRQSetFlags = [.actionMask, .actionUnmask, .actionTrigger]

  /// The data type bits alone (one of them in a valid request).
  @inlinable public var dataType: VFIOIRQSetFlags { intersection(.dataTypeMask) }
  /// The action bits alone (one of them in a valid request).
  @inlinable public var action: VFIOIRQSetFlags { intersection(.actionTypeMask) }
}

/// VFIO_DMA_MAP_FLAG_*: DMA_MAP's `flags`, the access the window allows.
public struct VFIODMAMapFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt32
  @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
  public static let read = VFIODMAMapFlags(rawValue: 1 << 0)
  public static let write = VFIODMAMapFlags(rawValue: 1 << 1)
}

/// VFIO_DMA_UNMAP_FLAG_*: DMA_UNMAP's `flags`.
public struct VFIODMAUnmapFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt32
  @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
  /// VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: part of the retired v1 migration, refused.
  public static let getDirtyBitmap = VFIODMAUnmapFlags(rawValue: 1 << 0)
  public static let all = VFIODMAUnmapFlags(rawValue: 1 << 1)
}

public enum VFIODeviceFeatureFlags {
  public static let mask: UInt32 = 0xFFFF
  public static let get: UInt32 = 1 << 16
  public static let set: UInt32 = 1 << 17
  public static let probe: UInt32 = 1 << 18
}

public enum VFIODeviceFeature {
  public static let migration: UInt32 = 1
  public static let migDeviceState: UInt32 = 2
  public static let dmaLoggingStart: UInt32 = 6
  public static let dmaLoggingStop: UInt32 = 7
  public static let dmaLoggingReport: UInt32 = 8
  public static let migDataSize: UInt32 = 9
}

/// Most writes one REGION_WRITE_MULTI carries, and the most bytes each.
public enum WriteMultiLimits {
  public static let maxWrites = 200
  public static let maxDataPerWrite = 8
}
