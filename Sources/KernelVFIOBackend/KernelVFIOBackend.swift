import KernelVFIO
import Logging
import SystemPackage
import VFIOUser
import VFIOUserServer

/// The adapter between the server's device protocol and a kernel VFIO device
/// (`KernelVFIO`). It is the only code that knows both sides, so it is the
/// part that follows changes to `VFIODeviceBackend`; everything about the
/// kernel lives in KernelVFIO.
///
/// Regions are forwarded with pread/pwrite, and every mmap-able area is
/// offered as the device fd at the region's offset, so the client's MMIO goes
/// straight to the device. The client's eventfds go to VFIO_DEVICE_SET_IRQS.
/// Each fd-backed DMA window is mapped into the device's IOMMU at the
/// client's IOVA (the server's mapping of the client's memory as vaddr; the
/// kernel pins the pages, which keeps them alive until the IOMMU unmap even
/// though the server drops its mapping first).
public class KernelVFIOBackend: VFIODeviceBackend {
  public let device: KernelVFIODevice
  var logger: Logger
  var routing: KernelIRQRouting
  /// The kernel's migration, when the driver has it.
  let migration: KernelMigration?
  public let regionDescriptions: [RegionDescription]
  /// The minimum IOMMU page size (the DMA granule offered to clients).
  public let pageSize: UInt64

  /// A migratable device gets the subclass, which the server recognises as `MigrationCapable`.
  public static func make(
    _ device: KernelVFIODevice, logger: Logger, migrationTimeout: Duration = .seconds(10)
  )
    -> KernelVFIOBackend
  {
    device.migrationFlags != nil
      ? MigratableKernelVFIOBackend(device, logger: logger, migrationTimeout: migrationTimeout)
      : KernelVFIOBackend(device, logger: logger)
  }

  init(_ device: KernelVFIODevice, logger: Logger, migration: KernelMigration? = nil) {
    self.device = device
    self.logger = logger
    self.migration = migration
    routing = KernelIRQRouting(device.irqs)
    regionDescriptions = device.regions.map { Self.describe($0, deviceFD: device.fd) }
    let sizes = device.iommu.pageSizes
    pageSize = sizes == 0 ? 4096 : UInt64(1) << UInt64(sizes.trailingZeroBitCount)
    for region in device.regions where region.msixMappable {
      logger.debug(
        "\(VFIOPCIRegion.name(region.index)): the kernel allows mmap over its MSI-X table; the server's region description cannot say so, so clients keep trapping the table page"
      )
    }
  }

  /// The server's view of a kernel region: same size and permissions, the
  /// device fd at the region's offset for the mmap-able areas, the type.
  public static func describe(_ region: KernelRegionInfo, deviceFD: Int32) -> RegionDescription {
    var mmap: MmapSource?
    var areas: [SparseMmapArea] = []
    if region.mmappable, region.size > 0 {
      if let sparse = region.sparseAreas {
        areas = sparse.filter { $0.size > 0 }
        if !areas.isEmpty { mmap = MmapSource(fd: deviceFD, offset: region.offset) }
      } else {
        mmap = MmapSource(fd: deviceFD, offset: region.offset)
      }
    }
    return RegionDescription(
      index: region.index, size: region.size, readable: region.size > 0 && region.readable,
      writable: region.size > 0 && region.writable, mmap: mmap, sparseAreas: areas,
      type: region.type)
  }

  // MARK: Description

  public var deviceFlags: UInt32 {
    device.info.flags & (VFIODeviceFlags.pci | VFIODeviceFlags.reset)
  }
  public var regionCount: UInt32 { UInt32(device.regions.count) }
  public var irqCount: UInt32 { UInt32(device.irqs.count) }

  public func region(_ index: UInt32) -> RegionDescription? {
    Int(index) < regionDescriptions.count ? regionDescriptions[Int(index)] : nil
  }

  public func irq(_ index: UInt32) -> IRQDescription? {
    guard Int(index) < device.irqs.count else { return nil }
    let info = device.irqs[Int(index)]
    return IRQDescription(index: index, count: info.count, flags: info.flags)
  }

  // MARK: Access

  public func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  {
    try device.read(region: region, offset: offset, into: buffer)
  }

