import KernelVFIO
import Logging
import SystemPackage
import VFIODevice
import VFIOUser
import XeStream

/// The adapter between the device interface (`VFIODevice`) and a kernel VFIO
/// device (`KernelVFIO`). It is the only code that knows both sides, so it is
/// the part that follows changes to `VFIODeviceBackend`; everything about the
/// kernel lives in KernelVFIO, and nothing here knows the server engine.
///
/// Regions are forwarded with pread/pwrite, and every mmap-able area is
/// offered as the device fd at the region's offset, so the client's MMIO goes
/// straight to the device. Each SET_IRQS is forwarded as it came to
/// VFIO_DEVICE_SET_IRQS, the client's eventfds with it (the client is a VFIO
/// client: it already follows the kernel's rules, NORESIZE and INTx masking
/// included). Each fd-backed DMA window is mapped into the device's IOMMU at
/// the client's IOVA, with the server's mapping of the client's memory as
/// vaddr; the IOMMU's page sizes, free mappings and IOVA ranges are the
/// `dmaLimits` the server offers and enforces.
public class KernelVFIOBackend: VFIODeviceBackend {
  public let device: KernelVFIODevice
  var logger: Logger
  /// The kernel's migration, when the driver has it.
  let migration: KernelMigration?
  public let regionDescriptions: [RegionDescription]
  /// The IOMMU's page sizes, the mappings it still takes, and its IOVA ranges.
  public let dmaLimits: DMALimits
  /// The windows in the IOMMU, by address: what DMA logging gathers from.
  var mappedWindows: [UInt64: DMAWindow] = [:]
  let dmaLog: KernelDMALog
  /// What migrates the device (`MigrationPlan.decide`), for the log, `list` and a live update.
  public let plan: MigrationPlan
  /// How long one blocking read or write of a migration stream may take.
  let migrationTimeout: Duration
  /// A live update's part: the windows whose vaddr this process invalidated
  /// (restored if the update is called off), and in an imported backend the
  /// windows the IOMMU holds that wait for this process's addresses.
  var handover = KernelHandoverProgress()

  /// A migratable device gets a subclass, which the server recognises as
  /// `MigrationCapable`: the kernel's data_fd, or the PF's debugfs controls,
  /// as `plan` says (`MigrationPlan.decide`); nil takes the kernel's when it has one.
  public static func make(
    _ device: KernelVFIODevice, logger: Logger, plan: MigrationPlan? = nil,
    migrationTimeout: Duration = .seconds(10)
  ) -> KernelVFIOBackend {
    let plan = plan ?? device.migrationFlags.map(MigrationPlan.vfio) ?? .none("")
    return switch plan {
    case .vfio:
      MigratableKernelVFIOBackend(device, logger: logger, migrationTimeout: migrationTimeout)
    case .pfDebugfs(let controls):
      PFMigratedKernelVFIOBackend(
        device, logger: logger,
        migration: PFDebugfsMigration(controls: controls, timeout: migrationTimeout))
    case .none:
      KernelVFIOBackend(device, logger: logger, plan: plan, migrationTimeout: migrationTimeout)
    }
  }

  init(
    _ device: KernelVFIODevice, logger: Logger, migration: KernelMigration? = nil,
    plan: MigrationPlan, migrationTimeout: Duration
  ) {
    self.device = device
    self.logger = logger
    self.migration = migration
    self.plan = plan
    self.migrationTimeout = migrationTimeout
    regionDescriptions = device.regions.map { Self.describe($0, deviceFD: device.fd) }
    let sizes = device.iommu.pageSizes
    dmaLimits = DMALimits(
      pageSizes: sizes == 0 ? 4096 : sizes,
      maxWindows: device.iommu.mappingsAvailable ?? DMALimits.unrestricted.maxWindows,
      iovaRanges: device.iommu.iovaRanges)
    dmaLog = KernelDMALog(tracking: device.iommu.dirtyTracking)
  }

  /// The server's view of a kernel region: same size and permissions, the
  /// device fd at the region's offset for the mmap-able areas, the type.
  public static func describe(_ region: KernelRegionInfo, deviceFD: Int32) -> RegionDescription {
    var mmap: MmapSource?
    var areas: [SparseMmapArea] = []
    if region.mmappable, region.size > 0 {
      if let sparse = region.sparseAreas {
        areas = sparse.filter { $0.size > 0 }
        if !areas.isEmpty {
          mmap = MmapSource(fd: FileDescriptor(rawValue: deviceFD), offset: region.offset)
        }
      } else {
        mmap = MmapSource(fd: FileDescriptor(rawValue: deviceFD), offset: region.offset)
      }
    }
    return RegionDescription(
      index: region.index, size: region.size, readable: region.size > 0 && region.readable,
      writable: region.size > 0 && region.writable, mmap: mmap, sparseAreas: areas,
      type: region.type, msixMappable: mmap != nil && region.msixMappable)
  }

