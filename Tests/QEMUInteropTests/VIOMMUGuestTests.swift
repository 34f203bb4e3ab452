import Foundation
import TestSupport
import Testing

/// QEMU with a virtual IOMMU (`q35`, `intel-iommu,caching-mode=on`) and a Linux
/// guest booted with `intel_iommu=on`: every address the VF DMAs to is an IOVA,
/// and QEMU's IOMMU notifier turns the guest's IOTLB invalidations into
/// DMA_MAP and DMA_UNMAP ranges, including ranges that hold many windows or
/// none (issue 12). The guest binds the VF to vfio-pci and runs
/// `Guest/vfio-dma.c`, which moves bytes with the copy engine while a buffer is
/// mapped in a type1v2 container and checks that after VFIO_IOMMU_UNMAP_DMA the
/// same transfers fail and nothing lands.
@Suite("QEMU interop (vIOMMU guest)", .serialized, viommuGuestAvailable, .timeLimit(.minutes(4)))
struct VIOMMUGuestTests {
  /// THP is off by default below 512 MiB of RAM; the program's second buffer asks
  /// for a huge page with madvise.
  static let initScript = """
    \(GuestRun.initPreamble(modules: GuestVFIOModules.names))
    echo madvise > /sys/kernel/mm/transparent_hugepage/enabled
    dev=""
    for d in /sys/bus/pci/devices/*; do
      [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0xe211 ] && dev=$d
    done
    if [ -z "$dev" ]; then
      echo "XEVF: no device"; echo "XEVF: done"; poweroff -f
    fi
    addr=${dev##*/}
    echo "XEVF: device $addr iommu $(ls /sys/class/iommu) group $(basename $(readlink $dev/iommu_group))"
    echo vfio-pci > $dev/driver_override
    echo $addr > /sys/bus/pci/drivers_probe
    echo "XEVF: driver $(basename $(readlink $dev/driver))"
    /bin/vfio-dma $addr || echo "XEVF: error vfio-dma exit $?"
    echo "XEVF: done $(cut -d' ' -f1 /proc/uptime)"
    poweroff -f
    """

  /// Builds Guest/vfio-dma.c with gcc -static into `directory`.
  static func buildProgram(into directory: String) throws -> String {
    let env = InteropEnvironment.current
    let output = directory + "/vfio-dma"
    let compiler = try ChildProcess(
      executable: try #require(env.compiler),
      arguments: [
        "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", output,
        env.root + "/Tests/QEMUInteropTests/Guest/vfio-dma.c",
      ],
      logPath: directory + "/gcc.log")
    guard compiler.waitForExit(timeout: 120), compiler.stop() == 0 else {
      throw InteropError("building the guest program failed:\n\(compiler.log)")
    }
    return output
  }

