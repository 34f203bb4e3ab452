import Foundation
import TestSupport
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// How a test QEMU is set up.
struct QEMUOptions {
  var memory = "256M"
  /// Guest RAM from a shared memfd (DMA_MAP with fds) or plain anonymous memory
  /// (no fd: DMA goes through DMA_READ / DMA_WRITE messages).
  var sharedMemory = true
  /// Add our `-device vfio-user-pci` at 00:04.0 (off when `extra` brings its own).
  var attachDevice = true
  /// How long QEMU waits for each reply (its `x-msg-timeout`, default 5000 ms).
  var messageTimeoutMilliseconds: Int?
  var accelerator = "qtest"
  var extra: [String] = []
  /// QEMU trace events written to `qemu-trace.log`.
  var traces = [
    "vfio_user_version", "vfio_user_recv_request", "vfio_user_wrmulti", "vfio_user_set_irqs",
    "vfio_user_dma_map", "vfio_msi_interrupt", "vfio_msix_enable",
  ]
}

/// QEMU with our VF at 00:04.0, driven through qtest and QMP.
final class QEMUSession: @unchecked Sendable {
  static let slot: UInt32 = 4
  let directory: String
  let process: ChildProcess
  let qtest: QTest
  let qmp: QMP
  let tracePath: String

  init(directory: String, socketPath: String, options: QEMUOptions = QEMUOptions()) throws {
    let env = InteropEnvironment.current
    guard let qemu = env.qemu else { throw InteropError(env.qemuMissing ?? "no QEMU") }
    self.directory = directory
    let tag = UUID().uuidString.prefix(4)
    let qtestPath = "\(directory)/qtest-\(tag).sock"
    let qmpPath = "\(directory)/qmp-\(tag).sock"
    tracePath = "\(directory)/qemu-trace-\(tag).log"
    var arguments = [
      "-machine", "q35", "-accel", options.accelerator, "-display", "none", "-nodefaults", "-m",
      options.memory,
      "-qtest", "unix:\(qtestPath),server=on,wait=off", "-qtest-log", "none",
      "-qmp", "unix:\(qmpPath),server=on,wait=off", "-D", tracePath,
    ]
    if options.sharedMemory {
      arguments += [
        "-object", "memory-backend-memfd,id=mem,size=\(options.memory),share=on", "-machine",
        "memory-backend=mem",
      ]
    }
    // XE_VFU_QEMU_TRACE adds trace patterns when debugging, e.g. "vfio_user_*".
    let debugTraces = ProcessInfo.processInfo.environment["XE_VFU_QEMU_TRACE"].map { [$0] } ?? []
    for event in options.traces + debugTraces { arguments += ["-trace", event] }
    if options.attachDevice {
      arguments += [
        "-device",
        #"{"driver":"vfio-user-pci","id":"xevf0","socket":{"path":"\#(socketPath)","type":"unix"},"addr":"0x\#(hex(Self.slot))""#
          + (options.messageTimeoutMilliseconds.map { #","x-msg-timeout":\#($0)"# } ?? "") + "}",
      ]
    }
    process = try ChildProcess(
      executable: qemu, arguments: arguments + options.extra,
      logPath: "\(directory)/qemu-\(tag).log")
    let child = process
    do {
      qtest = try QTest(path: qtestPath, alive: { child.isRunning })
      qmp = try QMP(path: qmpPath, alive: { child.isRunning })
    } catch {
      child.stop()
      throw InteropError("QEMU did not come up (\(error)); its log:\n\(child.log)")
    }
  }

  deinit { process.stop() }

  var trace: String { (try? String(contentsOfFile: tracePath, encoding: .utf8)) ?? "" }

  /// Trace lines of `event`.
  func traced(_ event: String) -> [String] {
    trace.split(separator: "\n").filter { $0.hasPrefix(event + " ") }.map(String.init)
  }

  /// QMP quit, then waits for the process to end.
  func quit() throws {
    _ = try? qmp.execute("quit")
    guard process.waitForExit(timeout: 10) else {
      throw InteropError("QEMU did not exit after quit")
    }
  }

  // MARK: PCI config space through CF8/CFC (bus 0, our slot, function 0)

  private func select(_ offset: UInt32) throws {
    try qtest.outl(0xCF8, 0x8000_0000 | Self.slot << 11 | (offset & 0xFC))
  }

  func config32(_ offset: UInt32) throws -> UInt32 {
    try select(offset)
    return try qtest.inl(0xCFC)
  }

  func config16(_ offset: UInt32) throws -> UInt16 {
    try select(offset)
    return try qtest.inw(0xCFC + UInt16(offset & 2))
  }

  func config8(_ offset: UInt32) throws -> UInt8 {
    try select(offset)
    return try qtest.inb(0xCFC + UInt16(offset & 3))
  }

  func setConfig32(_ offset: UInt32, _ value: UInt32) throws {
    try select(offset)
    try qtest.outl(0xCFC, value)
  }

  func setConfig16(_ offset: UInt32, _ value: UInt16) throws {
    try select(offset)
    try qtest.outw(0xCFC + UInt16(offset & 2), value)
  }

  /// Where the tests put the BARs: BAR0 below 4 GiB, BAR2 (64-bit, prefetchable) at 32 GiB.
  static let bar0: UInt64 = 0xE000_0000
  static let bar2: UInt64 = 0x8_0000_0000

  /// Programs BAR0 and BAR2 and enables memory decoding and bus mastering.
  func enableDevice(bar2 hasBAR2: Bool = true) throws {
    try setConfig32(0x10, UInt32(truncatingIfNeeded: Self.bar0))
    try setConfig32(0x14, UInt32(truncatingIfNeeded: Self.bar0 >> 32))
    if hasBAR2 {
      try setConfig32(0x18, UInt32(truncatingIfNeeded: Self.bar2))
      try setConfig32(0x1C, UInt32(truncatingIfNeeded: Self.bar2 >> 32))
    }
    try setConfig16(0x04, 0x0006)
  }
}
