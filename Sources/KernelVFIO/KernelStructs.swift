import CVFIOUser
import SystemPackage
import VFIOUser

/// A kernel reply that does not parse: a capability chain that leaves the
/// reply, loops or is cut short.
public struct KernelStructError: Error, Equatable, CustomStringConvertible {
  public var description: String
  init(_ description: String) { self.description = description }
}

/// `struct vfio_device_info` (24 bytes).
public struct KernelDeviceInfo: Sendable, Equatable {
  public static let size = Int(CVFU_DEVICE_INFO_SIZE)
  public var flags: VFIODeviceFlags
  public var numRegions: UInt32
  public var numIRQs: UInt32

  public init(flags: VFIODeviceFlags, numRegions: UInt32, numIRQs: UInt32) {
    self.flags = flags
    self.numRegions = numRegions
    self.numIRQs = numIRQs
  }

  public init(parsing raw: [UInt8]) throws(KernelStructError) {
    guard raw.count >= Self.size else { throw KernelStructError("vfio_device_info is short") }
    self = try parseKernel(raw, "vfio_device_info") { b in
      KernelDeviceInfo(
        flags: VFIODeviceFlags(rawValue: try b.u32(at: KernelLayout.flags)),
        numRegions: try b.u32(at: Int(CVFU_DEVICE_INFO_NUM_REGIONS_OFFSET)),
        numIRQs: try b.u32(at: Int(CVFU_DEVICE_INFO_NUM_IRQS_OFFSET)))
    }
  }

  static func request() throws(Errno) -> ByteWriter { try kernelStruct(size: size) }
}

/// `struct vfio_region_info` (32 bytes) with its capability chain decoded.
public struct KernelRegionInfo: Sendable, Equatable {
  public static let fixedSize = Int(CVFU_REGION_INFO_SIZE)
  public var index: UInt32
  /// VFIO_REGION_INFO_FLAG_* (READ, WRITE, MMAP, CAPS).
  public var flags: VFIORegionFlags
  public var size: UInt64
  /// The device fd offset of the region's first byte, for pread, pwrite and mmap.
  public var offset: UInt64
  /// VFIO_REGION_INFO_CAP_SPARSE_MMAP: the only mmap-able areas (nil: no such
  /// capability, so the whole region when MMAP is set; empty: none of it).
  public var sparseAreas: [SparseMmapArea]?
  /// VFIO_REGION_INFO_CAP_TYPE.
  public var type: (type: UInt32, subtype: UInt32)?
  /// VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: the MSI-X table in this BAR may be mmapped too.
  public var msixMappable = false
  /// Capability ids this layer does not know (skipped, as the kernel's consumers do).
  public var unknownCapabilities: [UInt16] = []

  public init(
    index: UInt32, flags: VFIORegionFlags, size: UInt64, offset: UInt64,
    sparseAreas: [SparseMmapArea]? = nil, type: (type: UInt32, subtype: UInt32)? = nil,
    msixMappable: Bool = false
  ) {
    self.index = index
    self.flags = flags
    self.size = size
    self.offset = offset
    self.sparseAreas = sparseAreas
    self.type = type
    self.msixMappable = msixMappable
  }

  public var readable: Bool { flags.contains(.read) }
  public var writable: Bool { flags.contains(.write) }
  public var mmappable: Bool { flags.contains(.mmap) }

  /// The argsz the kernel asked for when the capabilities did not fit (0 when they did).
  static func neededSize(_ raw: [UInt8]) -> Int {
    guard raw.count >= fixedSize else { return 0 }
    return kernelNeededSize(raw)
  }

  static func request(index: UInt32, argsz: Int) throws(Errno) -> ByteWriter {
    var b = try kernelStruct(size: max(argsz, fixedSize))
    try b.put(index, at: Int(CVFU_REGION_INFO_INDEX_OFFSET))
    return b
  }

  /// Decodes a complete reply: the fixed part and, when CAPS is set, every
  /// capability of the chain. Offsets in the chain count from the start of the
  /// structure; each must lie after the fixed part and past the one before it.
  public init(parsing raw: [UInt8]) throws(KernelStructError) {
    guard raw.count >= Self.fixedSize else { throw KernelStructError("vfio_region_info is short") }
    self = try parseKernel(raw, "vfio_region_info") { b in try Self.decode(b) }
  }

