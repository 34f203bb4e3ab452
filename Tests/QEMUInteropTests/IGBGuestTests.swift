import Foundation
import Testing

/// A real SR-IOV VF through the kernel VFIO backend. QEMU gives a Linux guest
/// (the generic amd64 kernel flavour, which has igb) an Intel IOMMU and an
/// `igb` (82576: PCIe, MSI-X, SR-IOV with up to 8 igbvf VFs) at 00:05.0. In the
/// guest the igb PF driver enables two VFs through `sriov_numvfs`; VF 0 is bound
/// to vfio-pci with driver_override (igbvf is not even in the initramfs) and
/// served by `xe-vfio-user serve --device vfio:<VF>`, and
/// `xe-vfu-guest-check --igb` (Tests/KernelGuestCheck/IGB.swift) checks through
/// the server: the physfn/virtfn0 links, config space against sysfs, the MSI-X
/// capability and IRQ info, eventfds on all MSI-X vectors that the VF raises
/// (its EICS register) and that stop after the teardown, and an FLR through
/// DEVICE_RESET that clears the queue enable the client set.
@Suite(
  "QEMU interop (a real SR-IOV VF: igb in a guest)", .serialized, igbGuestAvailable,
  .timeLimit(.minutes(4)))
struct IGBGuestTests {
  /// The guest's /init; `modules` are inserted in this order.
  static func initScript(modules: [String]) -> String {
    """
    \(GuestRun.initPreamble(environment: "PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu", modules: modules))
    pf=""
    for d in /sys/bus/pci/devices/*; do
      [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x10c9 ] && pf=$d
    done
    if [ -z "$pf" ]; then
      echo "XEVF: error no igb"; echo "XEVF: done"; poweroff -f
    fi
    echo "XEVF: pf ${pf##*/} driver $(basename $(readlink $pf/driver)) totalvfs $(cat $pf/sriov_totalvfs)"
    # Up, the PF driver puts the device in MSI-X mode (GPIE), which VF interrupts need.
    netdev=$(ls $pf/net)
    ip link set dev $netdev up || echo "XEVF: error link up $netdev"
    # No VF driver probes the new VFs (igbvf is not here either).
    echo 0 > $pf/sriov_drivers_autoprobe
    echo 2 > $pf/sriov_numvfs || echo "XEVF: error sriov_numvfs"
    echo "XEVF: numvfs $(cat $pf/sriov_numvfs)"
    vf=$(readlink -f $pf/virtfn0)
    addr=${vf##*/}
    drv=$(readlink $vf/driver)
    echo "XEVF: vf $addr id $(cat $vf/vendor):$(cat $vf/device) driver ${drv:-none} reset-method $(cat $vf/reset_method) iommu $(ls /sys/class/iommu) group $(basename $(readlink $vf/iommu_group))"
    echo vfio-pci > $vf/driver_override
    echo $addr > /sys/bus/pci/drivers_probe
    echo "XEVF: driver $(basename $(readlink $vf/driver))"
    echo "XEVF: vf-group-devices $(ls $vf/iommu_group/devices | tr '\\n' ' ')"
    /bin/xe-vfio-user serve --device vfio:$addr -s /tmp/g.sock \(KernelGuestTests.serveArguments) 2>/tmp/server.log &
    i=0; while [ ! -S /tmp/g.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    echo "XEVF: served $(cut -d' ' -f1 /proc/uptime)"
    /bin/xe-vfu-guest-check --igb /tmp/g.sock $addr || echo "XEVF: error guest-check exit $?"
    i=0; while ! grep -q "client disconnected" /tmp/server.log && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    sed 's/^/XEVF-LOG: /' /tmp/server.log
    echo "XEVF: done $(cut -d' ' -f1 /proc/uptime)"
    poweroff -f
    """
  }

