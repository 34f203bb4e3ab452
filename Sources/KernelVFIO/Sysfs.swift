/// What sysfs says about one PCI function.
public struct SysfsPCIDevice: Sendable, Equatable {
  public var address: PCIAddress
  public var vendor: UInt16?
  public var device: UInt16?
  /// The bound driver's name (`vfio-pci`, `xe`, ...), nil when unbound.
  public var driver: String?
  /// The IOMMU group number, nil without an IOMMU.
  public var iommuGroup: Int?
  /// The VFIO device cdev (`vfio3`) when the kernel has CONFIG_VFIO_DEVICE_CDEV and a VFIO driver is bound.
  public var vfioCdev: String?
  /// The PF of a VF.
  public var physfn: PCIAddress?
  /// `driver_override`, when set.
  public var driverOverride: String?

  /// `[8086:e211]`, or empty when the IDs are unknown.
  public var ids: String {
    guard let vendor, let device else { return "" }
    func hex(_ v: UInt16) -> String {
      let t = String(v, radix: 16)
      return String(repeating: "0", count: 4 - t.count) + t
    }
    return "[\(hex(vendor)):\(hex(device))]"
  }

  /// A driver that hands the device to VFIO: vfio-pci or a variant driver (xe-vfio-pci, ...).
  public var boundToVFIO: Bool { driver.map(SystemPaths.isVFIODriver) ?? false }
}

extension SystemPaths {
  static func isVFIODriver(_ name: String) -> Bool {
    name == "vfio-pci" || name.hasSuffix("-vfio-pci") || name.hasSuffix("_vfio_pci")
      || name.hasPrefix("vfio")
  }

  /// Drivers that leave a group viable: they never DMA on their own
  /// (`driver_managed_dma`), so they may share a group with a VFIO device.
  static func keepsGroupViable(_ name: String?) -> Bool {
    guard let name else { return true }
    return isVFIODriver(name) || name == "pci-stub" || name == "pcieport"
  }

  /// The last component of a symlink's target, or nil when `path` is no symlink.
  func linkName(_ path: String) -> String? { POSIX.linkName(path) }

  /// The first line of a sysfs attribute, trimmed; nil when empty or "(null)".
  func firstLine(_ path: String) -> String? {
    guard let text = POSIX.readText(path) else { return nil }
    let line = POSIX.trimmed(
      text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "")
    return line.isEmpty || line == "(null)" ? nil : line
  }

  func listing(_ path: String) -> [String] { POSIX.list(path) }

  func exists(_ path: String) -> Bool { POSIX.exists(path) }

  /// The function's sysfs facts, or nil when there is no such PCI device.
  public func pciDevice(at address: PCIAddress) -> SysfsPCIDevice? {
    let dir = pciDevice(address)
    guard exists(dir) else { return nil }
    func hex16(_ name: String) -> UInt16? {
      firstLine("\(dir)/\(name)").flatMap {
        UInt16($0.hasPrefix("0x") ? String($0.dropFirst(2)) : $0, radix: 16)
      }
    }
    return SysfsPCIDevice(
      address: address, vendor: hex16("vendor"), device: hex16("device"),
      driver: linkName("\(dir)/driver"),
      iommuGroup: linkName("\(dir)/iommu_group").flatMap { Int($0) },
      vfioCdev: listing("\(dir)/vfio-dev").first { $0.hasPrefix("vfio") },
      physfn: linkName("\(dir)/physfn").flatMap { PCIAddress($0) },
      driverOverride: firstLine("\(dir)/driver_override"))
  }

  /// Every device in IOMMU group `group` (PCI functions by address; anything else by name).
  public func groupMembers(_ group: Int) -> [String] {
    listing("\(sys)/kernel/iommu_groups/\(group)/devices")
  }

  /// The IOMMU instances the kernel runs (`dmar0`, `ivhd0`, ...).
  public func iommuInstances() -> [String] { listing("\(sys)/class/iommu") }

  public func pciDriverLoaded(_ name: String) -> Bool { exists("\(sys)/bus/pci/drivers/\(name)") }

  /// The PCI function behind a VFIO cdev name (`vfio3`).
  public func address(ofCdev name: String) -> PCIAddress? {
    linkName("\(sys)/class/vfio-dev/\(name)/device").flatMap { PCIAddress($0) }
  }
}

/// What sysfs says about a mediated device (mdev): a VFIO device that a
/// parent driver makes in software (the `mtty` sample, vGPU types), named by
/// a UUID under /sys/bus/mdev/devices. Its IOMMU group is the kernel's
/// emulated one: the parent driver pins what the device reaches.
public struct SysfsMdevDevice: Sendable, Equatable {
  public var uuid: String
  /// The mdev type it was created as (`mtty-1`).
  public var type: String?
  /// The parent device's name (`mtty`, or a PCI address).
  public var parent: String?
  public var driver: String?
  public var iommuGroup: Int?

  public init(
    uuid: String, type: String? = nil, parent: String? = nil, driver: String? = nil,
    iommuGroup: Int? = nil
  ) {
    self.uuid = uuid
    self.type = type
    self.parent = parent
    self.driver = driver
    self.iommuGroup = iommuGroup
  }
}

