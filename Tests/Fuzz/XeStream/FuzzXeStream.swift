import FuzzSupport
import Logging
import SystemPackage
import VFIODevice
import VFIOUser
import XeStream
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

// libFuzzer target: the restore side of the Xe migration stream. An input is
// a write pattern byte and then a raw stream, written into a stopped
// simulated BMG VF in RESUMING (the data_fd's bytes: packet assembly,
// descriptor checks, the PF's ring and its restore worker), then RESUMING →
// STOP. Whatever the bytes, the restore either completes or fails, the
// device then reports STOP or (after the server's `migrationFailed`) ERROR,
// never RUNNING with a half state, and a reset brings it back to RUNNING for
// the next input.

/// The destination: a small GGTT quota and VRAM so that a whole save is a few KiB.
let profile: XeProfile = {
  var p = XeProfile.bmg
  p.ggttQuota = 256 << 10
  return p
}()

let quietLogger: Logger = {
  var logger = Logger(label: "fuzz-xe-stream")
  logger.logLevel = .critical
  return logger
}()

func makeVF(_ profile: XeProfile, vram: UInt64?) -> SimulatedXeVF {
  do {
    let vf = try SimulatedXeVF(profile: profile, vramSize: vram, logger: quietLogger)
    // The PF's state machine runs whole, on the fuzzing thread and with no
    // waits: what is fuzzed is its logic, not its timing, and each thread
    // wake-up would cost more than an input.
    vf.pfRunsWorkInline = true
    guard vf.pfRunsWorkInline else { fuzzFailure("the PF's workers started before the fuzzer") }
    vf.pfTiming = .immediate
    vf.vramChunkSize = 64 << 10
    return vf
  } catch {
    fuzzFailure("cannot create the simulated VF: \(error)")
  }
}

nonisolated(unsafe) let destination = makeVF(profile, vram: 1 << 20)

/// How the stream is cut into writes: the first input byte picks one.
let writeSizes = [Int.max, 1, 3, 23, 24, 25, 512, 4096]

func step(_ vf: SimulatedXeVF, _ from: MigrationState, _ to: MigrationState) throws(Errno)
  -> MigrationStream?
{
  try vf.migrationStep(from: from, to: to)
}

func fuzzXeStream(_ input: [UInt8]) {
  guard let pattern = input.first else { return }
  let stream = input.dropFirst()
  let writeSize = writeSizes[Int(pattern) % writeSizes.count]
  let vf = destination
  let sink: any MigrationSink
  do throws(Errno) {
    _ = try step(vf, .running, .runningP2P)
    _ = try step(vf, .runningP2P, .stop)
    guard case .sink(let opened)? = try step(vf, .stop, .resuming) else {
      fuzzFailure("STOP → RESUMING opened no sink")
    }
    sink = opened
  } catch {
    fuzzFailure("a reset VF refused RUNNING → RESUMING: \(error)")
  }

  var at = stream.startIndex
  var writeFailed = false
  while at < stream.endIndex {
    let end = stream.index(at, offsetBy: min(writeSize, stream.endIndex - at))
    let taken: Int
    do throws(Errno) {
      taken = try withBytes(stream[at..<end]) { raw throws(Errno) in try sink.write(raw) }
    } catch {
      writeFailed = true
      break
    }
    guard taken > 0, taken <= end - at else {
      fuzzFailure("a write took \(taken) of \(end - at) bytes")
    }
    at += taken
  }

  let restored: Bool
  do throws(Errno) {
    _ = try step(vf, .resuming, .stop)
    restored = true
  } catch {
    restored = false
  }
  sink.close()
  if restored {
    guard !writeFailed else { fuzzFailure("a restore whose stream was refused completed") }
    guard vf.migrationState == .stop else { fuzzFailure("restored, but \(vf.migrationState)") }
    do throws(Errno) {
      _ = try step(vf, .stop, .runningP2P)
      _ = try step(vf, .runningP2P, .running)
    } catch {
      fuzzFailure("a restored VF cannot run: \(error)")
    }
  } else {
    // What the server does when RESUMING → STOP fails.
    vf.migrationFailed()
    guard vf.migrationState == .error else {
      fuzzFailure("a failed restore left the VF in \(vf.migrationState)")
    }
  }
  do throws(Errno) { try vf.reset() } catch { fuzzFailure("reset failed: \(error)") }
  guard vf.migrationState == .running else {
    fuzzFailure("the VF is \(vf.migrationState) after a reset")
  }
}

