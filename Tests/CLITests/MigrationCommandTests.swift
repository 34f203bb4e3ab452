import CVFIOUser
import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// A pattern that differs per offset and per seed.
func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
  (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ $0 >> 9) }
}

let scratch0: UInt64 = 0x19_0240

/// Fills VRAM (through BAR2 writes) and a scratch register, then hangs up.
func loadDevice(_ serve: ServeProcess, vram: Int, seed: UInt8) throws -> [UInt8] {
  let client = try serve.connect()
  let data = pattern(vram, seed: seed)
  var offset = 0
  while offset < vram {
    let n = min(1 << 20, vram - offset)
    try client.write(
      region: VFIOPCIRegion.bar2, offset: UInt64(offset), data: Array(data[offset..<(offset + n)]))
    offset += n
  }
  try client.write32(region: 0, offset: scratch0, 0x5eed_0000 | UInt32(seed))
  return data
}

func readVRAM(_ client: VFIOUserClient, _ count: Int) throws -> [UInt8] {
  var out: [UInt8] = []
  while out.count < count {
    out += try client.read(
      region: VFIOPCIRegion.bar2, offset: UInt64(out.count), count: min(1 << 20, count - out.count))
  }
  return out
}

func waitIdle(_ serve: ServeProcess) {
  // The server serves the next client once the previous one is torn down.
  usleep(100_000)
}

@Suite("migrate, save and restore as a user runs them", .serialized)
struct MigrationCommandTests {
  let vram = 16 << 20
  var serveArguments: [String] { ["--vram-size", "16M", "--on-disconnect", "keep"] }

