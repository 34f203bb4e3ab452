import ArgumentParser
import Dispatch
import Synchronization
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

#if canImport(Glibc)
  import Glibc
#endif

/// What must match between a saved stream and the device it is restored into.
struct DeviceIdentity: Codable, Equatable, CustomStringConvertible {
  var vendorID: UInt16
  var deviceID: UInt16
  var revision: UInt8
  var subsystemVendorID: UInt16
  var subsystemID: UInt16
  var vramSize: UInt64

  static func read(from client: VFIOUserClient) throws -> DeviceIdentity {
    let ids = try client.read32(region: VFIOPCIRegion.config, offset: 0)
    let classRev = try client.read32(region: VFIOPCIRegion.config, offset: 8)
    let subsystem = try client.read32(region: VFIOPCIRegion.config, offset: 0x2C)
    let bar2 = try client.regionInfo(VFIOPCIRegion.bar2)
    if let fd = bar2.fd { close(fd) }
    return DeviceIdentity(
      vendorID: UInt16(truncatingIfNeeded: ids), deviceID: UInt16(truncatingIfNeeded: ids >> 16),
      revision: UInt8(truncatingIfNeeded: classRev),
      subsystemVendorID: UInt16(truncatingIfNeeded: subsystem),
      subsystemID: UInt16(truncatingIfNeeded: subsystem >> 16), vramSize: bar2.info.size)
  }

  var description: String {
    "[\(hex(vendorID, 4)):\(hex(deviceID, 4))] rev \(hex(revision, 2)), subsystem \(hex(subsystemVendorID, 4)):\(hex(subsystemID, 4)), VRAM \(vramSize == 0 ? "none" : formatBytes(vramSize))"
  }

  /// Why a stream from `self` cannot go into `other`, or nil when it can.
  func incompatibility(with other: DeviceIdentity) -> String? {
    if vendorID != other.vendorID || deviceID != other.deviceID {
      return
        "device id \(hex(vendorID, 4)):\(hex(deviceID, 4)) ≠ \(hex(other.vendorID, 4)):\(hex(other.deviceID, 4)) (the PF would refuse it with ENODEV)"
    }
    if revision != other.revision {
      return
        "revision \(hex(revision, 2)) ≠ \(hex(other.revision, 2)) (the PF would refuse it with ENODEV)"
    }
    if vramSize != other.vramSize {
      return
        "VRAM \(formatBytes(vramSize)) ≠ \(formatBytes(other.vramSize)) (provision the destination with the same quota)"
    }
    return nil
  }
}

/// Lets a value be handed to one other thread that becomes its only user.
final class Handoff<T>: @unchecked Sendable {
  let value: T
  init(_ value: T) { self.value = value }
}

// MARK: Errors a person can act on

/// A server that refused the connection with EBUSY: it serves another client
/// (`info` then asks its control socket instead).
struct BusyServerError: Error, CustomStringConvertible {
  var end: String
  var description: String {
    "\(end): the server is busy with another client (EBUSY); it serves one client at a time, so stop the VMM or command using it first"
  }
}

/// A failure at run time (not a usage mistake): printed as "Error: …" without the usage text.
struct CLIError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// "ENOSPC (No space left on device)": the name to search for and the text to read.
func describe(_ errno: Errno) -> String { "\(errno.name) (\(errno))" }

/// One line for any error the migration commands meet.
func describe(_ error: Error) -> String {
  switch error {
  case let e as VFIOUserClientError:
    switch e {
    case .server(let errno, let command):
      "\(Command(rawValue: command)?.description ?? "command \(command)") failed: \(describe(errno))"
    case .system(let errno): "connection lost: \(describe(errno))"
    case .disconnected: "the server closed the connection"
    case .timedOut: "no reply within \(migrationTimeout / 1000) s"
    case .protocolViolation(let why): "protocol violation: \(why)"
    }
  case let e as Errno: describe(e)
  default: "\(error)"
  }
}

/// An error on one named end: a server socket (`--from /tmp/a.sock`) or a file.
struct EndError: Error, CustomStringConvertible {
  var end: String
  var underlying: Error
  var description: String { "\(end): \(describe(underlying))" }
}

