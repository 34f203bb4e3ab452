import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// How the device was reached.
public enum IOMMUPath: String, Sendable {
  /// /dev/vfio/devices/vfioN + /dev/iommu (CONFIG_IOMMUFD, CONFIG_VFIO_DEVICE_CDEV).
  case iommufd
  /// /dev/vfio/vfio + /dev/vfio/N with the type1v2 IOMMU.
  case group
}

/// A PCI function opened through the kernel's VFIO uAPI: its device fd, the
/// IOMMU domain its DMA goes through, and what the kernel reports about its
/// regions, interrupts and migration. Not thread-safe: one owner drives it.
public final class KernelVFIODevice {
  /// The PCI function; nil for an mdev.
  public let address: PCIAddress?
  /// The PCI function's sysfs facts; nil for an mdev.
  public let sysfs: SysfsPCIDevice?
  /// The mdev's sysfs facts; nil for a PCI function.
  public let mdev: SysfsMdevDevice?
  /// The device fd's calls (`POSIXDeviceFile` on a real device).
  public let file: any VFIODeviceFile
  /// The device fd: what a client maps the mmap-able areas through.
  public var fd: Int32 { file.fd }
  public let iommu: IOMMUDomain
  public let iommuPath: IOMMUPath
  public let info: KernelDeviceInfo
  public let regions: [KernelRegionInfo]
  public let irqs: [KernelIRQInfo]
  /// VFIO_DEVICE_FEATURE_MIGRATION, or nil when the driver has no migration (ENOTTY).
  public let migrationFlags: MigrationFlags?
  /// Why there is no migration, when there is none.
  public let migrationAbsence: String?

  /// Opens the device: sysfs checks first (each failure explained), then the
  /// iommufd cdev path where the kernel has it (or the cdev was named), the
  /// group/container path otherwise. An mdev goes through its group.
  public static func open(
    _ selection: DeviceSelection, paths: SystemPaths = .live, allowIOMMUFD: Bool = true
  ) throws(KernelVFIOError) -> KernelVFIODevice {
    guard let address = selection.address else {
      let uuid = selection.mdev ?? ""
      let mdev = try OpenDiagnostics.preflightMdev(uuid, paths: paths)
      let container = try Type1Container(group: mdev.iommuGroup!, device: nil, paths: paths)
      let file = POSIXDeviceFile(adopting: try container.deviceFD(uuid))
      return try KernelVFIODevice(
        sysfs: nil, mdev: mdev, file: file, iommu: container, path: .group)
    }
    let device = try OpenDiagnostics.preflight(address, paths: paths)
    let cdev = selection.cdev ?? device.vfioCdev
    let useIOMMUFD =
      selection.cdev != nil
      || (allowIOMMUFD && cdev != nil && paths.exists("\(paths.dev)/iommu"))
    // The device fd is the file's from here: closed with it when the device cannot be made.
    if useIOMMUFD, let cdev {
      let file = POSIXDeviceFile(
        adopting: try openNode("\(paths.dev)/vfio/devices/\(cdev)", paths: paths))
      let domain = try IOMMUFDDomain(device: file.fd, cdev: cdev, paths: paths)
      return try KernelVFIODevice(sysfs: device, file: file, iommu: domain, path: .iommufd)
    }
    let container = try Type1Container(
      group: device.iommuGroup!, device: device, paths: paths)
    let file = POSIXDeviceFile(adopting: try container.deviceFD("\(device.address)"))
    return try KernelVFIODevice(sysfs: device, file: file, iommu: container, path: .group)
  }

  /// A device already open as `file` (a fake in the tests) behind `iommu`:
  /// asked what it has exactly as a device opened by `open` is.
  public static func adopt(_ file: any VFIODeviceFile, iommu: IOMMUDomain)
    throws(KernelVFIOError) -> KernelVFIODevice
  {
    try KernelVFIODevice(sysfs: nil, file: file, iommu: iommu, path: .group)
  }

  /// A device another process opened, handed over by a live update: its
  /// device fd (`file`, owning it from here) behind the `iommu` handed over
  /// with it, asked again what it has, exactly as a device `open` opened.
  /// `address` or `mdev` name it (the record of the old process); sysfs is
  /// read again for its facts (the driver, the PF), and a device sysfs no
  /// longer shows keeps its name.
  public static func adopt(
    handedOver file: any VFIODeviceFile, iommu: IOMMUDomain, path: IOMMUPath,
    address: PCIAddress?, mdev uuid: String?, paths: SystemPaths = .live
  ) throws(KernelVFIOError) -> KernelVFIODevice {
    let mdev =
      uuid.map { paths.mdevDevice($0) ?? SysfsMdevDevice(uuid: $0) }
    return try KernelVFIODevice(
      sysfs: address.flatMap { paths.pciDevice(at: $0) }, mdev: mdev, file: file, iommu: iommu,
      path: path, address: address)
  }

