import Foundation
import TestSupport
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
    \(GuestRun.initPreamble())
    \(GuestRun.findVF)
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

  /// The initramfs: busybox, /init (this suite's by default) and a console node.
  static func initramfs(busybox: String, init script: String = initScript) throws -> [UInt8] {
    var archive = CPIOArchive()
    for dir in ["bin", "dev", "proc", "sys"] { archive.directory(dir) }
    archive.characterDevice("dev/console", major: 5, minor: 1)
    archive.file(
      "bin/busybox", [UInt8](try Data(contentsOf: URL(fileURLWithPath: busybox))), mode: 0o100755)
    archive.file("init", Array(script.utf8), mode: 0o100755)
    return archive.finish()
  }

  @Test func linuxGuestSeesAndUsesTheVF() throws {
    let env = InteropEnvironment.current
    // keep: the guest's VRAM writes are read back by a client after QEMU has gone.
    let rig = try Rig("guest", server: ["--on-disconnect", "keep"], qemu: nil)
    defer { rig.close() }
    let guest = try GuestRun.boot(
      rig: rig, initramfs: try Self.initramfs(busybox: try #require(env.busybox)))
    #expect(guest.finished, "\(guest.failureReport)")
    let lines = guest.lines
    let bootTime = guest.seconds
    print(
      "guest boot test: \(String(format: "%.1f", bootTime)) s wall to the last marker (guest uptime \(guest.uptime) s)"
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
    #expect(ServeProcess.received("REGION_WRITE", in: log).count >= 2)
    #expect(ServeProcess.received("DMA_MAP", in: log).contains { ServeProcess.fds($0) == 1 })
    // ...and the guest's VRAM writes in its VRAM, read back by a client afterwards.
    let client = try VFIOUserClient.connect(path: rig.server.socketPath)
    #expect(try client.read32(region: VFIOPCIRegion.bar2, offset: 0x1000) == 0xA5A5_5A5A)
    #expect(try client.read64(region: VFIOPCIRegion.bar2, offset: 0x1008) == 0x0123_4567_89AB_CDEF)
    #expect(
      bootTime < 120, "the guest test should stay well within its budget (took \(bootTime) s)")
  }
}