/// Whether `error` says the peer is gone (nothing more can be asked of it).
func isHangUp(_ error: Error) -> Bool {
  guard let e = error as? VFIOUserClientError else { return false }
  switch e {
  case .disconnected: return true
  case .system(let errno): return errno == .brokenPipe || errno == .connectionReset
  default: return false
  }
}

/// Runs `body`, naming `end` in whatever it throws.
func on<T>(_ end: String, _ body: () throws -> T) throws -> T {
  do { return try body() } catch let e as EndError { throw e } catch {
    throw EndError(end: end, underlying: error)
  }
}

/// Migration steps a command takes, for error reports that say where it failed.
enum MigrationStep: String {
  case connect = "connect"
  case probe = "check migration support"
  case identity = "compare devices"
  case resuming = "destination RUNNING → RESUMING"
  case stopCopy = "source → STOP_COPY"
  case stream = "stream STOP_COPY data"
  case restoreStream = "stream the saved state into the device"
  case finishSave = "source STOP_COPY → STOP"
  case finishRestore = "destination RESUMING → STOP"
  case start = "destination STOP → RUNNING"
}

struct StepError: Error, CustomStringConvertible {
  var step: MigrationStep
  var underlying: Error
  var description: String { "\(step.rawValue) failed: \(describe(underlying))" }
}

func step<T>(_ step: MigrationStep, _ body: () throws -> T) throws -> T {
  do { return try body() } catch let e as StepError { throw e } catch {
    throw StepError(step: step, underlying: error)
  }
}

/// Connects to the server that `option` (e.g. `--from`) names, with a message
/// that says what to do when it is absent or busy, the same for every command.
/// `sparse` offers the sparse migration stream (the client's
/// `sparseMigration` says whether the server took it).
func connectServer(_ path: String, option: String, sparse: Bool = false) throws -> VFIOUserClient {
  do {
    let client = try VFIOUserClient.connect(
      path: path,
      capabilities: sparse ? VFIOUserClient.sparseCapabilities : VFIOUserClient.defaultCapabilities)
    client.timeoutMilliseconds = migrationTimeout
    return client
  } catch {
    let end = "\(option) \(path)"
    switch error {
    case .server(.resourceBusy, _):
      throw BusyServerError(end: end)
    case .server(.permissionDenied, _):
      throw CLIError(
        "\(end): the server does not serve this user (EACCES); see its --allow-uid and --allow-gid")
    case .system(.permissionDenied):
      throw CLIError(
        "\(end): no permission to connect to the socket (EACCES); see its mode and group")
    case .system(.noSuchFileOrDirectory):
      throw CLIError("\(end): no such socket (ENOENT); is the server running?")
    case .system(.connectionRefused):
      throw CLIError("\(end): no server is listening there (ECONNREFUSED)")
    default:
      throw EndError(end: end, underlying: error)
    }
  }
}

// MARK: Output on stderr

func printError(_ line: String) {
  let bytes = Array((line + "\n").utf8)
  _ = try? bytes.withUnsafeBytes { try FileDescriptor.standardError.writeAll($0) }
}

/// `value` with `digits` decimals, without Foundation's formatters.
func fixed(_ value: Double, _ digits: Int) -> String {
  guard value.isFinite else { return "\(value)" }
  var scale = 1.0
  for _ in 0..<digits { scale *= 10 }
  let scaled = (abs(value) * scale).rounded()
  let whole = UInt64(scaled / scale)
  var text = "\(value < 0 && scaled > 0 ? "-" : "")\(whole)"
  if digits > 0 {
    let fraction = String(UInt64(scaled - Double(whole) * scale))
    text += "." + String(repeating: "0", count: digits - fraction.count) + fraction
  }
  return text
}

func formatRate(_ bytes: UInt64) -> String {
  if bytes >= 1 << 30 { return fixed(Double(bytes) / Double(1 << 30), 2) + " GiB" }
  if bytes >= 1 << 20 { return fixed(Double(bytes) / Double(1 << 20), 1) + " MiB" }
  if bytes >= 1 << 10 { return fixed(Double(bytes) / Double(1 << 10), 1) + " KiB" }
  return "\(bytes) B"
}

