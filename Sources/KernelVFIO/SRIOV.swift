import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// An SR-IOV PF and its VFs as sysfs shows them (protocol/xe-kernel-facts.md §9).
public struct SRIOVPF: Sendable, Equatable {
  public var device: SysfsPCIDevice
  public var totalVFs: Int
  public var numVFs: Int
  public var vfs: [SRIOVVF]
}

public struct SRIOVVF: Sendable, Equatable {
  public var device: SysfsPCIDevice
  /// N of the PF's `virtfnN`; debugfs and `sriov_admin` call it `vf<N+1>`.
  public var index: Int
  /// The VF's VRAM quota in bytes, where the PF exposes it: the xe
  /// `sriov_admin` tree (Linux 7.0+, readable by anyone), else debugfs
  /// (`tile0/vram_quota`, root only).
  public var vramQuota: UInt64?
}

extension SystemPaths {
  /// Every SR-IOV PF (a device with `sriov_totalvfs`) and its VFs, by address.
  public func sriovPFs() -> [SRIOVPF] {
    listing("\(sys)/bus/pci/devices").compactMap(PCIAddress.init).compactMap(sriovPF)
  }

  public func sriovPF(_ address: PCIAddress) -> SRIOVPF? {
    let dir = pciDevice(address)
    guard let total = firstLine("\(dir)/sriov_totalvfs").flatMap({ Int($0) }),
      let device = pciDevice(at: address)
    else { return nil }
    let links = listing(dir).compactMap { name -> (Int, PCIAddress)? in
      guard name.hasPrefix("virtfn"), let n = Int(name.dropFirst(6)),
        let vf = linkName("\(dir)/\(name)").flatMap(PCIAddress.init)
      else { return nil }
      return (n, vf)
    }.sorted { $0.0 < $1.0 }
    let vfs = links.compactMap { (n, vf) -> SRIOVVF? in
      pciDevice(at: vf).map {
        SRIOVVF(device: $0, index: n, vramQuota: vramQuota(pf: address, vf: n + 1))
      }
    }
    return SRIOVPF(
      device: device, totalVFs: total,
      numVFs: firstLine("\(dir)/sriov_numvfs").flatMap { Int($0) } ?? vfs.count, vfs: vfs)
  }

  /// `vram_quota` of `vf<number>` from sriov_admin, else from debugfs.
  func vramQuota(pf: PCIAddress, vf number: Int) -> UInt64? {
    let admin = "\(sys)/bus/pci/drivers/xe/\(pf)/sriov_admin/vf\(number)/profile/vram_quota"
    let debugfs = "\(sys)/kernel/debug/dri/\(pf)/sriov/vf\(number)/tile0/vram_quota"
    return (firstLine(admin) ?? firstLine(debugfs)).flatMap { UInt64($0) }
  }

  /// Whether `address` is an SR-IOV PF.
  public func isSRIOVPF(_ address: PCIAddress) -> Bool {
    exists("\(pciDevice(address))/sriov_totalvfs")
  }

  /// `driver_override` + `drivers_probe` (the kernel binds during the probe
  /// write). Returns the driver bound afterwards; the caller checks it.
  public func bindToVFIO(_ address: PCIAddress) -> Result<String?, Errno> {
    func put(_ text: String, _ path: String) -> Errno? {
      let fd = open(path, O_WRONLY | O_CLOEXEC)
      guard fd >= 0 else { return Errno(rawValue: errno) }
      defer { close(fd) }
      let n = Array(text.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
      return n < 0 ? Errno(rawValue: errno) : nil
    }
    if let error = put("vfio-pci", "\(pciDevice(address))/driver_override") {
      return .failure(error)
    }
    if let error = put("\(address)", "\(sys)/bus/pci/drivers_probe") { return .failure(error) }
    // A real kernel has bound it when the write returns; give a slow one a moment.
    for _ in 0..<200 {
      if let driver = pciDevice(at: address)?.driver { return .success(driver) }
      usleep(10_000)
    }
    return .success(nil)
  }
}