  private init(
    sysfs device: SysfsPCIDevice?, mdev: SysfsMdevDevice? = nil, file: any VFIODeviceFile,
    iommu: IOMMUDomain, path: IOMMUPath, address named: PCIAddress? = nil
  ) throws(KernelVFIOError) {
    address = device?.address ?? named
    sysfs = device
    self.mdev = mdev
    self.file = file
    self.iommu = iommu
    iommuPath = path
    let name = device.map { "\($0.address)" } ?? "mdev \(mdev?.uuid ?? "?")"
    let request = try kernelCall("VFIO_DEVICE_GET_INFO") { () throws(Errno) in
      var request = try KernelDeviceInfo.request()
      try kernelIoctl(file, VFIOIoctl.deviceGetInfo, &request)
      return request
    }
    do throws(KernelStructError) {
      info = try KernelDeviceInfo(parsing: request.bytes)
    } catch {
      throw KernelVFIOError(.kernel, "VFIO_DEVICE_GET_INFO: \(error)")
    }
    guard info.flags.contains(.pci) else {
      throw KernelVFIOError(
        .kernel,
        "\(name) is not a PCI device to VFIO (flags 0x\(String(info.flags.rawValue, radix: 16)))")
    }
    regions = try (0..<info.numRegions).map { (index) throws(KernelVFIOError) in
      try Self.regionInfo(file, index)
    }
    irqs = try (0..<info.numIRQs).map { (index) throws(KernelVFIOError) in
      var request = ByteWriter()
      do throws(Errno) {
        request = try KernelIRQInfo.request(index: index)
        try kernelIoctl(file, VFIOIoctl.deviceGetIRQInfo, &request)
      } catch {
        // An index the device does not have: vfio-pci reports it with count 0,
        // mdev drivers (mtty) answer EINVAL; QEMU treats both as absent.
        guard error == .invalidArgument else {
          throw KernelVFIOError(
            .kernel, "VFIO_DEVICE_GET_IRQ_INFO(\(index)) failed: \(error.name) (\(error))",
            errno: error)
        }
        return KernelIRQInfo(index: index, flags: [], count: 0)
      }
      do throws(KernelStructError) {
        return try KernelIRQInfo(parsing: request.bytes)
      } catch {
        throw KernelVFIOError(.kernel, "VFIO_DEVICE_GET_IRQ_INFO: \(error)")
      }
    }
    do throws(Errno) {
      let data = try Self.feature(
        file, get: VFIODeviceFeature.migration, size: Int(CVFU_FEATURE_MIGRATION_SIZE))
      migrationFlags = try MigrationFeatureData(decoding: data).flags
      migrationAbsence = nil
    } catch {
      migrationFlags = nil
      let driver = device?.driver ?? mdev?.driver
      migrationAbsence =
        error == .inappropriateIOCTLForDevice
        ? "\(driver ?? "its driver") has no migration support (ENOTTY)"
        : "VFIO_DEVICE_FEATURE MIGRATION failed: \(error.name)"
    }
  }

  /// A region the device does not have (vfio-pci answers EINVAL for VGA
  /// without CONFIG_VFIO_PCI_VGA) is described as empty, as QEMU treats it.
  static func regionInfo(_ file: any VFIODeviceFile, _ index: UInt32) throws(KernelVFIOError)
    -> KernelRegionInfo
  {
    var size = KernelRegionInfo.fixedSize
    for _ in 0..<4 {
      var request = ByteWriter()
      do throws(Errno) {
        request = try KernelRegionInfo.request(index: index, argsz: size)
        try kernelIoctl(file, VFIOIoctl.deviceGetRegionInfo, &request)
      } catch {
        guard error == .invalidArgument else {
          throw KernelVFIOError(
            .kernel, "VFIO_DEVICE_GET_REGION_INFO(\(index)) failed: \(error.name) (\(error))",
            errno: error)
        }
        return KernelRegionInfo(index: index, flags: [], size: 0, offset: 0)
      }
      let needed = KernelRegionInfo.neededSize(request.bytes)
      if needed > size {
        size = needed
        continue
      }
      do throws(KernelStructError) {
        return try KernelRegionInfo(parsing: request.bytes)
      } catch {
        throw KernelVFIOError(.kernel, "VFIO_DEVICE_GET_REGION_INFO: \(error)")
      }
    }
    throw KernelVFIOError(.kernel, "VFIO_DEVICE_GET_REGION_INFO(\(index)) keeps growing")
  }

  // MARK: Regions

  /// pread of region bytes (config space, BARs); the kernel checks bounds and widths.
  public func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  {
    try whole(region: region, offset: offset, count: buffer.count) { done, at in
      file.pread(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: at)
    }
  }

