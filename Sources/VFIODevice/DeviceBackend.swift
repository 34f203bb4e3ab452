import SystemPackage
import VFIOUser

/// Where a client can mmap (part of) a region: a descriptor the server passes
/// with SCM_RIGHTS and the file offset of the region's first byte in it
/// (a VFIO device fd and its region offset, or the simulated VF's VRAM memfd).
/// Lent: the backend keeps ownership, and the server sends it without closing it.
public struct MmapSource: Sendable, Equatable {
  public var fd: FileDescriptor
  public var offset: UInt64
  public init(fd: FileDescriptor, offset: UInt64) {
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
  /// The MSI-X table inside this region may be mmapped too
  /// (VFIO_REGION_INFO_CAP_MSIX_MAPPABLE), so a client need not trap its page.
  public var msixMappable: Bool

  public init(
    index: UInt32, size: UInt64, readable: Bool = true, writable: Bool = true,
    mmap: MmapSource? = nil,
    sparseAreas: [SparseMmapArea] = [], type: (type: UInt32, subtype: UInt32)? = nil,
    msixMappable: Bool = false
  ) {
    self.index = index
    self.size = size
    self.readable = readable
    self.writable = writable
    self.mmap = mmap
    self.sparseAreas = sparseAreas
    self.type = type
    self.msixMappable = msixMappable
  }

  public static func == (a: Self, b: Self) -> Bool {
    a.index == b.index && a.size == b.size && a.readable == b.readable && a.writable == b.writable
      && a.mmap == b.mmap && a.sparseAreas == b.sparseAreas && a.type?.type == b.type?.type
      && a.type?.subtype == b.type?.subtype && a.msixMappable == b.msixMappable
  }
}

/// The services the server gives the device: DMA into client memory that the
/// device cannot reach by itself, and work deferred until the current reply
/// has gone out. All calls happen on the connection's thread.
///
/// Interrupts are not among them: a device signals the client's eventfds
/// itself (the simulated VF through `IRQEmulation`, real hardware through the
/// kernel, which holds the eventfds VFIO_DEVICE_SET_IRQS gave it).
public protocol DeviceHost: AnyObject {
  /// Copies client memory at `address` into `buffer`. Completes at once for
  /// fd-backed memory, later (after DMA_READ round trips) otherwise; on
  /// reset, unmap or hang-up it completes with ECANCELED.
  func dmaRead(
    address: UInt64, into buffer: UnsafeMutableRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void)
  /// Copies `buffer` into client memory at `address`; completes like dmaRead.
  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void)
  /// dmaWrite that marks in `log` the pages it writes through the server's
  /// mappings of fd-backed windows, as it writes them (a transfer cut short
  /// logs what landed). Bytes that travel in DMA_WRITE messages are the
  /// client's to track: it wrote them itself. Default: `log` is ignored.
  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer, log: DirtyPageLog?,
    completion: @escaping (Result<Void, Errno>) -> Void)
  /// Runs `work` after the reply to the message being handled is sent.
  func deferWork(_ work: @escaping () -> Void)
  /// The device signalled (or latched, while masked) `vector` of `index`:
  /// counted for the control channel. A device whose interrupts the kernel
  /// delivers never calls it. Default: nothing.
  func interruptSignalled(index: UInt32, vector: UInt32)
}

/// A device behind the server: the simulated Xe VF, or a VF behind the
/// kernel's VFIO. The server engine drives every device through this
/// protocol alone and never knows which one it has.
///
/// Calls come from one thread at a time (the connection's), in the order the
/// client's requests arrive; a backend needs no lock against the server.
///
/// What the server checks before calling, so a backend sees only requests
/// that make sense for the device it described:
/// - region accesses lie inside a readable or writable region of the right size;
/// - a SET_IRQS names an index and vectors the device has, with a well-formed
///   data part (`IRQSetRequest`);
/// - a DMA window is page-aligned, lies inside `dmaLimits.iovaRanges`, does not
///   overlap another, and fits in `dmaLimits.maxWindows`.
public protocol VFIODeviceBackend: AnyObject {
  // MARK: Description (read once per client)

