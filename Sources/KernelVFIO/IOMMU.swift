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
func kernelIoctl(_ fd: Int32, _ request: UInt, _ bytes: inout ByteWriter) throws(Errno) -> Int32 {
  try retryingEINTR {
    bytes.bytes.withUnsafeMutableBytes { cvfu_ioctl(fd, request, $0.baseAddress) }
  }
}

/// ioctl with a structure on a device file, retrying EINTR.
@discardableResult
func kernelIoctl(_ file: any VFIODeviceFile, _ request: UInt, _ bytes: inout ByteWriter)
  throws(Errno) -> Int32
{
  try retryingEINTR { bytes.bytes.withUnsafeMutableBytes { file.ioctl(request, $0.baseAddress) } }
}

/// ioctl with a structure whose u64 at `pointerAt` points to `buffer`, which the kernel fills.
func kernelIoctl(
  _ fd: Int32, _ request: UInt, _ bytes: inout ByteWriter, buffer: inout [UInt64],
  pointerAt offset: Int
) throws(Errno) {
  let result: Result<Void, Errno> = buffer.withUnsafeMutableBytes { raw in
    do throws(Errno) {
      try bytes.put(UInt64(UInt(bitPattern: raw.baseAddress)), at: offset)
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

  // Live update: the mappings stay in the IOMMU while another process takes
  // the domain over; only the server's addresses of the memory change.

  /// Why the mappings cannot keep their IOVAs across a change of process
  /// (a live update), or nil when they can.
  var vaddrUpdateRefusal: String? { get }
  /// Forgets the server's address of the mapping at exactly [iova, iova +
  /// size): the IOVA stays mapped to the same pages, and the device's DMA
  /// goes on, until `updateVaddr` names the memory's address again (type1:
  /// VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR).
  func invalidateVaddr(iova: UInt64, size: UInt64) throws(Errno)
  /// Names `vaddr`, this process's address of the same memory, for the
  /// mapping at exactly [iova, iova + size) whose address was invalidated;
  /// the kernel moves the pinned pages' accounting to this process (type1:
  /// VFIO_IOMMU_MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR).
  func updateVaddr(_ vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64) throws(Errno)
  /// What another process needs to take the domain over (its descriptors,
  /// lent), or nil when it cannot be handed over.
  var handover: IOMMUHandover? { get }
}

extension IOMMUDomain {
  public var dirtyTracking: IOMMUDirtyTracking? { nil }
  public var vaddrUpdateRefusal: String? {
    "the IOMMU domain (\(path)) cannot keep its mappings across a change of process"
  }
  public func invalidateVaddr(iova: UInt64, size: UInt64) throws(Errno) { throw .notSupported }
  public func updateVaddr(_ vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64) throws(Errno) {
    throw .notSupported
  }
  public var handover: IOMMUHandover? { nil }
}

/// An IOMMU domain as a live update hands it to the next process: the kernel
/// objects stay, the descriptors travel (SCM_RIGHTS), and the new process
/// adopts them.
public struct IOMMUHandover {
  public enum Kind: UInt8, Sendable {
    /// A type1v2 container: the container's descriptor, then the group's.
    case type1 = 1
  }
  public var kind: Kind
  /// Lent: the domain still owns them.
  public var descriptors: [FileDescriptor]
  /// The IOMMU group's number (type1).
  public var group: Int

  public init(kind: Kind, descriptors: [FileDescriptor], group: Int) {
    self.kind = kind
    self.descriptors = descriptors
    self.group = group
  }
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
      let flags = try kernelCall("VFIO_GROUP_GET_STATUS") { () throws(Errno) in
        var status = try kernelStruct(size: Int(CVFU_GROUP_STATUS_SIZE))
        try kernelIoctl(group, VFIOIoctl.groupGetStatus, &status)
        return try status.reading { r throws(Errno) in try r.u32(at: KernelLayout.flags) }
      }
      guard flags & VFIOKernel.groupViable != 0 else {
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
      try kernelCall("VFIO_GROUP_SET_CONTAINER") { () throws(Errno) in
        var containerFD = ByteWriter(capacity: 4)
        containerFD.append(container)
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

  /// A container and its group that another process opened and set up (a
  /// live update hands them over): owned from here. The group must be
  /// viable and in a container, and the IOMMU's facts are asked again.
  public init(
    adoptingContainer container: consuming OwnedFileDescriptor,
    group: consuming OwnedFileDescriptor, groupNumber number: Int
  ) throws(KernelVFIOError) {
    let groupFD = group.descriptor.rawValue
    let flags = try kernelCall("VFIO_GROUP_GET_STATUS") { () throws(Errno) in
      var status = try kernelStruct(size: Int(CVFU_GROUP_STATUS_SIZE))
      try kernelIoctl(groupFD, VFIOIoctl.groupGetStatus, &status)
      return try status.reading { r throws(Errno) in try r.u32(at: KernelLayout.flags) }
    }
    let wanted = VFIOKernel.groupViable | VFIOKernel.groupContainerSet
    guard flags & wanted == wanted else {
      throw KernelVFIOError(
        .kernel,
        "IOMMU group \(number) as handed over is not viable in a container (flags 0x\(String(flags, radix: 16)))"
      )
    }
    info = try Self.queryInfo(container.descriptor.rawValue)
    self.container = container.release().rawValue
    self.group = group.release().rawValue
    groupNumber = number
  }

  deinit {
    close(group)  // leaves the container; its mappings go with it
    close(container)
  }

  static func queryInfo(_ container: Int32) throws(KernelVFIOError) -> Type1Info {
    var size = Type1Info.fixedSize
    for _ in 0..<4 {
      let request = try kernelCall("VFIO_IOMMU_GET_INFO") { () throws(Errno) in
        var request = try Type1Info.request(argsz: size)
        try kernelIoctl(container, VFIOIoctl.iommuGetInfo, &request)
        return request
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
    var bytes = ByteWriter(capacity: name.utf8.count + 1)
    bytes.append(name.utf8CString.map { UInt8(bitPattern: $0) })
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
    var m = try KernelDMA.map(
      vaddr: UInt64(UInt(bitPattern: vaddr)), iova: iova, size: size, readable: readable,
      writable: writable)
    try kernelIoctl(container, VFIOIoctl.iommuMapDMA, &m)
  }

  public func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64 {
    var u = try KernelDMA.unmap(iova: iova, size: size)
    try kernelIoctl(container, VFIOIoctl.iommuUnmapDMA, &u)
    return try KernelDMA.unmappedSize(u)
  }

  /// Present when VFIO_IOMMU_GET_INFO has the migration capability.
  public var dirtyTracking: IOMMUDirtyTracking? { info.dirtyPageSizes != nil ? self : nil }

  // MARK: Live update (VFIO_UPDATE_VADDR)

  /// Asked of the container each time: an mdev added to it turns it off.
  public var vaddrUpdateRefusal: String? {
    Self.vaddrUpdateRefusal(
      Result { () throws(Errno) in
        try kernelIoctl(
          container, VFIOIoctl.checkExtension, value: VFIOKernel.updateVaddrExtension)
      })
  }

  /// What VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR) answered, as a refusal.
  public static func vaddrUpdateRefusal(_ answer: Result<Int32, Errno>) -> String? {
    switch answer {
    case .success(let value) where value > 0: nil
    case .success:
      "the kernel's type1 IOMMU does not offer VFIO_UPDATE_VADDR for this container (Linux 5.12 and later have it, and turn it off while the container holds a mediated device (mdev), whose IOMMU group is emulated): the DMA windows cannot stay mapped while the server's process is replaced"
    case .failure(let error):
      "VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR) failed (\(error.name)): the DMA windows cannot stay mapped while the server's process is replaced"
    }
  }

  public func invalidateVaddr(iova: UInt64, size: UInt64) throws(Errno) {
    var u = try kernelStruct(size: Int(CVFU_DMA_UNMAP_SIZE), flags: VFIOKernel.dmaUnmapVaddr)
    try u.put(iova, at: Int(CVFU_DMA_UNMAP_IOVA_OFFSET))
    try u.put(size, at: Int(CVFU_DMA_UNMAP_SIZE_OFFSET))
    try kernelIoctl(container, VFIOIoctl.iommuUnmapDMA, &u)
    // A range holding no mapping succeeds with nothing done: not this mapping.
    guard try KernelDMA.unmappedSize(u) == size else { throw .noSuchFileOrDirectory }
  }

  /// The kernel takes no READ or WRITE flag with VADDR: the mapping keeps its protection.
  public func updateVaddr(_ vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64) throws(Errno) {
    var m = try kernelStruct(size: Int(CVFU_DMA_MAP_SIZE), flags: VFIOKernel.dmaMapVaddr)
    try m.put(UInt64(UInt(bitPattern: vaddr)), at: Int(CVFU_DMA_MAP_VADDR_OFFSET))
    try m.put(iova, at: Int(CVFU_DMA_MAP_IOVA_OFFSET))
    try m.put(size, at: Int(CVFU_DMA_MAP_SIZE_OFFSET))
    try kernelIoctl(container, VFIOIoctl.iommuMapDMA, &m)
  }

  public var handover: IOMMUHandover? {
    IOMMUHandover(
      kind: .type1,
      descriptors: [FileDescriptor(rawValue: container), FileDescriptor(rawValue: group)],
      group: groupNumber)
  }
}

extension Type1Container: IOMMUDirtyTracking {
  public var dirtyPageSize: UInt64 {
    let sizes = info.dirtyPageSizes ?? info.pageSizes
    return sizes == 0 ? 4096 : sizes & (~sizes &+ 1)
  }

  public func startDirtyTracking() throws(Errno) { try dirtyPages(VFIOKernel.dirtyPagesStart) }
  public func stopDirtyTracking() throws(Errno) { try dirtyPages(VFIOKernel.dirtyPagesStop) }

  private func dirtyPages(_ flag: UInt32) throws(Errno) {
    var request = try kernelStruct(size: Int(CVFU_DIRTY_BITMAP_SIZE), flags: flag)
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
    // The range after the 8-byte head: dirty_bitmap_get's iova, size and vfio_bitmap, which
    // the unmap's iova, size (@8, @16) and trailing vfio_bitmap (@24) match.
    let head = Int(CVFU_DIRTY_BITMAP_SIZE)
    let bitmap = head + Int(CVFU_DIRTY_BITMAP_GET_BITMAP_OFFSET)
    var request = try kernelStruct(size: head + Int(CVFU_DIRTY_BITMAP_GET_SIZE), flags: flag)
    try request.put(iova, at: head + Int(CVFU_DIRTY_BITMAP_GET_IOVA_OFFSET))
    try request.put(size, at: head + Int(CVFU_DIRTY_BITMAP_GET_SIZE_OFFSET))
    try request.put(page, at: bitmap + Int(CVFU_BITMAP_PGSIZE_OFFSET))
    try request.put(UInt64(words.count * 8), at: bitmap + Int(CVFU_BITMAP_SIZE_OFFSET))
    try kernelIoctl(
      container, ioctl, &request, buffer: &words, pointerAt: bitmap + Int(CVFU_BITMAP_DATA_OFFSET))
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
      try kernelCall("VFIO_DEVICE_BIND_IOMMUFD") { () throws(Errno) in
        var bind = try kernelStruct(size: Int(CVFU_BIND_IOMMUFD_SIZE))
        try bind.put(iommufd, at: Int(CVFU_BIND_IOMMUFD_IOMMUFD_OFFSET))
        try kernelIoctl(device, VFIOIoctl.deviceBindIOMMUFD, &bind)
      }
      let ioas = try kernelCall("IOMMU_IOAS_ALLOC") { () throws(Errno) in
        var alloc = try kernelStruct(size: Int(CVFU_IOAS_ALLOC_SIZE))
        try kernelIoctl(iommufd, IOMMUFDIoctl.ioasAlloc, &alloc)
        return try alloc.reading { r throws(Errno) in
          try r.u32(at: Int(CVFU_IOAS_ALLOC_OUT_IOAS_ID_OFFSET))
        }
      }
      self.ioas = ioas
      try kernelCall("VFIO_DEVICE_ATTACH_IOMMUFD_PT") { () throws(Errno) in
        var attach = try kernelStruct(size: Int(CVFU_ATTACH_IOMMUFD_PT_SIZE))
        try attach.put(ioas, at: Int(CVFU_ATTACH_IOMMUFD_PT_PT_ID_OFFSET))
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
      var request = try kernelStruct(size: Int(CVFU_IOAS_IOVA_RANGES_SIZE))
      try request.put(ioas, at: Int(CVFU_IOAS_IOVA_RANGES_IOAS_ID_OFFSET))
      try request.put(UInt32(count), at: Int(CVFU_IOAS_IOVA_RANGES_NUM_IOVAS_OFFSET))
      let result: Result<Void, Errno>
      do throws(Errno) {
        try kernelIoctl(
          iommufd, IOMMUFDIoctl.ioasIOVARanges, &request, buffer: &table,
          pointerAt: Int(CVFU_IOAS_IOVA_RANGES_ALLOWED_IOVAS_OFFSET))
        result = .success(())
      } catch { result = .failure(error) }
      let (reported, alignment) = try request.reading { r throws(Errno) in
        (
          Int(try r.u32(at: Int(CVFU_IOAS_IOVA_RANGES_NUM_IOVAS_OFFSET))),
          try r.u64(at: Int(CVFU_IOAS_IOVA_RANGES_OUT_IOVA_ALIGNMENT_OFFSET))
        )
      }
      if case .failure(let error) = result {
        guard error == .messageTooLong, reported > count else { throw error }
        count = reported
        continue
      }
      let ranges = (0..<reported).map { table[2 * $0]...table[2 * $0 + 1] }
      return (ranges, max(alignment, 4096))
    }
    throw .messageTooLong
  }

  public var path: String { "iommufd (cdev \(cdev), IOAS \(ioas))" }
  public var mappingsAvailable: UInt32? { nil }

  /// The IOAS pins the client's memory by this process's addresses. Linux
  /// 6.13's IOMMU_IOAS_CHANGE_PROCESS moves an IOAS to another process, but
  /// only for memory mapped by its file (IOMMU_IOAS_MAP_FILE), which this
  /// server does not do yet: refused, whatever the kernel has.
  public var vaddrUpdateRefusal: String? {
    "an iommufd IOAS cannot be handed to a new process yet: IOMMU_IOAS_CHANGE_PROCESS (Linux 6.13) moves only mappings made by file (IOMMU_IOAS_MAP_FILE), and this server maps the client's memory by address"
  }

  public func map(
    vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64, readable: Bool, writable: Bool
  ) throws(Errno) {
    var m = try kernelStruct(
      size: Int(CVFU_IOAS_MAP_SIZE),
      flags: VFIOKernel.ioasMapFixedIOVA | (readable ? VFIOKernel.ioasMapReadable : 0)
        | (writable ? VFIOKernel.ioasMapWriteable : 0))
    try m.put(ioas, at: Int(CVFU_IOAS_MAP_IOAS_ID_OFFSET))
    try m.put(UInt64(UInt(bitPattern: vaddr)), at: Int(CVFU_IOAS_MAP_USER_VA_OFFSET))
    try m.put(size, at: Int(CVFU_IOAS_MAP_LENGTH_OFFSET))
    try m.put(iova, at: Int(CVFU_IOAS_MAP_IOVA_OFFSET))
    try kernelIoctl(iommufd, IOMMUFDIoctl.ioasMap, &m)
  }

  public func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64 {
    var u = ByteWriter(count: Int(CVFU_IOAS_UNMAP_SIZE))
    try u.put(UInt32(u.count), at: KernelLayout.argsz)
    try u.put(ioas, at: Int(CVFU_IOAS_UNMAP_IOAS_ID_OFFSET))
    try u.put(iova, at: Int(CVFU_IOAS_UNMAP_IOVA_OFFSET))
    try u.put(size, at: Int(CVFU_IOAS_UNMAP_LENGTH_OFFSET))
    try kernelIoctl(iommufd, IOMMUFDIoctl.ioasUnmap, &u)
    return try u.reading { r throws(Errno) in try r.u64(at: Int(CVFU_IOAS_UNMAP_LENGTH_OFFSET)) }
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

/// `struct vfio_iommu_type1_dma_map` and `vfio_iommu_type1_dma_unmap`.
enum KernelDMA {
  static func map(vaddr: UInt64, iova: UInt64, size: UInt64, readable: Bool, writable: Bool)
    throws(Errno) -> ByteWriter
  {
    var m = try kernelStruct(
      size: Int(CVFU_DMA_MAP_SIZE),
      flags: (readable ? VFIOKernel.dmaMapRead : 0) | (writable ? VFIOKernel.dmaMapWrite : 0))
    try m.put(vaddr, at: Int(CVFU_DMA_MAP_VADDR_OFFSET))
    try m.put(iova, at: Int(CVFU_DMA_MAP_IOVA_OFFSET))
    try m.put(size, at: Int(CVFU_DMA_MAP_SIZE_OFFSET))
    return m
  }

  static func unmap(iova: UInt64, size: UInt64) throws(Errno) -> ByteWriter {
    var u = try kernelStruct(size: Int(CVFU_DMA_UNMAP_SIZE))
    try u.put(iova, at: Int(CVFU_DMA_UNMAP_IOVA_OFFSET))
    try u.put(size, at: Int(CVFU_DMA_UNMAP_SIZE_OFFSET))
    return u
  }

  /// The bytes the kernel unmapped, which it writes back into `size`.
  static func unmappedSize(_ u: ByteWriter) throws(Errno) -> UInt64 {
    try u.reading { r throws(Errno) in try r.u64(at: Int(CVFU_DMA_UNMAP_SIZE_OFFSET)) }
  }
}