  @Test func migrateMovesVRAMAndRegisters() throws {
    let source = try ServeProcess(serveArguments)
    let destination = try ServeProcess(serveArguments)
    defer {
      _ = source.stop()
      _ = destination.stop()
    }
    let data = try loadDevice(source, vram: vram, seed: 7)
    _ = try destination.connect()  // make sure it is up
    waitIdle(source)
    let result = try run([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--progress",
    ])
    #expect(result.status == 0, "\(result.stderr)")
    #expect(
      result.stdout.contains("migrated") && result.stdout.contains("downtime")
        && result.stdout.contains("RUNNING"))
    #expect(result.stderr.contains("migrating"))  // progress lines (not a terminal)
    waitIdle(destination)
    let client = try destination.connect()
    #expect(try client.read32(region: 0, offset: scratch0) == 0x5eed_0007)
    #expect(try readVRAM(client, vram) == data)
  }

  @Test func saveThenRestoreThroughAFileAndThroughAPipe() throws {
    let source = try ServeProcess(serveArguments)
    let first = try ServeProcess(serveArguments)
    let second = try ServeProcess(serveArguments)
    defer { [source, first, second].forEach { _ = $0.stop() } }
    let data = try loadDevice(source, vram: vram, seed: 9)
    _ = try first.connect()
    _ = try second.connect()
    waitIdle(source)
    let file = source.directory + "/vf.xesave"
    let save = try run(["save", "--socket-path", source.socketPath, "--output", file])
    #expect(save.status == 0, "\(save.stderr)")
    #expect(save.stderr.contains("saved"))
    // The source keeps running after a checkpoint.
    waitIdle(source)
    do {
      let sourceClient = try source.connect()
      #expect(try sourceClient.read32(region: 0, offset: scratch0) == 0x5eed_0009)
    }
    waitIdle(source)
    let restore = try run(["restore", "--socket-path", first.socketPath, "--input", file])
    #expect(restore.status == 0, "\(restore.stderr)")
    waitIdle(first)
    do {
      let restored = try first.connect()
      #expect(try restored.read32(region: 0, offset: scratch0) == 0x5eed_0009)
      #expect(try readVRAM(restored, vram) == data)
    }
    waitIdle(first)
    // The same through a pipe, as `save -o - | ssh host restore -i -` would.
    let binary = executable.path
    let piped = try run([
      "__shell__",
      "\(binary) save -s \(first.socketPath) -o - --quiet | \(binary) restore -s \(second.socketPath) -i - --quiet",
    ])
    #expect(piped.status == 0, "\(piped.stderr)")
    waitIdle(second)
    let viaPipe = try second.connect()
    #expect(try readVRAM(viaPipe, vram) == data)
  }

  @Test func restoreRefusesAnIncompatibleDeviceBeforeTouchingIt() throws {
    let source = try ServeProcess(serveArguments)
    let smaller = try ServeProcess(["--vram-size", "8M", "--on-disconnect", "keep"])
    let integrated = try ServeProcess(["--profile", "ptl", "--on-disconnect", "keep"])
    defer { [source, smaller, integrated].forEach { _ = $0.stop() } }
    _ = try loadDevice(source, vram: vram, seed: 3)
    do {
      let marker = try smaller.connect()
      try marker.write32(region: 0, offset: scratch0, 0x1234)
      _ = try integrated.connect()
    }
    waitIdle(source)
    let file = source.directory + "/vf.xesave"
    #expect(try run(["save", "-s", source.socketPath, "-o", file, "--quiet"]).status == 0)
    waitIdle(smaller)
    let vramMismatch = try run(["restore", "-s", smaller.socketPath, "-i", file])
    #expect(vramMismatch.status != 0)
    #expect(
      vramMismatch.stderr.contains("refusing to restore")
        && vramMismatch.stderr.contains("VRAM 16 MiB ≠ 8 MiB"))
    let idMismatch = try run(["restore", "-s", integrated.socketPath, "-i", file])
    #expect(idMismatch.stderr.contains("device id 8086:e211 ≠ 8086:b080"))
    // Untouched: the register written before is still there, the device RUNNING.
    waitIdle(smaller)
    do {
      let check = try smaller.connect()
      #expect(try check.read32(region: 0, offset: scratch0) == 0x1234)
    }
    waitIdle(smaller)
    // Not a save file at all.
    let garbage = source.directory + "/garbage"
    _ = FileManager.default.createFile(
      atPath: garbage, contents: Data("hello".utf8 + [UInt8](repeating: 0, count: 64)))
    let bad = try run(["restore", "-s", smaller.socketPath, "-i", garbage])
    #expect(bad.status != 0 && bad.stderr.contains("not an xe-vfio-user save file"))
  }

  /// A restore from an empty file says it is empty, and one from a directory
  /// names the errno as every other message does (EISDIR), both before any
  /// server is asked for.
  @Test func restoreNamesAnEmptyFileAndADirectory() throws {
    let directory = NSTemporaryDirectory() + "xvu-restore-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let empty = directory + "/empty.xesave"
    _ = FileManager.default.createFile(atPath: empty, contents: Data())
    let socket = directory + "/no-server.sock"
    let fromEmpty = try run(["restore", "-s", socket, "-i", empty])
    #expect(fromEmpty.status != 0)
    #expect(
      fromEmpty.stderr.contains("\(empty) is empty (0 bytes), not an xe-vfio-user save file"),
      "\(fromEmpty.stderr)")
    #expect(!fromEmpty.stderr.contains("bad magic"))
    let fromPipe = try run(["__shell__", "\(executable.path) restore -s \(socket) -i - </dev/null"])
    #expect(fromPipe.stderr.contains("standard input is empty (0 bytes)"), "\(fromPipe.stderr)")
    let fromDirectory = try run(["restore", "-s", socket, "-i", directory])
    #expect(fromDirectory.status != 0)
    #expect(
      fromDirectory.stderr.contains("reading \(directory): EISDIR (Is a directory)"),
      "\(fromDirectory.stderr)")
    #expect(!fromDirectory.stderr.contains("errno"), "\(fromDirectory.stderr)")
  }

  /// The same server as both ends is named as the mistake it is, before
  /// either end is touched (a second connection would only meet EBUSY),
  /// however the paths are spelled.
  @Test func migrateToTheSameServerSaysSo() throws {
    let serve = try ServeProcess(serveArguments)
    defer { _ = serve.stop() }
    try serve.connect().write32(region: 0, offset: scratch0, 0x5a5e)
    waitIdle(serve)
    let same = try run(["migrate", "--from", serve.socketPath, "--to", serve.socketPath])
    #expect(same.status != 0)
    #expect(
      same.stderr.contains("--from and --to are the same server (\(serve.socketPath))"),
      "\(same.stderr)")
    #expect(!same.stderr.contains("EBUSY"), "\(same.stderr)")
    let link = serve.directory + "/link.sock"
    try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: serve.socketPath)
    let linked = try run(["migrate", "--from", link, "--to", serve.socketPath])
    #expect(
      linked.status != 0
        && linked.stderr.contains(
          "--from and --to are the same server (\(link) is \(serve.socketPath))"),
      "\(linked.stderr)")
    // Untouched: RUNNING, its register as it was.
    let client = try serve.connect()
    #expect(try client.read32(region: 0, offset: scratch0) == 0x5a5e)
    #expect(try client.migrationState() == .running)
  }

  /// `migrate`'s summary gives the state moved and its rate apart from the
  /// bytes on the wire: counted where the stream passes through the command
  /// (raw, or expanded for an older destination), the source's estimate where
  /// a sparse stream is spliced through unread, and said to be one.
  @Test func migrateReportsTheStateAndTheWireApart() throws {
    let a = try ServeProcess(serveArguments)
    let b = try ServeProcess(serveArguments)
    let older = try ServeProcess(serveArguments + ["--no-sparse-migration"])
    defer { [a, b, older].forEach { _ = $0.stop() } }
    // One MiB written, fifteen never: the sparse stream carries about one.
    do {
      let client = try a.connect()
      try client.write(
        region: VFIOPCIRegion.bar2, offset: 0, data: pattern(1 << 20, seed: 1))
    }
    _ = try b.connect()
    _ = try older.connect()
    waitIdle(a)
    func migrate(_ from: ServeProcess, _ to: ServeProcess) throws -> String {
      let result = try run(["migrate", "--from", from.socketPath, "--to", to.socketPath])
      #expect(result.status == 0, "\(result.stderr)")
      waitIdle(from)
      waitIdle(to)
      return result.stdout
    }
    /// The MiB in "N.N MiB <what>", and the bytes the rate and time make.
    func mebibytes(_ line: String, _ what: String) -> Double? {
      guard let range = line.range(of: " MiB \(what)") else { return nil }
      return Double(
        line[..<range.lowerBound].split(separator: " ").last!.trimmingCharacters(in: ["~"]))
    }
    func rateTimesTime(_ line: String) -> Double? {
      let words = line.split(separator: " ")
      guard let s = words.firstIndex(of: "s"), let seconds = Double(words[s - 1]),
        let rate = Double(words[s + 1].trimmingCharacters(in: ["(", "~"]))
      else { return nil }
      return rate * 1e9 * seconds
    }

    // Both sparse: spliced through, so the state is the source's estimate, and so is its rate.
    let spliced = try migrate(a, b)
    #expect(
      spliced.contains("of state (the source's estimate) in ")
        && spliced.contains("on the wire (sparse stream: zero VRAM pages not sent)"), "\(spliced)")
    let estimate = try #require(
      mebibytes(spliced, "of state (the source's estimate)"), "\(spliced)")
    #expect(estimate >= 16 && estimate < 17, "\(spliced)")
    let moved = try #require(rateTimesTime(spliced), "\(spliced)")
    #expect(moved > 8e6, "the rate is the state's (16 MiB), not the wire's (~1 MiB): \(spliced)")
    let wire = try #require(mebibytes(spliced, "on the wire"), "\(spliced)")
    #expect(wire >= 1 && wire < 2, "\(spliced)")

    // To a destination without the sparse stream: expanded here, so counted.
    let expanded = try migrate(b, older)
    let state = try #require(mebibytes(expanded, "of state in"), "\(expanded)")
    #expect(state >= 16 && state < 17 && !expanded.contains("estimate"), "\(expanded)")
    #expect(
      mebibytes(expanded, "on the wire (sparse stream: zero VRAM pages not sent)") == wire,
      "\(expanded)")
    #expect((rateTimesTime(expanded) ?? 0) > 8e6, "\(expanded)")

    // The raw stream: every byte on the wire, the state is what crossed.
    let raw = try migrate(older, a)
    #expect(mebibytes(raw, "of state in") == state, "\(raw)")
    #expect(mebibytes(raw, "on the wire;") == state, "\(raw)")
    #expect(!raw.contains("zero VRAM pages"), "\(raw)")
  }

  @Test func failedMigrationLeavesTheSourceRunning() throws {
    let source = try ServeProcess(serveArguments)
    let destination = try ServeProcess(["--vram-size", "32M"])
    defer {
      _ = source.stop()
      _ = destination.stop()
    }
    _ = try loadDevice(source, vram: vram, seed: 5)
    _ = try destination.connect()
    waitIdle(source)
    let result = try run([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--progress",
    ])
    #expect(result.status != 0)
    #expect(result.stderr.contains("compare devices failed"))
    // Refused before the source was stopped: nothing to return it from.
    #expect(
      result.stderr.contains("source --from \(source.socketPath) untouched: it is as it was"),
      "\(result.stderr)")
    waitIdle(source)
    let client = try source.connect()
    #expect(try client.read32(region: 0, offset: scratch0) == 0x5eed_0005)
    let state = try client.feature(
      flags: VFIODeviceFeatureFlags.get | VFIODeviceFeature.migDeviceState, argsz: 16)
    #expect(try MigDeviceStateData(decoding: state.data).state == .running)
  }
}