  // MARK: Description

  public var deviceFlags: VFIODeviceFlags {
    device.info.flags.intersection([.pci, .reset])
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
  /// kills its data_fd; the stream here answers ENODEV from now on. A reset
  /// the kernel refuses (EAGAIN from pci_try_reset_function when the device
  /// is busy) changed nothing, so the stream stays.
  public func reset() throws(Errno) {
    try device.reset()
    migration?.deviceReset()
  }

  public func attach(host: DeviceHost?) {
    // The hardware DMAs through the IOMMU and raises interrupts through the
    // eventfds itself: nothing of the host is needed.
  }

  // MARK: Interrupts

  /// Forwarded to VFIO_DEVICE_SET_IRQS as it came. The kernel takes its own
  /// reference to each eventfd, so the request's copies are let go (closed)
  /// when it ends. DATA_EVENTFD without descriptors de-assigns: -1 per vector.
  /// A failed ioctl leaves the kernel's interrupts as they were.
  public func setIRQs(_ request: consuming IRQSetRequest) throws(Errno) {
    var fds: [Int32] = []
    if request.dataType == .eventFD {
      fds = (0..<Int(request.count)).map { k in
        request.eventFDs.isEmpty ? -1 : request.eventFDs[k]?.rawValue ?? -1
      }
    }
    let set = KernelIRQSet(
      index: request.index, start: request.start, count: request.count, flags: request.flags,
      fds: fds, bools: request.dataType == .bool ? request.bools : [])
    logger.debug("VFIO_DEVICE_SET_IRQS \(set)")
    do throws(Errno) {
      try device.setIRQs(set)
    } catch {
      logger.warning(
        "VFIO_DEVICE_SET_IRQS for \(VFIOPCIIRQ.name(request.index)) failed: \(error.name) (\(set))")
      throw error
    }
  }

  /// The kernel holds the eventfds, not this process.
  public var eventFDCount: Int { 0 }

  // MARK: DMA

  /// Maps the window into the IOMMU by the server's address of the client's
  /// memory (type1 and IOMMU_IOAS_MAP both pin by address), so the client's
  /// descriptor is not needed and is let go. The server has checked the page
  /// alignment, the IOVA ranges and the number of mappings (`dmaLimits`).
  public func dmaMap(_ window: DMAWindow, file: consuming OwnedFileDescriptor?) throws(Errno) {
    let what = Self.describe(window)
    guard let vaddr = window.mapping else {
      logger.warning(
        "\(what) refused (ENOTSUP): it came without a file descriptor, and a device behind VFIO can only reach memory the server can map into its IOMMU. Give the VMM shared, fd-backed guest RAM (memory-backend-memfd,share=on)"
      )
      throw .notSupported
    }
    guard window.readable || window.writable else {
      logger.warning("\(what) refused (EINVAL): neither readable nor writable")
      throw .invalidArgument
    }
    do throws(Errno) {
      try device.iommu.map(
        vaddr: vaddr, iova: window.address, size: window.size, readable: window.readable,
        writable: window.writable)
    } catch {
      if error == .noMemory,
        let why = MemlockStatus.current().shortfall(adding: window.size, what: what)
      {
        logger.error("\(why)")
      } else {
        logger.warning("\(what): the IOMMU map failed: \(error.name) (\(error))")
      }
      throw error
    }
    mappedWindows[window.address] = window
  }

  /// Unmaps the windows from the IOMMU, all or nothing: when the kernel
  /// refuses one, those already unmapped are mapped back (their memory is
  /// still the server's) and the error goes to the client, whose windows all
  /// stay.
  public func dmaUnmap(_ windows: [DMAWindow]) throws(Errno) {
    var done: [DMAWindow] = []
    // A window without a file never reached the IOMMU.
    for window in windows where window.mapping != nil {
      do throws(Errno) {
        // While logging, what the window dirtied is kept (type1: returned by the unmap itself).
        try dmaLog.unmap(window) { () throws(Errno) in
          try device.iommu.unmap(iova: window.address, size: window.size)
        }
        done.append(window)
      } catch {
        logger.warning("IOMMU unmap of \(Self.describe(window)) failed: \(error.name)")
        for back in done.reversed() {
          do throws(Errno) {
            try device.iommu.map(
              vaddr: back.mapping!, iova: back.address, size: back.size, readable: back.readable,
              writable: back.writable)
          } catch {
            logger.error(
              "IOMMU: \(Self.describe(back)) could not be mapped back (\(error.name)): the device no longer reaches a window the client still has"
            )
          }
        }
        throw error
      }
    }
    for window in windows { mappedWindows[window.address] = nil }
  }

  static func describe(_ window: DMAWindow) -> String {
    "DMA_MAP [0x\(String(window.address, radix: 16)), +0x\(String(window.size, radix: 16))]"
  }
}

extension KernelVFIOBackend: DMALoggingCapable {
  public var dmaLoggingMethod: String { dmaLog.method }

