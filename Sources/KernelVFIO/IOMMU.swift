import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// Repeats `call` (a system call returning -errno on failure) while it is interrupted.
@inline(__always)
private func retryingEINTR(_ call: () -> Int32) throws(Errno) -> Int32 {
  while true {
    let r = call()
    if r >= 0 { return r }
    if -r != EINTR { throw Errno(rawValue: -r) }
  }
}

/// ioctl with a structure, retrying EINTR. Returns the ioctl's value.
@discardableResult
func kernelIoctl(_ fd: Int32, _ request: UInt, _ bytes: inout KernelBytes) throws(Errno) -> Int32 {
  try retryingEINTR {
    bytes.bytes.withUnsafeMutableBytes { cvfu_ioctl(fd, request, $0.baseAddress) }
  }
}

/// ioctl with a structure on a device file, retrying EINTR.
@discardableResult
func kernelIoctl(_ file: any VFIODeviceFile, _ request: UInt, _ bytes: inout KernelBytes)
  throws(Errno) -> Int32
{
  try retryingEINTR { bytes.bytes.withUnsafeMutableBytes { file.ioctl(request, $0.baseAddress) } }
}

/// ioctl with a structure whose u64 at `pointerAt` points to `buffer`, which the kernel fills.
func kernelIoctl(
  _ fd: Int32, _ request: UInt, _ bytes: inout KernelBytes, buffer: inout [UInt64],
  pointerAt offset: Int
) throws(Errno) {
  let result: Result<Void, Errno> = buffer.withUnsafeMutableBytes { raw in
    bytes.put(UInt64(UInt(bitPattern: raw.baseAddress)), at: offset)
    do throws(Errno) {
      try kernelIoctl(fd, request, &bytes)
      return .success(())
    } catch { return .failure(error) }
  }
  try result.get()
}

/// ioctl with an integer argument (or none), retrying EINTR.
@discardableResult
func kernelIoctl(_ fd: Int32, _ request: UInt, value: UInt = 0) throws(Errno) -> Int32 {
  try retryingEINTR { cvfu_ioctl(fd, request, UnsafeMutableRawPointer(bitPattern: value)) }
}

/// ioctl without an argument on a device file, retrying EINTR.
@discardableResult
func kernelIoctl(_ file: any VFIODeviceFile, _ request: UInt) throws(Errno) -> Int32 {
  try retryingEINTR { file.ioctl(request, nil) }
}

func openNode(_ path: String, group: Int? = nil, paths: SystemPaths) throws(KernelVFIOError)
  -> Int32
{
  let fd = open(path, O_RDWR | O_CLOEXEC)
  guard fd >= 0 else {
    throw OpenDiagnostics.openFailed(path, Errno(rawValue: errno), group: group, paths: paths)
  }
  return fd
}

/// The IOMMU address space the device's DMA goes through: a type1v2
/// container (group path) or an iommufd IOAS (cdev path). Maps are by the
/// server's virtual address of the client's memory; the kernel pins the pages.
public protocol IOMMUDomain: AnyObject {
  /// How the device was reached, for logs: "group/container (type1v2, group 3)".
  var path: String { get }
  /// Where mappings may go (inclusive ends).
  var iovaRanges: [ClosedRange<UInt64>] { get }
  /// Supported page sizes (bitmap); the smallest is the mapping granule.
  var pageSizes: UInt64 { get }
  /// Mappings the domain still accepts, when it says.
  var mappingsAvailable: UInt32? { get }
  func map(vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64, readable: Bool, writable: Bool)
    throws(Errno)
  /// Unmaps `[iova, iova + size)`; returns the bytes the kernel unmapped.
  @discardableResult func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64
  /// The domain's dirty-page tracking, when the kernel offers it.
  var dirtyTracking: IOMMUDirtyTracking? { get }
}

extension IOMMUDomain {
  public var dirtyTracking: IOMMUDirtyTracking? { nil }
}

/// A type1 container's dirty-page tracking (VFIO_IOMMU_DIRTY_PAGES): the
/// pages the devices behind it wrote (or, for a device that cannot tell, every
/// pinned page), per mapping, in `pageSize` pages.
public protocol IOMMUDirtyTracking: AnyObject {
  /// The bitmaps' page: the IOMMU's smallest page, which the kernel requires.
  var dirtyPageSize: UInt64 { get }
  func startDirtyTracking() throws(Errno)
  func stopDirtyTracking() throws(Errno)
  /// The dirty pages of [iova, iova + size), which must not cut a mapping,
  /// as little-endian u64 words; reading clears them.
  func dirtyBitmap(iova: UInt64, size: UInt64) throws(Errno) -> [UInt64]
  /// Unmaps [iova, iova + size) and returns its dirty pages in the same call
  /// (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP), so no write between the two is lost.
  func unmapReturningDirty(iova: UInt64, size: UInt64) throws(Errno) -> [UInt64]
}