  @Test func aVFOfQEMUsIGBIsServedFromInsideAGuest() throws {
    let binaries = try #require(KernelGuestBinaries.current)
    if let stale = binaries.stale { print("⚠️  \(stale)") }
    let amd64 = try #require(InteropEnvironment.current.amd64)
    let order = try String(contentsOfFile: amd64 + "/modules/order", encoding: .utf8)
      .split(separator: "\n").map(String.init)
    // The rig is for its directory: its simulated VF is not attached.
    let rig = try Rig("igbvf", qemu: nil)
    defer { rig.close() }
    let initramfs = try KernelGuestTests.initramfs(
      server: binaries.server, check: binaries.check, directory: rig.directory,
      script: Self.initScript(modules: order),
      modules: order.map { (name: $0, path: "\(amd64)/modules/\($0).ko") })
    let run = try GuestRun.boot(
      rig: rig, initramfs: initramfs, memory: "512M", append: "intel_iommu=on",
      devices: ["intel-iommu,caching-mode=on", "igb,addr=0x5"], kernel: amd64 + "/vmlinuz",
      vfioUser: false)
    #expect(run.finished, "\(run.failureReport)")
    let lines = run.lines
    let serverLog = run.console.split(whereSeparator: \.isNewline).compactMap { line in
      line.range(of: "XEVF-LOG: ").map { String(line[$0.upperBound...]) }
    }
    let context = "\(run.console.suffix(6000))"
    #expect(lines["error"] == nil, "the guest reported errors: \(lines["error"] ?? [])\n\(context)")

    // The PF under its igb driver (which keeps one of QEMU's 8 VF pools for itself),
    // two VFs, VF 0 (devfn 0x28 + VF offset 0x80) on vfio-pci, alone in its IOMMU group.
    #expect(lines["pf"] == ["0000:00:05.0 driver igb totalvfs 7"], "\(context)")
    #expect(lines["numvfs"] == ["2"])
    let vf = try #require(lines["vf"]?.first, "\(context)")
    #expect(
      vf.hasPrefix("0000:00:15.0 id 0x8086:0x10ca driver none reset-method flr iommu dmar0 group "),
      "\(vf)")
    #expect(lines["driver"] == ["vfio-pci"])
    #expect(lines["vf-group-devices"] == ["0000:00:15.0"])
    let opened = serverLog.first { $0.contains("kernel VFIO device: ") } ?? ""
    #expect(
      opened.contains("0000:00:15.0 [8086:10ca] driver vfio-pci through group/container"),
      "\(serverLog.prefix(10))")

    // Enumeration through sysfs links.
    #expect(lines["sriov-physfn"] == ["0000:00:05.0"])
    #expect(lines["sriov-virtfn0"] == ["0000:00:15.0"])
    #expect(lines["device-info"]?.first?.hasPrefix("pci 1 reset 1 regions ") == true)
    // Config space through the server equals the guest kernel's sysfs view, with
    // what vfio-pci fills in that a VF's own config space lacks: the IDs (all-ones in
    // sysfs), and the type bits of its BARs (0 and 3: 64-bit prefetchable; zeros in sysfs).
    #expect(lines["config-sysfs-ids"] == ["ffffffff"])
    #expect(lines["config-vf-virtualized"] == ["ids bar0=0xc bar3=0xc"])
    #expect(lines["config"]?.first?.hasSuffix("bytes match 1") == true, "\(lines["config"] ?? [])")
    #expect(lines["config-ids"] == ["10ca8086"])
    // MSI-X: the capability (3 vectors, table and PBA in BAR3) and the IRQ info agree.
    #expect(
      lines["msix-cap"] == [
        "offset 0x70 vectors 3 table bar3+0x0 pba bar3+0x2000 kernel-vectors 3"
      ],
      "\(lines["msix-cap"] ?? [])")
    #expect(lines["pcie-flr"] == ["1"])
    #expect(lines["irq-info"]?.first?.hasPrefix("msix 3 ") == true, "\(lines["irq-info"] ?? [])")
    #expect(lines["irq-info"]?.first?.hasSuffix(" intx 0") == true)
    // Eventfds on every vector; the VF raises vectors 0 and 1; none after the teardown.
    #expect(lines["msix-eventfd"] == ["set 3"])
    #expect(lines["msix-enabled"] == ["1"])
    let fired = (lines["msix-fired"]?.first ?? "").split(separator: " ").compactMap { Int($0) }
    #expect(fired.count == 2 && fired.allSatisfy { $0 >= 1 }, "\(lines["msix-fired"] ?? [])")
    #expect(lines["msix-teardown"] == ["ok enabled 0 fired-after 0"])
    // DEVICE_RESET → VFIO_DEVICE_RESET → an FLR, which clears the queue enable.
    let reset = (lines["reset"]?.first ?? "").split(separator: " ").map(String.init)
    #expect(reset.count == 6 && reset[0] == "ok", "\(lines["reset"] ?? [])")
    if reset.count == 6, let set = UInt32(reset[3].dropFirst(2), radix: 16),
      let after = UInt32(reset[5].dropFirst(2), radix: 16)
    {
      #expect(set & (1 << 25) != 0 && after & (1 << 25) == 0, "\(reset)")
    }
    #expect(lines["check-done"] != nil, "\(context)")
    // The server's log: the eventfds went to the kernel as they were, then none; the reset.
    for line in [
      "VFIO_DEVICE_SET_IRQS MSI-X TRIGGER [0, +3) eventfds",
      "VFIO_DEVICE_SET_IRQS MSI-X TRIGGER [0, +0)",
      "device reset",
    ] {
      #expect(serverLog.contains { $0.contains(line) }, "\(line): \(serverLog)")
    }
    #expect(serverLog.contains { $0.contains("client disconnected") })

    print(
      "igb VF guest test: \(String(format: "%.1f", run.seconds)) s wall to the last marker (guest uptime \(run.uptime) s, server up at \(lines["served"]?.first ?? "?") s); initramfs \(initramfs.count >> 20) MiB"
    )
  }
}

let igbGuestAvailable = GuestAvailability.trait(
  KernelGuestBinaries.missing ?? InteropEnvironment.current.amd64Missing)

@Suite("igb guest availability")
struct IGBGuestAvailabilityTests {
  @Test func theIGBGuestRunsOnCI() {
    GuestAvailability.check(
      "igb VF guest test",
      missing: KernelGuestBinaries.missing ?? InteropEnvironment.current.amd64Missing)
  }
}
