import Foundation
import KernelVFIO
import SystemPackage
import Testing

/// Each way opening a device can fail, against fake sysfs trees: the error
/// says what is wrong and what to type.
@Suite("Kernel VFIO: open diagnostics")
struct OpenDiagnosticsTests {
  let vf = PCIAddress("0000:03:00.1")!

  func failure(_ system: FakeSystem, _ address: PCIAddress? = nil) -> KernelVFIOError? {
    do throws(KernelVFIOError) {
      _ = try OpenDiagnostics.preflight(address ?? vf, paths: system.paths)
      return nil
    } catch { return error }
  }

  @Test func aMissingDeviceIsNamed() throws {
    let system = try FakeSystem()
    let error = try #require(failure(system))
    #expect(error.kind == .noSuchDevice)
    #expect(error.message.contains("no PCI device 0000:03:00.1"))
    #expect(error.message.contains("lspci -D"))
  }

  @Test func noIOMMUSaysIntelIOMMUOn() throws {
    let system = try FakeSystem()
    try system.addDevice("0000:03:00.1", driver: "vfio-pci")
    let error = try #require(failure(system))
    #expect(error.kind == .noIOMMU)
    #expect(error.message.contains("0000:03:00.1 [8086:e211] has no IOMMU group"))
    #expect(error.message.contains("class/iommu is empty"))
    #expect(error.message.contains("intel_iommu=on"))
    #expect(error.message.contains("amd_iommu=on"))
    #expect(error.message.contains("intel-iommu,caching-mode=on"), "the advice for a VM guest")
  }

  @Test func anIOMMUThatDoesNotCoverTheDeviceIsNamed() throws {
    let system = try FakeSystem()
    try system.addIOMMU("dmar0")
    try system.addDevice("0000:03:00.1", driver: "vfio-pci")
    let error = try #require(failure(system))
    #expect(error.kind == .noIOMMU)
    #expect(error.message.contains("dmar0"), "\(error.message)")
  }

  @Test func aDeviceBoundToAnotherDriverGetsTheDriverOverrideCommands() throws {
    let system = try FakeSystem()
    try system.addIOMMU()
    try system.loadDriver("vfio-pci")
    try system.addDevice("0000:03:00.0", driver: "xe", group: 11)
    try system.addDevice("0000:03:00.1", driver: "xe", group: 12, physfn: "0000:03:00.0")
    let error = try #require(failure(system))
    #expect(error.kind == .notBoundToVFIO)
    let sys = system.paths.sys
    #expect(error.message.contains("0000:03:00.1 [8086:e211] is bound to xe, not to vfio-pci"))
    let lines = error.message.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
    #expect(lines.contains("echo 0000:03:00.1 > \(sys)/bus/pci/devices/0000:03:00.1/driver/unbind"))
    #expect(lines.contains("echo vfio-pci > \(sys)/bus/pci/devices/0000:03:00.1/driver_override"))
    #expect(lines.contains("echo 0000:03:00.1 > \(sys)/bus/pci/drivers_probe"))
    #expect(!lines.contains("modprobe vfio-pci"), "vfio-pci is loaded")
    #expect(error.message.contains("VF of 0000:03:00.0"))
    #expect(error.message.contains("0000:03:00.0/sriov_drivers_autoprobe"))
  }

  @Test func anUnboundDeviceNeedsNoUnbindButMaybeModprobe() throws {
    let system = try FakeSystem()
    try system.addIOMMU()
    try system.addDevice("0000:03:00.1", group: 12)
    let error = try #require(failure(system))
    #expect(error.kind == .notBoundToVFIO)
    #expect(error.message.contains("is bound to no driver"))
    #expect(!error.message.contains("driver/unbind"))
    let lines = error.message.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
    #expect(lines.first { $0.hasPrefix("modprobe") || $0.hasPrefix("echo") } == "modprobe vfio-pci")
  }

  @Test func aVariantDriverCountsAsVFIO() throws {
    let system = try FakeSystem()
    try system.addIOMMU()
    try system.addDevice("0000:03:00.1", driver: "xe-vfio-pci", group: 12)
    #expect(failure(system) == nil)
  }

  @Test func aGroupThatIsNotViableNamesTheOtherDevicesAndTheirDrivers() throws {
    let system = try FakeSystem()
    try system.addIOMMU()
    try system.addDevice("0000:03:00.1", driver: "vfio-pci", group: 12)
    try system.addDevice("0000:03:00.2", device: "0xe2ff", driver: "snd_hda_intel", group: 12)
    try system.addDevice("0000:03:00.3", driver: "xe", group: 12)
    try system.addDevice("0000:00:1c.0", driver: "pcieport", group: 12)  // fine in a group
    try system.addDevice("0000:03:00.4", group: 12)  // unbound: fine
    let error = try #require(failure(system))
    #expect(error.kind == .groupNotViable)
    #expect(error.message.contains("IOMMU group 12 of 0000:03:00.1 is not viable"))
    #expect(error.message.contains("0000:03:00.2 bound to snd_hda_intel"))
    #expect(error.message.contains("0000:03:00.3 bound to xe"))
    #expect(!error.message.contains("0000:00:1c.0"), "pcieport leaves the group viable")
    #expect(!error.message.contains("0000:03:00.4"), "an unbound device leaves it viable")
  }