/// The legacy path: /dev/vfio/vfio (a container with the type1v2 IOMMU) and /dev/vfio/N (the group).
public final class Type1Container: IOMMUDomain {
  let container: Int32
  let group: Int32
  public let groupNumber: Int
  public private(set) var info: Type1Info

  /// Opens the container and the group, checks the group is viable, and sets the IOMMU.
  /// `device` is nil for an mdev, whose emulated group holds only itself.
  init(group number: Int, device: SysfsPCIDevice?, paths: SystemPaths) throws(KernelVFIOError) {
    let containerPath = "\(paths.dev)/vfio/vfio"
    let container = try openNode(containerPath, paths: paths)
    var group: Int32 = -1
    do throws(KernelVFIOError) {
      let version = try kernelCall("VFIO_GET_API_VERSION") { () throws(Errno) in
        try kernelIoctl(container, VFIOIoctl.getAPIVersion)
      }
      guard version == VFIOKernel.apiVersion else {
        throw KernelVFIOError(.kernel, "VFIO API version \(version), expected 0")
      }
      let type1v2 =
        (try? kernelIoctl(container, VFIOIoctl.checkExtension, value: VFIOKernel.type1v2IOMMU)) ?? 0
      guard type1v2 == 1 else {
        throw KernelVFIOError(
          .noType1v2,
          "the VFIO container offers no type1v2 IOMMU: run `modprobe vfio_iommu_type1`, and check that the IOMMU is on (intel_iommu=on or amd_iommu=on)"
        )
      }
      let groupPath = "\(paths.dev)/vfio/\(number)"
      group = try openNode(groupPath, group: number, paths: paths)
      var status = KernelBytes(count: 8)
      status.put(UInt32(8), at: 0)
      try kernelCall("VFIO_GROUP_GET_STATUS") { () throws(Errno) in
        try kernelIoctl(group, VFIOIoctl.groupGetStatus, &status)
      }
      guard status.u32(4) & VFIOKernel.groupViable != 0 else {
        guard let device else {
          throw KernelVFIOError(.groupNotViable, "IOMMU group \(number) is not viable")
        }
        var members = OpenDiagnostics.groupBlockers(
          group: number, except: device.address, paths: paths)
        if members.isEmpty {
          members = paths.groupMembers(number).filter { PCIAddress($0) != device.address }.map {
            ($0, PCIAddress($0).flatMap { paths.pciDevice(at: $0)?.driver })
          }
        }
        throw OpenDiagnostics.groupNotViable(device, group: number, members: members, paths: paths)
      }
      var containerFD = KernelBytes(count: 4)
      containerFD.put(container, at: 0)
      try kernelCall("VFIO_GROUP_SET_CONTAINER") { () throws(Errno) in
        try kernelIoctl(group, VFIOIoctl.groupSetContainer, &containerFD)
      }
      try kernelCall("VFIO_SET_IOMMU(type1v2)") { () throws(Errno) in
        try kernelIoctl(container, VFIOIoctl.setIOMMU, value: VFIOKernel.type1v2IOMMU)
      }
      info = try Self.queryInfo(container)
    } catch {
      if group >= 0 { close(group) }
      close(container)
      throw error
    }
    self.container = container
    self.group = group
    groupNumber = number
  }

  deinit {
    close(group)  // leaves the container; its mappings go with it
    close(container)
  }

  static func queryInfo(_ container: Int32) throws(KernelVFIOError) -> Type1Info {
    var size = Type1Info.fixedSize
    for _ in 0..<4 {
      var request = Type1Info.request(argsz: size)
      try kernelCall("VFIO_IOMMU_GET_INFO") { () throws(Errno) in
        try kernelIoctl(container, VFIOIoctl.iommuGetInfo, &request)
      }
      let needed = Type1Info.neededSize(request.bytes)
      if needed > size {
        size = needed
        continue
      }
      do throws(KernelStructError) {
        return try Type1Info(parsing: request.bytes)
      } catch {
        throw KernelVFIOError(.kernel, "VFIO_IOMMU_GET_INFO: \(error)")
      }
    }
    throw KernelVFIOError(.kernel, "VFIO_IOMMU_GET_INFO keeps growing")
  }

