// The Linux VFIO and iommufd uAPI this layer speaks, as numbers and byte
// layouts (protocol/xe-kernel-facts.md §10). Every structure is built and
// parsed here by offset rather than through <linux/vfio.h>: the build host's
// headers may predate the cdev and iommufd ioctls (Debian 12 ships 6.1), and
// byte-level codecs are what the unit tests feed raw kernel replies to.

/// ioctl numbers: `_IO(';', n)`, so the value is `0x3B00 | n`; no size is encoded.
public enum VFIOIoctl {
  static func io(_ n: UInt) -> UInt { 0x3B00 | n }
  // Container (/dev/vfio/vfio)
  public static let getAPIVersion = io(100)
  public static let checkExtension = io(101)
  public static let setIOMMU = io(102)
  // Group (/dev/vfio/N)
  public static let groupGetStatus = io(103)
  public static let groupSetContainer = io(104)
  public static let groupUnsetContainer = io(105)
  public static let groupGetDeviceFD = io(106)
  // Device
  public static let deviceGetInfo = io(107)
  public static let deviceGetRegionInfo = io(108)
  public static let deviceGetIRQInfo = io(109)
  public static let deviceSetIRQs = io(110)
  public static let deviceReset = io(111)
  public static let deviceFeature = io(117)
  public static let deviceBindIOMMUFD = io(118)
  public static let deviceAttachIOMMUFDPT = io(119)
  // type1 IOMMU, on the container
  public static let iommuGetInfo = io(112)
  public static let iommuMapDMA = io(113)
  public static let iommuUnmapDMA = io(114)
  /// VFIO_IOMMU_DIRTY_PAGES (on the container; the same number as DEVICE_FEATURE on a device).
  public static let iommuDirtyPages = io(117)
}

/// iommufd ioctls on /dev/iommu: `_IO(';', 0x80 + n)`.
public enum IOMMUFDIoctl {
  public static let destroy: UInt = 0x3B80
  public static let ioasAlloc: UInt = 0x3B81
  public static let ioasIOVARanges: UInt = 0x3B84
  public static let ioasMap: UInt = 0x3B85
  public static let ioasUnmap: UInt = 0x3B86
}

public enum VFIOKernel {
  /// VFIO_API_VERSION
  public static let apiVersion: Int32 = 0
  /// VFIO_TYPE1v2_IOMMU
  public static let type1v2IOMMU: UInt = 3
  /// VFIO_GROUP_FLAGS_VIABLE / CONTAINER_SET
  public static let groupViable: UInt32 = 1 << 0
  public static let groupContainerSet: UInt32 = 1 << 1
  /// vfio_iommu_type1_info flags
  public static let iommuInfoPageSizes: UInt32 = 1 << 0
  public static let iommuInfoCaps: UInt32 = 1 << 1
  /// type1 info capability ids
  public static let iommuCapIOVARange: UInt16 = 1
  public static let iommuCapMigration: UInt16 = 2
  public static let iommuCapDMAAvail: UInt16 = 3
  public static let dirtyPagesStart: UInt32 = 1 << 0
  public static let dirtyPagesStop: UInt32 = 1 << 1
  public static let dirtyPagesGetBitmap: UInt32 = 1 << 2
  /// VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP.
  public static let unmapGetDirtyBitmap: UInt32 = 1 << 0
  /// vfio_iommu_type1_dma_map flags
  public static let dmaMapRead: UInt32 = 1 << 0
  public static let dmaMapWrite: UInt32 = 1 << 1
  /// iommu_ioas_map flags
  public static let ioasMapFixedIOVA: UInt32 = 1 << 0
  public static let ioasMapWriteable: UInt32 = 1 << 1
  public static let ioasMapReadable: UInt32 = 1 << 2
}

/// Little-endian field access on a byte array holding one kernel structure.
struct KernelBytes {
  var bytes: [UInt8]

  init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }
  init(_ bytes: [UInt8]) { self.bytes = bytes }

  var count: Int { bytes.count }

  func u16(_ at: Int) -> UInt16 { load(at, UInt16.self) }
  func u32(_ at: Int) -> UInt32 { load(at, UInt32.self) }
  func u64(_ at: Int) -> UInt64 { load(at, UInt64.self) }
  func s32(_ at: Int) -> Int32 { Int32(bitPattern: u32(at)) }

  mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    bytes.withUnsafeMutableBytes {
      $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }
  }

  private func load<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
    bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: T.self)) }
  }

  /// Whether `[at, at + length)` lies inside the bytes.
  func contains(_ at: Int, _ length: Int) -> Bool {
    at >= 0 && length >= 0 && at <= bytes.count && length <= bytes.count - at
  }
}
