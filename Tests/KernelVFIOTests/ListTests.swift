import Foundation
import KernelVFIO
import Testing

/// `xe-vfio-user list` as a process against fake trees (`--root`): a BMG PF
/// with a VF in each binding state, a NIC's PF, a machine with no Xe; and
/// `list --bind`.
@Suite("xe-vfio-user list", .serialized)
struct ListTests {
  struct Listing: Decodable {
    struct PF: Decodable {
      var address: String
      var deviceID: String
      var platform: String?
      var driver: String?
      var totalVFs: Int
      var numVFs: Int
      var vfs: [VF]
    }
    struct VF: Decodable {
      struct Migration: Decodable {
        var path: String
        var reason: String
      }
      struct Server: Decodable {
        var pid: Int
        var socket: String
      }
      var address: String
      var name: String
      var driver: String?
      var iommuGroup: Int?
      var vramQuota: UInt64?
      var migration: Migration
      var server: Server?
    }
    var pfs: [PF]
  }

  /// A BMG PF with 4 VFs: on vfio-pci (served), on vfio-pci, on xe-vfio-pci,
  /// unbound; plus an igb NIC with one VF.
  func host() throws -> (FakeSystem, String, Lock) {
    let system = try FakeSystem()
    try system.addIOMMU()
    let vfs = try system.addSRIOVPF(
      "0000:03:00.0", device: "0xe211", total: 7, vfs: 4,
      vfDrivers: ["vfio-pci", "vfio-pci", "xe-vfio-pci", nil])
    try system.addPFDebugfs("0000:03:00.0", vfs: 4)
    try system.write(
      "sys/bus/pci/drivers/xe/0000:03:00.0/sriov_admin/vf1/profile/vram_quota", "4294967296\n")
    _ = try system.addSRIOVPF(
      "0000:05:00.0", device: "0x10c9", driver: "igb", group: 30, total: 7, vfs: 1)
    let run = system.root + "/run"
    try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
    // A live server's record of VF 1: locked by this process.
    let record = run + "/" + vfs[0]
    try "device=\(vfs[0])\npid=4242\nsocket=/run/vf1.sock\nmigration=pf-debugfs: ...\n".write(
      toFile: record, atomically: true, encoding: .utf8)
    let lock = Lock(record)
    // A dead server's record of VF 2: not locked, so not served.
    try "device=\(vfs[1])\npid=1\nsocket=/run/vf2.sock\nmigration=none\n".write(
      toFile: run + "/" + vfs[1], atomically: true, encoding: .utf8)
    return (system, run, lock)
  }

  /// A server's lock on its record, held by this test process.
  final class Lock {
    let fd: Int32
    init(_ path: String) {
      fd = open(path, O_RDONLY)
      #expect(flock(fd, LOCK_EX) == 0)
    }
    deinit { close(fd) }
  }

  func list(_ system: FakeSystem, run: String, _ arguments: [String]) throws -> (
    status: Int32, stdout: String, stderr: String
  ) {
    try runCLI(["list", "--root", system.root] + arguments, environment: ["XE_VFU_RUN_DIR": run])
  }

  @Test func theJSONReportsEachVFsBindingMigrationAndServer() throws {
    let (system, run, lock) = try host()
    defer { withExtendedLifetime(lock) {} }
    let result = try list(system, run: run, ["--json"])
    #expect(result.status == 0, "\(result.stderr)")
    let listing = try JSONDecoder().decode(Listing.self, from: Data(result.stdout.utf8))
    #expect(listing.pfs.count == 1)  // the NIC only with --all
    let pf = try #require(listing.pfs.first)
    #expect(pf.address == "0000:03:00.0" && pf.platform == "BMG" && pf.driver == "xe")
    #expect(pf.totalVFs == 7 && pf.numVFs == 4 && pf.deviceID == "e211")
    let vfs = pf.vfs
    #expect(vfs.map(\.address) == ["0000:03:00.1", "0000:03:00.2", "0000:03:00.3", "0000:03:00.4"])
    #expect(vfs.map(\.name) == ["vf1", "vf2", "vf3", "vf4"])
    #expect(vfs.map(\.driver) == ["vfio-pci", "vfio-pci", "xe-vfio-pci", nil])
    #expect(vfs.map(\.iommuGroup) == [11, 12, 13, 14])
    #expect(vfs[0].vramQuota == 4 << 30 && vfs[1].vramQuota == nil)
    #expect(vfs.map(\.migration.path) == ["pf-debugfs", "pf-debugfs", "xe-vfio-pci", "none"])
    #expect(vfs[3].migration.reason.contains("--bind 0000:03:00.4"))
    #expect(vfs[0].server?.pid == 4242 && vfs[0].server?.socket == "/run/vf1.sock")
    #expect(vfs[1].server == nil)  // its record is not locked: that server is gone
  }

