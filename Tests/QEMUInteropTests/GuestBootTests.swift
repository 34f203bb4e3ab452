import Foundation
import Testing
import VFIOUser
import VFIOUserClient
import XeVF

/// A real Linux guest (Debian's cloud kernel, busybox, under TCG) with the
/// simulated BMG VF attached. The guest's /init looks the device up in sysfs,
/// enables it, reads and writes BAR0 registers and BAR2 VRAM with devmem at the
/// physical addresses from `resource`, and prints "XEVF:" lines on the serial
/// console, which the test parses.
@Suite("QEMU interop (Linux guest)", .serialized, guestAvailable, .timeLimit(.minutes(4)))
struct GuestBootTests {
  static let initScript = """
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    echo "XEVF: booted $(cut -d' ' -f1 /proc/uptime)"
    dev=""
    for d in /sys/bus/pci/devices/*; do
      [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0xe211 ] && dev=$d
    done
    if [ -z "$dev" ]; then
      echo "XEVF: no device"; echo "XEVF: done"; poweroff -f
    fi
    echo "XEVF: device ${dev##*/} $(cat $dev/vendor) $(cat $dev/device) $(cat $dev/class) $(cat $dev/subsystem_vendor) $(cat $dev/subsystem_device)"
    for d in /sys/bus/pci/devices/*; do echo "XEVF: pci ${d##*/} $(cat $d/vendor):$(cat $d/device)"; done
    n=0
    while read start end flags; do echo "XEVF: resource $n $start $end $flags"; n=$((n + 1)); done < $dev/resource
    echo 1 > $dev/enable
    echo "XEVF: enabled $(cat $dev/enable)"
    bar0=$(sed -n 1p $dev/resource | cut -d' ' -f1)
    bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
    echo "XEVF: gmdid $(devmem $((bar0 + 0xd8c)) 32)"
    devmem $((bar0 + 0x190240)) 32 0x600dcafe
    echo "XEVF: scratch $(devmem $((bar0 + 0x190240)) 32)"
    devmem $((bar2 + 0x1000)) 32 0xa5a55a5a
    echo "XEVF: vram $(devmem $((bar2 + 0x1000)) 32)"
    devmem $((bar2 + 0x1008)) 64 0x0123456789abcdef
    echo "XEVF: vram64 $(devmem $((bar2 + 0x1008)) 64)"
    echo "XEVF: done $(cut -d' ' -f1 /proc/uptime)"
    poweroff -f
    """

  /// The initramfs: busybox, /init and a console node.
  static func initramfs(busybox: String) throws -> [UInt8] {
    var archive = CPIOArchive()
    for dir in ["bin", "dev", "proc", "sys"] { archive.directory(dir) }
    archive.characterDevice("dev/console", major: 5, minor: 1)
    archive.file(
      "bin/busybox", [UInt8](try Data(contentsOf: URL(fileURLWithPath: busybox))), mode: 0o100755)
    archive.file("init", Array(initScript.utf8), mode: 0o100755)
    return archive.finish()
  }

