import CVFIOUser
import Checkpoint
import FuzzSupport
import SystemPackage
import XeStream

#if canImport(Glibc)
  import Glibc
#endif

// libFuzzer target: the checkpoint reader (`SaveFileReader`, what `restore`
// runs on a file it was handed). An input is a whole save file, read from a
// memfd (a regular file, so its size is checked against the header's file
// length) twice: expanded (`readRecords`) and tagged (`readTaggedRecords`,
// zero runs as segment headers). Whatever the bytes, both refuse it or both
// give back the same stream; a stream read whole is written again as a
// checkpoint, which must read back as that stream. (A few KiB of zero
// records stand for gigabytes: streams are compared by length and their
// first `kept` bytes, and written again only when no longer.)

/// The stream bytes kept for comparison.
let kept = 4 << 20

/// What a read gave: the stream's length and its first `kept` bytes.
struct Stream: Equatable {
  var count = 0
  var bytes: [UInt8] = []

  mutating func append(_ data: UnsafeRawBufferPointer) {
    count += data.count
    bytes += data.prefix(max(0, kept - bytes.count))
  }

  mutating func appendZeros(_ length: Int) {
    count += length
    bytes += repeatElement(0, count: min(length, max(0, kept - bytes.count)))
  }
}

nonisolated(unsafe) let buffer = UnsafeMutableRawBufferPointer.allocate(
  byteCount: SaveFormat.maxRecord + SparseMigration.segmentHeaderSize, alignment: 4096)

let file: FileDescriptor = {
  let fd = cvfu_memfd_create("fuzz-checkpoint", 0)
  guard fd >= 0 else { fuzzFailure("memfd_create failed (\(-fd))") }
  return FileDescriptor(rawValue: fd)
}()

/// Makes `file` hold exactly `bytes`, read from its start.
func load(_ bytes: UnsafeRawBufferPointer) {
  do {
    guard ftruncate(file.rawValue, 0) == 0 else { throw Errno(rawValue: errno) }
    _ = try file.writeAll(toAbsoluteOffset: 0, bytes)
    _ = try file.seek(offset: 0, from: .start)
  } catch {
    fuzzFailure("cannot load the input into the memfd: \(error)")
  }
}

/// The stream `bytes` holds, or nil where the reader refuses it.
func read(_ bytes: UnsafeRawBufferPointer, tagged: Bool) -> Stream? {
  load(bytes)
  let reader = SaveFileReader(input: file, name: "input")
  var stream = Stream()
  do {
    _ = try reader.readHeader()
    while true {
      let (count, last) =
        tagged ? try reader.readTaggedRecords(into: buffer) : try reader.readRecords(into: buffer)
      guard count <= buffer.count else { fuzzFailure("the reader filled past its buffer") }
      if tagged {
        expandTagged(UnsafeRawBufferPointer(rebasing: buffer[0..<count]), into: &stream)
      } else {
        stream.append(UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
      }
      if last { return stream }
    }
  } catch is SaveFileError {
    return nil
  } catch {
    fuzzFailure("the reader threw something other than a refusal: \(error)")
  }
}

/// The expanded stream of a tagged read: each a segment header, then data bytes.
func expandTagged(_ tagged: UnsafeRawBufferPointer, into stream: inout Stream) {
  var at = 0
  while at < tagged.count {
    guard at + SparseMigration.segmentHeaderSize <= tagged.count else {
      fuzzFailure("a tagged read cut a segment header")
    }
    let word = tagged.loadUnaligned(fromByteOffset: at, as: UInt64.self)
    let length = Int(word >> 32)
    at += SparseMigration.segmentHeaderSize
    switch SparseMigration.SegmentKind(rawValue: UInt8(truncatingIfNeeded: word)) {
    case .zeros: stream.appendZeros(length)
    case .data:
      guard at + length <= tagged.count else { fuzzFailure("a tagged read cut its data") }
      stream.append(UnsafeRawBufferPointer(rebasing: tagged[at..<(at + length)]))
      at += length
    case nil: fuzzFailure("a tagged read wrote segment kind \(UInt8(truncatingIfNeeded: word))")
    }
  }
}

/// Collects a checkpoint written again.
final class Collect: SaveFileSink {
  var bytes: [UInt8] = []
  func write(_ bytes: UnsafeRawBufferPointer) throws { self.bytes += bytes }
}

func writeCheckpoint(_ stream: [UInt8]) -> [UInt8] {
  let writer = SaveFileWriter()
  let out = Collect()
  do {
    try out.write(writer.header(json: Array("{}".utf8)))
    try stream.withUnsafeBytes { try writer.append($0, to: out) }
    try writer.finish(to: out)
  } catch {
    fuzzFailure("writing a checkpoint into memory failed: \(error)")
  }
  return out.bytes
}

func fuzzCheckpoint(_ input: UnsafeRawBufferPointer) {
  let expanded = read(input, tagged: false)
  let tagged = read(input, tagged: true)
  guard expanded == tagged else {
    fuzzFailure(
      "expanded and tagged reads disagree: \(expanded.map { "\($0.count) bytes" } ?? "refused") against \(tagged.map { "\($0.count) bytes" } ?? "refused")"
    )
  }
  guard let stream = expanded, stream.count <= kept else { return }
  let again = writeCheckpoint(stream.bytes)
  let back = again.withUnsafeBytes { read($0, tagged: false) }
  guard back == stream else { fuzzFailure("a stream read whole did not survive being saved again") }
}

/// Checkpoints of Xe streams: the packets of protocol/xe-packets.json in a
/// stream with a VRAM packet of zero and data pages, written each way (zero
/// elision and zstd, stored only, without checksums), and in format 2.
func checkpointSeeds(_ protocolDirectory: String) -> [[UInt8]] {
  var packets: [UInt8] = []
  forEachFixture(protocolDirectory + "/xe-packets.json", key: "packets") { object in
    if object.bool("header_only") != true, let bytes = object.hex("hex") { packets += bytes }
  }
  guard !packets.isEmpty else { return [] }
  var vram = [UInt8](repeating: 0, count: 5 * 4096)
  for i in 4096..<8192 { vram[i] = UInt8(truncatingIfNeeded: i &* 131 >> 3) }
  vram[vram.count - 1] = 1
  let stream =
    packets + XePacketHeader(type: .vram, size: UInt64(vram.count)).encoded + vram
    + XePacketHeader(type: .trailer).encoded
  var seeds: [[UInt8]] = []
  for mode in 0..<3 {
    let writer = SaveFileWriter()
    writer.elideZeros = mode == 0
    writer.compress = mode == 0
    writer.checksummed = mode != 2
    let out = Collect()
    do {
      try out.write(writer.header(json: Array(#"{"seed":true}"#.utf8)))
      try stream.withUnsafeBytes { try writer.append($0, to: out) }
      try writer.finish(to: out)
    } catch {
      fuzzFailure("writing a seed failed: \(error)")
    }
    seeds.append(out.bytes)
  }
  if let v2 = try? SaveFormat.versionTwo(of: seeds[1]) { seeds.append(v2) }
  seeds += regressionInputs(protocolDirectory, target: "checkpoint")
  return seeds
}

@main
enum FuzzCheckpointTarget {
  static func main() { fuzzTargetMain(seeds: checkpointSeeds) { fuzzCheckpoint($0) } }
}