  @Test func aViableGroupPasses() throws {
    let system = try FakeSystem()
    try system.addIOMMU()
    try system.addDevice("0000:03:00.1", driver: "vfio-pci", group: 12, cdev: "vfio4")
    try system.addDevice("0000:03:00.2", driver: "vfio-pci", group: 12)
    let device = try OpenDiagnostics.preflight(vf, paths: system.paths)
    #expect(device.iommuGroup == 12)
    #expect(device.driver == "vfio-pci")
    #expect(device.vfioCdev == "vfio4")
    #expect(device.vendor == 0x8086 && device.device == 0xE211)
  }

  @Test func permissionsOnTheGroupNodeSayWhoOwnsItAndHowToGrantIt() throws {
    let system = try FakeSystem()
    try system.write("dev/vfio/12", "")
    let node = system.paths.dev + "/vfio/12"
    chmod(node, 0o600)
    let error = OpenDiagnostics.openFailed(node, .permissionDenied, group: 12, paths: system.paths)
    #expect(error.kind == .permissionDenied)
    #expect(error.message.contains("cannot open \(node): EACCES"))
    #expect(error.message.contains("mode 600"), "\(error.message)")
    #expect(error.message.contains("owner root:") || getuid() != 0)
    #expect(
      error.message.contains(#"SUBSYSTEM=="vfio", KERNEL=="12", GROUP="xe-vfio-user", MODE="0660""#)
    )
    #expect(error.message.contains("DeviceAllow=\(node) rw"))
  }

  @Test func aBusyGroupNamesTheProcessHoldingIt() throws {
    let system = try FakeSystem()
    let node = system.paths.dev + "/vfio/12"
    try system.write("dev/vfio/12", "")
    try system.addProcess(pid: 4242, name: "qemu-system-x86", holding: node)
    try system.addProcess(pid: 4343, name: "bash", holding: "/dev/null")
    let error = OpenDiagnostics.openFailed(node, .resourceBusy, group: 12, paths: system.paths)
    #expect(error.kind == .groupBusy)
    #expect(error.message.contains("PID 4242 (qemu-system-x86)"), "\(error.message)")
    #expect(!error.message.contains("4343"))
  }

  @Test func aMissingContainerNodeMeansVFIOIsNotLoaded() throws {
    let system = try FakeSystem()
    let error = OpenDiagnostics.openFailed(
      system.paths.dev + "/vfio/vfio", .noSuchFileOrDirectory, group: nil, paths: system.paths)
    #expect(error.kind == .vfioUnavailable)
    #expect(error.message.contains("modprobe vfio-pci"))
  }

  @Test func memlockShortfallSaysByHowMuch() {
    let status = MemlockStatus(limit: 8 << 20, locked: 7 << 20, capIPCLock: false)
    let text = status.shortfall(adding: 2 << 20, what: "DMA_MAP [0x100000000, +0x200000]")
    #expect(
      text?.contains("The limit is 8 MiB, 7 MiB is pinned already, and this window needs 2 MiB:")
        == true, "\(text ?? "")")
    #expect(text?.contains("raise the limit by at least 1 MiB to 9 MiB") == true)
    #expect(text?.contains("LimitMEMLOCK=") == true)
    #expect(text?.contains("CAP_IPC_LOCK") == true)
    // Unlimited, or CAP_IPC_LOCK: the limit is not why.
    #expect(
      MemlockStatus(limit: nil, locked: 0, capIPCLock: false).shortfall(adding: 1, what: "x") == nil
    )
    #expect(
      MemlockStatus(limit: 4096, locked: 0, capIPCLock: true).shortfall(adding: 1 << 30, what: "x")
        == nil)
    // Within the limit: ENOMEM means something else.
    let roomy = MemlockStatus(limit: 1 << 30, locked: 0, capIPCLock: false)
    #expect(roomy.shortfall(adding: 4096, what: "x")?.contains("short of memory") == true)
  }

  @Test func theProcessKnowsItsOwnLimit() {
    let status = MemlockStatus.current()
    var limit = rlimit()
    getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit)
    #expect(status.limit == (limit.rlim_cur == rlim_t.max ? nil : UInt64(limit.rlim_cur)))
  }
}

@Suite("Kernel VFIO: naming the device")
struct DeviceSelectionTests {
  @Test func addressesParseAndPrintAsLspciDoes() {
    #expect(PCIAddress("0000:03:00.1")?.description == "0000:03:00.1")
    #expect(PCIAddress("03:00.1")?.description == "0000:03:00.1")
    #expect(PCIAddress("10000:ff:1f.7")?.description == "10000:ff:1f.7")
    for bad in [
      "", "03:00", "0000:03:20.1", "0000:03:00.8", "0000:03:00.1x", "zz:00.0", "0000:003:00.0",
    ] {
      #expect(PCIAddress(bad) == nil, "\(bad)")
    }
  }

