import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// The device is in `state` and its scratch register still says `seed`.
func expectState(
  _ serve: ServeProcess, _ state: MigrationState, seed: UInt8,
  sourceLocation: SourceLocation = #_sourceLocation
) throws {
  waitIdle(serve)
  let client = try serve.connect()
  #expect(try client.migrationState() == state, sourceLocation: sourceLocation)
  #expect(
    try client.read32(region: 0, offset: scratch0) == 0x5eed_0000 | UInt32(seed),
    sourceLocation: sourceLocation)
}

/// A source that `migrate` left stopped: its state runs at `destination`.
func migratedAway(seed: UInt8, vramSize: String = "16M") throws -> (
  source: ServeProcess, destination: ServeProcess
) {
  let arguments = ["--vram-size", vramSize, "--on-disconnect", "keep"]
  let source = try ServeProcess(arguments)
  let destination = try ServeProcess(arguments)
  _ = try markDevice(try source.connect(), vram: 16 << 20, seed: seed)
  _ = try destination.connect()
  waitIdle(source)
  let migrate = try run([
    "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--quiet",
  ])
  #expect(migrate.status == 0, "\(migrate.stderr)")
  try expectState(source, .stop, seed: seed)
  return (source, destination)
}

/// Whatever moves a device for its own purposes (save, a failed migrate or
/// restore, a client that leaves mid-save) leaves it in the state it found
/// it in: a source that a migration stopped never runs again beside its copy.
@Suite("commands leave a device as they found it", .serialized)
struct DeviceAsFoundTests {
  @Test func saveOfASourceAMigrationStoppedLeavesItStopped() throws {
    let (source, destination) = try migratedAway(seed: 0x21)
    defer { [source, destination].forEach { _ = $0.stop() } }
    let file = source.directory + "/vf.xesave"
    waitIdle(source)
    let save = try run(["save", "-s", source.socketPath, "-o", file, "--quiet"])
    #expect(save.status == 0, "\(save.stderr)")
    #expect(save.stderr.contains("device STOP, as it was found"), "\(save.stderr)")
    try expectState(source, .stop, seed: 0x21)
    try expectState(destination, .running, seed: 0x21)
    // A save that fails once the device is stopped (its reader leaves after
    // the header) returns it to STOP too, not RUNNING.
    waitIdle(source)
    let cut = try run([
      "__shell__",
      "'\(executable.path)' save -s '\(source.socketPath)' -o - --no-compress | head -c 4096 >/dev/null",
    ])
    #expect(cut.status == 1, "\(cut.stderr)")
    #expect(cut.stderr.contains("is STOP again, with its state"), "\(cut.stderr)")
    try expectState(source, .stop, seed: 0x21)
    // --resume is the way to run it again on purpose.
    waitIdle(source)
    let resumed = try run(["save", "-s", source.socketPath, "-o", file, "--resume", "--quiet"])
    #expect(resumed.status == 0 && resumed.stderr.contains("device left in RUNNING"))
    try expectState(source, .running, seed: 0x21)
    let both = try run(["save", "-s", source.socketPath, "-o", file, "--resume", "--keep-stopped"])
    #expect(both.status != 0 && both.stderr.contains("exclusive"), "\(both.stderr)")
  }

  /// The server's side of the same rule: a client that stops a stopped
  /// device's save by leaving (killed mid-stream) gets it back to STOP.
  @Test func aClientLeavingTheSaveOfAStoppedDeviceLeavesItStopped() throws {
    let (source, destination) = try migratedAway(seed: 0x22, vramSize: "256M")
    defer { [source, destination].forEach { _ = $0.stop() } }
    waitIdle(source)
    do {
      let client = try source.connect()
      try client.setMigrationState(.stopCopy)
      var buffer = [UInt8](repeating: 0, count: 1 << 20)
      _ = try buffer.withUnsafeMutableBytes { try client.migDataRead(into: $0) }
      // Leaves with most of the save unread.
    }
    try expectState(source, .stop, seed: 0x22)
    let log = source.stop().stderr
    #expect(log.contains("device STOP with its state, as before the save"), "\(log)")
  }

