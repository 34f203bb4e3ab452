import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// Why a kernel VFIO device could not be opened or used, with what to do
/// about it in `message` (several lines; printed as it is).
public struct KernelVFIOError: Error, Equatable, CustomStringConvertible {
  public enum Kind: Sendable, Equatable {
    case badDeviceName
    case noSuchDevice
    case notBoundToVFIO
    case noIOMMU
    case groupNotViable
    case groupBusy
    case permissionDenied
    case vfioUnavailable
    case noType1v2
    case memlockTooSmall
    /// Any other failing system call, named in the message.
    case kernel
  }

  public var kind: Kind
  public var message: String
  public var errno: Errno?

  public init(_ kind: Kind, _ message: String, errno: Errno? = nil) {
    self.kind = kind
    self.message = message
    self.errno = errno
  }

  public var description: String { message }
}

/// The checks made before any device node is opened, from sysfs alone, and
/// the advice for each failure. Pure functions of the tree, so the tests run
/// them against fake trees.
public enum OpenDiagnostics {
  /// The device must exist, sit behind an IOMMU, be bound to a VFIO driver,
  /// and share its IOMMU group only with devices that leave it viable.
  public static func preflight(_ address: PCIAddress, paths: SystemPaths) throws(KernelVFIOError)
    -> SysfsPCIDevice
  {
    guard let device = paths.pciDevice(at: address) else {
      throw KernelVFIOError(
        .noSuchDevice,
        "no PCI device \(address): \(paths.pciDevice(address)) does not exist (`lspci -D` lists the functions of this machine)"
      )
    }
    guard let group = device.iommuGroup else { throw noIOMMU(device, paths: paths) }
    guard device.boundToVFIO else { throw notBound(device, paths: paths) }
    let blockers = groupBlockers(group: group, except: address, paths: paths)
    if !blockers.isEmpty {
      throw groupNotViable(device, group: group, members: blockers, paths: paths)
    }
    return device
  }

  /// An mdev must exist and have its VFIO driver bound (which gives it its
  /// emulated IOMMU group); it shares the group with nothing.
  public static func preflightMdev(_ uuid: String, paths: SystemPaths) throws(KernelVFIOError)
    -> SysfsMdevDevice
  {
    guard let mdev = paths.mdevDevice(uuid) else {
      let parents = paths.listing("\(paths.sys)/class/mdev_bus")
      let create =
        parents.isEmpty
        ? "No driver offers mdevs here (\(paths.sys)/class/mdev_bus is empty or missing): load the parent driver (e.g. `modprobe mtty`)."
        : "Create one as root: echo \(uuid) > \(paths.sys)/class/mdev_bus/PARENT/mdev_supported_types/TYPE/create (parents here: \(parents.joined(separator: ", ")))."
      throw KernelVFIOError(
        .noSuchDevice, "no mdev \(uuid): \(paths.mdevDirectory(uuid)) does not exist. \(create)")
    }
    guard mdev.iommuGroup != nil else {
      throw KernelVFIOError(
        .notBoundToVFIO,
        "mdev \(uuid) has no IOMMU group: it is bound to \(mdev.driver ?? "no driver"), and only its VFIO driver gives it one. As root: echo \(uuid) > \(paths.sys)/bus/mdev/drivers_probe"
      )
    }
    return mdev
  }

  /// The other members of `group` whose drivers make it unusable, with their drivers.
  static func groupBlockers(group: Int, except address: PCIAddress, paths: SystemPaths)
    -> [(name: String, driver: String?)]
  {
    paths.groupMembers(group).compactMap { name in
      guard PCIAddress(name) != address else { return nil }
      let driver = PCIAddress(name).flatMap { paths.pciDevice(at: $0)?.driver }
      return SystemPaths.keepsGroupViable(driver) ? nil : (name, driver)
    }
  }

  static func noIOMMU(_ device: SysfsPCIDevice, paths: SystemPaths) -> KernelVFIOError {
    let iommus = paths.iommuInstances()
    let state =
      iommus.isEmpty
      ? "\(paths.sys)/class/iommu is empty: the kernel runs without an IOMMU"
      : "the kernel runs the IOMMU(s) \(iommus.joined(separator: ", ")), but none covers this device"
    return KernelVFIOError(
      .noIOMMU,
      """
      \(device.address) \(device.ids) has no IOMMU group: \(state). VFIO needs an IOMMU to \
      confine the device's DMA (Debian's kernels have no VFIO no-IOMMU mode).
        Turn on VT-d (Intel) or AMD-Vi (AMD) in the firmware setup, and boot with intel_iommu=on
        (or amd_iommu=on); iommu=pt keeps the host's own devices fast. On Debian: add it to
        GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub and reboot.
        In a VM the hypervisor must give the guest an IOMMU (QEMU: -device intel-iommu,caching-mode=on).
      """)
  }

