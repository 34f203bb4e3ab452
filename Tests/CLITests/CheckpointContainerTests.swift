import CVFIOUser
import Checkpoint
import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// The records of a save file, where each starts and what it holds.
func savedRecords(_ bytes: Data) throws -> [SaveRecordHeader] {
  try SaveRecordHeader.records(of: Array(bytes))
}

@Suite("checkpoints skip empty VRAM and compress what pays", .serialized)
struct CheckpointContainerTests {
  let vram = 16 << 20
  var serveArguments: [String] { ["--vram-size", "16M", "--on-disconnect", "keep"] }

  /// VRAM contents: a few scattered pages of a compressible pattern and one
  /// MiB of random bytes (the rest zero), random bytes everywhere, or nothing.
  enum Content: CaseIterable {
    case sparse, random, empty
  }

  func vramImage(_ content: Content) -> [UInt8] {
    var image = [UInt8](repeating: 0, count: vram)
    var state: UInt64 = 0x1234_5678
    func random() -> UInt8 {
      state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      return UInt8(truncatingIfNeeded: state >> 33)
    }
    switch content {
    case .empty: break
    case .random:
      for i in image.indices { image[i] = random() }
    case .sparse:
      // Pages at odd places (a page straddling two MIG_DATA_READ chunks among them), and
      // a byte alone at the very end.
      for page in [0, 1, 255, 256, 257, 1000, 2049, 4095] {
        let data = pattern(4096, seed: UInt8(truncatingIfNeeded: page))
        image.replaceSubrange((page * 4096)..<((page + 1) * 4096), with: data)
      }
      for i in (8 << 20)..<(9 << 20) { image[i] = random() }
      image[vram - 1] = 0x5A
    }
    return image
  }

  func load(_ serve: ServeProcess, _ image: [UInt8]) throws {
    let client = try serve.connect()
    var offset = 0
    while offset < image.count {
      let n = min(1 << 20, image.count - offset)
      let slice = Array(image[offset..<(offset + n)])
      // Zeros are already there: writing only the rest keeps untouched pages unwritten.
      if slice.contains(where: { $0 != 0 }) {
        try client.write(region: VFIOPCIRegion.bar2, offset: UInt64(offset), data: slice)
      }
      offset += n
    }
    try client.write32(region: 0, offset: scratch0, 0x5eed_0042)
  }

