import ArgumentParser
import FoundationEssentials
import KernelVFIO
import MigrationTools
import SystemPackage
import VFIOUser
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

struct List: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "List the Xe PFs on this host and their VFs, or bind a VF to vfio-pci.",
    discussion: """
      From sysfs: each Xe PF (BDF, IDs, platform, SR-IOV totals) and, for each \
      VF, its driver, IOMMU group, VRAM quota (where the PF shows it), the \
      migration path a server would take (xe-vfio-pci's data_fd, the PF's \
      debugfs controls, or none, with the reason) and whether a server serves \
      it already (its record in /run/xe-vfio-user, or XE_VFU_RUN_DIR, locked \
      while the server lives). With --bind BDF it binds an unbound VF to \
      vfio-pci through driver_override and drivers_probe instead (root only); \
      it refuses a PF, and a VF a host driver has. Then every server on the \
      host, the simulated VF's too, from the same records: its pid, socket, \
      and from its control socket (half a second at most each) the attached \
      client's pid and the device's state. A record whose server is gone is \
      removed and named.
      """)

  @Flag(help: "Also list SR-IOV devices that are not Xe (NICs, other GPUs).")
  var all = false

  @Flag(help: "Print JSON instead of text.")
  var json = false

  @Option(help: ArgumentHelp("Bind this VF to vfio-pci (root).", valueName: "BDF"))
  var bind: String?

  /// A fake root with sys/, dev/ and proc/ (tests).
  @Option(help: .hidden) var root: String?

  var paths: SystemPaths {
    root.map { SystemPaths(sys: $0 + "/sys", dev: $0 + "/dev", proc: $0 + "/proc") } ?? .live
  }

  func run() throws {
    if let bind { return try bindVF(bind) }
    let listing = Self.gather(paths: paths, all: all)
    if json {
      let encoder = JSONEncoder()
      encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
      print(String(decoding: try encoder.encode(listing), as: UTF8.self))
    } else {
      print(Self.render(listing, all: all), terminator: "")
    }
  }

  // MARK: Gathering

  struct Listing: Codable, Equatable {
    var pfs: [PF]
    /// Where server records are looked for.
    var runDirectory: String
    /// Every live server, kernel and simulated.
    var servers: [ServerEntry] = []
    /// Records of servers that are gone, removed now.
    var staleRecordsRemoved: [String] = []
  }

  struct ServerEntry: Codable, Equatable {
    var name: String
    var pid: Int
    var socket: String
    var control: String?
    var served: String?
    /// From the control socket: the attached client's pid (nil: none) and the device's state.
    var clientPID: Int64?
    var state: String?
    var unreachable: String?
    /// Live updates since the server first started, and the last one's time (nil: never updated).
    var liveUpdates: Int64?
    var lastLiveUpdate: Int64?
  }

  struct PF: Codable, Equatable {
    var address: String
    var vendorID: String
    var deviceID: String
    /// BMG, PTL or WCL from the device ID; "Xe" for an xe device of another ID; nil when not Xe.
    var platform: String?
    var driver: String?
    var iommuGroup: Int?
    var totalVFs: Int
    var numVFs: Int
    var vfs: [VF]
  }

  struct VF: Codable, Equatable {
    var address: String
    /// The name the PF's debugfs and sriov_admin use (`vf1` for virtfn0).
    var name: String
    var vendorID: String
    var deviceID: String
    var driver: String?
    var driverOverride: String?
    var iommuGroup: Int?
    var vramQuota: UInt64?
    var migration: Migration
    var server: Server?
  }

  struct Migration: Codable, Equatable {
    /// xe-vfio-pci, pf-debugfs or none.
    var path: String
    var reason: String
  }

  struct Server: Codable, Equatable {
    var pid: Int
    var socket: String
    var migration: String
  }

  static func platform(_ device: SysfsPCIDevice) -> String? {
    if device.vendor == XeProfile.vendorID,
      let profile = XeProfile.allProfiles.first(where: { $0.deviceID == device.device })
    {
      return profile.name.uppercased()
    }
    return device.driver == "xe" ? "Xe" : nil
  }

  static func hex4(_ value: UInt16?) -> String { value.map { hex($0, 4) } ?? "?" }

  static func gather(paths: SystemPaths, all: Bool) -> Listing {
    let pfs = paths.sriovPFs().compactMap { pf -> PF? in
      let platform = platform(pf.device)
      guard platform != nil || all else { return nil }
      return PF(
        address: "\(pf.device.address)", vendorID: hex4(pf.device.vendor),
        deviceID: hex4(pf.device.device), platform: platform, driver: pf.device.driver,
        iommuGroup: pf.device.iommuGroup, totalVFs: pf.totalVFs, numVFs: pf.numVFs,
        vfs: pf.vfs.map { entry($0, paths: paths) })
    }
    let stale = ServedRecord.removeStale()
    let servers = LiveServer.gather(stats: false).map { live in
      ServerEntry(
        name: live.name, pid: live.record.pid, socket: live.record.socket,
        control: live.record.control, served: live.record.served, clientPID: live.clientPID,
        state: live.state, unreachable: live.unreachable, liveUpdates: live.liveUpdates?.count,
        lastLiveUpdate: live.liveUpdates?.at)
    }
    return Listing(
      pfs: pfs, runDirectory: ServedRecord.directory, servers: servers,
      staleRecordsRemoved: stale)
  }

  static func entry(_ vf: SRIOVVF, paths: SystemPaths) -> VF {
    let d = vf.device
    return VF(
      address: "\(d.address)", name: "vf\(vf.index + 1)", vendorID: hex4(d.vendor),
      deviceID: hex4(d.device), driver: d.driver, driverOverride: d.driverOverride,
      iommuGroup: d.iommuGroup, vramQuota: vf.vramQuota, migration: migration(d, paths: paths),
      server: ServedRecord.read("\(d.address)").map {
        Server(pid: $0.pid, socket: $0.socket, migration: $0.migration)
      })
  }

  /// The path `serve --migration auto` would take, without opening anything.
  static func migration(_ vf: SysfsPCIDevice, paths: SystemPaths) -> Migration {
    if vf.driver == "xe-vfio-pci" {
      return Migration(path: "xe-vfio-pci", reason: "the VF driver's data_fd (Linux 6.19+)")
    }
    let debugfs = PFDebugfsLocation.find(vf: vf.address, paths: paths, files: POSIXControlFiles())
    switch (vf.driver, debugfs) {
    case ("vfio-pci", .success(let location)):
      return Migration(path: "pf-debugfs", reason: "the PF's controls in \(location.directory)")
    case ("vfio-pci", .failure(let why)):
      return Migration(path: "none", reason: why.message)
    case (_, .success):
      return Migration(
        path: "none",
        reason:
          "\(vf.driver.map { "bound to \($0)" } ?? "no driver"): bind it to vfio-pci (`xe-vfio-user list --bind \(vf.address)`), then pf-debugfs"
      )
    case (_, .failure(let why)):
      return Migration(
        path: "none",
        reason: "\(vf.driver.map { "bound to \($0)" } ?? "no driver"); and \(why.message)")
    }
  }

  // MARK: Text

  static func render(_ listing: Listing, all: Bool) -> String {
    renderPFs(listing, all: all) + renderServers(listing)
  }

  /// Every server, one line for what it serves and one for its client.
  static func renderServers(_ listing: Listing) -> String {
    var out = ""
    if !listing.servers.isEmpty { out += "Servers (records in \(listing.runDirectory)):\n" }
    for server in listing.servers {
      let updated =
        server.liveUpdates.map { count in
          ", live-updated \(count)× (last \(Info.utcTime(server.lastLiveUpdate ?? 0)))"
        } ?? ""
      out +=
        "\t\(server.name): pid \(server.pid)\(updated), \(server.served ?? "a device") on \(server.socket)\n"
      if let why = server.unreachable {
        out += "\t\tControl: \(why)\n"
      } else {
        out +=
          "\t\tClient: \(server.clientPID.map { "pid \($0)" } ?? "none"), device \(server.state ?? "not migratable")\n"
      }
    }
    for name in listing.staleRecordsRemoved {
      out += "Removed the record \(name): its server is gone\n"
    }
    return out
  }

  static func renderPFs(_ listing: Listing, all: Bool) -> String {
    guard !listing.pfs.isEmpty else {
      return all
        ? "No SR-IOV device on this host (no sriov_totalvfs under /sys/bus/pci/devices).\n"
        : "No Xe SR-IOV PF on this host (--all shows other SR-IOV devices).\n"
    }
    var out = ""
    for pf in listing.pfs {
      let platform = pf.platform.map { "Intel Xe \($0)" } ?? "SR-IOV device"
      out +=
        "\(pf.address) \(platform) PF [\(pf.vendorID):\(pf.deviceID)] (driver \(pf.driver ?? "none"), IOMMU group \(pf.iommuGroup.map(String.init) ?? "none"))\n"
      out += "\tSR-IOV: \(pf.numVFs) of \(pf.totalVFs) VFs enabled\n"
      for vf in pf.vfs {
        out +=
          "\t\(vf.address) VF \(vf.name) [\(vf.vendorID):\(vf.deviceID)] driver \(vf.driver ?? "none"), IOMMU group \(vf.iommuGroup.map(String.init) ?? "none")\(vf.vramQuota.map { ", VRAM quota \(formatBytes($0))" } ?? "")\n"
        out += "\t\tMigration: \(vf.migration.path) (\(vf.migration.reason))\n"
        out +=
          "\t\tServed: \(vf.server.map { "by pid \($0.pid) on \($0.socket)" } ?? "no")\n"
      }
    }
    return out
  }

  // MARK: Binding

  /// What --bind suggests for an argument it cannot read: the forms that name a PCI function.
  static let bindForms =
    "name the VF by its PCI address, DDDD:BB:DD.F or BB:DD.F (e.g. 0000:03:00.1), or its /sys/bus/pci/devices/DDDD:BB:DD.F directory; `xe-vfio-user list` shows the VFs"

  func bindVF(_ argument: String) throws {
    let selection: DeviceSelection
    do throws(KernelVFIOError) {
      selection = try DeviceSelection.parse(argument, paths: paths, usage: Self.bindForms)
    } catch {
      // The parser's message starts with the argument.
      throw CLIError("--bind \(error.message)")
    }
    guard let address = selection.address else {
      throw CLIError(
        "--bind \(argument): refused: an mdev is made for VFIO by its parent driver; only SR-IOV VFs are bound"
      )
    }
    guard let device = paths.pciDevice(at: address) else {
      throw CLIError("--bind: no PCI device \(address)")
    }
    if paths.isSRIOVPF(address) {
      throw CLIError(
        "--bind \(address): refused: it is an SR-IOV PF (driver \(device.driver ?? "none")). Only its VFs are served; the PF stays with its host driver, which provisions and migrates them"
      )
    }
    guard device.physfn != nil else {
      throw CLIError("--bind \(address): refused: it is not an SR-IOV VF (no physfn link)")
    }
    if device.driver == "vfio-pci" {
      print("\(address) is already bound to vfio-pci; nothing to do")
      return
    }
    if let driver = device.driver {
      throw CLIError(
        "--bind \(address): refused: the host driver \(driver) is using it. If nothing on the host needs it, unbind it first (echo \(address) > /sys/bus/pci/drivers/\(driver)/unbind), then --bind again"
      )
    }
    guard root != nil || geteuid() == 0 else {
      throw CLIError("--bind writes to sysfs: run it as root")
    }
    guard paths.pciDriverLoaded("vfio-pci") else {
      throw CLIError("--bind \(address): vfio-pci is not loaded: `modprobe vfio-pci` first")
    }
    switch paths.bindToVFIO(address) {
    case .failure(let error):
      throw CLIError(
        "--bind \(address): writing driver_override or drivers_probe failed: \(describe(error))")
    case .success(let driver) where driver == "vfio-pci":
      let group = paths.pciDevice(at: address)?.iommuGroup
      print(
        "bound \(address) to vfio-pci: wrote vfio-pci to its driver_override and \(address) to /sys/bus/pci/drivers_probe; its VFIO group is /dev/vfio/\(group.map(String.init) ?? "?")"
      )
      print("serve it with: xe-vfio-user serve --device vfio:\(address)")
    case .success(let driver):
      throw CLIError(
        "--bind \(address): wrote vfio-pci to driver_override and probed, but it is bound to \(driver ?? "no driver") (dmesg may say why)"
      )
    }
  }
}