  public func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer)
    throws(Errno)
  {
    try device.write(region: region, offset: offset, from: buffer)
  }

  /// VFIO_DEVICE_RESET. The kernel returns a migratable device to RUNNING and
  /// kills its data_fd; the stream here answers ENODEV from now on.
  public func reset() throws(Errno) {
    migration?.deviceReset()
    try device.reset()
  }

  public func attach(host: DeviceHost?) {
    // The hardware DMAs through the IOMMU and raises interrupts through the
    // eventfds itself: nothing of the host is needed.
  }

  // MARK: Interrupts

  public func irqsChanged(_ configuration: IRQConfiguration) throws(Errno) {
    let index = configuration.index
    do throws(Errno) {
      try routing.apply(
        index: index, triggers: configuration.triggerFDs, unmaskFD: configuration.unmaskFD,
        masked: configuration.masked
      ) { (set) throws(Errno) in
        logger.debug("VFIO_DEVICE_SET_IRQS \(set)")
        try device.setIRQs(set)
      }
    } catch {
      logger.warning(
        "VFIO_DEVICE_SET_IRQS for \(VFIOPCIIRQ.name(index)) failed: \(error.name) (\(error))")
      throw error
    }
  }

  // MARK: DMA

  public func dmaMapped(_ region: DMARegion) throws(Errno) {
    let what =
      "DMA_MAP [0x\(String(region.address, radix: 16)), +0x\(String(region.size, radix: 16))]"
    guard let vaddr = region.mapping else {
      logger.warning(
        "\(what) refused (ENOTSUP): it came without a file descriptor, and a device behind VFIO can only reach memory the server can map into its IOMMU. Give the VMM shared, fd-backed guest RAM (memory-backend-memfd,share=on)"
      )
      throw .notSupported
    }
    let ranges = device.iommu.iovaRanges
    guard ranges.covers(start: region.address, size: region.size) else {
      logger.warning(
        "\(what) refused (EINVAL): outside the IOMMU's IOVA ranges \(ranges.text)")
      throw .invalidArgument
    }
    guard region.readable || region.writable else {
      logger.warning("\(what) refused (EINVAL): neither readable nor writable")
      throw .invalidArgument
    }
    do throws(Errno) {
      try device.iommu.map(
        vaddr: vaddr, iova: region.address, size: region.size, readable: region.readable,
        writable: region.writable)
    } catch {
      if error == .noMemory,
        let why = MemlockStatus.current().shortfall(adding: region.size, what: what)
      {
        logger.error("\(why)")
      } else {
        logger.warning("\(what): the IOMMU map failed: \(error.name) (\(error))")
      }
      throw error
    }
  }

  public func dmaUnmapped(_ region: DMARegion) {
    guard region.mapping != nil else { return }  // never mapped into the IOMMU
    do throws(Errno) {
      try device.iommu.unmap(iova: region.address, size: region.size)
    } catch {
      logger.error(
        "IOMMU unmap of [0x\(String(region.address, radix: 16)), +0x\(String(region.size, radix: 16))] failed: \(error.name); the device may still reach that memory"
      )
    }
  }
}

/// A kernel device with VFIO migration (`VFIO_DEVICE_FEATURE_MIGRATION`): the
/// server's walk of the state machine becomes one MIG_DEVICE_STATE SET per arc
/// (`KernelMigration`), and the kernel's data_fd the stream.
public final class MigratableKernelVFIOBackend: KernelVFIOBackend, MigrationCapable {
  init(_ device: KernelVFIODevice, logger: Logger, migrationTimeout: Duration) {
    super.init(
      device, logger: logger,
      migration: KernelMigration(
        driver: device, flags: device.migrationFlags ?? [], timeout: migrationTimeout))
  }

  public var migrationFlags: MigrationFlags { migration!.flags }

  public func migrationStep(from: MigrationState, to: MigrationState) throws(Errno)
    -> MigrationStream?
  {
    try migration!.step(to: to).map(KernelMigrationStream.init)
  }

  public func stopCopySize() throws(Errno) -> UInt64 { try migration!.stopCopySize() }

  public func migrationFailed() {
    logger.error(
      "migration state walk failed; the kernel reports the device in \(migration!.kernelState)")
  }
}

/// The kernel's data_fd as the server's `MigrationStream`.
final class KernelMigrationStream: MigrationStream {
  let file: MigrationDataFile
  init(_ file: MigrationDataFile) { self.file = file }
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    try file.read(into: buffer)
  }
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int { try file.write(bytes) }
}
