import VFIOUser

/// `serve --migration`: which path migrates a kernel VFIO device.
public enum MigrationChoice: String, CaseIterable, Sendable {
  /// The VF driver's data_fd when it has one (xe-vfio-pci), the PF's debugfs otherwise.
  case auto
  /// The VF driver's data_fd (VFIO_DEVICE_FEATURE_MIGRATION).
  case vfio
  /// The PF's per-VF debugfs controls.
  case pfDebugfs = "pf-debugfs"
  /// None: the device is served without migration.
  case none
}

/// What migrates the device, decided once when serving starts.
public enum MigrationPlan {
  case vfio(MigrationFlags)
  case pfDebugfs(PFVFControls)
  /// No migration, and why.
  case none(String)

  /// The path's name, as `--migration` spells it.
  public var name: String {
    switch self {
    case .vfio: "vfio"
    case .pfDebugfs: "pf-debugfs"
    case .none: "none"
    }
  }

  /// One line for the log and `info`.
  public var summary: String {
    switch self {
    case .vfio(let flags):
      "vfio: the device driver's data_fd (\(MigrationPlan.describe(flags)))"
    case .pfDebugfs(let controls):
      "pf-debugfs: the PF's controls in \(controls.location.directory) (STOP_COPY | P2P)"
    case .none(let why): "none: \(why)"
    }
  }

  static func describe(_ flags: MigrationFlags) -> String {
    [(MigrationFlags.stopCopy, "STOP_COPY"), (.p2p, "P2P"), (.preCopy, "PRE_COPY")]
      .filter { flags.contains($0.0) }.map(\.1).joined(separator: " | ")
  }

  /// Decides the path for an opened device. An explicit choice that cannot
  /// work is an error (the user asked for it); `auto` falls back to none,
  /// with every reason in the plan, rather than a migration that half works.
  public static func decide(
    _ choice: MigrationChoice, device: KernelVFIODevice, paths: SystemPaths = .live,
    files: any PFControlFileSystem = POSIXControlFiles()
  ) throws(KernelVFIOError) -> MigrationPlan {
    try decide(
      choice, address: device.address, driver: device.sysfs?.driver ?? device.mdev?.driver,
      kernelFlags: device.migrationFlags, kernelAbsence: device.migrationAbsence, paths: paths,
      files: files)
  }

  public static func decide(
    _ choice: MigrationChoice, address: PCIAddress?, driver: String?,
    kernelFlags: MigrationFlags?, kernelAbsence: String?, paths: SystemPaths,
    files: any PFControlFileSystem
  ) throws(KernelVFIOError) -> MigrationPlan {
    let noDataFD = kernelAbsence ?? "\(driver ?? "its driver") has no migration support"
    func debugfs() -> Result<PFVFControls, PFDebugfsUnavailable> {
      guard let address else {
        return .failure(PFDebugfsUnavailable(.notAVF, "an mdev is no VF: it has no PF controls"))
      }
      return PFDebugfsLocation.find(vf: address, paths: paths, files: files).flatMap {
        PFVFControls.open($0, files: files)
      }
    }
    switch choice {
    case .none:
      return .none("--migration none")
    case .vfio:
      guard let kernelFlags else {
        throw KernelVFIOError(
          .migrationUnavailable,
          "--migration vfio: \(noDataFD). A VF bound to plain vfio-pci has no data_fd: its PF migrates it (--migration pf-debugfs), or bind it to xe-vfio-pci (Linux 6.19+, CONFIG_XE_VFIO_PCI; Debian builds neither)"
        )
      }
      return .vfio(kernelFlags)
    case .pfDebugfs:
      switch debugfs() {
      case .success(let controls): return .pfDebugfs(controls)
      case .failure(let why):
        throw KernelVFIOError(.migrationUnavailable, "--migration pf-debugfs: \(why.message)")
      }
    case .auto:
      if let kernelFlags { return .vfio(kernelFlags) }
      switch debugfs() {
      case .success(let controls): return .pfDebugfs(controls)
      case .failure(let why): return .none("no data_fd (\(noDataFD)); pf-debugfs: \(why.message)")
      }
    }
  }
}
