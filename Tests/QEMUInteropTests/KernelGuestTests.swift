import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient
import XeVF

/// The kernel VFIO backend on a real kernel. The host serves the simulated BMG
/// VF to QEMU (`--on-disconnect keep`), and QEMU gives a Linux guest an Intel
/// IOMMU and the VF (vfio-user-pci). Inside the guest the VF is bound to
/// vfio-pci and `xe-vfio-user serve --device vfio:0000:00:04.0` serves it
/// through the guest kernel's VFIO (group/container, type1v2: Debian's kernels
/// have no iommufd), and `xe-vfu-guest-check` (Tests/KernelGuestCheck), a
/// client in the guest, drives that server: config space against sysfs, BAR0
/// registers, BAR2 mapped through the fd the server passes, refused DMA
/// windows, an MSI-X eventfd handed to VFIO_DEVICE_SET_IRQS, DMA through the
/// guest's IOMMU into its memfd and not after the unmap, and a reset; then,
/// with `--live-update`, the same DMA and MSI-X across two live updates of the
/// server under one connection. After the guest powers off, the host reads its
/// VF through its own client.
///
/// Both binaries are the release builds with the Swift runtime linked in
/// (scripts/build.sh; scripts/test.sh builds them), copied into the
/// initramfs with the libraries `ldd` lists.
@Suite(
  "QEMU interop (kernel VFIO backend in a guest)", .serialized, kernelGuestAvailable,
  .timeLimit(.minutes(4)))
struct KernelGuestTests {
  static let serveArguments = "--on-disconnect keep --quiet --log-level debug"

  static let initScript = """
    \(GuestRun.initPreamble(environment: "PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu", modules: GuestVFIOModules.names))
    dev=""
    for d in /sys/bus/pci/devices/*; do
      [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0xe211 ] && dev=$d
    done
    if [ -z "$dev" ]; then
      echo "XEVF: error no device"; echo "XEVF: done"; poweroff -f
    fi
    addr=${dev##*/}
    echo "XEVF: device $addr iommu $(ls /sys/class/iommu) group $(basename $(readlink $dev/iommu_group))"
    # Before binding: the server says what to do.
    /bin/xe-vfio-user serve --device vfio:$addr -s /tmp/x.sock --quiet 2>/tmp/unbound.txt
    echo "XEVF: open-unbound exit $? $(head -n1 /tmp/unbound.txt)"
    grep -q "driver_override" /tmp/unbound.txt && echo "XEVF: open-unbound-advice driver_override"
    echo vfio-pci > $dev/driver_override
    echo $addr > /sys/bus/pci/drivers_probe
    echo "XEVF: driver $(basename $(readlink $dev/driver))"
    group=/dev/vfio/$(basename $(readlink $dev/iommu_group))
    # An unprivileged user (no CAP_IPC_LOCK): first the group node is root's...
    mkdir -p /tmp/u && chown 1000:1000 /tmp/u
    user="su -s /bin/sh xevf -c"
    $user "/bin/xe-vfio-user serve --device vfio:$addr -s /tmp/u/p.sock --quiet" 2>/tmp/perm.txt
    echo "XEVF: open-permission exit $? $(head -n1 /tmp/perm.txt)"
    # ...then it is the user's, but RLIMIT_MEMLOCK (1 MiB) cannot pin a 2 MiB window.
    chown 1000:1000 $group
    $user "ulimit -l 1024; exec /bin/xe-vfio-user serve --device vfio:$addr -s /tmp/u/m.sock --quiet" 2>/tmp/memlock.txt &
    limited=$!
    /bin/xe-vfu-guest-check --map /tmp/u/m.sock memlock-map || echo "XEVF: error map exit $?"
    kill $limited; wait $limited
    chown 0:0 $group
    echo "XEVF: memlock-log $(grep -o 'RLIMIT_MEMLOCK is too small.*raise the limit by at least [0-9]* [KMG]iB' /tmp/memlock.txt)"
    /bin/xe-vfio-user serve --device vfio:$addr -s /tmp/g.sock \(serveArguments) 2>/tmp/server.log &
    server=$!
    i=0; while [ ! -S /tmp/g.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    echo "XEVF: served $(cut -d' ' -f1 /proc/uptime)"
    # A second server on the same device: the group is busy, and the error names the holder.
    /bin/xe-vfio-user serve --device vfio:$addr -s /tmp/y.sock --quiet 2>/tmp/busy.txt
    echo "XEVF: open-busy exit $? $(head -n1 /tmp/busy.txt)"
    /bin/xe-vfio-user info -s /tmp/g.sock >/tmp/info.txt 2>&1 || echo "XEVF: error info exit $?"
    sed 's/^/XEVF-INFO: /' /tmp/info.txt
    /bin/xe-vfu-guest-check /tmp/g.sock $addr || echo "XEVF: error guest-check exit $?"
    hangups() { i=0; while [ $(grep -c "client disconnected" /tmp/server.log) -lt $1 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done; }
    hangups 2  # info, then the check
    # The window the check left mapped went with it: the same IOVA maps again.
    /bin/xe-vfu-guest-check --map /tmp/g.sock remap-after-hangup || echo "XEVF: error map exit $?"
    hangups 3
    # Live updates under a client mid-work: its windows stay mapped in the IOMMU (VFIO_UPDATE_VADDR).
    /bin/xe-vfu-guest-check --live-update /tmp/g.sock || echo "XEVF: error live-update exit $?"
    hangups 4
    sed 's/^/XEVF-LOG: /' /tmp/server.log
    echo "XEVF: done $(cut -d' ' -f1 /proc/uptime)"
    # No kill, no close: the guest's vfio-pci would reset the VF when the server let go of it.
    poweroff -f
    """

