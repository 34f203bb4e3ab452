import Foundation
import TestSupport
import Testing

/// Whether a guest test can run here: skipped loudly where its parts are
/// missing, and a failure on CI, which must run every guest.
enum GuestAvailability {
  static func trait(_ missing: String?) -> ConditionTrait {
    .enabled(if: missing == nil, Comment(rawValue: "guest boot skipped: \(missing ?? "")"))
  }

  static func check(_ name: String, missing: String?) {
    if InteropEnvironment.isCI {
      #expect(missing == nil, "CI must run the \(name): \(missing ?? "")")
    } else if let missing {
      print("⚠️  the \(name) is SKIPPED: \(missing)")
    }
  }
}

/// One boot of a Linux guest under TCG with the rig's VF attached at 00:04.0.
/// The guest's /init reports on the serial console in lines `XEVF: key words…`
/// and ends with `XEVF: done <uptime>` before it powers off.
struct GuestRun {
  /// The whole console.
  var console: String
  /// Each key's reports, in order.
  var lines: [String: [String]]
  /// Wall time from QEMU's start to the last marker.
  var seconds: Double
  var finished: Bool
  var qemuLog: String

  /// How every test guest's /init starts: busybox's applets on PATH, /proc,
  /// /sys and /dev mounted, the first report line, then `modules` (from
  /// /lib/modules) loaded in order. Ends with a newline.
  static func initPreamble(environment: String = "PATH=/bin", modules: [String] = []) -> String {
    var script = """
      #!/bin/busybox sh
      /bin/busybox --install -s /bin
      export \(environment)
      mount -t proc proc /proc
      mount -t sysfs sysfs /sys
      mount -t devtmpfs devtmpfs /dev
      echo "XEVF: booted $(cut -d' ' -f1 /proc/uptime)"

      """
    for module in modules {
      script += "insmod /lib/modules/\(module).ko || echo \"XEVF: error insmod \(module)\"\n"
    }
    return script
  }

  /// Sets `dev` to the simulated BMG VF's sysfs directory (empty when absent).
  static let findVF = """
    dev=""
    for d in /sys/bus/pci/devices/*; do
      [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0xe211 ] && dev=$d
    done

    """

  /// The guest's uptime at `done`, or -1.
  var uptime: Double { lines["done"]?.first.flatMap { Double($0) } ?? -1 }

  /// What to show when the guest did not finish.
  var failureReport: String { "guest did not finish in time\n\(console.suffix(3000))\n\(qemuLog)" }

  /// Boots `kernel` (the installed cloud kernel by default) with `initramfs`;
  /// `devices` come before the VF (an IOMMU must precede the devices it
  /// translates for). Without `vfioUser` the rig's VF is not attached.
  static func boot(
    rig: Rig, initramfs: [UInt8], memory: String = "256M", append: String = "",
    devices: [String] = [], kernel: String? = nil, vfioUser: Bool = true
  ) throws -> GuestRun {
    let env = InteropEnvironment.current
    let kernel = try kernel ?? #require(env.kernel)
    let initrd = rig.directory + "/initrd.cpio"
    try Data(initramfs).write(to: URL(fileURLWithPath: initrd))
    let serial = rig.directory + "/serial.log"
    _ = FileManager.default.createFile(atPath: serial, contents: nil)
    let started = Date()
    let arguments =
      [
        "-machine", "q35", "-accel", "tcg", "-m", memory, "-smp", "1",
        "-object", "memory-backend-memfd,id=mem,size=\(memory),share=on",
        "-machine", "memory-backend=mem",
      ] + devices.flatMap { ["-device", $0] } + [
        "-display", "none", "-nodefaults", "-no-reboot", "-serial", "file:\(serial)",
        "-kernel", kernel, "-initrd", initrd,
        // no_timer_check: under TCG on a loaded host the kernel's check that the
        // timer interrupt arrives through the IO-APIC can miss its window, and
        // with interrupt remapping (intel-iommu) that is a panic at boot
        // ("timer doesn't work through Interrupt-remapped IO-APIC").
        "-append", "console=ttyS0 panic=-1 quiet no_timer_check \(append)",
      ]
      + (vfioUser
        ? [
          "-device",
          #"{"driver":"vfio-user-pci","id":"xevf0","socket":{"path":"\#(rig.server.socketPath)","type":"unix"},"addr":"0x4"}"#,
        ] : [])
    // The installed wrapper shares /tmp; the kernel's directory is shared on request.
    let qemu = try ChildProcess(
      executable: try #require(env.qemu), arguments: arguments,
      logPath: rig.directory + "/qemu.log",
      environment: [
        "XE_VFU_QEMU_SHARE": URL(fileURLWithPath: kernel).deletingLastPathComponent().path
      ])
    defer { qemu.stop() }
    let read = { (try? String(contentsOfFile: serial, encoding: .utf8)) ?? "" }
    let finished = waitUntil(timeout: 150, interval: 0.1) {
      read().contains("XEVF: done") || read().contains("Kernel panic") || !qemu.isRunning
    }
    let seconds = Date().timeIntervalSince(started)
    _ = qemu.waitForExit(timeout: 10)  // poweroff -f ends QEMU
    qemu.stop()
    let console = read()
    var lines: [String: [String]] = [:]
    for line in console.split(whereSeparator: \.isNewline) {
      guard let range = line.range(of: "XEVF: ") else { continue }
      let words = line[range.upperBound...].split(separator: " ").map(String.init)
      if let key = words.first {
        lines[key, default: []].append(words.dropFirst().joined(separator: " "))
      }
    }
    return GuestRun(
      console: console, lines: lines, seconds: seconds,
      finished: finished && console.contains("XEVF: done"), qemuLog: qemu.log)
  }
}
