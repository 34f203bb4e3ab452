import Foundation
import KernelVFIO
import SystemPackage
import VFIODevice
import XeVF

/// A fake /sys, /dev and /proc in a temporary directory, laid out like the
/// kernel's: device directories with `driver`, `iommu_group`, `physfn` links,
/// `kernel/iommu_groups/N/devices`, `class/iommu`, `bus/pci/drivers`.
final class FakeSystem {
  let root: String
  let paths: SystemPaths
  private let files = FileManager.default

  init() throws {
    root =
      FileManager.default.temporaryDirectory.appendingPathComponent(
        "kvfio-\(UUID().uuidString.prefix(8))"
      ).path
    paths = SystemPaths(sys: root + "/sys", dev: root + "/dev", proc: root + "/proc")
    for dir in [
      "sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups", "sys/class/iommu",
      "sys/class/vfio-dev", "sys/devices/pci0000:00", "dev/vfio", "proc",
    ] {
      try files.createDirectory(atPath: "\(root)/\(dir)", withIntermediateDirectories: true)
    }
  }

  deinit { try? files.removeItem(atPath: root) }

  func write(_ path: String, _ text: String) throws {
    let url = URL(fileURLWithPath: "\(root)/\(path)")
    try files.createDirectory(
      at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
    try text.write(to: url, atomically: true, encoding: .utf8)
  }

  func link(_ path: String, to target: String) throws {
    let full = "\(root)/\(path)"
    try files.createDirectory(
      atPath: URL(fileURLWithPath: full).deletingLastPathComponent().path,
      withIntermediateDirectories: true)
    try files.createSymbolicLink(atPath: full, withDestinationPath: target)
  }

  func loadDriver(_ name: String) throws {
    try files.createDirectory(
      atPath: "\(root)/sys/bus/pci/drivers/\(name)", withIntermediateDirectories: true)
  }

  func addIOMMU(_ name: String = "dmar0") throws {
    try files.createDirectory(
      atPath: "\(root)/sys/class/iommu/\(name)", withIntermediateDirectories: true)
  }

  /// A PCI function: its directory under /sys/devices, the /sys/bus/pci/devices
  /// link, IDs, and optionally a driver, an IOMMU group, a PF and a VFIO cdev.
  func addDevice(
    _ address: String, vendor: String = "0x8086", device: String = "0xe211",
    driver: String? = nil, group: Int? = nil, physfn: String? = nil, cdev: String? = nil
  ) throws {
    let dir = "sys/devices/pci0000:00/\(address)"
    try write("\(dir)/vendor", vendor + "\n")
    try write("\(dir)/device", device + "\n")
    try write("\(dir)/driver_override", "(null)\n")
    try link("sys/bus/pci/devices/\(address)", to: "../../../devices/pci0000:00/\(address)")
    if let driver {
      try loadDriver(driver)
      try link("\(dir)/driver", to: "../../../bus/pci/drivers/\(driver)")
    }
    if let group {
      try link("\(dir)/iommu_group", to: "../../../kernel/iommu_groups/\(group)")
      try link(
        "sys/kernel/iommu_groups/\(group)/devices/\(address)",
        to: "../../../../devices/pci0000:00/\(address)")
    }
    if let physfn { try link("\(dir)/physfn", to: "../\(physfn)") }
    if let cdev {
      try files.createDirectory(
        atPath: "\(root)/\(dir)/vfio-dev/\(cdev)", withIntermediateDirectories: true)
      try link("sys/class/vfio-dev/\(cdev)/device", to: "../../../devices/pci0000:00/\(address)")
    }
  }

  /// A process in the fake /proc holding `path` open.
  func addProcess(pid: Int, name: String, holding path: String) throws {
    try write("proc/\(pid)/comm", name + "\n")
    try link("proc/\(pid)/fd/7", to: path)
  }
}

// MARK: SR-IOV and the PF's debugfs

extension FakeSystem {
  /// An SR-IOV PF with `vfs` VFs at functions 1...: `sriov_totalvfs`,
  /// `sriov_numvfs`, `virtfnN` links, each VF's `physfn`. `vfDrivers[i]` binds
  /// VF i (nil: unbound); VF i is alone in IOMMU group `firstGroup + i`.
  func addSRIOVPF(
    _ pf: String, vendor: String = "0x8086", device: String = "0xe211", driver: String? = "xe",
    group: Int = 10, total: Int = 4, vfs: Int, vfDrivers: [String?] = []
  ) throws -> [String] {
    try addDevice(pf, vendor: vendor, device: device, driver: driver, group: group)
    let dir = "sys/devices/pci0000:00/\(pf)"
    try write("\(dir)/sriov_totalvfs", "\(total)\n")
    try write("\(dir)/sriov_numvfs", "\(vfs)\n")
    let prefix = pf.dropLast(1)
    var addresses: [String] = []
    for i in 0..<vfs {
      let vf = "\(prefix)\(i + 1)"
      try addDevice(
        vf, vendor: vendor, device: device, driver: i < vfDrivers.count ? vfDrivers[i] : nil,
        group: group + 1 + i, physfn: pf)
      try link("\(dir)/virtfn\(i)", to: "../\(vf)")
      addresses.append(vf)
    }
    return addresses
  }