  /// The initramfs: busybox, the VFIO modules (or `modules`: name and path),
  /// both binaries (stripped), the dynamic loader and the libraries they need,
  /// /init (`script`).
  static func initramfs(
    server: String, check: String, directory: String, script: String = initScript,
    modules custom: [(name: String, path: String)]? = nil
  ) throws -> [UInt8] {
    let env = InteropEnvironment.current
    let read = { (path: String) in [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }
    var archive = CPIOArchive()
    var directories: Set<String> = []
    func makeDirectory(_ path: String) {
      var partial = ""
      for component in path.split(separator: "/") {
        partial += partial.isEmpty ? String(component) : "/\(component)"
        if directories.insert(partial).inserted { archive.directory(partial) }
      }
    }
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp", "lib/modules"] { makeDirectory(dir) }
    // An unprivileged user for `su`.
    archive.file(
      "etc/passwd", Array("root:x:0:0:root:/:/bin/sh\nxevf:x:1000:1000::/tmp:/bin/sh\n".utf8))
    archive.file("etc/group", Array("root:x:0:\nxevf:x:1000:\n".utf8))
    archive.characterDevice("dev/console", major: 5, minor: 1)
    archive.file("bin/busybox", try read(try #require(env.busybox)), mode: 0o100755)
    for (name, binary) in [("xe-vfio-user", server), ("xe-vfu-guest-check", check)] {
      archive.file("bin/\(name)", try read(try stripped(binary, into: directory)), mode: 0o100755)
    }
    for library in try sharedLibraries(of: [server, check], directory: directory) {
      makeDirectory(URL(fileURLWithPath: library).deletingLastPathComponent().path)
      archive.file(String(library.dropFirst()), try read(library), mode: 0o100755)
    }
    let modules = try #require(env.guestModules)
    for (name, path) in custom
      ?? GuestVFIOModules.names.map({ (name: $0, path: "\(modules)/\($0).ko") })
    {
      archive.file("lib/modules/\(name).ko", try read(path))
    }
    archive.file("init", Array(script.utf8), mode: 0o100755)
    return archive.finish()
  }

  /// A stripped copy (a smaller initramfs unpacks faster under TCG), or the binary itself without strip.
  static func stripped(_ binary: String, into directory: String) throws -> String {
    guard let strip = findExecutable("strip") else { return binary }
    let output = directory + "/" + URL(fileURLWithPath: binary).lastPathComponent
    let process = try ChildProcess(
      executable: strip, arguments: ["-o", output, binary], logPath: directory + "/strip.log")
    guard process.waitForExit(timeout: 60), process.stop() == 0 else { return binary }
    return output
  }

  /// What `ldd` resolves for the binaries, the dynamic loader included.
  static func sharedLibraries(of binaries: [String], directory: String) throws -> [String] {
    var found: Set<String> = []
    for binary in binaries {
      let ldd = try ChildProcess(
        executable: try #require(findExecutable("ldd")), arguments: [binary],
        logPath: directory + "/ldd.log", outputPath: directory + "/ldd.out")
      guard ldd.waitForExit(timeout: 30), ldd.stop() == 0 else {
        throw InteropError("ldd \(binary) failed: \(ldd.log)")
      }
      for line in ldd.output.split(separator: "\n") {
        // "\tlibjson-c.so.5 => /lib/x86_64-linux-gnu/libjson-c.so.5 (0x...)" or "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
        let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        if let path = words.first(where: { $0.hasPrefix("/") }) { found.insert(String(path)) }
      }
    }
    return found.sorted()
  }

  static func findExecutable(_ name: String) -> String? {
    (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":")
      .map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
  }

  @Test func theServerDrivesAVFIOPCIDeviceInsideAGuest() throws {
    let binaries = try #require(KernelGuestBinaries.current)
    if let stale = binaries.stale { print("⚠️  \(stale)") }
    let rig = try Rig("kvfio", server: ["--on-disconnect", "keep"], qemu: nil)
    defer { rig.close() }
    let initramfs = try Self.initramfs(
      server: binaries.server, check: binaries.check, directory: rig.directory)
    let run = try GuestRun.boot(
      rig: rig, initramfs: initramfs, memory: "512M", append: "intel_iommu=on",
      devices: ["intel-iommu,caching-mode=on"])
    #expect(run.finished, "\(run.failureReport)")
    let output = run.console
    let lines = run.lines
    // The server's log and `info`, which the guest prints after its own lines.
    let tagged = { (tag: String) in
      output.split(whereSeparator: \.isNewline).compactMap { line in
        line.range(of: tag).map { String(line[$0.upperBound...]) }
      }
    }
    let serverLog = tagged("XEVF-LOG: ")
    let info = tagged("XEVF-INFO: ")
    let context = "\(output.suffix(6000))"
    #expect(lines["error"] == nil, "the guest reported errors: \(lines["error"] ?? [])\n\(context)")

    // The device, its IOMMU and its driver in the guest.
    let device = try #require(lines["device"]?.first, "\(context)")
    #expect(device.hasPrefix("0000:00:04.0 iommu dmar0 group "), "\(device)")
    #expect(lines["driver"] == ["vfio-pci"])
    // Opening fails with advice before the bind, and while another server holds the group.
    let unbound = lines["open-unbound"]?.first ?? ""
    #expect(unbound.hasPrefix("exit 1 ") && unbound.contains("not to vfio-pci"), "\(unbound)")
    #expect(lines["open-unbound-advice"] == ["driver_override"])
    let busy = lines["open-busy"]?.first ?? ""
    #expect(
      busy.hasPrefix("exit 1 ") && busy.contains("busy") && busy.contains("(xe-vfio-user)"),
      "\(busy)")

    // An unprivileged server: told whose the group node is, then how far RLIMIT_MEMLOCK falls short.
    let permission = lines["open-permission"]?.first ?? ""
    #expect(
      permission.hasPrefix("exit 1 ") && permission.contains("/dev/vfio/")
        && permission.contains("EACCES, permission denied (owner root:"), "\(permission)")
    #expect(lines["memlock-map"] == ["ENOMEM"], "\(lines["memlock-map"] ?? [])")
    #expect(
      lines["memlock-log"]?.first?.contains(
        "The limit is 1 MiB, nothing is pinned yet, and this window needs 2 MiB: raise the limit by at least 1 MiB"
      ) == true, "\(lines["memlock-log"] ?? [])")

    // The server's start log says what it opened and how.
    let opened = serverLog.first { $0.contains("kernel VFIO device: ") } ?? ""
    #expect(
      opened.contains(
        "0000:00:04.0 [8086:e211] driver vfio-pci through group/container (type1v2 IOMMU, group "),
      "\(serverLog.prefix(10))")
    #expect(
      opened.contains("migration: none: vfio-pci has no migration support (ENOTTY)"), "\(opened)")
    #expect(
      serverLog.contains { $0.contains("IOMMU: IOVA ranges [0x0, 0xfedfffff], [0xfef00000, ") })

    // `info` through the kernel-backed server.
    #expect(info.contains { $0.contains("Intel Corporation Device [8086:e211]") }, "\(info)")
    #expect(info.contains { $0.contains("Region BAR2") && $0.contains("mmap") }, "\(info)")
    #expect(info.contains { $0.contains("Migration: not supported") }, "\(info)")

    // Config space through the server equals the guest kernel's sysfs view.
    #expect(lines["config"]?.first?.hasSuffix("bytes match 1") == true, "\(lines["config"] ?? [])")
    #expect(lines["config"]?.first?.hasPrefix("4096 ") == true)
    #expect(lines["config-ids"] == ["e2118086"])
    // BAR0 registers: REGION_READ/WRITE → pread/pwrite → the host's VF.
    #expect(lines["bar0-gmdid"] == ["0x\(String(XeProfile.bmg.gmdID, radix: 16))"])
    #expect(lines["bar0-scratch"] == ["0x5ca1ab1e"])
    // BAR2: the fd the server passed is the guest's VFIO device; the mapping writes VRAM.
    #expect(lines["bar2"]?.first?.contains("vfio-device") == true, "\(lines["bar2"] ?? [])")
    #expect(lines["bar2-mmap"] == ["wrote 65536 at 0x100000 read-through-server match 1"])
    // Windows the server refuses: no fd, and the IOMMU's MSI window (outside the
    // IOVA ranges the backend reports: ERANGE, named for its cause, where type1 says EINVAL).
    #expect(lines["dma-map-nofd"] == ["ENOTSUP"])
    #expect(lines["dma-map-msi-window"] == ["ERANGE"])
    // DMA through the guest's IOMMU into the client's memfd, and MSI-X through the kernel.
    #expect(lines["msix-eventfd"] == ["set"])
    #expect(lines["dma-map"] == ["iova 0x100000000 size 2097152 ok"])
    #expect(lines["dma-mapped"] == ["status 0x2 match 1"], "\(context)")
    let fired = lines["msix"]?.first.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
    #expect(fired >= 1, "the MSI-X eventfd did not fire: \(lines["msix"] ?? [])")
    #expect(lines["dma-to-device"] == ["status 0x2 match 1"])
    #expect(lines["unmap"] == ["size 2097152"])
    #expect(
      lines["dma-unmapped"] == ["status 0x4 errno 14 untouched 1"], "\(lines["dma-unmapped"] ?? [])"
    )
    // DEVICE_RESET → VFIO_DEVICE_RESET → an FLR of the host's VF.
    #expect(lines["reset"] == ["ok scratch 0x0"])
    #expect(rig.server.log.contains("PCIe FLR: function reset"), "the host VF saw no FLR")
    #expect(lines["check-done"] != nil)
    #expect(lines["left-mapped"] == ["iova 0x100000000 ok"])
    #expect(lines["remap-after-hangup"] == ["ok"], "the hang-up left the window in the IOMMU")
    let refused = serverLog.filter { $0.contains("refused") }
    #expect(
      refused.count == 2 && refused.contains { $0.contains("refused (ENOTSUP)") }, "\(refused)")
    #expect(serverLog.contains { $0.contains("client disconnected") })
    #expect(
      !serverLog.contains { $0.contains("IOMMU unmap") || $0.contains("SET_IRQS for") },
      "\(serverLog)")

    // Live updates of the kernel-backed server under the same client (Tests/KernelGuestCheck/
    // LiveUpdate.swift): the guest kernel has VFIO_UPDATE_VADDR, so the windows stay mapped in
    // the guest's IOMMU while the server's process changes, the copy engine's DMA reaches the same
    // windows (the one the first process mapped, and one the second mapped) after each update,
    // MSI-X still fires through the eventfd the kernel holds, and the last process unmaps.
    #expect(
      serverLog.contains {
        $0.contains(
          "live update: DMA windows stay mapped across one (the container has VFIO_UPDATE_VADDR)")
      }, "\(serverLog.prefix(12))")
    #expect(lines["lu-map"] == ["iova 0x100000000 size 1048576 ok"], "\(context)")
    #expect(lines["lu-map-2"] == ["iova 0x100400000 ok"])
    for label in ["lu-before", "lu-after-1", "lu-window-2", "lu-after-2", "lu-after-2-window-2"] {
      #expect(
        lines[label] == ["status 0x2 0x2 match 1 msix 1"],
        "\(label): \(lines[label] ?? [])\n\(context)")
    }
    for label in ["lu-update-1", "lu-update-2"] {
      let line = lines[label]?.first ?? ""
      #expect(
        line.hasPrefix("exit 0 live update: pid ") && line.contains("serves /tmp/g.sock now"),
        "\(label): \(line)")
    }
    #expect(lines["lu-unmapped"] == ["ok status 0x4 errno 14 untouched 1"], "\(context)")
    #expect(lines["lu-done"] != nil)
    let tookOver = serverLog.filter { $0.contains("live update: took over from pid") }
    #expect(
      tookOver.count == 2 && tookOver.allSatisfy { $0.contains("with client pid") }, "\(tookOver)")
    for count in [1, 2] {
      #expect(
        serverLog.contains {
          $0.contains("live update: \(count) DMA windows have this process's addresses")
        },
        "\(count) windows")
    }

    // The host's VF holds what the guest wrote through the kernel-backed server.
    let scratch = try #require(lines["final-scratch"]?.first).split(separator: " ").map(String.init)
    let vram = try #require(lines["final-vram"]?.first)  // "offset 0x100000 size 65536 seed 0x99"
    #expect(vram == "offset 0x100000 size 65536 seed 0x99")
    #expect(rig.server.waitForLog("client disconnected"), "\(rig.logs)")
    let host = try VFIOUserClient.connect(path: rig.server.socketPath)
    let held = try (0..<4).map {
      "0x"
        + String(
          try host.read32(region: VFIOPCIRegion.bar0, offset: XeSimRegisters.vfSwFlag($0)),
          radix: 16)
    }
    #expect(held == scratch, "host VF scratch registers")
    let bytes = try host.read(region: VFIOPCIRegion.bar2, offset: 0x10_0000, count: 65536)
    expectBytes(
      bytes, pattern(65536, seed: 0x99), "host VF VRAM written through the guest's BAR2 mapping")

    print(
      "kernel VFIO guest test: \(String(format: "%.1f", run.seconds)) s wall to the last marker (guest uptime \(run.uptime) s, server up at \(lines["served"]?.first ?? "?") s); initramfs \(initramfs.count >> 20) MiB"
    )
  }
}