  public func startDMALogging(pageSize: UInt64, ranges: [DMALoggingRange]) throws(Errno) {
    try dmaLog.start(pageSize: pageSize, ranges: ranges)
  }

  public func stopDMALogging() { dmaLog.stop() }

  public func reportDMALog(
    iova: UInt64, length: UInt64, pageSize: UInt64, into bitmap: UnsafeMutableRawBufferPointer
  ) throws(Errno) {
    try dmaLog.report(
      iova: iova, length: length, pageSize: pageSize, into: bitmap,
      windows: Array(mappedWindows.values))
  }
}

/// A kernel device with VFIO migration (`VFIO_DEVICE_FEATURE_MIGRATION`): the
/// server's walk of the state machine becomes one MIG_DEVICE_STATE SET per arc
/// (`KernelMigration`), the kernel's state is the device's (GET asks it), and
/// the kernel's data_fd is the stream.
public final class MigratableKernelVFIOBackend: KernelVFIOBackend, MigrationCapable {
  /// The server gave up on a migration (`migrationFailed`): ERROR until a
  /// reset. The kernel's drivers stay in the state of the arc that failed
  /// (xe-vfio-pci in RESUMING after a restore that did not validate), so this
  /// is the one thing the adapter keeps besides what the kernel says.
  var failed = false

  /// `failed`: where a live update's old process left it.
  init(_ device: KernelVFIODevice, logger: Logger, migrationTimeout: Duration, failed: Bool = false)
  {
    let flags = device.migrationFlags ?? []
    self.failed = failed
    super.init(
      device, logger: logger,
      migration: KernelMigration(driver: device, flags: flags, timeout: migrationTimeout),
      plan: .vfio(flags), migrationTimeout: migrationTimeout)
  }

  public var migrationFlags: MigrationFlags { migration!.flags }

  /// xe-vfio-pci's data_fd carries the Xe PF's packet stream; another driver's is its own.
  public var sparseStreamTransform: (any MigrationStreamTransform)? {
    device.sysfs?.driver == "xe-vfio-pci" ? SparseMigration.transform : nil
  }

  /// The kernel's MIG_DEVICE_STATE (GET), or ERROR after `migrationFailed`.
  public var migrationState: MigrationState {
    get throws(Errno) { failed ? .error : try device.migrationState() }
  }

  public func migrationStep(from: MigrationState, to: MigrationState) throws(Errno)
    -> MigrationStream?
  {
    guard let file = try migration!.step(to: to) else { return nil }
    return to == .resuming ? .sink(DataFileSink(file)) : .source(DataFileSource(file))
  }

  public func stopCopySize() throws(Errno) -> UInt64 { try migration!.stopCopySize() }

  public func migrationFailed() {
    failed = true
    logger.error(
      "migration failed; the kernel reports the device in \(migration!.kernelState), reported as ERROR until a reset"
    )
  }

  public override func reset() throws(Errno) {
    try super.reset()
    failed = false
  }
}

/// A VF on plain vfio-pci that its PF migrates through debugfs
/// (`PFDebugfsMigration`); the device itself is reached as any other.
public final class PFMigratedKernelVFIOBackend: KernelVFIOBackend, PFDebugfsMigratable {
  public let pfMigration: PFDebugfsMigration

  init(_ device: KernelVFIODevice, logger: Logger, migration: PFDebugfsMigration) {
    pfMigration = migration
    super.init(
      device, logger: logger, plan: .pfDebugfs(migration.controls),
      migrationTimeout: migration.timeout)
  }

  public func logPFError(_ message: String) { logger.error("\(message)") }

  /// VFIO_DEVICE_RESET, then the PF's `reset` so the PF has settled too.
  public override func reset() throws(Errno) {
    let pfError = try pfMigration.reset { () throws(Errno) in try super.reset() }
    if let pfError {
      logger.warning(
        "the VF was reset, but the PF's reset of its controls failed: \(pfError.name); the next migration may fail until another reset"
      )
    }
  }
}