  /// VFIO_GROUP_GET_DEVICE_FD. VFIO names a PCI function by its address and an mdev by its UUID.
  func deviceFD(_ name: String) throws(KernelVFIOError) -> Int32 {
    var bytes = KernelBytes(Array(name.utf8CString).map { UInt8(bitPattern: $0) })
    return try kernelCall("VFIO_GROUP_GET_DEVICE_FD(\(name))") { () throws(Errno) in
      try kernelIoctl(group, VFIOIoctl.groupGetDeviceFD, &bytes)
    }
  }

  public var path: String { "group/container (type1v2 IOMMU, group \(groupNumber))" }
  public var iovaRanges: [ClosedRange<UInt64>] { info.iovaRanges ?? [0...UInt64.max] }
  public var pageSizes: UInt64 { info.pageSizes }

  /// Re-read: the kernel's count shrinks with every mapping.
  public var mappingsAvailable: UInt32? {
    (try? Self.queryInfo(container))?.dmaAvailable ?? info.dmaAvailable
  }

  public func map(
    vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64, readable: Bool, writable: Bool
  ) throws(Errno) {
    var m = KernelBytes(count: 32)
    m.put(UInt32(32), at: 0)
    m.put((readable ? VFIOKernel.dmaMapRead : 0) | (writable ? VFIOKernel.dmaMapWrite : 0), at: 4)
    m.put(UInt64(UInt(bitPattern: vaddr)), at: 8)
    m.put(iova, at: 16)
    m.put(size, at: 24)
    try kernelIoctl(container, VFIOIoctl.iommuMapDMA, &m)
  }

  public func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64 {
    var u = KernelBytes(count: 24)
    u.put(UInt32(24), at: 0)
    u.put(iova, at: 8)
    u.put(size, at: 16)
    try kernelIoctl(container, VFIOIoctl.iommuUnmapDMA, &u)
    return u.u64(16)
  }

  /// Present when VFIO_IOMMU_GET_INFO has the migration capability.
  public var dirtyTracking: IOMMUDirtyTracking? { info.dirtyPageSizes != nil ? self : nil }
}

extension Type1Container: IOMMUDirtyTracking {
  public var dirtyPageSize: UInt64 {
    let sizes = info.dirtyPageSizes ?? info.pageSizes
    return sizes == 0 ? 4096 : sizes & (~sizes &+ 1)
  }

  public func startDirtyTracking() throws(Errno) { try dirtyPages(VFIOKernel.dirtyPagesStart) }
  public func stopDirtyTracking() throws(Errno) { try dirtyPages(VFIOKernel.dirtyPagesStop) }

  private func dirtyPages(_ flag: UInt32) throws(Errno) {
    var request = KernelBytes(count: 8)
    request.put(UInt32(8), at: 0)
    request.put(flag, at: 4)
    try kernelIoctl(container, VFIOIoctl.iommuDirtyPages, &request)
  }

  /// VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP: `vfio_iommu_type1_dirty_bitmap`
  /// with a `vfio_iommu_type1_dirty_bitmap_get` {iova, size, {pgsize, size, data}}.
  public func dirtyBitmap(iova: UInt64, size: UInt64) throws(Errno) -> [UInt64] {
    try bitmapCall(VFIOIoctl.iommuDirtyPages, VFIOKernel.dirtyPagesGetBitmap, iova, size)
  }

  /// VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
  /// `vfio_iommu_type1_dma_unmap` {argsz, flags, iova, size} and a `vfio_bitmap`.
  public func unmapReturningDirty(iova: UInt64, size: UInt64) throws(Errno) -> [UInt64] {
    try bitmapCall(VFIOIoctl.iommuUnmapDMA, VFIOKernel.unmapGetDirtyBitmap, iova, size)
  }

  /// Both calls share a layout: argsz, flags, iova, size, then {pgsize, size, data}.
  private func bitmapCall(_ ioctl: UInt, _ flag: UInt32, _ iova: UInt64, _ size: UInt64)
    throws(Errno) -> [UInt64]
  {
    let page = dirtyPageSize
    var words = [UInt64](repeating: 0, count: Int((size / page + 63) / 64))
    var request = KernelBytes(count: 48)
    request.put(UInt32(48), at: 0)
    request.put(flag, at: 4)
    request.put(iova, at: 8)
    request.put(size, at: 16)
    request.put(page, at: 24)
    request.put(UInt64(words.count * 8), at: 32)
    try kernelIoctl(container, ioctl, &request, buffer: &words, pointerAt: 40)
    return words.map { UInt64(littleEndian: $0) }
  }
}

/// The cdev path: /dev/vfio/devices/vfioN bound to /dev/iommu, attached to an IOAS.
public final class IOMMUFDDomain: IOMMUDomain {
  let iommufd: Int32
  public let ioas: UInt32
  public let cdev: String
  public private(set) var iovaRanges: [ClosedRange<UInt64>] = [0...UInt64.max]
  public private(set) var pageSizes: UInt64 = 4096