  private static func decode(_ b: ByteReader) throws -> KernelRegionInfo {
    var info = KernelRegionInfo(
      index: try b.u32(at: Int(CVFU_REGION_INFO_INDEX_OFFSET)),
      flags: VFIORegionFlags(rawValue: try b.u32(at: KernelLayout.flags)),
      size: try b.u64(at: Int(CVFU_REGION_INFO_SIZE_OFFSET)),
      offset: try b.u64(at: Int(CVFU_REGION_INFO_OFFSET_OFFSET)))
    let (index, size) = (info.index, info.size)
    guard info.flags.contains(.caps) else { return info }
    let argsz = min(Int(try b.u32(at: KernelLayout.argsz)), b.count)
    var next = Int(try b.u32(at: Int(CVFU_REGION_INFO_CAP_OFFSET_OFFSET)))
    var previous = Self.fixedSize - 1
    var seen = 0
    while next != 0 {
      guard next > previous, b.contains(next, KernelLayout.CapHeader.size),
        next + KernelLayout.CapHeader.size <= argsz
      else {
        throw KernelStructError(
          "region \(index): capability at \(next) lies outside the \(argsz)-byte reply or loops")
      }
      seen += 1
      guard seen <= 64 else {
        throw KernelStructError("region \(index): more than 64 capabilities")
      }
      let id = try b.u16(at: next + KernelLayout.CapHeader.id)
      switch id {
      case VFIORegionCapID.sparseMmap:
        let areasAt = next + Int(CVFU_SPARSE_MMAP_AREAS_OFFSET)
        guard areasAt <= argsz else {
          throw KernelStructError("region \(index): sparse mmap capability cut short")
        }
        let count = Int(try b.u32(at: next + Int(CVFU_SPARSE_MMAP_NR_AREAS_OFFSET)))
        let areaSize = Int(CVFU_SPARSE_MMAP_AREA_SIZE)
        guard count <= 4096, areasAt + areaSize * count <= argsz else {
          throw KernelStructError("region \(index): sparse mmap capability claims \(count) areas")
        }
        var areas: [SparseMmapArea] = []
        for i in 0..<count {
          let at = areasAt + areaSize * i
          let area = SparseMmapArea(
            offset: try b.u64(at: at + Int(CVFU_SPARSE_MMAP_AREA_OFFSET_OFFSET)),
            size: try b.u64(at: at + Int(CVFU_SPARSE_MMAP_AREA_SIZE_OFFSET)))
          guard area.offset <= size, area.size <= size - area.offset else {
            throw KernelStructError(
              "region \(index): sparse mmap area [0x\(String(area.offset, radix: 16)) +0x\(String(area.size, radix: 16))] exceeds the region"
            )
          }
          areas.append(area)
        }
        info.sparseAreas = (info.sparseAreas ?? []) + areas
      case VFIORegionCapID.type:
        guard next + Int(CVFU_CAP_TYPE_SIZE) <= argsz else {
          throw KernelStructError("region \(index): type capability cut short")
        }
        info.type = (
          try b.u32(at: next + Int(CVFU_CAP_TYPE_TYPE_OFFSET)),
          try b.u32(at: next + Int(CVFU_CAP_TYPE_SUBTYPE_OFFSET))
        )
      case VFIORegionCapID.msixMappable:
        info.msixMappable = true
      default:
        info.unknownCapabilities.append(id)
      }
      previous = next
      next = Int(try b.u32(at: next + KernelLayout.CapHeader.next))
    }
    return info
  }

  public static func == (a: Self, b: Self) -> Bool {
    a.index == b.index && a.flags == b.flags && a.size == b.size && a.offset == b.offset
      && a.sparseAreas == b.sparseAreas && a.type?.type == b.type?.type
      && a.type?.subtype == b.type?.subtype && a.msixMappable == b.msixMappable
      && a.unknownCapabilities == b.unknownCapabilities
  }
}

/// `struct vfio_irq_info` (16 bytes).
public struct KernelIRQInfo: Sendable, Equatable {
  public static let size = Int(CVFU_IRQ_INFO_SIZE)
  public var index: UInt32
  /// VFIO_IRQ_INFO_* (EVENTFD, MASKABLE, AUTOMASKED, NORESIZE).
  public var flags: VFIOIRQInfoFlags
  public var count: UInt32

  public init(index: UInt32, flags: VFIOIRQInfoFlags, count: UInt32) {
    self.index = index
    self.flags = flags
    self.count = count
  }

  public init(parsing raw: [UInt8]) throws(KernelStructError) {
    guard raw.count >= Self.size else { throw KernelStructError("vfio_irq_info is short") }
    self = try parseKernel(raw, "vfio_irq_info") { b in
      KernelIRQInfo(
        index: try b.u32(at: Int(CVFU_IRQ_INFO_INDEX_OFFSET)),
        flags: VFIOIRQInfoFlags(rawValue: try b.u32(at: KernelLayout.flags)),
        count: try b.u32(at: Int(CVFU_IRQ_INFO_COUNT_OFFSET)))
    }
  }