/// `withUnsafeBytes` with typed throws (the standard one rethrows untyped).
func withBytes<R>(
  _ bytes: ArraySlice<UInt8>, _ body: (UnsafeRawBufferPointer) throws(Errno) -> R
) throws(Errno) -> R {
  let result: Result<R, Errno> = bytes.withUnsafeBytes { raw in
    do throws(Errno) { return .success(try body(raw)) } catch { return .failure(error) }
  }
  return try result.get()
}

func withMutableBytes<R>(
  _ bytes: inout [UInt8], _ body: (UnsafeMutableRawBufferPointer) throws(Errno) -> R
) throws(Errno) -> R {
  let result: Result<R, Errno> = bytes.withUnsafeMutableBytes { raw in
    do throws(Errno) { return .success(try body(raw)) } catch { return .failure(error) }
  }
  return try result.get()
}

/// A whole save of a fresh VF, from RUNNING; the VF runs again after it.
func save(_ vf: SimulatedXeVF) -> [UInt8] {
  do throws(Errno) {
    _ = try step(vf, .running, .runningP2P)
    _ = try step(vf, .runningP2P, .stop)
    guard case .source(let source)? = try step(vf, .stop, .stopCopy) else {
      fuzzFailure("STOP → STOP_COPY opened no source")
    }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 64 << 10)
    while true {
      let n = try withMutableBytes(&buffer) { raw throws(Errno) in try source.read(into: raw) }
      if n == 0 { break }
      bytes += buffer[..<n]
    }
    source.close()
    _ = try step(vf, .stopCopy, .stop)
    _ = try step(vf, .stop, .runningP2P)
    _ = try step(vf, .runningP2P, .running)
    return bytes
  } catch {
    fuzzFailure("a save failed: \(error)")
  }
}

/// `stream` with its VRAM packets cut to the first 512 bytes of VRAM, still
/// a complete stream (a restore takes any VRAM chunks): a seed of a few KiB
/// instead of a megabyte of zero pages.
func shrinkingVRAM(_ stream: [UInt8]) -> [UInt8] {
  var out: [UInt8] = []
  var at = 0
  while at + XePacketHeader.size <= stream.count {
    guard var header = try? XePacketHeader(decoding: Array(stream[at..<at + XePacketHeader.size]))
    else { break }
    let payload = at + XePacketHeader.size
    let end = payload + Int(header.size)
    at = end
    if header.type == .vram {
      guard header.offset == 0 else { continue }
      header.size = min(header.size, 512)
    }
    out += header.encoded + stream[payload..<(payload + Int(header.size))]
  }
  return out
}

/// Real saves (this profile; ptl; another VRAM size) under each write
/// pattern, and the packets of protocol/xe-packets.json alone, after a
/// descriptor, and before a trailer.
func xeStreamSeeds(_ protocolDirectory: String) -> [[UInt8]] {
  var seeds: [[UInt8]] = []
  var ptl = XeProfile.ptl
  ptl.ggttQuota = 256 << 10
  let saves = [
    save(makeVF(profile, vram: 1 << 20)), save(makeVF(ptl, vram: nil)),
    save(makeVF(profile, vram: 2 << 20)),
  ].map(shrinkingVRAM)
  for (i, stream) in saves.enumerated() {
    for pattern in 0..<(i == 0 ? writeSizes.count : 1) { seeds.append([UInt8(pattern)] + stream) }
  }
  var packets: [String: [UInt8]] = [:]
  var ordered: [[UInt8]] = []
  forEachFixture(protocolDirectory + "/xe-packets.json", key: "packets") { object in
    guard let name = object.string("name"), let bytes = object.hex("hex") else { return }
    packets[name] = bytes
    ordered.append(bytes)
  }
  forEachFixture(protocolDirectory + "/xe-packets.json", key: "restore_errors") { object in
    if let bytes = object.hex("hex") { ordered.append(bytes) }
  }
  let descriptor = packets["descriptor-bmg"] ?? []
  let trailer = packets["trailer"] ?? []
  for packet in ordered {
    seeds.append([0] + packet)
    seeds.append([0] + descriptor + packet + trailer)
  }
  seeds += regressionInputs(protocolDirectory, target: "xe-stream")
  return seeds
}

@main
enum FuzzXeStreamTarget {
  static func main() { fuzzTargetMain(seeds: xeStreamSeeds) { fuzzXeStream(Array($0)) } }
}