func gigabytesPerSecond(_ bytes: UInt64, _ seconds: Double) -> String {
  fixed(seconds > 0 ? Double(bytes) / seconds / 1e9 : 0, 2) + " GB/s"
}

/// What `migrate` moved: the bytes on the wire (read from the source), and
/// the state they carry, counted where the stream passes through this process
/// and otherwise (a sparse stream spliced through unread) the source's
/// estimate (MIG_DATA_SIZE, taken before STOP_COPY), said to be one.
struct MigrationVolume {
  var wire: UInt64
  /// The stream's length with its zero runs written out; nil when not seen.
  var state: UInt64?
  var estimate: UInt64
  /// The source sent the sparse stream: zero VRAM pages not on the wire.
  var sparse: Bool

  /// "256.1 MiB of state in 0.358 s (0.75 GB/s), 256.1 MiB on the wire"; the
  /// rate is the state's, which is what the workload sees move.
  func summary(seconds: Double) -> String {
    let time = "in \(fixed(seconds, 3)) s"
    let onTheWire =
      "\(formatRate(wire)) on the wire\(sparse ? " (sparse stream: zero VRAM pages not sent)" : "")"
    if let state {
      return
        "\(formatRate(state)) of state \(time) (\(gigabytesPerSecond(state, seconds))), \(onTheWire)"
    }
    guard estimate > 0 else {
      return "state of unknown size (the source gave no estimate) \(time), \(onTheWire)"
    }
    return
      "~\(formatRate(estimate)) of state (the source's estimate) \(time) (~\(gigabytesPerSecond(estimate, seconds))), \(onTheWire)"
  }
}

/// Whether two socket paths name one socket, however each is spelled (a
/// symlink, a relative path): the same device and inode. Paths that do not
/// exist are the same only when spelled the same.
func sameSocket(_ a: String, _ b: String) -> Bool {
  var first = stat()
  var second = stat()
  guard stat(a, &first) == 0, stat(b, &second) == 0 else { return a == b }
  return first.st_dev == second.st_dev && first.st_ino == second.st_ino
}

/// `--progress` and `--quiet`, the same for save, restore and migrate.
struct ProgressOptions: ParsableArguments {
  @Flag(help: "A progress line on stderr even when it is not a terminal.") var progress = false
  @Flag(help: "No progress output.") var quiet = false

  /// On a terminal unless `--quiet`; elsewhere only with `--progress`.
  var enabled: Bool { !quiet && (progress || isatty(2) != 0) }
}

/// `part` as a percentage of `whole`, for "1.2 GiB as 150 MiB (12%)".
func percent(_ part: UInt64, of whole: UInt64) -> String {
  whole > 0 ? fixed(Double(part) * 100 / Double(whole), 1) + "%" : "-"
}

/// Progress on stderr: the bytes of state moved and the bytes on the wire
/// (the file or pipe a checkpoint goes through, the socket of a migration),
/// so a person sees what skipping empty VRAM saved. Redrawn in place on a
/// terminal, a line every 10% otherwise.
final class ProgressReporter {
  let total: UInt64
  let label: String
  let tty = isatty(2) != 0
  let start = now()
  var lastDecile = -1
  var lastDraw: UInt64 = 0
  let enabled: Bool

  init(label: String, total: UInt64, enabled: Bool) {
    self.label = label
    self.total = total
    self.enabled = enabled
  }

  convenience init(label: String, total: UInt64, options: ProgressOptions) {
    self.init(label: label, total: total, enabled: options.enabled)
  }

