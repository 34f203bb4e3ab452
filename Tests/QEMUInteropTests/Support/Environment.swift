import Foundation
import TestSupport
import Testing

/// Where the interop tests find QEMU, the guest kernel and busybox, and the
/// server binary. `scripts/install-qemu.sh` writes the QEMU settings to
/// `/opt/xe-vfio-user/env` (or `$XE_VFU_CACHE/env`); `scripts/test.sh` also
/// exports them. Variables in the environment win over the file.
struct InteropEnvironment: Sendable {
  var qemu: String?
  var qemuVersion: String?
  var kernel: String?
  var busybox: String?
  /// The guest kernel's VFIO modules, decompressed (`GuestVFIOModules.names`).
  var guestModules: String?
  /// The generic amd64 flavour of the guest kernel, which has igb: `vmlinuz` and
  /// `modules/*.ko` with `modules/order` (the insmod order).
  var amd64: String?
  /// The mtty sample mdev driver built for that kernel: `mtty.ko` and `mdev.ko`.
  var mtty: String?
  /// The Debian 13 root with libvirt that scripts/libvirt.sh runs a daemon from.
  var libvirtRoot: String?
  /// A C compiler that links statically, for the vIOMMU guest's program.
  var compiler: String?
  /// The built `xe-vfio-user`.
  var server: String
  /// The repository root.
  var root: String
  /// Why the QEMU tests cannot run here, or nil when they can.
  var qemuMissing: String?
  var guestMissing: String?
  var viommuMissing: String?
  var amd64Missing: String?
  var mttyMissing: String?
  var libvirtMissing: String?

  static let current = InteropEnvironment.load()

  static var isCI: Bool { ProcessInfo.processInfo.environment["CI"] == "true" }