  @Test func everyFormOfTheArgument() throws {
    let system = try FakeSystem()
    try system.addDevice("0000:00:04.0", driver: "vfio-pci", group: 3, cdev: "vfio0")
    let address = PCIAddress("0000:00:04.0")!
    let p = system.paths
    #expect(
      try DeviceSelection.parse("vfio:0000:00:04.0", paths: p) == DeviceSelection(address: address))
    #expect(try DeviceSelection.parse("vfio:00:04.0", paths: p).address == address)
    #expect(try DeviceSelection.parse("0000:00:04.0", paths: p).address == address)
    #expect(
      try DeviceSelection.parse("/sys/bus/pci/devices/0000:00:04.0", paths: p).address == address)
    #expect(
      try DeviceSelection.parse("/sys/devices/pci0000:00/0000:00:04.0", paths: p).address == address
    )
    #expect(
      try DeviceSelection.parse("/dev/vfio/devices/vfio0", paths: p)
        == DeviceSelection(address: address, cdev: "vfio0"))
  }

  /// An mdev as `mdev:UUID` or its sysfs directory (the bus link or the
  /// directory under its parent), laid out as the mdev core makes them.
  @Test func mdevsAreNamedByUUID() throws {
    let system = try FakeSystem()
    let uuid = "4d2c5f2e-7a1b-4c3d-8e9f-00000000000a"
    let dir = "sys/devices/virtual/mtty/mtty/\(uuid)"
    try system.write("\(dir)/uevent", "")
    try system.write("sys/devices/virtual/mtty/mtty/mdev_supported_types/mtty-1/name", "1\n")
    try system.link("\(dir)/mdev_type", to: "../mdev_supported_types/mtty-1")
    try system.link("\(dir)/driver", to: "../../../../bus/mdev/drivers/mtty")
    try system.link("\(dir)/iommu_group", to: "../../../../kernel/iommu_groups/7")
    try system.link("sys/bus/mdev/devices/\(uuid)", to: "../../../\(dir.dropFirst(4))")
    let p = system.paths
    #expect(try DeviceSelection.parse("mdev:\(uuid)", paths: p) == DeviceSelection(mdev: uuid))
    #expect(
      try DeviceSelection.parse("mdev:\(uuid.uppercased())", paths: p)
        == DeviceSelection(mdev: uuid))
    #expect(try DeviceSelection.parse("/sys/bus/mdev/devices/\(uuid)", paths: p).mdev == uuid)
    #expect(try DeviceSelection.parse("/\(dir)", paths: p).mdev == uuid)
    let mdev = try OpenDiagnostics.preflightMdev(uuid, paths: p)
    #expect(
      [mdev.uuid, mdev.type, mdev.parent, mdev.driver, mdev.iommuGroup.map { "\($0)" }]
        == [uuid, "mtty-1", "mtty", "mtty", "7"])

    // No such mdev: how to make one, and which parents offer them.
    try system.write("sys/class/mdev_bus/mtty/uevent", "")
    let other = "4d2c5f2e-7a1b-4c3d-8e9f-0000000000ff"
    do throws(KernelVFIOError) {
      _ = try OpenDiagnostics.preflightMdev(other, paths: p)
      Issue.record("a missing mdev passed")
    } catch {
      #expect(error.kind == .noSuchDevice)
      #expect(error.message.contains("mdev_supported_types/TYPE/create (parents here: mtty)"))
    }
    // Without its driver it has no IOMMU group, so VFIO cannot open it.
    try FileManager.default.removeItem(atPath: "\(system.root)/\(dir)/iommu_group")
    do throws(KernelVFIOError) {
      _ = try OpenDiagnostics.preflightMdev(uuid, paths: p)
      Issue.record("an mdev without a group passed")
    } catch {
      #expect(error.kind == .notBoundToVFIO, "\(error)")
    }
    for bad in ["mdev:4d2c5f2e", "mdev:4d2c5f2e-7a1b-4c3d-8e9f-00000000000g"] {
      #expect(throws: KernelVFIOError.self) { try DeviceSelection.parse(bad, paths: p) }
    }
  }

  @Test func badArgumentsSayWhatIsExpected() throws {
    let system = try FakeSystem()
    for (argument, kind) in [
      ("vfio:nonsense", KernelVFIOError.Kind.badDeviceName), ("/dev/vfio/3", .badDeviceName),
      ("/dev/vfio/devices/vfio9", .noSuchDevice),
      ("/sys/bus/pci/devices/0000:09:00.0", .noSuchDevice),
    ] {
      do throws(KernelVFIOError) {
        _ = try DeviceSelection.parse(argument, paths: system.paths)
        Issue.record("\(argument) was accepted")
      } catch {
        #expect(error.kind == kind, "\(argument): \(error)")
        #expect(error.message.contains(argument))
      }
    }
  }
}