  @Test func textIsLikeLspciAndAllAddsOtherSRIOVDevices() throws {
    let (system, run, lock) = try host()
    defer { withExtendedLifetime(lock) {} }
    let text = try list(system, run: run, [])
    #expect(text.status == 0)
    #expect(text.stdout.contains("0000:03:00.0 Intel Xe BMG PF [8086:e211] (driver xe"))
    #expect(text.stdout.contains("SR-IOV: 4 of 7 VFs enabled"))
    #expect(
      text.stdout.contains(
        "0000:03:00.1 VF vf1 [8086:e211] driver vfio-pci, IOMMU group 11, VRAM quota 4"))
    #expect(text.stdout.contains("Served: by pid 4242 on /run/vf1.sock"))
    #expect(!text.stdout.contains("0000:05:00.0"))
    let all = try list(system, run: run, ["--all", "--json"])
    let listing = try JSONDecoder().decode(Listing.self, from: Data(all.stdout.utf8))
    let nic = try #require(listing.pfs.first { $0.address == "0000:05:00.0" })
    #expect(
      nic.platform == nil && nic.driver == "igb" && nic.vfs.map(\.address) == ["0000:05:00.1"])
    #expect(nic.vfs[0].migration.path == "none")
    #expect(nic.vfs[0].migration.reason.contains("igb, not xe"))
  }

  @Test func aMachineWithoutXeSaysSo() throws {
    let system = try FakeSystem()
    _ = try system.addSRIOVPF("0000:05:00.0", device: "0x10c9", driver: "igb", vfs: 1)
    let text = try list(system, run: system.root, [])
    #expect(text.status == 0)
    #expect(text.stdout.contains("No Xe SR-IOV PF on this host"))
    let json = try list(system, run: system.root, ["--json"])
    #expect(try JSONDecoder().decode(Listing.self, from: Data(json.stdout.utf8)).pfs.isEmpty)
  }

  /// An argument --bind cannot read is answered with the forms --bind takes
  /// (a VF's PCI address or sysfs directory), not those of `serve --device`
  /// (cdev, mdev, vfio: prefix), and names the argument once.
  @Test func bindSuggestsOnlyTheFormsItTakes() throws {
    let (system, run, lock) = try host()
    defer { withExtendedLifetime(lock) {} }
    for argument in ["banana", "/dev/vfio/14", "mdev:banana"] {
      let result = try list(system, run: run, ["--bind", argument])
      #expect(result.status != 0)
      #expect(
        result.stderr.contains(
          "name the VF by its PCI address, DDDD:BB:DD.F or BB:DD.F (e.g. 0000:03:00.1), or its /sys/bus/pci/devices/DDDD:BB:DD.F directory"
        ), "\(result.stderr)")
      for form in ["mdev:UUID", "/dev/vfio/devices/vfioN", "vfio:DDDD"] {
        #expect(!result.stderr.contains(form), "\(argument): \(result.stderr)")
      }
      #expect(result.stderr.components(separatedBy: argument).count == 2, "\(result.stderr)")
    }
    let banana = try list(system, run: run, ["--bind", "banana"])
    #expect(banana.stderr.hasPrefix("Error: --bind banana: name the VF"), "\(banana.stderr)")
    // The forms it suggests are the ones it takes.
    let sysfs = try list(system, run: run, ["--bind", "/sys/bus/pci/devices/0000:03:00.3"])
    #expect(sysfs.stderr.contains("the host driver xe-vfio-pci is using it"), "\(sysfs.stderr)")
    let short = try list(system, run: run, ["--bind", "03:00.1"])
    #expect(short.status == 0 && short.stdout.contains("already bound to vfio-pci"))
  }

  @Test func bindRefusesAPFAndAVFInUseAndBindsAnUnboundVF() throws {
    let (system, run, lock) = try host()
    defer { withExtendedLifetime(lock) {} }
    try system.loadDriver("vfio-pci")
    try system.write("sys/bus/pci/drivers_probe", "")
    let pf = try list(system, run: run, ["--bind", "0000:03:00.0"])
    #expect(pf.status != 0 && pf.stderr.contains("refused: it is an SR-IOV PF"), "\(pf.stderr)")
    let used = try list(system, run: run, ["--bind", "0000:03:00.3"])
    #expect(used.status != 0 && used.stderr.contains("the host driver xe-vfio-pci is using it"))
    let already = try list(system, run: run, ["--bind", "0000:03:00.1"])
    #expect(already.status == 0 && already.stdout.contains("already bound to vfio-pci"))

    // The fake kernel: binds what drivers_probe names, as the real one does during the write.
    let vf = "0000:03:00.4"
    let probe = system.root + "/sys/bus/pci/drivers_probe"
    let driverLink = system.root + "/sys/devices/pci0000:00/\(vf)/driver"
    let kernel = Thread {
      for _ in 0..<500 {
        if (try? String(contentsOfFile: probe, encoding: .utf8))?.contains(vf) == true {
          try? FileManager.default.createSymbolicLink(
            atPath: driverLink, withDestinationPath: "../../../bus/pci/drivers/vfio-pci")
          return
        }
        usleep(5000)
      }
    }
    kernel.start()
    let bound = try list(system, run: run, ["--bind", vf])
    #expect(bound.status == 0, "\(bound.stderr)")
    #expect(bound.stdout.contains("bound \(vf) to vfio-pci"))
    #expect(bound.stdout.contains("/dev/vfio/14"))
    let override = try String(
      contentsOfFile: system.root + "/sys/devices/pci0000:00/\(vf)/driver_override", encoding: .utf8
    )
    #expect(override == "vfio-pci")
  }
}

