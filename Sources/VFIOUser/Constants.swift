// Values shared with linux/vfio.h, which the vfio-user messages reuse.

public enum VFIODeviceFlags {
  public static let reset: UInt32 = 1 << 0
  public static let pci: UInt32 = 1 << 1
  public static let caps: UInt32 = 1 << 7
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

public enum VFIORegionFlags {
  public static let read: UInt32 = 1 << 0
  public static let write: UInt32 = 1 << 1
  public static let mmap: UInt32 = 1 << 2
  public static let caps: UInt32 = 1 << 3
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

public enum VFIOIRQInfoFlags {
  public static let eventfd: UInt32 = 1 << 0
  public static let maskable: UInt32 = 1 << 1
  public static let automasked: UInt32 = 1 << 2
  public static let noresize: UInt32 = 1 << 3
}

public enum VFIOIRQSetFlags {
  public static let dataNone: UInt32 = 1 << 0
  public static let dataBool: UInt32 = 1 << 1
  public static let dataEventfd: UInt32 = 1 << 2
  public static let actionMask: UInt32 = 1 << 3
  public static let actionUnmask: UInt32 = 1 << 4
  public static let actionTrigger: UInt32 = 1 << 5
  public static let dataTypeMask: UInt32 = dataNone | dataBool | dataEventfd
  public static let actionTypeMask: UInt32 = actionMask | actionUnmask | actionTrigger
}

public enum VFIODMAMapFlags {
  public static let read: UInt32 = 1 << 0
  public static let write: UInt32 = 1 << 1
}

public enum VFIODMAUnmapFlags {
  /// VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: part of the retired v1 migration, refused.
  public static let getDirtyBitmap: UInt32 = 1 << 0
  public static let all: UInt32 = 1 << 1
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