extension SystemPaths {
  /// `8-4-4-4-12` hex digits, as libuuid prints them.
  static func isUUID(_ text: String) -> Bool {
    let groups = text.split(separator: "-", omittingEmptySubsequences: false)
    return groups.map(\.count) == [8, 4, 4, 4, 12]
      && groups.allSatisfy { $0.allSatisfy(\.isHexDigit) }
  }

  func mdevDirectory(_ uuid: String) -> String { "\(sys)/bus/mdev/devices/\(uuid)" }

  /// The mdev's sysfs facts, or nil when there is no such mdev.
  public func mdevDevice(_ uuid: String) -> SysfsMdevDevice? {
    let dir = mdevDirectory(uuid)
    guard exists(dir) else { return nil }
    let parent = POSIX.realPath(dir).flatMap { path in
      path.split(separator: "/").dropLast().last.map(String.init)
    }
    return SysfsMdevDevice(
      uuid: uuid, type: linkName("\(dir)/mdev_type"), parent: parent,
      driver: linkName("\(dir)/driver"),
      iommuGroup: linkName("\(dir)/iommu_group").flatMap { Int($0) })
  }
}

/// Which device `serve --device` names: a PCI function, or an mdev.
public struct DeviceSelection: Sendable, Equatable {
  /// The PCI function; nil for an mdev.
  public var address: PCIAddress?
  /// Set when the user named the cdev itself: only the iommufd path may be used.
  public var cdev: String?
  /// The mdev's UUID, when an mdev was named.
  public var mdev: String?

  public init(address: PCIAddress, cdev: String? = nil) {
    self.address = address
    self.cdev = cdev
  }

  public init(mdev uuid: String) { mdev = uuid }

  /// The forms `parse` takes, as its errors suggest them (`serve --device`).
  public static let forms =
    "name the device as vfio:DDDD:BB:DD.F (e.g. vfio:0000:03:00.1), a /sys/bus/pci/devices/DDDD:BB:DD.F path, a /dev/vfio/devices/vfioN cdev, or an mdev as mdev:UUID or /sys/bus/mdev/devices/UUID"

  /// Accepts `vfio:0000:03:00.1` (or `vfio:03:00.1`, or the bare address), a
  /// sysfs device path (`/sys/bus/pci/devices/0000:03:00.1`, or its
  /// `/sys/devices/...` target), a VFIO cdev (`/dev/vfio/devices/vfio3`), and
  /// an mdev as `mdev:UUID` or its `/sys/bus/mdev/devices/UUID` directory.
  /// `usage`: the forms an error suggests, for a caller that takes fewer.
  public static func parse(
    _ argument: String, paths: SystemPaths = .live, usage: String = forms
  ) throws(KernelVFIOError) -> DeviceSelection {
    var text = argument
    if text.hasPrefix("mdev:") {
      let uuid = String(text.dropFirst(5)).lowercased()
      guard SystemPaths.isUUID(uuid) else {
        throw KernelVFIOError(.badDeviceName, "\(argument): not an mdev UUID; \(usage)")
      }
      return DeviceSelection(mdev: uuid)
    }
    if text.hasPrefix("vfio:") { text.removeFirst(5) }
    if text.hasPrefix("/dev/vfio/devices/") {
      let name = String(text.dropFirst("/dev/vfio/devices/".count))
      guard !name.isEmpty, !name.contains("/") else {
        throw KernelVFIOError(.badDeviceName, "\(argument): not a VFIO cdev; \(usage)")
      }
      guard let address = paths.address(ofCdev: name) else {
        throw KernelVFIOError(
          .noSuchDevice,
          "\(argument): no such VFIO device (\(paths.sys)/class/vfio-dev/\(name) is missing). The cdev exists only on kernels with CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD (Debian's have neither: use vfio:DDDD:BB:DD.F)"
        )
      }
      return DeviceSelection(address: address, cdev: name)
    }
    if text.hasPrefix("/dev/vfio/") {
      throw KernelVFIOError(
        .badDeviceName,
        "\(argument) is a VFIO group, which may hold several devices; \(usage)")
    }
    if text.hasPrefix("/sys/") {
      let path = paths.translate(text)
      guard paths.exists(path) else {
        throw KernelVFIOError(.noSuchDevice, "\(argument) does not exist; \(usage)")
      }
      let resolved = POSIX.realPath(path)?.split(separator: "/").last.map(String.init) ?? ""
      if SystemPaths.isUUID(resolved), paths.exists("\(path)/mdev_type") {
        return DeviceSelection(mdev: resolved)
      }
      guard let address = PCIAddress(resolved) else {
        throw KernelVFIOError(.badDeviceName, "\(argument) is not a PCI device directory; \(usage)")
      }
      return DeviceSelection(address: address)
    }
    guard let address = PCIAddress(text) else {
      throw KernelVFIOError(.badDeviceName, "\(argument): \(usage)")
    }
    return DeviceSelection(address: address)
  }
}