/// `info` on a server that has a record names the kernel device and its
/// migration path (text and `--json`); the server here is a fake VF on a
/// fake host, migrated through the PF's debugfs.
@Suite("xe-vfio-user info with a served-device record")
struct InfoRecordTests {
  struct Report: Decodable {
    struct KernelDevice: Decodable {
      var address: String
      var migrationPath: String
    }
    var kernelDevice: KernelDevice?
  }

  @Test func infoNamesTheKernelDeviceAndItsMigrationPath() throws {
    let host = try FakeXeHost(vfs: 1)
    let vf = host.vfAddresses[0]
    try withServer(try host.device(1)) { server in
      let run = host.system.root + "/run"
      try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
      try
        "device=\(vf)\npid=\(getpid())\nsocket=\(server.path)\nmigration=pf-debugfs: the PF's controls\n"
        .write(toFile: run + "/" + vf, atomically: true, encoding: .utf8)
      let lock = ListTests.Lock(run + "/" + vf)
      defer { withExtendedLifetime(lock) {} }
      let json = try runCLI(
        ["info", "-s", server.path, "--json"], environment: ["XE_VFU_RUN_DIR": run])
      #expect(json.status == 0, "\(json.stderr)")
      let report = try JSONDecoder().decode(Report.self, from: Data(json.stdout.utf8))
      #expect(report.kernelDevice?.address == vf)
      #expect(report.kernelDevice?.migrationPath == "pf-debugfs")
      let text = try runCLI(["info", "-s", server.path], environment: ["XE_VFU_RUN_DIR": run])
      #expect(
        text.stdout.contains(
          "Kernel device: \(vf) (server pid \(getpid())), migration path pf-debugfs"))
      #expect(text.stdout.contains("Migration: STOP_COPY | P2P"))
      // Without a live record (nobody holds its lock), nothing is claimed.
      let unlocked = try runCLI(
        ["info", "-s", server.path, "--json"], environment: ["XE_VFU_RUN_DIR": host.system.root])
      #expect(
        try JSONDecoder().decode(Report.self, from: Data(unlocked.stdout.utf8)).kernelDevice == nil)
    }
  }
}