  @Test func aMigrationRefusedBeforeTheDestinationIsTouchedLeavesItsState() throws {
    let source = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    let destination = try ServeProcess(["--vram-size", "32M", "--on-disconnect", "keep"])
    defer { [source, destination].forEach { _ = $0.stop() } }
    _ = try markDevice(try source.connect(), vram: 16 << 20, seed: 0x23)
    _ = try markDevice(try destination.connect(), vram: 32 << 20, seed: 0x24)
    waitIdle(source)
    let migrate = try run([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--quiet",
    ])
    #expect(migrate.status == 1 && migrate.stderr.contains("VRAM"), "\(migrate.stderr)")
    #expect(migrate.stderr.contains("untouched: it keeps its own state"), "\(migrate.stderr)")
    try expectState(source, .running, seed: 0x23)
    try expectState(destination, .running, seed: 0x24)
  }

  /// A damaged regular file is found whole before the destination leaves its
  /// state; from a pipe it can only be found on the way (then reset, said so).
  @Test func restoreOfADamagedFileLeavesTheDestinationAsItWas() throws {
    let arguments = ["--vram-size", "16M", "--on-disconnect", "keep"]
    let source = try ServeProcess(arguments)
    let destination = try ServeProcess(arguments)
    defer { [source, destination].forEach { _ = $0.stop() } }
    _ = try fillAndMarkDevice(try source.connect(), vram: 16 << 20, seed: 0x25)
    let marks = try markDevice(try destination.connect(), vram: 16 << 20, seed: 0x26)
    waitIdle(source)
    let file = source.directory + "/vf.xesave"
    let save = try run(["save", "-s", source.socketPath, "-o", file, "--quiet"])
    #expect(save.status == 0, "\(save.stderr)")
    // One byte flipped near the end: most records pass before it is met.
    var bytes = try Data(contentsOf: URL(fileURLWithPath: file))
    bytes[bytes.count - 200] ^= 0x40
    try bytes.write(to: URL(fileURLWithPath: file))
    waitIdle(destination)
    let restore = try run(["restore", "-s", destination.socketPath, "-i", file, "--quiet"])
    #expect(restore.status == 1, "\(restore.stderr)")
    #expect(restore.stderr.contains("the file is damaged"), "\(restore.stderr)")
    #expect(restore.stderr.contains("device untouched"), "\(restore.stderr)")
    waitIdle(destination)
    try expectMarked(destination, marks, seed: 0x26)
    // Through a pipe the same file resets the device, and says so.
    waitIdle(destination)
    let piped = try run([
      "__shell__",
      "cat '\(file)' | '\(executable.path)' restore -s '\(destination.socketPath)' -i -",
    ])
    #expect(piped.status == 1 && piped.stderr.contains("device reset"), "\(piped.stderr)")
    waitIdle(destination)
    let client = try destination.connect()
    #expect(try client.migrationState() == .running)
    #expect(try client.read32(region: 0, offset: scratch0) == 0)
  }

