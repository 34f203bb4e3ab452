import Foundation
import Testing

/// Migration through a real kernel's VFIO `data_fd`. The guest (the generic
/// amd64 kernel) loads the Linux sample driver mtty (samples/vfio-mdev/mtty.c
/// of the same kernel version, built by scripts/install-qemu.sh), which
/// implements VFIO migration (STOP_COPY, P2P, PRE_COPY) for a 16550-like serial
/// port whose transmit FIFO loops back. Two mtty mdevs are each served by
/// `xe-vfio-user serve --device` (one named `mdev:UUID`, one by its sysfs
/// path); `xe-vfu-guest-check --mtty` (Tests/KernelGuestCheck/MTTY.swift)
/// probes the first, checks that a DEVICE_RESET mid-stream kills the stream
/// (ENODEV) and leaves it RUNNING, writes bytes into its FIFO, and after
/// `xe-vfio-user migrate` reads the same bytes back from the second mdev.
@Suite(
  "QEMU interop (kernel migration data_fd: mtty mdevs in a guest)", .serialized,
  mttyGuestAvailable, .timeLimit(.minutes(4)))
struct MTTYGuestTests {
  static let source = "4d2c5f2e-7a1b-4c3d-8e9f-00000000000a"
  static let destination = "4d2c5f2e-7a1b-4c3d-8e9f-00000000000b"
  static let text = "xe-vfio-user!"

  static func initScript(modules: [String]) -> String {
    """
    \(GuestRun.initPreamble(environment: "PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu", modules: modules))
    export XE_VFU_RUN_DIR=/tmp/xvu-run
    types=/sys/class/mdev_bus/mtty/mdev_supported_types
    echo "XEVF: mdev-types $(ls $types | tr '\\n' ' ')"
    for u in \(source) \(destination); do
      echo $u > $types/mtty-1/create || echo "XEVF: error create $u"
      d=/sys/bus/mdev/devices/$u
      echo "XEVF: mdev $u driver $(basename $(readlink $d/driver)) type $(basename $(readlink $d/mdev_type)) group-devices $(ls $d/iommu_group/devices | tr '\\n' ' ')"
    done
    /bin/xe-vfio-user serve --device mdev:\(source) -s /tmp/a.sock \(KernelGuestTests.serveArguments) 2>/tmp/a.log &
    /bin/xe-vfio-user serve --device /sys/bus/mdev/devices/\(destination) -s /tmp/b.sock \(KernelGuestTests.serveArguments) 2>/tmp/b.log &
    i=0; while { [ ! -S /tmp/a.sock ] || [ ! -S /tmp/b.sock ]; } && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    echo "XEVF: served $(cut -d' ' -f1 /proc/uptime)"
    check() { /bin/xe-vfu-guest-check --mtty "$@" || echo "XEVF: error guest-check $1 exit $?"; }
    check probe /tmp/a.sock
    check reset /tmp/a.sock
    check write /tmp/a.sock \(text)
    check live-update /tmp/a.sock
    echo "XEVF: info-kernel-a $(/bin/xe-vfio-user info -s /tmp/a.sock | grep 'Kernel device:' | tr -d '\\t')"
    /bin/xe-vfio-user migrate --from /tmp/a.sock --to /tmp/b.sock >/tmp/migrate.txt 2>&1
    echo "XEVF: migrate exit $? $(tail -n 1 /tmp/migrate.txt)"
    check read /tmp/b.sock \(text.utf8.count)
    echo "XEVF: info-kernel $(/bin/xe-vfio-user info -s /tmp/b.sock | grep 'Kernel device:' | tr -d '\\t')"
    sed 's/^/XEVF-LOG: a: /' /tmp/a.log
    sed 's/^/XEVF-LOG: b: /' /tmp/b.log
    echo "XEVF: done $(cut -d' ' -f1 /proc/uptime)"
    poweroff -f
    """
  }