  /// VFIO_DEVICE_FLAGS_* (PCI, RESET).
  var deviceFlags: VFIODeviceFlags { get }
  var regionCount: UInt32 { get }
  var irqCount: UInt32 { get }
  func region(_ index: UInt32) -> RegionDescription?
  func irq(_ index: UInt32) -> IRQDescription?
  /// The DMA the device can honour: page sizes, windows, IOVA ranges. The
  /// VERSION reply offers what both this and the server's limits allow, and
  /// DMA_MAP enforces it. Default: `DMALimits.unrestricted`.
  var dmaLimits: DMALimits { get }

  // MARK: Regions

  /// Reads `buffer.count` bytes at `offset` of region `region`. Throws EINVAL
  /// for a width or alignment the device does not accept.
  func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno)

  /// The `count` bytes at `offset` of `region` (checked by the caller) where
  /// a large REGION_READ reply can be sent straight from, with no copy: plain
  /// memory without side effects on read (VRAM), and only where reading it
  /// there allocates nothing. nil (the default) routes the read through `read`.
  func directRead(region: UInt32, offset: UInt64, count: Int) -> UnsafeRawBufferPointer?

  // MARK: Lifecycle

  /// VFIO_USER_DEVICE_RESET (a function-level reset). A device that migrates
  /// returns to RUNNING and invalidates any stream it opened (later reads and
  /// writes throw ENODEV).
  func reset() throws(Errno)

  /// The client connected (`host` set) or left (`nil`). By the time it is
  /// told `nil`, the server has unmapped every window and disabled every
  /// interrupt index the client set up.
  func attach(host: DeviceHost?)

  // MARK: Interrupts

  /// DEVICE_SET_IRQS, decoded and checked against `irq(_:)`. The request owns
  /// the client's eventfds; the backend takes what it keeps. A kernel backend
  /// forwards it to VFIO_DEVICE_SET_IRQS; a software device applies it with
  /// `IRQEmulation`. Throwing refuses the request with that errno, and the
  /// device's interrupt state must then be as it was before the call.
  ///
  /// When the client leaves, the server disables every index its requests
  /// set up (and it did not disable itself): a TRIGGER request with DATA_NONE
  /// and count 0.
  func setIRQs(_ request: consuming IRQSetRequest) throws(Errno)

  /// Eventfds of the client's that the device holds open (statistics and leak
  /// checks). A backend that hands them to the kernel and lets its own copies
  /// go holds none.
  var eventFDCount: Int { get }

  // MARK: DMA windows

  /// The client mapped `window`. `file` is the client's descriptor for it (nil
  /// when it sent none) and is the backend's from now on: kept (`release()`)
  /// for a backend that maps the file itself, such as an iommufd
  /// IOMMU_IOAS_MAP_FILE, or let go and so closed. The server's own mapping
  /// (`window.mapping`) exists before this call and outlives the window.
  /// Throwing refuses the DMA_MAP: the server removes the window again.
  /// Default: accepts and lets the descriptor go.
  func dmaMap(_ window: DMAWindow, file: consuming OwnedFileDescriptor?) throws(Errno)

  /// The client is unmapping `windows` (one DMA_UNMAP: a range, or all), in
  /// address order. Called before the server releases their memory: the
  /// device must not reach them once this returns. All or nothing: throwing
  /// refuses the whole DMA_UNMAP with that errno, the server removes none of
  /// the windows, and the device must still reach every one (a backend that
  /// tore some down before failing maps them back, or checks before it acts).
  /// When the client has gone (hang-up), a refusal is logged and the memory
  /// released anyway. Default: accepts.
  func dmaUnmap(_ windows: [DMAWindow]) throws(Errno)
}

extension DeviceHost {
  public func interruptSignalled(index: UInt32, vector: UInt32) {}

  public func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer, log: DirtyPageLog?,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    dmaWrite(address: address, from: buffer, completion: completion)
  }
}

extension VFIODeviceBackend {
  public var dmaLimits: DMALimits { .unrestricted }
  public func directRead(region: UInt32, offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
    nil
  }
  public func dmaMap(_ window: DMAWindow, file: consuming OwnedFileDescriptor?) throws(Errno) {}
  public func dmaUnmap(_ windows: [DMAWindow]) throws(Errno) {}
}