  static func notBound(_ device: SysfsPCIDevice, paths: SystemPaths) -> KernelVFIOError {
    let a = device.address
    let dir = paths.pciDevice(a)
    var steps: [String] = []
    if !paths.pciDriverLoaded("vfio-pci") { steps.append("modprobe vfio-pci") }
    if device.driver != nil { steps.append("echo \(a) > \(dir)/driver/unbind") }
    steps.append("echo vfio-pci > \(dir)/driver_override")
    steps.append("echo \(a) > \(paths.sys)/bus/pci/drivers_probe")
    let bound = device.driver.map { "is bound to \($0)" } ?? "is bound to no driver"
    var text = "\(a) \(device.ids) \(bound), not to vfio-pci. As root, hand it to vfio-pci:\n"
    text += steps.map { "  " + $0 }.joined(separator: "\n")
    if let override = device.driverOverride, override != "vfio-pci" {
      text += "\n(its driver_override is \(override) now; the steps replace it.)"
    }
    if let pf = device.physfn {
      text +=
        "\nIt is a VF of \(pf). To keep the PF's driver from claiming VFs as they are created, run"
        + " `echo 0 > \(paths.pciDevice(pf))/sriov_drivers_autoprobe` before writing sriov_numvfs."
    }
    return KernelVFIOError(.notBoundToVFIO, text)
  }

  static func groupNotViable(
    _ device: SysfsPCIDevice, group: Int, members: [(name: String, driver: String?)],
    paths: SystemPaths
  ) -> KernelVFIOError {
    let list = members.map { "  \($0.name) bound to \($0.driver ?? "no driver")" }
      .joined(separator: "\n")
    return KernelVFIOError(
      .groupNotViable,
      """
      IOMMU group \(group) of \(device.address) is not viable: a VFIO device can be used only \
      when every device in its group is bound to vfio-pci, pci-stub or pcieport, or to no driver. \
      Also in group \(group):
      \(list)
      Bind those to vfio-pci as well (the same driver_override steps), or unbind them \
      (echo ADDRESS > \(paths.sys)/bus/pci/devices/ADDRESS/driver/unbind). If they are unrelated \
      devices, the platform cannot isolate them (ACS): move the card to another slot.
      """)
  }

  /// A device node that could not be opened, explained.
  public static func openFailed(_ path: String, _ errno: Errno, group: Int?, paths: SystemPaths)
    -> KernelVFIOError
  {
    switch errno {
    case .permissionDenied, .notPermitted:
      return permissionDenied(path, errno, group: group)
    case .resourceBusy:
      return groupBusy(path, group: group, paths: paths)
    case .noSuchFileOrDirectory where path.hasSuffix("/vfio/vfio"):
      return KernelVFIOError(
        .vfioUnavailable,
        "\(path) does not exist: VFIO is not loaded. Run `modprobe vfio-pci` (it loads vfio and vfio_iommu_type1 too).",
        errno: errno)
    default:
      return KernelVFIOError(.kernel, "cannot open \(path): \(errno.name) (\(errno))", errno: errno)
    }
  }

  static func permissionDenied(_ path: String, _ errno: Errno, group: Int?) -> KernelVFIOError {
    var owner = ""
    var info = stat()
    if stat(path, &info) == 0 {
      let user =
        getpwuid(info.st_uid).map { String(cString: $0.pointee.pw_name) } ?? "\(info.st_uid)"
      let grp =
        getgrgid(info.st_gid).map { String(cString: $0.pointee.gr_name) } ?? "\(info.st_gid)"
      owner = " (owner \(user):\(grp), mode \(String(info.st_mode & 0o777, radix: 8)))"
    }
    let node = path.split(separator: "/").last.map(String.init) ?? path
    let match =
      path.contains("/vfio/devices/")
      ? "SUBSYSTEM==\"vfio-dev\", KERNEL==\"\(node)\""
      : group != nil ? "SUBSYSTEM==\"vfio\", KERNEL==\"\(node)\"" : "KERNEL==\"\(node)\""
    return KernelVFIOError(
      .permissionDenied,
      """
      cannot open \(path): \(errno.name), permission denied\(owner). Run the server as root, or \
      give the group it runs as (the systemd unit's is xe-vfio-user) the device node with a udev \
      rule in /etc/udev/rules.d/60-xe-vfio-user.rules:
        \(match), GROUP="xe-vfio-user", MODE="0660"
      then `udevadm control --reload && udevadm trigger`. Under systemd the unit also needs
      PrivateDevices=no, DeviceAllow=\(path) rw and DeviceAllow=/dev/vfio/vfio rw (or /dev/iommu
      for the cdev path), and LimitMEMLOCK= as large as the guest's RAM.
      """, errno: errno)
  }

