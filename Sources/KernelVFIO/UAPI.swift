// The Linux VFIO and iommufd uAPI this layer speaks, as numbers and byte
// layouts (protocol/xe-kernel-facts.md §10). Every structure is built and
// parsed by offset with VFIOUser's byte cursor rather than through the C
// structs: the build host's headers may predate the cdev and iommufd ioctls
// (Debian 12 ships 6.1), and byte-level codecs are what the unit tests feed raw
// kernel replies to. The offsets come from cvfu_kernel.h, checked there.

import CVFIOUser
import SystemPackage
import VFIOUser

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
  /// VFIO_DMA_MAP_FLAG_VADDR: a new vaddr for a mapping whose vaddr was invalidated.
  public static let dmaMapVaddr: UInt32 = 1 << 2
  /// VFIO_DMA_UNMAP_FLAG_VADDR: invalidate the vaddr, keep the IOVA mapped.
  public static let dmaUnmapVaddr: UInt32 = 1 << 2
  /// VFIO_UPDATE_VADDR, the extension (VFIO_CHECK_EXTENSION on a container
  /// with its IOMMU set) that says the container takes the two flags above:
  /// Linux 5.12 and later, and 0 while the container holds an mdev (Linux 6.2
  /// and later; an emulated IOMMU group pins pages by the vaddr).
  public static let updateVaddrExtension: UInt = 10
  /// iommu_ioas_map flags
  public static let ioasMapFixedIOVA: UInt32 = 1 << 0
  public static let ioasMapWriteable: UInt32 = 1 << 1
  public static let ioasMapReadable: UInt32 = 1 << 2
}

/// The layouts of the structures above, from cvfu_kernel.h, where each is
/// checked against linux/vfio.h and linux/iommufd.h by offsetof and sizeof at
/// compile time (on hosts whose headers define it): the codecs in
/// KernelStructs.swift and IOMMU.swift use these numbers, never their own.
enum KernelLayout {
  static let argsz = Int(CVFU_ARGSZ_OFFSET)
  static let flags = Int(CVFU_FLAGS_OFFSET)

  enum CapHeader {
    static let size = Int(CVFU_CAP_HEADER_SIZE)
    static let id = Int(CVFU_CAP_HEADER_ID_OFFSET)
    static let next = Int(CVFU_CAP_HEADER_NEXT_OFFSET)
  }
}

/// A zero-filled kernel structure of `size` bytes with its argsz (or size) and flags set.
func kernelStruct(size: Int, argsz: Int? = nil, flags: UInt32 = 0) throws(Errno) -> ByteWriter {
  var b = ByteWriter(count: size)
  try b.put(UInt32(argsz ?? size), at: KernelLayout.argsz)
  try b.put(flags, at: KernelLayout.flags)
  return b
}

/// Parses a kernel reply with a checked reader: a read past its end is a reply
/// cut short, and the structure's own errors pass through.
func parseKernel<R>(_ raw: [UInt8], _ what: String, _ body: (ByteReader) throws -> R)
  throws(KernelStructError) -> R
{
  do {
    return try raw.withUnsafeBytes { try body(ByteReader($0)) }
  } catch let error as KernelStructError {
    throw error
  } catch {
    throw KernelStructError("\(what) is cut short")
  }
}
