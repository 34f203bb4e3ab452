import KernelVFIO
import KernelVFIOBackend
import LiveUpdate
import Logging
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
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
    logger.info(
      "live update: \(device.iommu.vaddrUpdateRefusal.map { "refused while DMA windows are mapped: \($0)" } ?? "DMA windows stay mapped across one (the container has VFIO_UPDATE_VADDR)")"
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

  /// A live update's successor: the device `--device` names, handed over
  /// open by the old process (its device fd, container and group), with the
  /// backend's state. Nothing is opened again: the device's group is the old
  /// process's until it exits, and a second open would find it busy.
  func importKernelDevice(
    _ argument: String, _ bytes: [UInt8], descriptors: consuming OwnedFileDescriptors,
    logger: Logger
  ) throws(HandoverRefusal) -> (backend: KernelVFIOBackend, description: String) {
    let backend = try KernelVFIOBackend.importHandover(
      bytes, descriptors: descriptors, logger: logger)
    let device = backend.device
    if let named = try? DeviceSelection.parse(argument),
      named.address.map({ $0 != device.address }) ?? (named.mdev != device.mdev?.uuid)
    {
      throw HandoverRefusal(
        "the old server handed over \(device.name), but its --device \(argument) names another")
    }
    logger.info("kernel VFIO device (handed over): \(device.summary)")
    logger.info("migration path: \(backend.plan.summary)")
    return (
      backend,
      "kernel VFIO device \(device.identity) (\(device.iommuPath.rawValue) path, migration \(backend.plan.name))"
    )
  }
}