/// The release builds the guest runs, and why the test cannot run without them.
struct KernelGuestBinaries {
  let server: String
  let check: String
  /// Set when a source file is newer than a binary (run scripts/build.sh again).
  let stale: String?

  static let current: KernelGuestBinaries? = {
    let root = InteropEnvironment.current.root
    let server = root + "/.build/release/xe-vfio-user"
    let check = root + "/.build/release/xe-vfu-guest-check"
    let files = FileManager.default
    guard files.isExecutableFile(atPath: server), files.isExecutableFile(atPath: check) else {
      return nil
    }
    let date = { (path: String) in
      (try? files.attributesOfItem(atPath: path)[.modificationDate]) as? Date ?? .distantPast
    }
    /// The first source file under `directories` newer than `binary`.
    func newer(than binary: String, in directories: [String]) -> String? {
      let built = date(binary)
      for directory in directories {
        let names = files.enumerator(atPath: root + "/" + directory)?.allObjects as? [String] ?? []
        if let name = names.first(where: { date(root + "/" + directory + "/" + $0) > built }) {
          return directory + "/" + name
        }
      }
      return nil
    }
    let checkSources = [
      "Tests/KernelGuestCheck", "Sources/VFIOUser", "Sources/VFIOUserClient",
      "Sources/VFIOUserSocket", "Sources/CVFIOUser",
    ]
    let stale = newer(than: server, in: ["Sources"]) ?? newer(than: check, in: checkSources)
    return KernelGuestBinaries(
      server: server, check: check,
      stale: stale.map {
        "\($0) is newer than the release binaries the kernel guest test runs: rebuild them (scripts/test.sh does)"
      })
  }()

  static var missing: String? {
    if let reason = InteropEnvironment.current.viommuMissing { return reason }
    return current == nil
      ? "no release builds for the guest: scripts/build.sh and swift build -c release --static-swift-stdlib --product xe-vfu-guest-check (scripts/test.sh runs both)"
      : nil
  }
}

let kernelGuestAvailable = GuestAvailability.trait(KernelGuestBinaries.missing)

@Suite("Kernel guest availability")
struct KernelGuestAvailabilityTests {
  @Test func theKernelGuestRunsOnCI() {
    GuestAvailability.check("kernel VFIO guest test", missing: KernelGuestBinaries.missing)
  }
}