  static func groupBusy(_ path: String, group: Int?, paths: SystemPaths) -> KernelVFIOError {
    let holders = processes(holding: path, paths: paths)
    let who =
      holders.isEmpty
      ? "another process has it open"
      : "it is open in " + holders.map { "PID \($0.pid) (\($0.name))" }.joined(separator: ", ")
    return KernelVFIOError(
      .groupBusy,
      "\(path) is busy: \(who). A VFIO \(group != nil ? "group" : "device") is used by one process at a time (a VMM with the device assigned, or another server): stop it first.",
      errno: .resourceBusy)
  }

  /// PIDs (with their command names) that hold `path` open, from /proc/*/fd.
  static func processes(holding path: String, paths: SystemPaths) -> [(pid: Int, name: String)] {
    var found: [(Int, String)] = []
    for entry in paths.listing(paths.proc) {
      guard let pid = Int(entry), pid != Int(getpid()) else { continue }
      let fds = "\(paths.proc)/\(entry)/fd"
      let holds = paths.listing(fds).contains {
        POSIX.readLink("\(fds)/\($0)") == path
      }
      if holds { found.append((pid, paths.firstLine("\(paths.proc)/\(entry)/comm") ?? "?")) }
    }
    return found
  }
}

/// How much memory the process may pin: VFIO charges every mapped page to
/// RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK.
public struct MemlockStatus: Sendable, Equatable {
  /// The soft limit in bytes; nil when unlimited.
  public var limit: UInt64?
  /// Bytes already locked (VmLck of /proc/self/status, which VFIO's pins count in).
  public var locked: UInt64
  /// CAP_IPC_LOCK in the effective set: no limit applies.
  public var capIPCLock: Bool

  public init(limit: UInt64?, locked: UInt64, capIPCLock: Bool) {
    self.limit = limit
    self.locked = locked
    self.capIPCLock = capIPCLock
  }

  /// The process's own figures.
  public static func current(paths: SystemPaths = .live) -> MemlockStatus {
    var limit = rlimit()
    getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit)
    let status = POSIX.readText("\(paths.proc)/self/status") ?? ""
    var locked: UInt64 = 0
    var capIPCLock = false
    for line in status.split(separator: "\n") {
      let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
      if fields.first == "VmLck:", fields.count >= 2, let kib = UInt64(fields[1]) {
        locked = kib * 1024
      } else if fields.first == "CapEff:", fields.count >= 2,
        let caps = UInt64(fields[1], radix: 16)
      {
        capIPCLock = caps & (1 << 14) != 0  // CAP_IPC_LOCK
      }
    }
    return MemlockStatus(
      limit: limit.rlim_cur == rlim_t.max ? nil : UInt64(limit.rlim_cur), locked: locked,
      capIPCLock: capIPCLock)
  }

  /// Whether pinning is limited at all.
  public var limited: Bool { limit != nil && !capIPCLock }

  /// Why pinning `size` more bytes failed with ENOMEM, and by how much the
  /// limit must grow; nil when the limit cannot be the reason.
  public func shortfall(adding size: UInt64, what: String) -> String? {
    guard let limit, !capIPCLock else { return nil }
    let needed = locked &+ size
    guard needed > limit else {
      return
        "\(what): ENOMEM with RLIMIT_MEMLOCK at \(Self.format(limit)) and \(Self.format(locked)) locked; that should have fit, so the system is short of memory"
    }
    let pinned = locked == 0 ? "nothing is pinned yet" : "\(Self.format(locked)) is pinned already"
    return
      "\(what): RLIMIT_MEMLOCK is too small to pin it. The limit is \(Self.format(limit)), \(pinned), and this window needs \(Self.format(size)): raise the limit by at least \(Self.format(needed - limit)) to \(Self.format(needed)) or more (all of guest RAM gets pinned: `ulimit -l`, LimitMEMLOCK= in the systemd unit, memlock in /etc/security/limits.conf), or give the server CAP_IPC_LOCK"
  }

  public static func format(_ bytes: UInt64) -> String {
    if bytes >= 1 << 30, bytes % (1 << 30) == 0 { return "\(bytes >> 30) GiB" }
    if bytes >= 1 << 20, bytes % (1 << 20) == 0 { return "\(bytes >> 20) MiB" }
    if bytes >= 1 << 10, bytes % (1 << 10) == 0 { return "\(bytes >> 10) KiB" }
    return "\(bytes) bytes"
  }
}