  @Test func stateMovesBetweenTwoMttyMdevsThroughTheKernelsDataFD() throws {
    let binaries = try #require(KernelGuestBinaries.current)
    if let stale = binaries.stale { print("⚠️  \(stale)") }
    let env = InteropEnvironment.current
    let amd64 = try #require(env.amd64)
    let mtty = try #require(env.mtty)
    let modules = [
      ("vfio", "\(amd64)/modules/vfio.ko"),
      ("vfio_iommu_type1", "\(amd64)/modules/vfio_iommu_type1.ko"),
      ("mdev", "\(mtty)/mdev.ko"), ("mtty", "\(mtty)/mtty.ko"),
    ]
    let rig = try Rig("mtty", qemu: nil)
    defer { rig.close() }
    let initramfs = try KernelGuestTests.initramfs(
      server: binaries.server, check: binaries.check, directory: rig.directory,
      script: Self.initScript(modules: modules.map(\.0)),
      modules: modules.map { (name: $0.0, path: $0.1) })
    let run = try GuestRun.boot(
      rig: rig, initramfs: initramfs, memory: "512M", kernel: amd64 + "/vmlinuz",
      vfioUser: false)
    #expect(run.finished, "\(run.failureReport)")
    let lines = run.lines
    let context = "\(run.console.suffix(6000))"
    let log = run.console.split(whereSeparator: \.isNewline).compactMap { line in
      line.range(of: "XEVF-LOG: ").map { String(line[$0.upperBound...]) }
    }
    #expect(lines["error"] == nil, "the guest reported errors: \(lines["error"] ?? [])\n\(context)")

    // Two mdevs of mtty's single-port type, each alone in its emulated IOMMU group.
    #expect(lines["mdev-types"] == ["mtty-1 mtty-2"], "\(context)")
    #expect(
      lines["mdev"]
        == [Self.source, Self.destination].map {
          "\($0) driver mtty type mtty-1 group-devices \($0)"
        }, "\(lines["mdev"] ?? [])")
    for (side, uuid) in [("a", Self.source), ("b", Self.destination)] {
      let opened = log.first { $0.hasPrefix("\(side): ") && $0.contains("kernel VFIO device: ") }
      #expect(
        opened?.contains(
          "mdev \(uuid) (mtty-1 of mtty) driver mtty through group/container") == true,
        "\(log.prefix(12))")
      #expect(
        opened?.contains("migration: kernel data_fd (STOP_COPY | P2P | PRE_COPY)") == true,
        "\(opened ?? "")")
    }

    // What the client sees: a PCI device with config and BAR0 (8 I/O ports,
    // not mmap-able), INTx and MSI, and the driver's migration flags.
    #expect(lines["mtty-device"] == ["pci 1 regions 9 irqs 5"], "\(context)")
    #expect(lines["mtty-ids"] == ["32534348"])
    #expect(lines["mtty-bar0"] == ["size 8 mmap 0"])
    #expect(lines["mtty-irqs"] == ["INTx 1 MSI 1 MSI-X 0"])
    #expect(lines["mtty-migration"] == ["STOP_COPY|P2P|PRE_COPY"])
    #expect(lines["mtty-state"] == ["RUNNING"])
    // A reset in STOP_COPY: the kernel's data_fd is dead (ENODEV) and the device RUNNING.
    let reset = (lines["mtty-reset"]?.first ?? "").split(separator: " ")
    #expect(
      reset.count == 4 && reset[2] == "read" && reset[3] == "8" && (Int(reset[1]) ?? 0) > 8,
      "\(lines["mtty-reset"] ?? [])")
    #expect(lines["mtty-after-reset"] == ["read ENODEV state RUNNING"], "\(context)")
    // The bytes written into the source's FIFO (line status: data ready) ...
    let wrote = (lines["mtty-wrote"]?.first ?? "").split(separator: " ")
    #expect(wrote.count == 3 && wrote[0] == "\(Self.text.utf8.count)", "\(wrote)")
    if wrote.count == 3, let lsr = UInt8(wrote[2].dropFirst(2), radix: 16) {
      #expect(lsr & 1 == 1, "LSR \(wrote[2]): no data ready")
    }
    // A live update of the source's server: refused while a DMA window is mapped (an mdev's
    // container has no VFIO_UPDATE_VADDR), the server carrying on; without windows the mdev is
    // handed over open, with its migration path, and the new process claims its record.
    #expect(lines["mtty-lu-map"] == ["ok"], "\(context)")
    let refused = lines["mtty-lu-refused"]?.first ?? ""
    #expect(
      refused.hasPrefix("exit 1 ") && refused.contains("VFIO_UPDATE_VADDR")
        && refused.contains("the server carries on"), "\(refused)")
    #expect(lines["mtty-lu-unmap"] == ["ok"])
    let updated = lines["mtty-lu-update"]?.first ?? ""
    #expect(
      updated.hasPrefix("exit 0 live update: pid ") && updated.contains("serves /tmp/a.sock now"),
      "\(updated)\n\(context)")
    if let lsr = lines["mtty-lu-lsr"]?.first.flatMap({ UInt8($0.dropFirst(2), radix: 16) }) {
      #expect(lsr & 1 == 1, "LSR 0x\(String(lsr, radix: 16)) after the update: no data ready")
    }
    #expect(
      log.contains {
        $0.hasPrefix("a: ") && $0.contains("live update: refused while DMA windows are mapped: ")
      }, "\(log)")
    #expect(
      log.contains { $0.hasPrefix("a: ") && $0.contains("live update: took over from pid ") },
      "\(log)")
    let infoA = lines["info-kernel-a"]?.first ?? ""
    #expect(
      infoA.hasPrefix("Kernel device: mdev \(Self.source) (mtty-1 of mtty) driver mtty through "),
      "the successor's record: \(infoA)")
    // ... moved with the device state through both kernels' data_fds (the source's served by the
    // new process) ...
    let migrate = lines["migrate"]?.first ?? ""
    #expect(
      migrate.hasPrefix("exit 0 migrated ") && migrate.hasSuffix("destination RUNNING"),
      "\(migrate)\n\(context)")
    // ... and come out of the destination's FIFO, which is then empty.
    #expect(lines["mtty-read"] == [Self.text], "\(context)")
    if let lsr = lines["mtty-read-lsr"]?.first.flatMap({ UInt8($0.dropFirst(2), radix: 16) }) {
      #expect(lsr & 1 == 0, "LSR 0x\(String(lsr, radix: 16)): still data ready")
    } else {
      Issue.record("no line status after the read: \(context)")
    }
    #expect(log.contains { $0.hasPrefix("a: ") && $0.contains("device reset") }, "\(log)")
    // `info` names the served mdev, its driver, the IOMMU path and the migration path.
    let info = lines["info-kernel"]?.first ?? ""
    #expect(
      info.hasPrefix(
        "Kernel device: mdev \(Self.destination) (mtty-1 of mtty) driver mtty through group/container (type1v2 IOMMU, group "
      ), "\(info)")
    #expect(
      info.contains(
        "migration path vfio: the device driver's data_fd (STOP_COPY | P2P | PRE_COPY)"), "\(info)")
    print(
      "mtty guest test: \(String(format: "%.1f", run.seconds)) s wall to the last marker (guest uptime \(run.uptime) s, servers up at \(lines["served"]?.first ?? "?") s); \(migrate)"
    )
  }
}

let mttyGuestAvailable = GuestAvailability.trait(
  KernelGuestBinaries.missing ?? InteropEnvironment.current.mttyMissing)

@Suite("mtty guest availability")
struct MTTYGuestAvailabilityTests {
  @Test func theMttyGuestRunsOnCI() {
    GuestAvailability.check(
      "mtty guest test",
      missing: KernelGuestBinaries.missing ?? InteropEnvironment.current.mttyMissing)
  }
}