  @Test func linuxGuestSeesAndUsesTheVF() throws {
    let env = InteropEnvironment.current
    let kernel = try #require(env.kernel)
    // keep: the guest's VRAM writes are read back by a client after QEMU has gone.
    let rig = try Rig("guest", server: ["--on-disconnect", "keep"], qemu: nil)
    defer { rig.close() }
    let initrd = rig.directory + "/initrd.cpio"
    try Data(try Self.initramfs(busybox: try #require(env.busybox))).write(
      to: URL(fileURLWithPath: initrd))
    let serial = rig.directory + "/serial.log"
    _ = FileManager.default.createFile(atPath: serial, contents: nil)

    let started = Date()
    let arguments = [
      "-machine", "q35", "-accel", "tcg", "-m", "256M", "-smp", "1",
      "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
      "-display", "none", "-nodefaults", "-no-reboot", "-serial", "file:\(serial)",
      "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet",
      "-device",
      #"{"driver":"vfio-user-pci","id":"xevf0","socket":{"path":"\#(rig.server.socketPath)","type":"unix"},"addr":"0x4"}"#,
    ]
    // The installed wrapper shares /tmp; the kernel's directory is shared on request.
    let qemu = try ChildProcess(
      executable: try #require(env.qemu), arguments: arguments,
      logPath: rig.directory + "/qemu.log",
      environment: [
        "XE_VFU_QEMU_SHARE": URL(fileURLWithPath: kernel).deletingLastPathComponent().path
      ])
    defer { qemu.stop() }
    let console = { (try? String(contentsOfFile: serial, encoding: .utf8)) ?? "" }
    let finished = waitUntil(timeout: 150, interval: 0.1) {
      console().contains("XEVF: done") || console().contains("Kernel panic") || !qemu.isRunning
    }
    let bootTime = Date().timeIntervalSince(started)
    _ = qemu.waitForExit(timeout: 10)  // poweroff -f ends QEMU
    qemu.stop()
    let output = console()
    #expect(
      finished && output.contains("XEVF: done"),
      "guest did not finish in time\n\(output.suffix(3000))\n\(qemu.log)")
    var lines: [String: [String]] = [:]
    for line in output.split(whereSeparator: \.isNewline) {
      guard let range = line.range(of: "XEVF: ") else { continue }
      let words = line[range.upperBound...].split(separator: " ").map(String.init)
      if let key = words.first {
        lines[key, default: []].append(words.dropFirst().joined(separator: " "))
      }
    }
    let uptime = lines["done"]?.first.flatMap { Double($0) } ?? -1
    print(
      "guest boot test: \(String(format: "%.1f", bootTime)) s wall to the last marker (guest uptime \(uptime) s)"
    )

    // Enumeration as Linux sees it.
    #expect(
      lines["device"]?.first == "0000:00:04.0 0x8086 0xe211 0x038000 0x8086 0xe211", "\(lines)")
    let functions = lines["pci"] ?? []
    #expect(
      functions.filter { $0.hasSuffix("0x8086:0xe211") } == ["0000:00:04.0 0x8086:0xe211"],
      "\(functions)")
    let resources = (lines["resource"] ?? []).map {
      $0.split(separator: " ").compactMap { UInt64($0.dropFirst(2), radix: 16) }
    }
    #expect(resources.count >= 3)
    if resources.count >= 3, resources[0].count == 4, resources[2].count == 4 {
      let (bar0, bar2) = (resources[0], resources[2])
      #expect(bar0[2] - bar0[1] + 1 == 16 << 20, "BAR0 is 16 MiB")
      #expect(
        bar0[3] & 0x200 != 0 && bar0[3] & 0x2000 == 0,
        "BAR0: memory, not prefetchable (flags 0x\(hex(bar0[3])))")
      #expect(bar2[2] - bar2[1] + 1 == 256 << 20, "BAR2 is 256 MiB of VRAM")
      #expect(bar2[3] & 0x2000 != 0, "BAR2 prefetchable (flags 0x\(hex(bar2[3])))")
      #expect(bar0[1] % (16 << 20) == 0 && bar2[1] % (256 << 20) == 0, "naturally aligned")
    }
    #expect(lines["enabled"]?.first == "1")

    // BAR0 through the server; BAR2 through the mmap.
    #expect(lines["gmdid"]?.first == "0x05004000", "GMD_ID (graphics 20.01), served by the server")
    #expect(lines["scratch"]?.first == "0x600DCAFE")
    #expect(lines["vram"]?.first == "0xA5A55A5A")
    #expect(lines["vram64"]?.first == "0x0123456789ABCDEF")

    // What the server saw: the guest's session, with BAR0 accesses as messages...
    let log = rig.server.log
    #expect(rig.server.waitForLog("client disconnected"), "\(rig.logs)")
    #expect(ServerProcess.received("REGION_WRITE", in: log).count >= 2)
    #expect(ServerProcess.received("DMA_MAP", in: log).contains { ServerProcess.fds($0) == 1 })
    // ...and the guest's VRAM writes in its VRAM, read back by a client afterwards.
    let client = try VFIOUserClient.connect(path: rig.server.socketPath)
    #expect(try client.read32(region: VFIOPCIRegion.bar2, offset: 0x1000) == 0xA5A5_5A5A)
    #expect(try client.read64(region: VFIOPCIRegion.bar2, offset: 0x1008) == 0x0123_4567_89AB_CDEF)
    #expect(
      bootTime < 120, "the guest test should stay well within its budget (took \(bootTime) s)")
  }
}