  static func request(index: UInt32) throws(Errno) -> ByteWriter {
    var b = try kernelStruct(size: size)
    try b.put(index, at: Int(CVFU_IRQ_INFO_INDEX_OFFSET))
    return b
  }

  public var noResize: Bool { flags.contains(.noresize) }
}

/// One VFIO_DEVICE_SET_IRQS call: `struct vfio_irq_set` (20 bytes) and its data.
public struct KernelIRQSet: Sendable, Equatable, CustomStringConvertible {
  public var index: UInt32
  public var start: UInt32
  public var count: UInt32
  /// VFIO_IRQ_SET_DATA_* | VFIO_IRQ_SET_ACTION_*.
  public var flags: VFIOIRQSetFlags
  /// One per vector for DATA_EVENTFD (-1 de-assigns), else empty.
  public var fds: [Int32]
  /// One byte per vector for DATA_BOOL, else empty.
  public var bools: [UInt8]

  public init(
    index: UInt32, start: UInt32, count: UInt32, flags: VFIOIRQSetFlags, fds: [Int32] = [],
    bools: [UInt8] = []
  ) {
    self.index = index
    self.start = start
    self.count = count
    self.flags = flags
    self.fds = fds
    self.bools = bools
  }

  /// The whole index off: DATA_NONE | ACTION_TRIGGER with count 0.
  public static func disable(_ index: UInt32) -> KernelIRQSet {
    KernelIRQSet(
      index: index, start: 0, count: 0,
      flags: [.dataNone, .actionTrigger])
  }

  /// Trigger eventfds for vectors `start..<start + fds.count`.
  public static func triggers(_ index: UInt32, start: UInt32, _ fds: [Int32]) -> KernelIRQSet {
    KernelIRQSet(
      index: index, start: start, count: UInt32(fds.count),
      flags: [.dataEventfd, .actionTrigger], fds: fds)
  }

  /// `struct vfio_irq_set` followed by its data (eventfds as s32, or bools).
  func encoded() throws(Errno) -> ByteWriter {
    let data = Int(CVFU_IRQ_SET_DATA_OFFSET)
    var b = try kernelStruct(size: data + 4 * fds.count + bools.count, flags: flags.rawValue)
    try b.put(index, at: Int(CVFU_IRQ_SET_INDEX_OFFSET))
    try b.put(start, at: Int(CVFU_IRQ_SET_START_OFFSET))
    try b.put(count, at: Int(CVFU_IRQ_SET_COUNT_OFFSET))
    for (i, fd) in fds.enumerated() { try b.put(fd, at: data + 4 * i) }
    try b.put(bools, at: data + 4 * fds.count)
    return b
  }

  public var description: String {
    let action =
      switch flags.action {
      case .actionMask: "MASK"
      case .actionUnmask: "UNMASK"
      default: "TRIGGER"
      }
    let data =
      switch flags.dataType {
      case .dataEventfd: " eventfds \(fds)"
      case .dataBool: " bools \(bools)"
      default: ""
      }
    return "\(VFIOPCIIRQ.name(index)) \(action) [\(start), +\(count))\(data)"
  }
}

/// What VFIO_IOMMU_GET_INFO reports for a type1 container.
public struct Type1Info: Sendable, Equatable {
  public static let fixedSize = Int(CVFU_IOMMU_INFO_SIZE)
  /// Supported IOMMU page sizes (a bitmap).
  public var pageSizes: UInt64
  /// VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: where mappings may go (inclusive ends); nil if absent.
  public var iovaRanges: [ClosedRange<UInt64>]?
  /// VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: how many more mappings the container accepts.
  public var dmaAvailable: UInt32?
  /// VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: the page sizes its dirty bitmaps
  /// may use (the container tracks dirty pages); nil if absent.
  public var dirtyPageSizes: UInt64?

  public init(
    pageSizes: UInt64, iovaRanges: [ClosedRange<UInt64>]? = nil, dmaAvailable: UInt32? = nil
  ) {
    self.pageSizes = pageSizes
    self.iovaRanges = iovaRanges
    self.dmaAvailable = dmaAvailable
  }

  static func request(argsz: Int) throws(Errno) -> ByteWriter {
    try kernelStruct(size: max(argsz, fixedSize))
  }

  static func neededSize(_ raw: [UInt8]) -> Int { kernelNeededSize(raw) }