  func expectImage(
    _ serve: ServeProcess, _ image: [UInt8], sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    waitIdle(serve)
    let client = try serve.connect()
    #expect(try client.migrationState() == .running, sourceLocation: sourceLocation)
    #expect(
      try client.read32(region: 0, offset: scratch0) == 0x5eed_0042, sourceLocation: sourceLocation)
    #expect(try readVRAM(client, vram) == image, sourceLocation: sourceLocation)
  }

  @Test(arguments: Content.allCases)
  func roundTripsThroughAFileAndAPipe(_ content: Content) throws {
    let source = try ServeProcess(serveArguments)
    let first = try ServeProcess(serveArguments)
    let second = try ServeProcess(serveArguments)
    defer { [source, first, second].forEach { _ = $0.stop() } }
    let image = vramImage(content)
    try load(source, image)
    // The destinations hold other data, which the restore must replace, zero pages included.
    try load(first, vramImage(.random).map { $0 ^ 0xFF })
    try load(second, vramImage(.random).map { $0 ^ 0x0F })
    waitIdle(source)
    let file = source.directory + "/vf.xesave"
    let save = try run(["save", "-s", source.socketPath, "-o", file, "--progress"])
    #expect(save.status == 0, "\(save.stderr)")
    // The progress line shows the state and what it took on the wire.
    #expect(save.stderr.contains("of state"), "\(save.stderr)")
    #expect(save.stderr.contains("on the wire"), "\(save.stderr)")
    let bytes = try Data(contentsOf: URL(fileURLWithPath: file))
    #expect(bytes[8] == 3)
    let records = try savedRecords(bytes)
    let stream = records.reduce(0) { $0 + $1.streamLength }
    #expect(stream > vram)
    switch content {
    case .empty:
      // Only the non-VRAM packets (GuC, GGTT, ...) are left, and they compress.
      #expect(bytes.count < 64 << 10, "\(bytes.count) bytes")
      #expect(records.contains { $0.kind == .zeros })
    case .sparse:
      // The random MiB is stored; the pattern pages compress; the rest is zero records.
      #expect(bytes.count < (1 << 20) + (256 << 10), "\(bytes.count) bytes")
      #expect(records.contains { $0.kind == .stored } && records.contains { $0.kind == .zstd })
    case .random:
      // Nothing to skip and nothing that compresses: the container costs only its headers.
      #expect(bytes.count < stream + stream / 100, "\(bytes.count) of \(stream)")
      #expect(!records.contains { $0.kind == .zeros })
    }
    waitIdle(source)
    let restore = try run(["restore", "-s", first.socketPath, "-i", file, "--progress"])
    #expect(restore.status == 0, "\(restore.stderr)")
    #expect(restore.stderr.contains("on the wire"), "\(restore.stderr)")
    try expectImage(first, image)
    // From a pipe, as `save -o - | ssh host restore -i -` runs.
    let binary = executable.path
    let piped = try run([
      "__shell__",
      "\(binary) save -s \(source.socketPath) -o - --quiet | \(binary) restore -s \(second.socketPath) -i - --quiet",
    ])
    #expect(piped.status == 0, "\(piped.stderr)")
    try expectImage(second, image)
  }

  /// A sparse source saved with `--no-compress`, and a destination: `body`
  /// gets the file's bytes and returns what to restore; the destination must then hold the source's VRAM.
  func withStoredCheckpoint(_ body: (Data) throws -> Data) throws {
    let source = try ServeProcess(serveArguments)
    let destination = try ServeProcess(serveArguments)
    defer { [source, destination].forEach { _ = $0.stop() } }
    let image = vramImage(.sparse)
    try load(source, image)
    waitIdle(source)
    let file = source.directory + "/plain.xesave"
    let save = try run(["save", "-s", source.socketPath, "-o", file, "--no-compress", "--quiet"])
    #expect(save.status == 0, "\(save.stderr)")
    let restored = source.directory + "/restored.xesave"
    try body(try Data(contentsOf: URL(fileURLWithPath: file)))
      .write(to: URL(fileURLWithPath: restored))
    let restore = try run(["restore", "-s", destination.socketPath, "-i", restored, "--quiet"])
    #expect(restore.status == 0, "\(restore.stderr)")
    try expectImage(destination, image)
  }

  @Test func noCompressStoresEveryByte() throws {
    try withStoredCheckpoint { bytes in
      let records = try savedRecords(bytes)
      #expect(records.dropLast().allSatisfy { $0.kind == .stored })
      return bytes
    }
  }

  /// A version 2 checkpoint (8-byte record headers, no kinds), as saved before
  /// version 3, built from a stored-only version 3 file: it still restores.
  @Test func versionTwoFilesStillRestore() throws {
    try withStoredCheckpoint { Data(try SaveFormat.versionTwo(of: Array($0))) }
  }
}

@Suite("damaged compressed and zero records are refused", .serialized)
struct DamagedContainerTests {
  let damaged = DamagedCheckpointTests()

  /// Restores `bytes` and expects the refusal `message` and a destination reset before it ran.
  func expectRefused(
    _ bytes: Data, _ message: String, into destination: ServeProcess,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    try damaged.markDestination(destination)
    let result = try damaged.restore(bytes, into: destination, viaPipe: true)
    #expect(result.status == 1, sourceLocation: sourceLocation)
    #expect(result.stderr.contains(message), "\(result.stderr)", sourceLocation: sourceLocation)
    #expect(
      result.stderr.contains("device reset"), "\(result.stderr)", sourceLocation: sourceLocation)
    try damaged.expectNotRestored(destination, untouched: false)
  }

  @Test func eachKindOfRecordIsCoveredByTheChain() throws {
    try damaged.withCheckpoint { bytes, destination in
      let records = try savedRecords(bytes)
      let zstd = try #require(records.first { $0.kind == .zstd && $0.bodyLength > 8 })
      let zeros = try #require(records.first { $0.kind == .zeros })
      // A bit flipped inside a compressed frame: caught before it is expanded.
      var frame = bytes
      frame[Int(zstd.start) + 16 + zstd.bodyLength / 2] ^= 0x10
      try expectRefused(frame, "checksum mismatch in the record", into: destination)
      // A zero run made longer: its stream length is under the CRC too.
      var longer = bytes
      longer[Int(zeros.start) + 9] ^= 0x01
      try expectRefused(longer, "checksum mismatch in the record", into: destination)
      // A record of a kind this version does not know.
      var unknown = bytes
      unknown[Int(zeros.start) + 12] = 9
      try expectRefused(unknown, "damaged record header", into: destination)
      // A stored record that claims to be compressed: its CRC no longer matches.
      var relabelled = bytes
      let stored = try #require(records.first { $0.kind == .stored })
      relabelled[Int(stored.start) + 12] = 3
      try expectRefused(relabelled, "checksum mismatch in the record", into: destination)
    }
  }
}