  private static func load() -> InteropEnvironment {
    var dir = URL(fileURLWithPath: #filePath)
    while dir.lastPathComponent != "Tests" { dir.deleteLastPathComponent() }
    let root = dir.deletingLastPathComponent().path
    var settings: [String: String] = [:]
    let cache = ProcessInfo.processInfo.environment["XE_VFU_CACHE"] ?? "/opt/xe-vfio-user"
    if let text = try? String(contentsOfFile: cache + "/env", encoding: .utf8) {
      for line in text.split(separator: "\n") {
        let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
        if parts.count == 2 { settings[parts[0]] = parts[1] }
      }
    }
    for (key, value) in ProcessInfo.processInfo.environment where key.hasPrefix("XE_VFU_") {
      settings[key] = value
    }
    let files = FileManager.default
    var env = InteropEnvironment(
      qemu: settings["XE_VFU_QEMU"], qemuVersion: settings["XE_VFU_QEMU_VERSION"],
      kernel: settings["XE_VFU_GUEST_KERNEL"], busybox: settings["XE_VFU_GUEST_BUSYBOX"],
      // install-qemu.sh puts them next to the kernel; an older env file does not name them.
      guestModules: settings["XE_VFU_GUEST_MODULES"]
        ?? settings["XE_VFU_GUEST_KERNEL"].map {
          URL(fileURLWithPath: $0).deletingLastPathComponent().path + "/modules"
        },
      amd64: settings["XE_VFU_GUEST_AMD64"]
        ?? settings["XE_VFU_GUEST_KERNEL"].map {
          URL(fileURLWithPath: $0).deletingLastPathComponent().path + "/amd64"
        },
      mtty: settings["XE_VFU_GUEST_MTTY"]
        ?? settings["XE_VFU_GUEST_KERNEL"].map {
          URL(fileURLWithPath: $0).deletingLastPathComponent().path + "/mtty"
        },
      libvirtRoot: settings["XE_VFU_LIBVIRT_ROOT"],
      compiler: settings["XE_VFU_CC"] ?? findInPath("gcc"),
      server: xeVFIOUserExecutable, root: root)
    if let qemu = env.qemu {
      if !files.isExecutableFile(atPath: qemu) {
        env.qemuMissing = "\(qemu) (from XE_VFU_QEMU) is not executable"
      }
    } else {
      env.qemuMissing =
        "no QEMU with vfio-user-pci installed: run scripts/install-qemu.sh (scripts/test.sh does)"
    }
    if !files.isExecutableFile(atPath: env.server) {
      env.qemuMissing = env.qemuMissing ?? "the server binary \(env.server) is missing: build first"
    }
    if env.qemuMissing != nil {
      env.guestMissing = env.qemuMissing
    } else if env.kernel.map({ !files.fileExists(atPath: $0) }) ?? true
      || env.busybox.map({ !files.isExecutableFile(atPath: $0) }) ?? true
    {
      env.guestMissing = "no guest kernel or busybox: run scripts/install-qemu.sh"
    }
    if env.guestMissing != nil {
      env.viommuMissing = env.guestMissing
    } else if !GuestVFIOModules.names.allSatisfy({ name in
      env.guestModules.map { files.fileExists(atPath: "\($0)/\(name).ko") } ?? false
    }) {
      env.viommuMissing = "no VFIO modules for the guest kernel: run scripts/install-qemu.sh"
    } else if env.compiler == nil {
      env.viommuMissing = "no gcc to build the guest's VFIO program (set XE_VFU_CC to another)"
    }
    if env.guestMissing != nil {
      env.amd64Missing = env.guestMissing
    } else if !(env.amd64.map {
      files.fileExists(atPath: "\($0)/vmlinuz") && files.fileExists(atPath: "\($0)/modules/order")
    } ?? false) {
      env.amd64Missing =
        "no amd64 guest kernel with igb (the cloud flavour has none): run scripts/install-qemu.sh"
    }
    if env.amd64Missing != nil {
      env.mttyMissing = env.amd64Missing
    } else if !(env.mtty.map {
      files.fileExists(atPath: "\($0)/mtty.ko") && files.fileExists(atPath: "\($0)/mdev.ko")
    } ?? false) {
      env.mttyMissing =
        "no mtty.ko built for the guest kernel (Debian ships none): run scripts/install-qemu.sh"
    }
    if env.guestMissing != nil {
      env.libvirtMissing = env.guestMissing
    } else if !(env.libvirtRoot.map { files.isExecutableFile(atPath: $0 + "/usr/sbin/libvirtd") }
      ?? false)
    {
      env.libvirtMissing = "no libvirt beside the QEMU: run scripts/install-qemu.sh"
    } else if getuid() != 0 {
      env.libvirtMissing = "scripts/libvirt.sh needs root (a mount namespace, chroot)"
    }
    return env
  }

  private static func findInPath(_ name: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    return path.split(separator: ":").map { "\($0)/\(name)" }.first {
      FileManager.default.isExecutableFile(atPath: $0)
    }
  }

}

/// Enables a suite only when QEMU is there. On CI a missing QEMU is a failure
/// (see `QEMUAvailabilityTests`), never a silent skip.
let qemuAvailable = ConditionTrait.enabled(
  if: InteropEnvironment.current.qemuMissing == nil,
  Comment(rawValue: "QEMU interop skipped: \(InteropEnvironment.current.qemuMissing ?? "")"))

let guestAvailable = ConditionTrait.enabled(
  if: InteropEnvironment.current.guestMissing == nil,
  Comment(rawValue: "guest boot skipped: \(InteropEnvironment.current.guestMissing ?? "")"))

let viommuGuestAvailable = ConditionTrait.enabled(
  if: InteropEnvironment.current.viommuMissing == nil,
  Comment(rawValue: "guest boot skipped: \(InteropEnvironment.current.viommuMissing ?? "")"))

/// The modules the vIOMMU guest inserts, in dependency order (scripts/install-qemu.sh
/// takes them from the guest kernel's own package).
enum GuestVFIOModules {
  static let names = ["irqbypass", "vfio", "vfio_iommu_type1", "vfio-pci-core", "vfio-pci"]
}

@Suite("QEMU availability")
struct QEMUAvailabilityTests {
  /// Locally a missing QEMU skips the interop suites (loudly, see scripts/test.sh);
  /// with CI=true it fails here.
  @Test func qemuIsThereOnCI() {
    let env = InteropEnvironment.current
    if InteropEnvironment.isCI {
      #expect(
        env.qemuMissing == nil, "CI must run the QEMU interop tests: \(env.qemuMissing ?? "")")
      #expect(env.guestMissing == nil, "CI must run the guest boot test: \(env.guestMissing ?? "")")
      #expect(
        env.viommuMissing == nil, "CI must run the vIOMMU guest test: \(env.viommuMissing ?? "")")
    } else if let reason = env.qemuMissing ?? env.guestMissing ?? env.viommuMissing {
      print("⚠️  QEMU interop tests are SKIPPED: \(reason)")
    }
  }
}

/// A fresh directory under /tmp (the QEMU wrapper shares /tmp, and socket paths stay short).
func makeScratchDirectory(_ tag: String) throws -> String {
  let path = "/tmp/xvq-\(tag)-\(UUID().uuidString.prefix(6))"
  try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
  return path
}

struct InteropError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}