  public init(parsing raw: [UInt8]) throws(KernelStructError) {
    guard raw.count >= Self.fixedSize else {
      throw KernelStructError("vfio_iommu_type1_info is short")
    }
    self = try parseKernel(raw, "vfio_iommu_type1_info") { b in try Self.decode(b) }
  }

  private static func decode(_ b: ByteReader) throws -> Type1Info {
    let flags = try b.u32(at: KernelLayout.flags)
    var info = Type1Info(
      pageSizes: flags & VFIOKernel.iommuInfoPageSizes != 0
        ? try b.u64(at: Int(CVFU_IOMMU_INFO_PGSIZES_OFFSET)) : 0)
    guard flags & VFIOKernel.iommuInfoCaps != 0 else { return info }
    let argsz = min(Int(try b.u32(at: KernelLayout.argsz)), b.count)
    var next = Int(try b.u32(at: Int(CVFU_IOMMU_INFO_CAP_OFFSET_OFFSET)))
    var previous = Self.fixedSize - 1
    var seen = 0
    while next != 0 {
      guard next > previous, b.contains(next, KernelLayout.CapHeader.size),
        next + KernelLayout.CapHeader.size <= argsz, seen < 64
      else {
        throw KernelStructError("IOMMU info capability at \(next) lies outside the reply or loops")
      }
      seen += 1
      switch try b.u16(at: next + KernelLayout.CapHeader.id) {
      case VFIOKernel.iommuCapIOVARange:
        let rangesAt = next + Int(CVFU_IOVA_RANGE_CAP_RANGES_OFFSET)
        guard rangesAt <= argsz else { throw KernelStructError("IOVA range capability cut short") }
        let count = Int(try b.u32(at: next + Int(CVFU_IOVA_RANGE_CAP_NR_IOVAS_OFFSET)))
        let rangeSize = Int(CVFU_IOVA_RANGE_SIZE)
        guard count <= 4096, rangesAt + rangeSize * count <= argsz else {
          throw KernelStructError("IOVA range capability claims \(count) ranges")
        }
        var ranges: [ClosedRange<UInt64>] = []
        for i in 0..<count {
          let at = rangesAt + rangeSize * i
          let start = try b.u64(at: at + Int(CVFU_IOVA_RANGE_START_OFFSET))
          let end = try b.u64(at: at + Int(CVFU_IOVA_RANGE_END_OFFSET))
          guard start <= end else {
            throw KernelStructError("IOVA range \(i) ends before it starts")
          }
          ranges.append(start...end)
        }
        info.iovaRanges = ranges
      case VFIOKernel.iommuCapDMAAvail:
        guard next + Int(CVFU_DMA_AVAIL_CAP_SIZE) <= argsz else {
          throw KernelStructError("DMA avail capability cut short")
        }
        info.dmaAvailable = try b.u32(at: next + Int(CVFU_DMA_AVAIL_CAP_AVAIL_OFFSET))
      case VFIOKernel.iommuCapMigration:
        guard next + Int(CVFU_MIGRATION_CAP_SIZE) <= argsz else {
          throw KernelStructError("migration capability cut short")
        }
        info.dirtyPageSizes = try b.u64(at: next + Int(CVFU_MIGRATION_CAP_PGSIZE_BITMAP_OFFSET))
      default:
        break  // anything newer: not needed here
      }
      previous = next
      next = Int(try b.u32(at: next + KernelLayout.CapHeader.next))
    }
    return info
  }
}

/// The argsz a kernel reply asks for when what it has to say did not fit (0 when it did).
func kernelNeededSize(_ raw: [UInt8]) -> Int {
  let argsz =
    (try? ByteReader.reading(raw) { b throws(Errno) in try b.u32(at: KernelLayout.argsz) })
    .map(Int.init) ?? 0
  return argsz > raw.count ? argsz : 0
}

extension [ClosedRange<UInt64>] {
  /// Whether `[start, start + size)` lies inside one of the ranges.
  public func covers(start: UInt64, size: UInt64) -> Bool {
    guard size > 0 else { return false }
    let (last, overflow) = start.addingReportingOverflow(size - 1)
    guard !overflow else { return false }
    return contains { $0.contains(start) && $0.contains(last) }
  }

  /// The ranges as `[0x0, 0xfedfffff], [0xfef00000, 0xffffffffffffffff]`.
  public var text: String {
    map { "[0x\(String($0.lowerBound, radix: 16)), 0x\(String($0.upperBound, radix: 16))]" }
      .joined(separator: ", ")
  }
}
