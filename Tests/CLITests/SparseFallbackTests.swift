import CVFIOUser
import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// `save`, `restore` and `migrate` with a server that does not speak the
/// sparse stream (`serve --no-sparse-migration` answers VERSION as one that
/// predates it): every combination still moves every byte, zero runs written
/// out where only one side has them, and a failure on that path still leaves
/// the source running with its state.
@Suite("the sparse stream's fallbacks, with a server that does not speak it", .serialized)
struct SparseFallbackTests {
  let vram = 16 << 20
  var current: [String] { ["--vram-size", "16M", "--on-disconnect", "keep"] }
  var older: [String] { current + ["--no-sparse-migration"] }

  /// Marks (`markDevice`: three MiB of data, the rest never written) and the
  /// whole VRAM they make.
  func load(_ serve: ServeProcess, seed: UInt8) throws -> [UInt8] {
    let marks = try markDevice(try serve.connect(), vram: vram, seed: seed)
    var image = [UInt8](repeating: 0, count: vram)
    for (offset, data) in marks {
      image.replaceSubrange(Int(offset)..<(Int(offset) + data.count), with: data)
    }
    waitIdle(serve)
    return image
  }

  /// Stale bytes in all of a destination's VRAM, which the zero runs must clear.
  func dirty(_ serve: ServeProcess) throws {
    let client = try serve.connect()
    for offset in stride(from: 0, to: vram, by: 1 << 20) {
      try client.write(
        region: VFIOPCIRegion.bar2, offset: UInt64(offset),
        data: [UInt8](repeating: 0xEE, count: 1 << 20))
    }
    waitIdle(serve)
  }

  func expectHolds(
    _ serve: ServeProcess, _ image: [UInt8], seed: UInt8,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let client = try connectRunningMarked(serve, seed: seed, sourceLocation: sourceLocation)
    #expect(try readVRAM(client, vram) == image, sourceLocation: sourceLocation)
    waitIdle(serve)
  }

  @Test func theServerOffersNothingWithTheFlag() throws {
    let serve = try ServeProcess(older)
    defer { _ = serve.stop() }
    _ = try serve.connect()
    waitIdle(serve)
    let client = try VFIOUserClient.connect(
      path: serve.socketPath, capabilities: VFIOUserClient.sparseCapabilities)
    #expect(!client.sparseMigration)
    #expect(client.serverCapabilities.sparseMigration == nil)
  }

  /// Source sparse, destination older: `migrate` expands the zero runs
  /// itself. Source older: the raw stream end to end.
  @Test(arguments: [true, false])
  func migrateBetweenACurrentAndAnOlderServer(sourceIsCurrent: Bool) throws {
    let source = try ServeProcess(sourceIsCurrent ? current : older)
    let destination = try ServeProcess(sourceIsCurrent ? older : current)
    defer { [source, destination].forEach { _ = $0.stop() } }
    let image = try load(source, seed: 3)
    try dirty(destination)
    let result = try run([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath,
    ])
    #expect(result.status == 0, "\(result.stderr)")
    // The sparse stream is what the source sent, or nothing says it was.
    #expect(result.stdout.contains("sparse stream") == sourceIsCurrent, "\(result.stdout)")
    try expectHolds(destination, image, seed: 3)
  }

  /// Checkpoints from either server restore into either: zero records sent
  /// as zero runs to the current one, written out for the older one.
  @Test func checkpointsMoveBetweenCurrentAndOlderServers() throws {
    let sources = try [current, older].map { try ServeProcess($0) }
    let destinations = try [current, older].map { try ServeProcess($0) }
    defer { (sources + destinations).forEach { _ = $0.stop() } }
    var images: [[UInt8]] = []
    var files: [String] = []
    for (i, source) in sources.enumerated() {
      images.append(try load(source, seed: 4))
      let file = source.directory + "/vf.xesave"
      let save = try run(["save", "--socket-path", source.socketPath, "--output", file])
      #expect(save.status == 0, "\(save.stderr)")
      files.append(file)
      #expect(i == 0 || images[i] == images[0])
    }
    // Three MiB of sixteen hold data: the checkpoint stores the rest as counts either way.
    for file in files {
      let size = try #require(try FileManager.default.attributesOfItem(atPath: file)[.size] as? Int)
      #expect(size < vram / 2, "\(file): \(size) bytes")
    }
    for file in files {
      for destination in destinations {
        try dirty(destination)
        let restore = try run(["restore", "--socket-path", destination.socketPath, "--input", file])
        #expect(restore.status == 0, "\(restore.stderr)")
        waitIdle(destination)
        try expectHolds(destination, images[0], seed: 4)
      }
    }
  }

  /// The expanding relay (source sparse, destination older) losing its
  /// destination halfway leaves the source RUNNING with its state.
  @Test func destinationKilledDuringTheExpandingRelayLeavesTheSourceRunning() throws {
    let big = 256 << 20
    let source = try ServeProcess(["--vram-size", "256M", "--on-disconnect", "keep"])
    let destination = try ServeProcess([
      "--vram-size", "256M", "--on-disconnect", "keep", "--no-sparse-migration",
    ])
    defer { [source, destination].forEach { _ = $0.stop() } }
    // Data in every page: the sparse stream is as long as the raw one.
    let marks = try fillAndMarkDevice(try source.connect(), vram: big, seed: 5)
    _ = try destination.connect()
    waitIdle(source)
    let migrate = try Background([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--progress",
    ])
    #expect(migrate.waitFor("migrating: ", times: 3))
    kill(destination.pid, SIGKILL)
    let status = migrate.wait()
    #expect(status == 1, "\(migrate.stderr)")
    #expect(migrate.stderr.contains("--to \(destination.socketPath)"), "\(migrate.stderr)")
    #expect(migrate.stderr.contains("is RUNNING again, with its state"), "\(migrate.stderr)")
    waitIdle(source)
    try expectMarked(source, marks, seed: 5)
  }
}
