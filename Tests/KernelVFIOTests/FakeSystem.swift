import Foundation
import KernelVFIO

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