  public func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer)
    throws(Errno)
  {
    try whole(region: region, offset: offset, count: buffer.count) { done, at in
      file.pwrite(from: UnsafeRawBufferPointer(rebasing: buffer[done...]), at: at)
    }
  }

  /// Repeats `call` (a pread or pwrite of the bytes after the first `done`,
  /// at device offset `at`, returning the bytes moved or -errno) until `count` bytes are through.
  @inline(__always)
  private func whole(
    region: UInt32, offset: UInt64, count: Int, _ call: (_ done: Int, _ at: Int64) -> Int
  ) throws(Errno) {
    guard Int(region) < regions.count else { throw .invalidArgument }
    var done = 0
    while done < count {
      let n = call(done, Int64(bitPattern: regions[Int(region)].offset + offset) + Int64(done))
      if n < 0 {
        if n == -Int(EINTR) { continue }
        throw Errno(rawValue: Int32(-n))
      }
      guard n > 0 else { throw .ioError }
      done += n
    }
  }

  // MARK: Interrupts and reset

  public func setIRQs(_ set: KernelIRQSet) throws(Errno) {
    var bytes = try set.encoded()
    try kernelIoctl(file, VFIOIoctl.deviceSetIRQs, &bytes)
  }

  /// VFIO_DEVICE_RESET: a function-level (or the device's best) reset.
  public func reset() throws(Errno) {
    try kernelIoctl(file, VFIOIoctl.deviceReset)
  }

  // MARK: Migration (VFIO_DEVICE_FEATURE)

  static func feature(_ file: any VFIODeviceFile, get feature: UInt32, size: Int) throws(Errno)
    -> [UInt8]
  {
    let data = Int(CVFU_DEVICE_FEATURE_DATA_OFFSET)
    var request = try kernelStruct(size: data + size, flags: feature | VFIODeviceFeatureFlags.get)
    try kernelIoctl(file, VFIOIoctl.deviceFeature, &request)
    return Array(request.bytes[data...])
  }

  /// MIG_DEVICE_STATE SET: the kernel performs the arc; returns the new
  /// data_fd (owned by the caller) or -1. See `KernelMigration`.
  public func setMigrationState(_ state: MigrationState) throws(Errno) -> Int32 {
    let data = Int(CVFU_DEVICE_FEATURE_DATA_OFFSET)
    let stateData = MigDeviceStateData(state: state)
    var request = try kernelStruct(
      size: data + MigDeviceStateData.size,
      flags: VFIODeviceFeature.migDeviceState | VFIODeviceFeatureFlags.set)
    try request.put(stateData.encoded(), at: data)
    try kernelIoctl(file, VFIOIoctl.deviceFeature, &request)
    return try MigDeviceStateData(decoding: Array(request.bytes[data...])).dataFD
  }

  /// MIG_DEVICE_STATE GET.
  public func migrationState() throws(Errno) -> MigrationState {
    let data = try Self.feature(
      file, get: VFIODeviceFeature.migDeviceState, size: MigDeviceStateData.size)
    guard let state = try MigDeviceStateData(decoding: data).state else { throw .ioError }
    return state
  }

  /// MIG_DATA_SIZE GET: the device's estimate of the STOP_COPY bytes.
  public func stopCopySize() throws(Errno) -> UInt64 {
    let data = try Self.feature(
      file, get: VFIODeviceFeature.migDataSize, size: Int(CVFU_FEATURE_MIG_DATA_SIZE_SIZE))
    return try MigDataSizeData(decoding: data).stopCopyLength
  }

  // MARK: Description

  /// One line for the server's start log: what was opened and how.
  public var summary: String {
    let migration =
      migrationFlags.map { flags in
        let names = [
          (MigrationFlags.stopCopy, "STOP_COPY"), (.p2p, "P2P"), (.preCopy, "PRE_COPY"),
        ].filter { flags.contains($0.0) }.map(\.1)
        return "kernel data_fd (\(names.joined(separator: " | ")))"
      } ?? "none: \(migrationAbsence ?? "not supported")"
    return "\(reach); driver migration: \(migration)"
  }

  /// The device and how it is reached: identity, driver and IOMMU path.
  public var reach: String { "\(identity) through \(iommu.path)" }

  /// VFIO's name for it: the PCI address, or the mdev's UUID.
  public var name: String { address.map { "\($0)" } ?? mdev?.uuid ?? "?" }

  /// What the device is: `0000:03:00.1 [8086:e211] driver vfio-pci`, or
  /// `mdev 0b1e… (mtty-1 of mtty) driver vfio_mdev`.
  public var identity: String {
    if let sysfs { return "\(sysfs.address) \(sysfs.ids) driver \(sysfs.driver ?? "?")" }
    let type = [mdev?.type, mdev?.parent].compactMap { $0 }.joined(separator: " of ")
    return
      "mdev \(mdev?.uuid ?? "?")\(type.isEmpty ? "" : " (\(type))") driver \(mdev?.driver ?? "?")"
  }
}