  /// The initramfs: busybox, the VFIO modules, the program, /init.
  static func initramfs(program: String) throws -> [UInt8] {
    let env = InteropEnvironment.current
    let read = { (path: String) in [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }
    var archive = CPIOArchive()
    for dir in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] { archive.directory(dir) }
    archive.characterDevice("dev/console", major: 5, minor: 1)
    archive.file("bin/busybox", try read(try #require(env.busybox)), mode: 0o100755)
    archive.file("bin/vfio-dma", try read(program), mode: 0o100755)
    let modules = try #require(env.guestModules)
    for name in GuestVFIOModules.names {
      archive.file("lib/modules/\(name).ko", try read("\(modules)/\(name).ko"))
    }
    archive.file("init", Array(initScript.utf8), mode: 0o100755)
    return archive.finish()
  }

  @Test func guestDrivesTheVFThroughItsIOMMU() throws {
    let rig = try Rig("viommu", qemu: nil)
    defer { rig.close() }
    // The IOMMU comes before the device it translates for. sp_off keeps the guest
    // from using 2 MiB IOMMU pages, so its huge buffer is 512 windows of 4 KiB that
    // one DMA_UNMAP range removes.
    let guest = try GuestRun.boot(
      rig: rig, initramfs: try Self.initramfs(program: try Self.buildProgram(into: rig.directory)),
      memory: "512M", append: "intel_iommu=on,sp_off", devices: ["intel-iommu,caching-mode=on"])
    #expect(guest.finished, "\(guest.failureReport)")
    let lines = guest.lines
    let output = guest.console
    let wall = guest.seconds
    #expect(lines["error"] == nil, "the guest reported errors: \(lines["error"] ?? [])")

    // The VF behind the guest's IOMMU, bound to vfio-pci.
    let device = try #require(lines["device"]?.first, "\(output.suffix(3000))")
    #expect(device.hasPrefix("0000:00:04.0 iommu dmar0 group "), "\(device)")
    #expect(lines["driver"] == ["vfio-pci"])
    #expect(lines["vfio-config"] == ["e2118086"])
    #expect(lines["vfio-scratch"] == ["0x5ca1ab1e"])
    #expect(lines["huge-page"] == ["2048 kB"], "the second buffer should be one huge page")

    // Mapped: the bytes land both ways. Unmapped: EFAULT (14), and nothing lands.
    for buffer in ["pages", "huge"] {
      #expect(lines["dma-mapped"]?.contains("\(buffer) status 0x2 match 1") == true, "\(lines)")
      #expect(lines["dma-to-device"]?.contains("\(buffer) status 0x2 match 1") == true)
      #expect(lines["unmap"]?.contains("\(buffer) size 2097152") == true)
      #expect(
        lines["dma-unmapped"]?.contains("\(buffer) status 0x4 errno 14 untouched 1") == true,
        "\(lines["dma-unmapped"] ?? [])")
      #expect(
        lines["dma-to-device-unmapped"]?.contains("\(buffer) status 0x4 errno 14 untouched 1")
          == true, "\(lines["dma-to-device-unmapped"] ?? [])")
    }
    #expect(lines["dma-remapped"] == ["pages status 0x2 match 1"])
    #expect(lines["vfio-reset"] == ["scratch 0x00000000"], "VFIO_DEVICE_RESET reached the VF")
    #expect(lines["vfio-done"] != nil)

    // Neither side refused an unmap (or a map).
    #expect(rig.server.waitForLog("client disconnected"), "\(rig.logs)")
    let log = rig.server.log
    let refused = log.split(separator: "\n").filter {
      ($0.contains("DMA_UNMAP") || $0.contains("DMA_MAP"))
        && ($0.contains("refused") || $0.contains("failed"))
    }
    #expect(refused.isEmpty, "the server refused: \(refused.prefix(5))")
    let qemuErrors = guest.qemuLog.split(separator: "\n").filter {
      $0.contains("vfio_container_dma") || $0.contains("error reply")
    }
    #expect(qemuErrors.isEmpty, "QEMU: \(qemuErrors.prefix(5))")

    // The ranges QEMU sent: empty ones (the guest's domain switches) and one
    // that removed all 512 windows of the huge buffer.
    let removed = log.split(separator: "\n").compactMap { line -> Int? in
      guard line.contains("DMA_UNMAP "), line.hasSuffix(" windows removed") else { return nil }
      return Int(line.split(separator: " ").dropLast(2).last ?? "")
    }
    let maps = ServeProcess.received("DMA_MAP", in: log).count
    let unmaps = ServeProcess.received("DMA_UNMAP", in: log).count
    #expect(removed.count == unmaps, "every DMA_UNMAP succeeded and says what it removed")
    #expect(removed.contains(0), "no empty range was unmapped")
    #expect(
      removed.contains(512),
      "no range removed the huge buffer's 512 windows: \(removed.max() ?? -1)")
    // Every window the guest's QEMU mapped is gone with it.
    #expect(rig.server.clientMappings == 0)
    let uptime = guest.uptime
    print(
      "vIOMMU guest test: \(String(format: "%.1f", wall)) s wall to the last marker (guest uptime \(uptime) s); \(maps) DMA_MAP, \(unmaps) DMA_UNMAP (\(removed.filter { $0 == 0 }.count) empty, \(removed.filter { $0 > 1 }.count) of several windows, at most \(removed.max() ?? 0))"
    )
  }
}