  /// Binds `device` (an open cdev) to a new iommufd and attaches it to a fresh IOAS.
  init(device: Int32, cdev: String, paths: SystemPaths) throws(KernelVFIOError) {
    let iommuPath = "\(paths.dev)/iommu"
    let iommufd = try openNode(iommuPath, paths: paths)
    do throws(KernelVFIOError) {
      var bind = KernelBytes(count: 16)
      bind.put(UInt32(16), at: 0)
      bind.put(iommufd, at: 8)
      try kernelCall("VFIO_DEVICE_BIND_IOMMUFD") { () throws(Errno) in
        try kernelIoctl(device, VFIOIoctl.deviceBindIOMMUFD, &bind)
      }
      var alloc = KernelBytes(count: 12)
      alloc.put(UInt32(12), at: 0)
      try kernelCall("IOMMU_IOAS_ALLOC") { () throws(Errno) in
        try kernelIoctl(iommufd, IOMMUFDIoctl.ioasAlloc, &alloc)
      }
      ioas = alloc.u32(8)
      var attach = KernelBytes(count: 12)
      attach.put(UInt32(12), at: 0)
      attach.put(ioas, at: 8)
      try kernelCall("VFIO_DEVICE_ATTACH_IOMMUFD_PT") { () throws(Errno) in
        try kernelIoctl(device, VFIOIoctl.deviceAttachIOMMUFDPT, &attach)
      }
    } catch {
      close(iommufd)
      throw error
    }
    self.iommufd = iommufd
    self.cdev = cdev
    (iovaRanges, pageSizes) = (try? queryRanges()) ?? ([0...UInt64.max], 4096)
  }

  deinit { close(iommufd) }  // the IOAS, its mappings and the binding go with it

  /// IOMMU_IOAS_IOVA_RANGES: asked once with no room to learn the count, then again.
  private func queryRanges() throws(Errno) -> ([ClosedRange<UInt64>], UInt64) {
    var count = 0
    for _ in 0..<4 {
      var table = [UInt64](repeating: 0, count: 2 * max(count, 1))
      var request = KernelBytes(count: 32)
      request.put(UInt32(32), at: 0)
      request.put(ioas, at: 4)
      request.put(UInt32(count), at: 8)
      let result: Result<Void, Errno>
      do throws(Errno) {
        try kernelIoctl(
          iommufd, IOMMUFDIoctl.ioasIOVARanges, &request, buffer: &table, pointerAt: 16)
        result = .success(())
      } catch { result = .failure(error) }
      let reported = Int(request.u32(8))
      if case .failure(let error) = result {
        guard error == .messageTooLong, reported > count else { throw error }
        count = reported
        continue
      }
      let ranges = (0..<reported).map { table[2 * $0]...table[2 * $0 + 1] }
      return (ranges, max(request.u64(24), 4096))
    }
    throw .messageTooLong
  }

  public var path: String { "iommufd (cdev \(cdev), IOAS \(ioas))" }
  public var mappingsAvailable: UInt32? { nil }

  public func map(
    vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64, readable: Bool, writable: Bool
  ) throws(Errno) {
    var m = KernelBytes(count: 40)
    m.put(UInt32(40), at: 0)
    m.put(
      VFIOKernel.ioasMapFixedIOVA | (readable ? VFIOKernel.ioasMapReadable : 0)
        | (writable ? VFIOKernel.ioasMapWriteable : 0), at: 4)
    m.put(ioas, at: 8)
    m.put(UInt64(UInt(bitPattern: vaddr)), at: 16)
    m.put(size, at: 24)
    m.put(iova, at: 32)
    try kernelIoctl(iommufd, IOMMUFDIoctl.ioasMap, &m)
  }

  public func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64 {
    var u = KernelBytes(count: 24)
    u.put(UInt32(24), at: 0)
    u.put(ioas, at: 4)
    u.put(iova, at: 8)
    u.put(size, at: 16)
    try kernelIoctl(iommufd, IOMMUFDIoctl.ioasUnmap, &u)
    return u.u64(16)
  }
}

/// Runs a system call step of the open flow, naming it in the error.
@discardableResult
func kernelCall<T>(_ what: String, _ body: () throws(Errno) -> T) throws(KernelVFIOError) -> T {
  do throws(Errno) {
    return try body()
  } catch {
    throw KernelVFIOError(.kernel, "\(what) failed: \(error.name) (\(error))", errno: error)
  }
}