  /// Ctrl-C, SIGTERM or SIGHUP mid-save: the command cleans up and says so.
  @Test(arguments: [SIGINT, SIGTERM, SIGHUP])
  func aSignalMidSaveRemovesThePartialFileAndKeepsTheSource(signal: Int32) throws {
    let source = try ServeProcess(["--vram-size", "256M", "--on-disconnect", "keep"])
    defer { _ = source.stop() }
    let marks = try markDevice(try source.connect(), vram: 256 << 20, seed: 0x27)
    waitIdle(source)
    let target = source.directory + "/vf.xesave"
    let save = try Background([
      "save", "-s", source.socketPath, "-o", target, "--progress", "--no-compress",
    ])
    #expect(save.waitFor("saving: "))
    kill(save.process.processIdentifier, signal)
    #expect(save.wait() == 128 + signal, "\(save.stderr)")
    #expect(save.stderr.contains("is RUNNING again, with its state"), "\(save.stderr)")
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: source.directory).sorted() == [
        "vf0.sock", "vf0.sock.control",
      ])
    waitIdle(source)
    try expectMarked(source, marks, seed: 0x27)
  }

  /// A save killed outright leaves its partial file; the next save to the
  /// same path removes it (its pid is gone), never one of a live save.
  @Test func theNextSaveRemovesWhatAKilledSaveLeft() throws {
    let source = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    defer { _ = source.stop() }
    _ = try source.connect()
    waitIdle(source)
    let gone = Process()
    gone.executableURL = URL(fileURLWithPath: "/bin/true")
    try gone.run()
    gone.waitUntilExit()
    let dead = source.directory + "/.vf.xesave.\(gone.processIdentifier).partial"
    let live = source.directory + "/.vf.xesave.\(getpid()).partial"
    let other = source.directory + "/.other.xesave.\(gone.processIdentifier).partial"
    for path in [dead, live, other] {
      #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 4096)))
    }
    let save = try run(["save", "-s", source.socketPath, "-o", source.directory + "/vf.xesave"])
    #expect(save.status == 0, "\(save.stderr)")
    #expect(save.stderr.contains("removed \(dead)"), "\(save.stderr)")
    #expect(!FileManager.default.fileExists(atPath: dead))
    #expect(FileManager.default.fileExists(atPath: live))
    #expect(FileManager.default.fileExists(atPath: other))
  }

  /// Two saves of one unchanged device differ only in the creation time;
  /// with --no-timestamp (or SOURCE_DATE_EPOCH) not at all.
  @Test func twoSavesOfOneStateAreComparable() throws {
    let source = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    defer { _ = source.stop() }
    _ = try markDevice(try source.connect(), vram: 16 << 20, seed: 0x28)
    var files: [Data] = []
    for (index, extra) in [["--no-timestamp"], ["--no-timestamp"], [], []].enumerated() {
      waitIdle(source)
      let file = source.directory + "/save\(index).xesave"
      let save = try run(["save", "-s", source.socketPath, "-o", file, "--quiet"] + extra)
      #expect(save.status == 0, "\(save.stderr)")
      files.append(try Data(contentsOf: URL(fileURLWithPath: file)))
    }
    #expect(files[0] == files[1], "two --no-timestamp saves differ")
    #expect(!String(decoding: files[0].prefix(4096), as: UTF8.self).contains("created"))
    // With the time: the headers differ at most in "created", which they have.
    let headers = files[2...].map { headerJSON($0) }
    for header in headers { #expect(header.contains(#""created":""#), "\(header)") }
    let withoutTime = headers.map {
      $0.replacingOccurrences(
        of: #""created":"[^"]*","#, with: "", options: .regularExpression)
    }
    #expect(withoutTime[0] == withoutTime[1], "\(headers)")
    // The keys in sorted order, the nested ones too.
    #expect(withoutTime[0].hasPrefix(#"{"estimatedBytes":"#), "\(withoutTime[0])")
    #expect(withoutTime[0].contains(#""identity":{"deviceID":"#), "\(withoutTime[0])")
    // SOURCE_DATE_EPOCH fixes the time instead.
    var epoch: [String] = []
    for index in 0..<2 {
      waitIdle(source)
      let file = source.directory + "/epoch\(index).xesave"
      let save = try run([
        "__shell__",
        "SOURCE_DATE_EPOCH=86400 '\(executable.path)' save -s '\(source.socketPath)' -o '\(file)' --quiet",
      ])
      #expect(save.status == 0, "\(save.stderr)")
      epoch.append(headerJSON(try Data(contentsOf: URL(fileURLWithPath: file))))
    }
    #expect(epoch[0] == epoch[1] && epoch[0].contains("1970-01-02T00:00:00Z"), "\(epoch)")
    let bad = try run([
      "__shell__",
      "SOURCE_DATE_EPOCH=yesterday '\(executable.path)' save -s '\(source.socketPath)' -o '\(source.directory)/bad.xesave'",
    ])
    #expect(bad.status == 1 && bad.stderr.contains("SOURCE_DATE_EPOCH=yesterday"), "\(bad.stderr)")
  }
}

/// The JSON part of a save file's header.
func headerJSON(_ file: Data) -> String {
  let length = file[12..<16].enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
  return String(decoding: file[32..<(32 + length)], as: UTF8.self)
}