  /// `sparse`: the state bytes are not known (a relayed sparse stream), only the wire's.
  func update(state: UInt64, wire: UInt64, final: Bool = false, sparse: Bool = false) {
    guard enabled else { return }
    let rate = gigabytesPerSecond(state, Double(now() - start) / 1e9)
    let fraction = final ? 1 : total > 0 ? min(1, Double(state) / Double(total)) : 0
    // Sparse: `state` is the wire's count, and so is the rate.
    let figures =
      sparse
      ? "\(formatRate(wire)) on the wire for ~\(formatRate(total)) of state (zero VRAM pages not sent), \(rate) on the wire"
      : "\(formatRate(state))\(total > 0 ? " of ~\(formatRate(total))" : "") of state, \(formatRate(wire)) on the wire (\(percent(wire, of: state))), \(rate)"
    if tty {
      guard final || now() - lastDraw > 100_000_000 else { return }
      lastDraw = now()
      // \r and clear-to-end-of-line: the line shrinks as well as grows.
      let line = "\r\(label): \(Int(fraction * 100))% \(figures)\u{1B}[K"
      _ = try? Array((line + (final ? "\n" : "")).utf8).withUnsafeBytes {
        try FileDescriptor.standardError.writeAll($0)
      }
    } else {
      let decile = Int(fraction * 10)
      guard final || decile > lastDecile else { return }
      lastDecile = decile
      printError("\(label): \(figures)")
    }
  }
}

// MARK: The copy pipeline

/// Moves a stream in buffers of `bufferSize` bytes from `produce`, run on a
/// thread of its own, to `consume`, run on the caller's, through a pool of
/// `slots` buffers: the next read overlaps the previous write, so the copy
/// runs at the slower side's pace. `produce` fills a buffer and says how many
/// bytes it holds and whether the stream ended. The first error on either side
/// stops both and is rethrown once the producer's thread has finished, so no
/// buffer is freed under it.
func pipeline(
  bufferSize: Int, slots: Int = 4,
  produce: @escaping (UnsafeMutableRawBufferPointer) throws -> (count: Int, last: Bool),
  consume: (UnsafeRawBufferPointer) throws -> Void
) throws -> UInt64 {
  let pool = (0..<slots).map { _ in
    UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
  }
  defer { pool.forEach { $0.deallocate() } }
  // Semaphores start at zero and are signalled up: libdispatch traps when one
  // is destroyed below its initial value, which an early exit would cause.
  let free = DispatchSemaphore(value: 0)
  for _ in 0..<slots { free.signal() }
  let filled = DispatchSemaphore(value: 0)
  let producerDone = DispatchSemaphore(value: 0)
  let results = Locked([(count: Int, last: Bool)](repeating: (0, false), count: slots))
  let producerError = Locked<Error?>(nil)
  let cancelled = Atomic<Bool>(false)
  let job = Handoff((produce, pool))
  DispatchQueue.global().async {
    let (produce, buffers) = job.value
    var slot = 0
    while true {
      free.wait()
      if cancelled.load(ordering: .acquiring) { break }
      do {
        let result = try produce(buffers[slot])
        results.withLock { $0[slot] = result }
        filled.signal()
        if result.last { break }
      } catch {
        producerError.withLock { $0 = error }
        results.withLock { $0[slot] = (-1, true) }
        filled.signal()
        break
      }
      slot = (slot + 1) % slots
    }
    producerDone.signal()
  }
  defer {
    // Wake a producer waiting for a buffer, then wait for it to finish.
    cancelled.store(true, ordering: .releasing)
    for _ in 0..<slots { free.signal() }
    producerDone.wait()
  }
  var total: UInt64 = 0
  var slot = 0
  while true {
    filled.wait()
    let result = results.withLock { $0[slot] }
    if result.count < 0 { throw producerError.withLock { $0 }! }
    if result.count > 0 {
      try consume(UnsafeRawBufferPointer(rebasing: pool[slot][0..<result.count]))
    }
    total += UInt64(result.count)
    free.signal()
    if result.last { return total }
    slot = (slot + 1) % slots
  }
}

/// A chunk both ends accept.
func migrationChunk(_ clients: VFIOUserClient...) -> Int {
  Int(clients.map { $0.serverCapabilities.effectiveMaxDataXferSize }.min() ?? 1 << 20)
}

/// How long a migration command waits for one reply: longer than the PF's
/// slowest bounded step (restore completion, 20 s for each of two GTs).
let migrationTimeout: Int32 = 60_000

/// Writes to a closed pipe fail with EPIPE (reported, then rolled back)
/// instead of killing the command with SIGPIPE halfway through.
func ignoreSIGPIPE() { signal(SIGPIPE, SIG_IGN) }
