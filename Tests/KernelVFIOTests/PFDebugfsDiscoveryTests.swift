import Foundation
import KernelVFIO
import SystemPackage
import Testing
import VFIOUser
import XeVF

/// Finding a VF's PF controls from sysfs and debugfs, and every reason there
/// are none, against fake trees.
@Suite("PF debugfs: finding the controls")
struct PFDebugfsDiscoveryTests {
  func find(_ host: FakeXeHost, _ vf: String) -> Result<PFDebugfsLocation, PFDebugfsUnavailable> {
    PFDebugfsLocation.find(vf: PCIAddress(vf)!, paths: host.system.paths, files: host.debugfs)
  }

  func failure(_ result: Result<PFDebugfsLocation, PFDebugfsUnavailable>) -> PFDebugfsUnavailable? {
    if case .failure(let why) = result { return why }
    return nil
  }

  @Test func theVFNumberComesFromThePFsVirtfnLinks() throws {
    let host = try FakeXeHost(vfs: 3)
    let location = try find(host, "0000:03:00.3").get()
    #expect(location.pf == PCIAddress("0000:03:00.0"))
    // virtfn2 is debugfs's vf3.
    #expect(location.vfNumber == 3)
    #expect(location.directory == host.system.debugfsVF(host.pf, 3))
  }

  @Test func aPFOrAVFOfAnotherDriverHasNoControls() throws {
    let host = try FakeXeHost()
    #expect(failure(find(host, host.pf))?.kind == .notAVF)
    let igb = try host.system.addSRIOVPF(
      "0000:05:00.0", vendor: "0x8086", device: "0x10c9", driver: "igb", group: 30, vfs: 1)
    let why = failure(find(host, igb[0]))
    #expect(why?.kind == .pfNotXe)
    #expect(why?.message.contains("igb") == true)
  }

  @Test func debugfsMissingUnmountedOrRootOnly() throws {
    let host = try FakeXeHost()
    let vf = host.vfAddresses[0]
    try FileManager.default.removeItem(atPath: host.system.root + "/proc/mounts")
    #expect(failure(find(host, vf))?.kind == .notMounted)
    try host.system.mountDebugfs()
    host.debugfs.denied[host.system.root + "/sys/kernel/debug/dri"] = .permissionDenied
    let denied = failure(find(host, vf))
    #expect(denied?.kind == .notRoot)
    #expect(denied?.message.contains("root") == true)
    host.debugfs.denied = [:]
    try FileManager.default.removeItem(atPath: host.system.root + "/sys/kernel/debug")
    #expect(failure(find(host, vf))?.kind == .noDebugfs)
  }

  @Test func theOldPerGTLayoutIsNamed() throws {
    let host = try FakeXeHost()
    try FileManager.default.removeItem(atPath: host.system.root + "/sys/kernel/debug/dri")
    try host.system.write("sys/kernel/debug/dri/0/name", "xe dev=\(host.pf) unique=\(host.pf)\n")
    try host.system.write("sys/kernel/debug/dri/0/gt0/vf1/control", "")
    let why = failure(find(host, host.vfAddresses[0]))
    #expect(why?.kind == .oldLayout)
    #expect(why?.message.contains("6.18") == true)
  }

  @Test func aPFWithoutMigrationFilesOrSizeOffersNone() throws {
    let host = try FakeXeHost()
    for file in ["save", "restore", "migration_data", "migration_size"] {
      try FileManager.default.removeItem(atPath: host.system.debugfsVF(host.pf, 1) + "/" + file)
    }
    #expect(failure(find(host, host.vfAddresses[0]))?.kind == .noMigration)

    // The files are there but the PF cannot size a save (its GuC refuses the query).
    let location = try find(host, host.vfAddresses[1]).get()
    host.vfs[1].pfFaults.inject(.error(.notSupported), on: .query)
    guard case .failure(let why) = PFVFControls.open(location, files: host.debugfs) else {
      Issue.record("opened the controls of a PF that cannot size a save")
      return
    }
    #expect(why.kind == .noMigration)
    #expect(why.message.contains("ENOTSUP"))
  }

  @Test func theControlsAreOpenedUpFrontWithRootsPermission() throws {
    let host = try FakeXeHost()
    let location = try find(host, host.vfAddresses[0]).get()
    host.debugfs.denied[location.directory + "/save"] = .permissionDenied
    guard case .failure(let why) = PFVFControls.open(location, files: host.debugfs) else {
      Issue.record("opened a control file debugfs refused")
      return
    }
    #expect(why.kind == .notRoot)
  }

  @Test func theMigrationPlanFollowsTheChoice() throws {
    let host = try FakeXeHost()
    let vf = PCIAddress(host.vfAddresses[0])!
    func decide(_ choice: MigrationChoice, kernel: MigrationFlags?) throws(KernelVFIOError)
      -> MigrationPlan
    {
      try MigrationPlan.decide(
        choice, address: vf, driver: kernel == nil ? "vfio-pci" : "xe-vfio-pci",
        kernelFlags: kernel, kernelAbsence: kernel == nil ? "vfio-pci has no migration" : nil,
        paths: host.system.paths, files: host.debugfs)
    }
    #expect(try decide(.auto, kernel: [.stopCopy, .p2p]).name == "vfio")
    #expect(try decide(.auto, kernel: nil).name == "pf-debugfs")
    #expect(try decide(.pfDebugfs, kernel: [.stopCopy, .p2p]).name == "pf-debugfs")
    #expect(try decide(.none, kernel: [.stopCopy]).name == "none")
    #expect((try? decide(.vfio, kernel: nil)) == nil)

    // Without debugfs, auto serves without migration and says why; asking for it fails.
    try FileManager.default.removeItem(atPath: host.system.root + "/proc/mounts")
    let plan = try decide(.auto, kernel: nil)
    #expect(plan.name == "none")
    #expect(plan.summary.contains("not mounted"))
    do {
      _ = try decide(.pfDebugfs, kernel: nil)
      Issue.record("--migration pf-debugfs without debugfs was accepted")
    } catch {
      #expect(error.kind == .migrationUnavailable)
      #expect(error.message.contains("not mounted"))
    }
  }
}
