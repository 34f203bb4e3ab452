/// One guest-memory window the client registered with DMA_MAP, as the device
/// is told of it.
public struct DMAWindow: @unchecked Sendable, Equatable {  // `mapping` belongs to the server
  public var address: UInt64
  public var size: UInt64
  public var readable: Bool
  public var writable: Bool
  /// Where the window starts in the client's file (DMA_MAP's offset); 0 when
  /// the client sent no file.
  public var fileOffset: UInt64
  /// The server's MAP_SHARED mapping of the window, when the client sent a
  /// file; nil when it sent none (the memory is then reached with DMA_READ /
  /// DMA_WRITE messages, through `DeviceHost`). A kernel type1 backend maps
  /// this address into the IOMMU. It is valid from before `dmaMap` until the
  /// backend's `dmaUnmap` of the window has returned: the server unmaps it
  /// only after that.
  public var mapping: UnsafeMutableRawPointer?

  public init(
    address: UInt64, size: UInt64, readable: Bool, writable: Bool, fileOffset: UInt64 = 0,
    mapping: UnsafeMutableRawPointer? = nil
  ) {
    self.address = address
    self.size = size
    self.readable = readable
    self.writable = writable
    self.fileOffset = fileOffset
    self.mapping = mapping
  }

  /// One past the last byte (a window ends below 2⁶⁴: DMAMapRequest checks it).
  public var end: UInt64 { address + size }
}

/// The DMA a device can honour, which the server offers in VERSION
/// (`pgsizes`, `max_dma_maps`) and enforces on DMA_MAP. A kernel backend
/// takes them from its IOMMU (type1's VFIO_IOMMU_GET_INFO: iova_pgsizes,
/// the IOVA-range and DMA-available capabilities; iommufd's
/// IOMMU_IOAS_IOVA_RANGES).
public struct DMALimits: Sendable, Equatable {
  /// The page sizes the device's DMA translation supports, OR'ed together
  /// (VFIO's `iova_pgsizes`, vfio-user's `pgsizes`). A window's address, size
  /// and file offset are multiples of the smallest.
  public var pageSizes: UInt64
  /// Windows that may be mapped at once.
  public var maxWindows: UInt32
  /// Where windows may lie: a window lies wholly inside one of these ranges
  /// (inclusive bounds, in address order). vfio-user has no capability for
  /// them, so a client learns them only from a DMA_MAP refused with ERANGE.
  public var iovaRanges: [ClosedRange<UInt64>]

  public init(
    pageSizes: UInt64 = 4096, maxWindows: UInt32 = 65535,
    iovaRanges: [ClosedRange<UInt64>] = [0...UInt64.max]
  ) {
    self.pageSizes = pageSizes
    self.maxWindows = maxWindows
    self.iovaRanges = iovaRanges
  }

  /// Nothing beyond the protocol's defaults: 4 KiB pages, 65535 windows, the
  /// whole IOVA space. Right for a device that reaches client memory only
  /// through the server's mappings (the simulated VF).
  public static let unrestricted = DMALimits()

  /// Whether [address, address + size) lies inside one IOVA range.
  public func allows(address: UInt64, size: UInt64) -> Bool {
    guard size > 0 else { return false }
    let (end, overflow) = address.addingReportingOverflow(size - 1)
    guard !overflow else { return false }
    return iovaRanges.contains { $0.contains(address) && $0.contains(end) }
  }
}
