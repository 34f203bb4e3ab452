import SystemPackage
import VFIOUser

/// Where a client can mmap (part of) a region: a descriptor the server passes
/// with SCM_RIGHTS and the file offset of the region's first byte in it. The
/// backend keeps ownership; the server sends it without closing it.
public struct MmapSource: Sendable, Equatable {
  public var fd: Int32
  public var offset: UInt64
  public init(fd: Int32, offset: UInt64) {
    self.fd = fd
    self.offset = offset
  }
}

/// What the server needs to know about one region.
public struct RegionDescription: Sendable, Equatable {
  public var index: UInt32
  public var size: UInt64
  public var readable: Bool
  public var writable: Bool
  /// Set when the client may mmap the region (or the areas below) through this fd.
  public var mmap: MmapSource?
  /// The mmap-able windows; empty with `mmap` set means the whole region.
  public var sparseAreas: [SparseMmapArea]
  /// A device-specific region's VFIO_REGION_INFO_CAP_TYPE.
  public var type: (type: UInt32, subtype: UInt32)?

  public init(
    index: UInt32, size: UInt64, readable: Bool = true, writable: Bool = true,
    mmap: MmapSource? = nil,
    sparseAreas: [SparseMmapArea] = [], type: (type: UInt32, subtype: UInt32)? = nil
  ) {
    self.index = index
    self.size = size
    self.readable = readable
    self.writable = writable
    self.mmap = mmap
    self.sparseAreas = sparseAreas
    self.type = type
  }

  public static func == (a: Self, b: Self) -> Bool {
    a.index == b.index && a.size == b.size && a.readable == b.readable && a.writable == b.writable
      && a.mmap == b.mmap && a.sparseAreas == b.sparseAreas && a.type?.type == b.type?.type
      && a.type?.subtype == b.type?.subtype
  }
}

/// What the server needs to know about one interrupt index.
public struct IRQDescription: Sendable, Equatable {
  public var index: UInt32
  public var count: UInt32
  /// VFIO_IRQ_INFO_* flags.
  public var flags: UInt32
  public init(index: UInt32, count: UInt32, flags: UInt32) {
    self.index = index
    self.count = count
    self.flags = flags
  }
  public var maskable: Bool { flags & VFIOIRQInfoFlags.maskable != 0 }
  public var automasked: Bool { flags & VFIOIRQInfoFlags.automasked != 0 }
}

/// One guest-memory window the client registered with DMA_MAP.
public struct DMARegion: @unchecked Sendable, Equatable {  // the mapping is owned by the DMA table
  public var address: UInt64
  public var size: UInt64
  public var readable: Bool
  public var writable: Bool
  /// The server's mapping of the client's fd, or nil when the client sent none
  /// (then the memory is reached with DMA_READ / DMA_WRITE messages).
  public var mapping: UnsafeMutableRawPointer?
  /// The client's descriptor (owned by the server's DMA table), or -1.
  public var fd: Int32
  public var fileOffset: UInt64

  public init(
    address: UInt64, size: UInt64, readable: Bool, writable: Bool,
    mapping: UnsafeMutableRawPointer?, fd: Int32, fileOffset: UInt64
  ) {
    self.address = address
    self.size = size
    self.readable = readable
    self.writable = writable
    self.mapping = mapping
    self.fd = fd
    self.fileOffset = fileOffset
  }

  public var end: UInt64 { address + size }
}

/// The interrupt state a backend may read when the client changes it: the
/// kernel backend hands these eventfds to VFIO_DEVICE_SET_IRQS.
public struct IRQConfiguration: Sendable, Equatable {
  public var index: UInt32
  /// Trigger eventfd per vector, -1 where none is set.
  public var triggerFDs: [Int32]
  /// INTx only: the eventfd that unmasks when signalled (irqfd resample), or -1.
  public var unmaskFD: Int32
  public var masked: [Bool]

  public init(index: UInt32, triggerFDs: [Int32], unmaskFD: Int32, masked: [Bool]) {
    self.index = index
    self.triggerFDs = triggerFDs
    self.unmaskFD = unmaskFD
    self.masked = masked
  }
}

/// The services the server gives the device: DMA into client memory,
/// interrupts through the client's eventfds, and work deferred until the
/// current reply has gone out. All calls happen on the connection's thread.
public protocol DeviceHost: AnyObject {
  /// Raises vector `vector` of interrupt index `index` (honours masking).
  func triggerInterrupt(index: UInt32, vector: UInt32)
  /// Copies client memory at `address` into `buffer`. Completes at once for
  /// fd-backed memory, later (after DMA_READ round trips) otherwise; on
  /// reset or hang-up it completes with ECANCELED.
  func dmaRead(
    address: UInt64, into buffer: UnsafeMutableRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void)
  /// Copies `buffer` into client memory at `address`; completes like dmaRead.
  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void)
  /// Runs `work` after the reply to the message being handled is sent.
  func deferWork(_ work: @escaping () -> Void)
}

/// A device behind the server: the simulated Xe VF or the kernel VFIO VF.
/// The server validates every request against the descriptions before calling
/// region accessors, so a backend sees only in-bounds, permitted accesses.
public protocol VFIODeviceBackend: AnyObject {
  /// VFIO_DEVICE_FLAGS_* (PCI, RESET).
  var deviceFlags: UInt32 { get }
  var regionCount: UInt32 { get }
  var irqCount: UInt32 { get }
  func region(_ index: UInt32) -> RegionDescription?
  func irq(_ index: UInt32) -> IRQDescription?

  /// Reads `buffer.count` bytes at `offset` of region `region`. Throws EINVAL
  /// for a width or alignment the register file does not accept.
  func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno)

  /// The bytes of `region` when it is plain memory without side effects on
  /// read (VRAM): large REGION_READ replies are then sent straight from it
  /// with no copy. nil (the default) routes every read through `read`.
  func directMemory(region: UInt32) -> UnsafeRawBufferPointer?

  /// VFIO_USER_DEVICE_RESET (a function-level reset).
  func reset() throws(Errno)

  /// The client connected (`host` set) or left (`nil`).
  func attach(host: DeviceHost?)
  /// The client changed an interrupt index; the server's IRQ table already holds the result.
  func irqsChanged(_ configuration: IRQConfiguration) throws(Errno)
  /// A DMA window was added or removed (the kernel backend maps it into its IOMMU).
  func dmaMapped(_ region: DMARegion) throws(Errno)
  func dmaUnmapped(_ region: DMARegion)
}

extension VFIODeviceBackend {
  public func directMemory(region: UInt32) -> UnsafeRawBufferPointer? { nil }
  public func irqsChanged(_ configuration: IRQConfiguration) throws(Errno) {}
  public func dmaMapped(_ region: DMARegion) throws(Errno) {}
  public func dmaUnmapped(_ region: DMARegion) {}
}