  /// debugfs mounted (in the fake /proc/mounts) with the PF's current-layout
  /// tree: `dri/<PF>/sriov/vf1..vfN/` and their control files (`files`).
  func addPFDebugfs(_ pf: String, vfs: Int, files: [String] = SimulatedPFDebugfs.files) throws {
    try mountDebugfs()
    for n in 1...max(vfs, 1) where vfs > 0 {
      for name in files { try write("sys/kernel/debug/dri/\(pf)/sriov/vf\(n)/\(name)", "") }
    }
    try write("sys/kernel/debug/dri/\(pf)/name", "xe dev=\(pf) unique=\(pf)\n")
  }

  func mountDebugfs() throws {
    try write(
      "proc/mounts",
      "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\ndebugfs /sys/kernel/debug debugfs rw,nosuid,nodev,noexec,relatime 0 0\n"
    )
  }

  func debugfsVF(_ pf: String, _ n: Int) -> String {
    "\(root)/sys/kernel/debug/dri/\(pf)/sriov/vf\(n)"
  }
}

/// The fake debugfs: the tree's directories and files are real (in the
/// temporary directory, so listing and existence are the kernel's), and the
/// files' reads and writes go to the simulated PF of the VF a directory is
/// attached to (`SimulatedPFDebugfs`), which gives them the PF's semantics:
/// blocking reads, short reads at the end, its errnos.
final class FakeDebugfs: PFControlFileSystem, Sendable {
  private let attached = Locked<[String: SimulatedPFDebugfs]>([:])
  private let deniedPaths = Locked<[String: Errno]>([:])
  /// Paths whose listing or opening fails with this errno (EACCES for a non-root user).
  var denied: [String: Errno] {
    get { deniedPaths.withLock { $0 } }
    set { deniedPaths.withLock { $0 = newValue } }
  }

  func attach(_ directory: String, _ vf: SimulatedXeVF) {
    let files = SimulatedPFDebugfs(vf: vf)
    attached.withLock { $0[directory] = files }
  }

  private func denial(_ path: String) -> Errno? {
    deniedPaths.withLock { denied in denied.first { path.hasPrefix($0.key) }?.value }
  }

  func open(_ path: String, _ control: PFControl) -> Result<any PFControlFile, Errno> {
    if let error = denial(path) { return .failure(error) }
    guard FileManager.default.fileExists(atPath: path) else {
      return .failure(.noSuchFileOrDirectory)
    }
    let directory = (path as NSString).deletingLastPathComponent
    guard let files = attached.withLock({ $0[directory] }) else {
      return .failure(.operationNotSupportedByDevice)
    }
    return .success(
      FakeControlFile(
        files: files, name: (path as NSString).lastPathComponent, flags: control.openFlags))
  }

  func list(_ directory: String) -> Result<[String], Errno> {
    if let error = denial(directory) { return .failure(error) }
    guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else {
      return .failure(.noSuchFileOrDirectory)
    }
    return .success(names.sorted())
  }
}

/// One opened fake control file; as on Linux, a descriptor opened for
/// writing only cannot read (EBADF), and one for reading only cannot write.
final class FakeControlFile: PFControlFile, @unchecked Sendable {
  let files: SimulatedPFDebugfs
  let name: String
  let flags: Int32

  init(files: SimulatedPFDebugfs, name: String, flags: Int32) {
    self.files = files
    self.name = name
    self.flags = flags
  }

  func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Result<Int, Errno> {
    guard flags & O_ACCMODE != O_WRONLY else { return .failure(.badFileDescriptor) }
    return Result { () throws(Errno) in try files.read(name, into: buffer, at: offset) }
  }

  func pwrite(_ bytes: UnsafeRawBufferPointer, at offset: Int64) -> Result<Int, Errno> {
    guard flags & O_ACCMODE != O_RDONLY else { return .failure(.badFileDescriptor) }
    return Result { () throws(Errno) in try files.write(name, bytes, at: offset) }
  }
}
