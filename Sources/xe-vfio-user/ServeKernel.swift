import KernelVFIO
import KernelVFIOBackend
import Logging
import MigrationTools
import VFIODevice
import VFIOUserServer

extension Serve {
  /// Opens `--device` through the kernel's VFIO. The backend's `dmaLimits`
  /// (the IOMMU's page sizes, mappings left, IOVA ranges) narrow what the
  /// server offers. Logs what was opened and how, since the vfio-user
  /// protocol has no field a client could read that from.
  ///
  /// The migration path is decided here, and the PF's debugfs controls
  /// opened, while the server still has the privileges debugfs needs.
  func openKernelDevice(
    _ argument: String, migration: MigrationChoice, logger: Logger, limits: ServerLimits
  ) throws -> (backend: KernelVFIOBackend, description: String, plan: MigrationPlan) {
    let device: KernelVFIODevice
    let plan: MigrationPlan
    do throws(KernelVFIOError) {
      device = try KernelVFIODevice.open(try DeviceSelection.parse(argument))
      plan = try MigrationPlan.decide(migration, device: device)
    } catch {
      throw CLIError("--device \(argument): \(error.message)")
    }
    let backend = KernelVFIOBackend.make(device, logger: logger, plan: plan)
    let dma = limits.dma(for: backend.dmaLimits)
    logger.info("kernel VFIO device: \(device.summary)")
    let memlock = MemlockStatus.current()
    let pinning =
      memlock.limited
      ? "RLIMIT_MEMLOCK \(MemlockStatus.format(memlock.limit!)) caps the client memory that can be mapped for DMA"
      : "no RLIMIT_MEMLOCK cap on pinned client memory\(memlock.capIPCLock ? " (CAP_IPC_LOCK)" : "")"
    logger.info(
      "IOMMU: IOVA ranges \(device.iommu.iovaRanges.text), page sizes 0x\(String(device.iommu.pageSizes, radix: 16)), max_dma_maps \(dma.maxWindows); \(pinning)"
    )
    if case .none = plan, migration == .auto {
      logger.warning("migration path: \(plan.summary)")
    } else {
      logger.info("migration path: \(plan.summary)")
    }
    logger.info(
      "the vfio-user protocol has no field for the device's address, driver, IOMMU path or migration path: `info` shows the device as the client sees it, and this log (and the record in \(ServedRecord.directory)) the rest"
    )
    return (
      backend,
      "kernel VFIO device \(device.identity) (\(device.iommuPath.rawValue) path, migration \(plan.name))",
      plan
    )
  }
}
