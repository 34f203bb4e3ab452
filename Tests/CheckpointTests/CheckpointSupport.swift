import CVFIOUser
import Checkpoint
import SystemPackage
import XeStream

#if canImport(Glibc)
  import Glibc
#endif

/// A checkpoint written to memory.
final class MemorySink: SaveFileSink {
  var bytes: [UInt8] = []
  func write(_ bytes: UnsafeRawBufferPointer) throws { self.bytes += bytes }
}

/// A sink that fails once it holds `limit` bytes, as a full disk does.
final class FullSink: SaveFileSink {
  struct Full: Error {}
  let limit: Int
  var count = 0
  init(limit: Int) { self.limit = limit }
  func write(_ bytes: UnsafeRawBufferPointer) throws {
    guard count + bytes.count <= limit else { throw Full() }
    count += bytes.count
  }
}

/// A packet of the Xe stream: its header and payload.
func packet(_ type: XePacketType, offset: UInt64 = 0, _ payload: [UInt8]) -> [UInt8] {
  XePacketHeader(type: type, offset: offset, size: UInt64(payload.count)).encoded + payload
}

/// Deterministic bytes that do not compress.
func noise(_ count: Int, seed: UInt64) -> [UInt8] {
  var state = seed
  return (0..<count).map { _ in
    state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
    return UInt8(truncatingIfNeeded: state >> 33)
  }
}

/// VRAM of `pages` pages: zero, except for a noisy page, a compressible
/// page and a byte alone, at places that cut runs both ways.
func vram(pages: Int) -> [UInt8] {
  var bytes = [UInt8](repeating: 0, count: pages * 4096)
  for page in [0, 2, 3, pages / 2] where page < pages {
    bytes.replaceSubrange(page * 4096..<(page + 1) * 4096, with: noise(4096, seed: UInt64(page)))
  }
  if pages > 5 {
    bytes.replaceSubrange(5 * 4096..<6 * 4096, with: (0..<4096).map { UInt8($0 % 7) })
  }
  bytes[bytes.count - 1] = 0x5A
  return bytes
}

/// A stream as the PF lays it out: a descriptor, a GuC blob that compresses,
/// VRAM in two chunks (the second not whole pages), a trailer.
func xeStream(vramPages: Int = 64) -> [UInt8] {
  let memory = vram(pages: vramPages)
  let half = memory.count / 2
  return packet(
    .descriptor, [0x01, 0x00, 0x01, 0xF0, 0x11, 0xE2, 0, 0] + [UInt8](repeating: 0, count: 8))
    + packet(.guc, [UInt8](repeating: 0x47, count: 9000))
    + packet(.vram, Array(memory[..<half]))
    + packet(.vram, offset: UInt64(half), Array(memory[half...]) + [1, 2, 3])
    + packet(.trailer, [])
}

/// `stream` appended in pieces of the given sizes (cycled), then finished.
func checkpoint(
  _ stream: [UInt8], cuts: [Int] = [Int.max], configure: (SaveFileWriter) -> Void = { _ in }
) throws -> [UInt8] {
  let writer = SaveFileWriter()
  configure(writer)
  let out = MemorySink()
  try out.write(writer.header(json: Array(#"{"test":true}"#.utf8)))
  var at = 0
  var cut = 0
  while at < stream.count {
    let n = min(cuts[cut % cuts.count], stream.count - at)
    try stream.withUnsafeBytes {
      try writer.append(UnsafeRawBufferPointer(rebasing: $0[at..<(at + n)]), to: out)
    }
    at += n
    cut += 1
  }
  try writer.finish(to: out)
  return out.bytes
}

/// A file descriptor that reads `bytes`: a memfd (a regular file), or a pipe
/// fed from another thread.
func input(_ bytes: [UInt8], pipe: Bool = false) throws -> FileDescriptor {
  if pipe {
    // A reader that refuses early closes its end: the feeder gets EPIPE, not SIGPIPE.
    signal(SIGPIPE, SIG_IGN)
    let ends = try FileDescriptor.pipe()
    let feed = Feed(bytes: bytes, fd: ends.writeEnd)
    var thread = pthread_t()
    pthread_create(
      &thread, nil,
      { context in
        let feed = Unmanaged<Feed>.fromOpaque(context!).takeRetainedValue()
        _ = try? feed.bytes.withUnsafeBytes { try feed.fd.writeAll($0) }
        try? feed.fd.close()
        return nil
      }, Unmanaged.passRetained(feed).toOpaque())
    pthread_detach(thread)
    return ends.readEnd
  }
  let fd = FileDescriptor(rawValue: cvfu_memfd_create("checkpoint", 0))
  _ = try bytes.withUnsafeBytes { try fd.writeAll($0) }
  _ = try fd.seek(offset: 0, from: .start)
  return fd
}

final class Feed: @unchecked Sendable {
  let bytes: [UInt8]
  let fd: FileDescriptor
  init(bytes: [UInt8], fd: FileDescriptor) {
    self.bytes = bytes
    self.fd = fd
  }
}

/// Reads a checkpoint whole: its header's JSON and the stream expanded, or
/// with `tagged`, rebuilt from the tagged records (zero runs as zeros).
func readBack(_ file: [UInt8], tagged: Bool = false, pipe: Bool = false) throws -> (
  json: [UInt8], stream: [UInt8]
) {
  let fd = try input(file, pipe: pipe)
  defer { try? fd.close() }
  let reader = SaveFileReader(input: fd, name: "test.xesave")
  let json = try reader.readHeader()
  let buffer = UnsafeMutableRawBufferPointer.allocate(
    byteCount: SaveFormat.maxRecord + SparseMigration.segmentHeaderSize, alignment: 4096)
  defer { buffer.deallocate() }
  var stream: [UInt8] = []
  while true {
    if !tagged {
      let (count, last) = try reader.readRecords(into: buffer)
      stream += UnsafeRawBufferPointer(rebasing: buffer[0..<count])
      if last { break }
      continue
    }
    let (count, last) = try reader.readTaggedRecords(into: buffer)
    var at = 0
    while at < count {
      let word = buffer.loadUnaligned(fromByteOffset: at, as: UInt64.self)
      let length = Int(word >> 32)
      at += SparseMigration.segmentHeaderSize
      if UInt8(truncatingIfNeeded: word) == SparseMigration.SegmentKind.zeros.rawValue {
        stream += [UInt8](repeating: 0, count: length)
      } else {
        stream += UnsafeRawBufferPointer(rebasing: buffer[at..<(at + length)])
        at += length
      }
    }
    if last { break }
  }
  return (json, stream)
}

/// The message a refused checkpoint gets, or nil when it reads whole.
func refusal(_ file: [UInt8], pipe: Bool = false) -> String? {
  do {
    _ = try readBack(file, pipe: pipe)
    return nil
  } catch {
    return "\(error)"
  }
}

func le32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
