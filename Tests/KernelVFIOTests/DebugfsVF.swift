import Foundation
import KernelVFIO
import Logging
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserServer
import XeVF

/// A fake VF on plain vfio-pci: the device itself (regions, interrupts, DMA,
/// FLR) is the simulated VF, standing in for the hardware vfio-pci would
/// reach; its migration is the production `PFDebugfsMigration` over the
/// fake tree's debugfs files, which the same VF's simulated PF drives. So
/// the server sees exactly what `PFMigratedKernelVFIOBackend` gives it.
final class DebugfsVF: VFIODeviceBackend, PFDebugfsMigratable {
  let vf: SimulatedXeVF
  let pfMigration: PFDebugfsMigration
  private(set) var pfErrors: [String] = []

  init(_ vf: SimulatedXeVF, controls: PFVFControls, timeout: Duration = .seconds(5)) {
    self.vf = vf
    pfMigration = PFDebugfsMigration(controls: controls, timeout: timeout)
  }

  func logPFError(_ message: String) { pfErrors.append(message) }

  var deviceFlags: VFIODeviceFlags { vf.deviceFlags }
  var regionCount: UInt32 { vf.regionCount }
  var irqCount: UInt32 { vf.irqCount }
  func region(_ index: UInt32) -> RegionDescription? { vf.region(index) }
  func irq(_ index: UInt32) -> IRQDescription? { vf.irq(index) }
  func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  { try vf.read(region: region, offset: offset, into: buffer) }
  func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
    try vf.write(region: region, offset: offset, from: buffer)
  }
  func directRead(region: UInt32, offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
    vf.directRead(region: region, offset: offset, count: count)
  }
  func attach(host: DeviceHost?) { vf.attach(host: host) }
  func setIRQs(_ request: consuming IRQSetRequest) throws(Errno) { try vf.setIRQs(request) }
  var eventFDCount: Int { vf.eventFDCount }

  /// The VF's FLR (vfio-pci's VFIO_DEVICE_RESET), then the PF's `reset`.
  func reset() throws(Errno) {
    if let error = try pfMigration.reset(device: { () throws(Errno) in try vf.reset() }) {
      pfErrors.append("PF reset: \(error.name)")
    }
  }
}

/// A fake host: a BMG (or PTL) PF driven by xe with `vfs` VFs on vfio-pci,
/// its debugfs tree, and a simulated VF behind each VF's directory.
final class FakeXeHost {
  let system: FakeSystem
  let debugfs = FakeDebugfs()
  let pf: String
  let vfAddresses: [String]
  var vfs: [SimulatedXeVF] = []

  init(
    profile: XeProfile = .bmg, pf: String = "0000:03:00.0", vfs count: Int = 2,
    vram: UInt64? = 4 << 20, timing: PFTiming = PFTiming.kernel.scaled(by: 0.5)
  ) throws {
    system = try FakeSystem()
    self.pf = pf
    try system.addIOMMU()
    try system.loadDriver("vfio-pci")
    vfAddresses = try system.addSRIOVPF(
      pf, device: "0x" + String(profile.deviceID, radix: 16), vfs: count,
      vfDrivers: Array(repeating: "vfio-pci", count: count))
    try system.addPFDebugfs(pf, vfs: count)
    let logger = Logger(label: "fake-vf")
    for n in 1...count {
      let vf = try SimulatedXeVF(
        profile: profile, vramSize: profile.hasVRAM ? vram : nil, vfid: UInt16(n), logger: logger)
      vf.pfTiming = timing
      debugfs.attach(system.debugfsVF(pf, n), vf)
      vfs.append(vf)
    }
  }

  /// The served device of VF `n` (1-based), found and opened as `serve` does.
  func device(_ n: Int, timeout: Duration = .seconds(5)) throws -> DebugfsVF {
    let plan = try MigrationPlan.decide(
      .auto, address: PCIAddress(vfAddresses[n - 1])!, driver: "vfio-pci", kernelFlags: nil,
      kernelAbsence: "vfio-pci has no migration support (ENOTTY)", paths: system.paths,
      files: debugfs)
    guard case .pfDebugfs(let controls) = plan else {
      throw KernelVFIOError(.migrationUnavailable, "no debugfs plan: \(plan.summary)")
    }
    return DebugfsVF(vfs[n - 1], controls: controls, timeout: timeout)
  }
}
