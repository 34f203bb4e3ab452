import ArgumentParser
import Foundation
import Synchronization
import VFIOUser
import VFIOUserClient
import VFIOUserServer

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

/// The header in front of a saved stream: magic, version, and JSON metadata.
struct SaveFileHeader: Codable {
  static let magic = Array("XEVFUSAV".utf8)
  static let version: UInt32 = 1
  var identity: DeviceIdentity
  var estimatedBytes: UInt64
  var created: String
  var source: String

  func encoded() throws -> [UInt8] {
    let json = Array(try JSONEncoder().encode(self))
    return Self.magic + le32(Self.version) + le32(UInt32(json.count)) + json
  }

  /// Reads the header from `input`; the stream bytes follow it.
  static func read(from input: FileHandle) throws -> SaveFileHeader {
    let fixed = try readExactly(input, 16)
    guard Array(fixed[0..<8]) == magic else {
      throw CLIError("not an xe-vfio-user save file (bad magic)")
    }
    let version = fixed[8..<12].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
    guard version == Self.version else {
      throw CLIError("save file format \(version) is not supported (this is \(Self.version))")
    }
    let length = Int(fixed[12..<16].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
    guard length < 1 << 20 else { throw CLIError("save file header is corrupt") }
    return try JSONDecoder().decode(SaveFileHeader.self, from: Data(try readExactly(input, length)))
  }
}

func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

func readExactly(_ handle: FileHandle, _ count: Int) throws -> [UInt8] {
  var out: [UInt8] = []
  while out.count < count {
    guard let data = try handle.read(upToCount: count - out.count), !data.isEmpty else {
      throw CLIError("unexpected end of input")
    }
    out += data
  }
  return out
}

/// Lets a value be handed to one other thread that becomes its only user.
final class Handoff<T>: @unchecked Sendable {
  let value: T
  init(_ value: T) { self.value = value }
}

/// Migration steps a command takes, for error reports that say where it failed.
enum MigrationStep: String {
  case connect = "connect"
  case probe = "check migration support"
  case identity = "compare devices"
  case resuming = "destination RUNNING → RESUMING"
  case stopCopy = "source RUNNING → STOP_COPY"
  case stream = "stream STOP_COPY data"
  case finishSave = "source STOP_COPY → STOP"
  case finishRestore = "destination RESUMING → RUNNING"
  case rollback = "return the source to RUNNING"
}

struct StepError: Error, CustomStringConvertible {
  var step: MigrationStep
  var underlying: Error
  var description: String {
    if let e = underlying as? VFIOUserClientError, let errno = e.errno {
      return "\(step.rawValue) failed: \(errno.name) (\(errno))"
    }
    return "\(step.rawValue) failed: \(underlying)"
  }
}

func step<T>(_ step: MigrationStep, _ body: () throws -> T) throws -> T {
  do { return try body() } catch let e as StepError { throw e } catch {
    throw StepError(step: step, underlying: error)
  }
}

/// Progress on stderr: a bar on a terminal, a line every 10% otherwise.
final class ProgressReporter {
  let total: UInt64
  let label: String
  let tty = isatty(2) != 0
  let start = now()
  var lastDecile = -1
  var lastDraw: UInt64 = 0
  let enabled: Bool

  init(label: String, total: UInt64, enabled: Bool = true) {
    self.label = label
    self.total = total
    self.enabled = enabled
  }

  func update(_ done: UInt64, final: Bool = false) {
    guard enabled else { return }
    let elapsed = Double(now() - start) / 1e9
    let rate = elapsed > 0 ? Double(done) / elapsed : 0
    let fraction = total > 0 ? min(1, Double(done) / Double(total)) : 0
    if tty {
      guard final || now() - lastDraw > 100_000_000 else { return }
      lastDraw = now()
      let width = 30
      let filled = Int(fraction * Double(width))
      let bar =
        String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
      FileHandle.standardError.write(
        Data(
          "\r\(label) [\(bar)] \(Int(fraction * 100))% \(formatRate(done)) \(String(format: "%.2f GB/s", rate / 1e9))\(final ? "\n" : "")"
            .utf8))
    } else {
      let decile = Int(fraction * 10)
      guard final || decile > lastDecile else { return }
      lastDecile = decile
      FileHandle.standardError.write(
        Data(
          "\(label): \(formatRate(done))\(total > 0 ? " of ~\(formatRate(total))" : "") (\(String(format: "%.2f GB/s", rate / 1e9)))\n"
            .utf8))
    }
  }
}

func formatRate(_ bytes: UInt64) -> String {
  if bytes >= 1 << 30 { return String(format: "%.2f GiB", Double(bytes) / Double(1 << 30)) }
  if bytes >= 1 << 20 { return String(format: "%.1f MiB", Double(bytes) / Double(1 << 20)) }
  return "\(bytes) B"
}

/// Moves the STOP_COPY stream from `source` to `sink` with the read of the next
/// chunk overlapping the write of the previous one (a reader thread and a
/// small pool of buffers), so the copy runs at the slower side's speed.
func pumpStream(
  from source: VFIOUserClient, chunk: Int, progress: ProgressReporter,
  sink: (UnsafeRawBufferPointer) throws -> Void
) throws -> UInt64 {
  let slots = 4
  let pool = (0..<slots).map { _ in
    UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
  }
  defer { pool.forEach { $0.deallocate() } }
  let filled = DispatchSemaphore(value: 0)
  let free = DispatchSemaphore(value: slots)
  let lengths = Mutex([Int](repeating: 0, count: slots))
  let failure = Mutex<Error?>(nil)
  let cancelled = Atomic<Bool>(false)
  let reader = Handoff((source, pool))
  let readerDone = DispatchSemaphore(value: 0)
  Thread {
    let (client, buffers) = reader.value
    var slot = 0
    while true {
      free.wait()
      if cancelled.load(ordering: .relaxed) { break }
      let n: Int
      do { n = try client.migDataRead(into: buffers[slot]) } catch {
        failure.withLock { $0 = error }
        lengths.withLock { $0[slot] = -1 }
        filled.signal()
        break
      }
      lengths.withLock { $0[slot] = n }
      filled.signal()
      if n < chunk { break }
      slot = (slot + 1) % slots
    }
    readerDone.signal()
  }.start()
  var total: UInt64 = 0
  var slot = 0
  defer {
    cancelled.store(true, ordering: .relaxed)
    free.signal()
    readerDone.wait()
  }
  while true {
    filled.wait()
    let n = lengths.withLock { $0[slot] }
    if n < 0 { throw failure.withLock { $0 }! }
    if n > 0 { try sink(UnsafeRawBufferPointer(rebasing: pool[slot][0..<n])) }
    total += UInt64(n)
    progress.update(total)
    free.signal()
    if n < chunk { break }
    slot = (slot + 1) % slots
  }
  progress.update(total, final: true)
  return total
}

/// A chunk both ends accept.
func migrationChunk(_ clients: VFIOUserClient...) -> Int {
  Int(clients.map { $0.serverCapabilities.effectiveMaxDataXferSize }.min() ?? 1 << 20)
}

/// A failure at run time (not a usage mistake): printed as "Error: …" without the usage text.
struct CLIError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// How long a migration command waits for one reply: longer than the PF's
/// slowest bounded step (restore completion, 20 s for each of two GTs).
let migrationTimeout: Int32 = 60_000
