import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// A child process whose stdout and stderr go to files (a pipe nobody drains
/// would stall a chatty child), stopped by PID.
///
/// Spawned with posix_spawn rather than Foundation's Process: the child gets
/// an empty signal mask and default dispositions (test threads block SIGTERM,
/// and a blocked mask is inherited, so QEMU would ignore SIGTERM), and no
/// descriptor of the test process except stdin/stdout/stderr (a leaked client
/// socket would keep a connection open and hide a hang-up).
class ChildProcess: @unchecked Sendable {
  let pid: pid_t
  let logPath: String
  let outputPath: String
  private var exitStatus: Int32?

  init(
    executable: String, arguments: [String], logPath: String, outputPath: String? = nil,
    environment: [String: String]? = nil
  ) throws {
    self.logPath = logPath
    self.outputPath = outputPath ?? logPath + ".stdout"
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(
      &actions, 1, self.outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_addopen(&actions, 2, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard let closeFrom = Self.addCloseFrom else {
      throw InteropError("glibc lacks posix_spawn_file_actions_addclosefrom_np")
    }
    _ = closeFrom(&actions, 3)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var none = sigset_t()
    sigemptyset(&none)
    posix_spawnattr_setsigmask(&attributes, &none)
    var all = sigset_t()
    sigfillset(&all)
    posix_spawnattr_setsigdefault(&attributes, &all)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

    let variables = ProcessInfo.processInfo.environment.merging(environment ?? [:]) { $1 }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp = variables.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
      for pointer in argv + envp { free(pointer) }
    }
    var child: pid_t = 0
    let result = posix_spawn(&child, executable, &actions, &attributes, argv, envp)
    guard result == 0 else {
      throw InteropError("cannot start \(executable): \(String(cString: strerror(result)))")
    }
    pid = child
  }

  deinit { _ = stop(grace: 2) }

  /// glibc 2.34+; not visible to Swift through the Glibc module, so looked up.
  private typealias AddCloseFrom =
    @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
  private static let addCloseFrom: AddCloseFrom? = {
    guard
      let symbol = dlsym(
        UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np")
    else {
      return nil
    }
    return unsafeBitCast(symbol, to: AddCloseFrom.self)
  }()

  var isRunning: Bool {
    guard exitStatus == nil else { return false }
    var status: Int32 = 0
    let reaped = waitpid(pid, &status, WNOHANG)
    if reaped == pid {
      // Exit code, or 128 + signal like a shell.
      exitStatus = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
      return false
    }
    return reaped == 0
  }

  /// The log (stderr) so far.
  var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }

  func signal(_ number: Int32) { if isRunning { kill(pid, number) } }

  /// Waits for the process to exit by itself; returns false on timeout.
  func waitForExit(timeout: Double) -> Bool {
    waitUntil(timeout: timeout, interval: 0.005) { !isRunning }
  }

  /// SIGTERM, then SIGKILL after `grace` seconds; returns the exit status.
  @discardableResult
  func stop(grace: Double = 5) -> Int32 {
    if isRunning {
      kill(pid, SIGTERM)
      if !waitForExit(timeout: grace) {
        kill(pid, SIGKILL)
        _ = waitForExit(timeout: 10)
      }
    }
    return exitStatus ?? -1
  }
}

/// `xe-vfio-user serve` with trace logging: every message it receives is a
/// line "<- COMMAND id=N size=N fds=N" in its log.
final class ServerProcess: ChildProcess, @unchecked Sendable {
  let socketPath: String

  init(directory: String, arguments: [String] = []) throws {
    socketPath = directory + "/vfu.sock"
    try super.init(
      executable: InteropEnvironment.current.server,
      arguments: ["serve", "--socket-path", socketPath, "--log-level", "trace", "--quiet"]
        + arguments,
      logPath: directory + "/server.log")
    guard waitUntil(timeout: 10, { log.contains("serving simulated Xe VF") || !isRunning }),
      isRunning
    else {
      throw InteropError("xe-vfio-user serve did not start:\n\(log)")
    }
  }

  /// A position in the log, to look only at what came after it.
  var mark: Int { (try? FileManager.default.attributesOfItem(atPath: logPath)[.size] as? Int) ?? 0 }

  func log(since mark: Int) -> String {
    guard let handle = FileHandle(forReadingAtPath: logPath) else { return "" }
    defer { try? handle.close() }
    try? handle.seek(toOffset: UInt64(mark))
    return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
  }

  /// The received messages of `command` (e.g. "REGION_WRITE") in `text`.
  static func received(_ command: String, in text: String) -> [String] {
    text.split(separator: "\n").filter { $0.contains("<- \(command) id=") }.map(String.init)
  }

  func received(_ command: String, since mark: Int = 0) -> [String] {
    Self.received(command, in: log(since: mark))
  }

  /// The `fds=N` of a trace line.
  static func fds(_ line: String) -> Int {
    line.split(separator: " ").first { $0.hasPrefix("fds=") }.flatMap { Int($0.dropFirst(4)) } ?? -1
  }

  /// Waits until the log has `count` lines containing `text`.
  func waitForLog(_ text: String, count: Int = 1, timeout: Double = 10) -> Bool {
    waitUntil(timeout: timeout) { log.components(separatedBy: text).count - 1 >= count }
  }

  var openFDs: Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
  }

  /// Mappings of client memory (QEMU's memfd guest RAM) the server still has.
  var clientMappings: Int {
    let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
    return maps.split(separator: "\n").filter { $0.contains("memfd:") && !$0.contains("xe-vf-") }
      .count
  }
}

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
