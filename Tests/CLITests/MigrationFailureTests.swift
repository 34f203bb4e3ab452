import CVFIOUser
import Checkpoint
import Control
import Foundation
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient

/// A command running in the background, its stderr collected as it comes.
final class Background: @unchecked Sendable {
  let process = Process()
  private let errors = Pipe()
  private let collected = Locked("")

  init(_ arguments: [String], stdout: Any? = nil) throws {
    process.executableURL = executable
    process.arguments = arguments
    process.standardOutput = stdout ?? FileHandle.nullDevice
    process.standardError = errors
    errors.fileHandleForReading.readabilityHandler = { [weak self] handle in
      let text = String(decoding: handle.availableData, as: UTF8.self)
      self?.collected.withLock { $0 += text }
    }
    try process.run()
  }

  var stderr: String { collected.withLock { $0 } }

  /// Waits until stderr contains `text` `times` times (or the process ends).
  func waitFor(_ text: String, times: Int = 1, seconds: Double = 60) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    func seen() -> Bool { stderr.components(separatedBy: text).count > times }
    while Date() < deadline {
      if seen() { return true }
      if !process.isRunning { return seen() }
      usleep(2_000)
    }
    return false
  }

  func wait() -> Int32 {
    process.waitUntilExit()
    errors.fileHandleForReading.readabilityHandler = nil
    // What arrived after the last callback.
    let rest = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    collected.withLock { $0 += rest }
    return process.terminationStatus
  }
}

/// Marks a device in ways a lost state would show: a scratch register and
/// VRAM at its first, middle and last MiB. Returns what was written where.
func markDevice(_ client: VFIOUserClient, vram: Int, seed: UInt8) throws -> [(UInt64, [UInt8])] {
  let marks = [0, vram / 2, vram - (1 << 20)].map { offset in
    (UInt64(offset), pattern(1 << 20, seed: seed &+ UInt8(truncatingIfNeeded: offset >> 20)))
  }
  for (offset, data) in marks {
    try client.write(region: VFIOPCIRegion.bar2, offset: offset, data: data)
  }
  try client.write32(region: 0, offset: scratch0, 0x5eed_0000 | UInt32(seed))
  return marks
}

/// `markDevice`, with data in every page of VRAM: a sparse stream does not
/// carry zero pages, and one of a nearly empty VF would be over at once.
func fillAndMarkDevice(_ client: VFIOUserClient, vram: Int, seed: UInt8) throws -> [(
  UInt64, [UInt8]
)] {
  // One MiB of pattern, made once: a debug build takes seconds to make each.
  let data = pattern(1 << 20, seed: seed &+ 99)
  for offset in stride(from: 0, to: vram, by: 1 << 20) {
    try client.write(region: VFIOPCIRegion.bar2, offset: UInt64(offset), data: data)
  }
  return try markDevice(client, vram: vram, seed: seed)
}

/// A client of `serve`, whose device is RUNNING with `seed`'s scratch register.
func connectRunningMarked(
  _ serve: ServeProcess, seed: UInt8, sourceLocation: SourceLocation
) throws -> VFIOUserClient {
  let client = try serve.connect()
  #expect(try client.migrationState() == .running, sourceLocation: sourceLocation)
  #expect(
    try client.read32(region: 0, offset: scratch0) == 0x5eed_0000 | UInt32(seed),
    sourceLocation: sourceLocation)
  return client
}

/// The device is RUNNING and holds exactly the marks.
func expectMarked(
  _ serve: ServeProcess, _ marks: [(UInt64, [UInt8])], seed: UInt8,
  sourceLocation: SourceLocation = #_sourceLocation
) throws {
  let client = try connectRunningMarked(serve, seed: seed, sourceLocation: sourceLocation)
  for (offset, data) in marks {
    let back = try client.read(region: VFIOPCIRegion.bar2, offset: offset, count: data.count)
    #expect(back == data, "VRAM at \(offset) lost", sourceLocation: sourceLocation)
  }
}

@Suite("migration failures keep the VF's state", .serialized)
struct MigrationFailureTests {
  // Big enough that the stream is still running when a side is killed.
  let vram = 256 << 20
  var keep: [String] { ["--vram-size", "256M", "--on-disconnect", "keep"] }

  /// Killed as the stream starts, and halfway through it (progress lines come every 10%).
  @Test(arguments: [false, true])
  func destinationKilledMidStreamLeavesTheSourceRunningWithItsState(halfway: Bool) throws {
    let source = try ServeProcess(keep)
    let destination = try ServeProcess(keep)
    defer { [source, destination].forEach { _ = $0.stop() } }
    let marks = try fillAndMarkDevice(try source.connect(), vram: vram, seed: 1)
    _ = try destination.connect()
    waitIdle(source)
    let migrate = try Background([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--progress",
    ])
    #expect(migrate.waitFor("migrating: "))
    if halfway { #expect(migrate.waitFor("migrating: ", times: 5)) }
    kill(destination.pid, SIGKILL)
    let status = migrate.wait()
    #expect(status == 1, "\(migrate.stderr)")  // a reported failure, not a signal
    #expect(migrate.stderr.contains("--to \(destination.socketPath)"), "\(migrate.stderr)")
    #expect(migrate.stderr.contains("is RUNNING again, with its state"), "\(migrate.stderr)")
    waitIdle(source)
    try expectMarked(source, marks, seed: 1)
  }

  @Test func migrateKilledMidStreamLeavesTheSourceRunningWithItsState() throws {
    let source = try ServeProcess(keep)
    let destination = try ServeProcess(keep)
    defer { [source, destination].forEach { _ = $0.stop() } }
    // Data in every page, so the stream lasts; and the kill lands while the
    // destination is seen to be RESUMING (a loaded machine could otherwise
    // notice the progress line only after the destination had the whole state).
    let marks = try fillAndMarkDevice(try source.connect(), vram: vram, seed: 2)
    do {
      let marker = try destination.connect()
      try marker.write32(region: 0, offset: scratch0, 0xdead)
    }
    waitIdle(source)
    let migrate = try Background([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--progress",
    ])
    #expect(migrate.waitFor("migrating: "))
    kill(migrate.process.processIdentifier, SIGSTOP)
    let status = try ControlClient(path: destination.socketPath + ".control").execute(
      "query-status")
    #expect(status["migration"]?["state"] == .string("RESUMING"), "\(status)")
    kill(migrate.process.processIdentifier, SIGKILL)
    _ = migrate.wait()
    // The source's server drains the abandoned save and resumes the VF itself.
    waitIdle(source)
    try expectMarked(source, marks, seed: 2)
    // The destination held half a state: reset, so it cannot run with it.
    let client = try destination.connect()
    #expect(try client.migrationState() == .running)
    #expect(try client.read32(region: 0, offset: scratch0) == 0)
  }

  /// The source dies: its state died with it, but the destination must not run with half of it.
  @Test func sourceKilledMidStreamLeavesNoHalfStateOnTheDestination() throws {
    let source = try ServeProcess(keep)
    let destination = try ServeProcess(keep)
    defer { [source, destination].forEach { _ = $0.stop() } }
    // As in the test above: a stream that lasts, and the source killed while
    // the destination is seen RESUMING with part of it.
    _ = try fillAndMarkDevice(try source.connect(), vram: vram, seed: 3)
    _ = try destination.connect()
    waitIdle(source)
    let migrate = try Background([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--progress",
    ])
    #expect(migrate.waitFor("migrating: "))
    kill(migrate.process.processIdentifier, SIGSTOP)
    let status = try ControlClient(path: destination.socketPath + ".control").execute(
      "query-status")
    #expect(status["migration"]?["state"] == .string("RESUMING"), "\(status)")
    kill(source.pid, SIGKILL)
    kill(migrate.process.processIdentifier, SIGCONT)
    #expect(migrate.wait() == 1)
    #expect(migrate.stderr.contains("--from \(source.socketPath)"), "\(migrate.stderr)")
    #expect(
      migrate.stderr.contains("destination --to \(destination.socketPath) reset"),
      "\(migrate.stderr)")
    waitIdle(destination)
    let client = try destination.connect()
    #expect(try client.migrationState() == .running)
    #expect(try client.read32(region: 0, offset: scratch0) == 0)
  }

  @Test func missingFilesAndDirectoriesAreNamedWithTheirErrno() throws {
    let source = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    defer { _ = source.stop() }
    _ = try source.connect()
    waitIdle(source)
    let missing = source.directory + "/nowhere/vf.xesave"
    let save = try run(["save", "-s", source.socketPath, "-o", missing])
    #expect(save.status == 1)
    #expect(
      save.stderr.contains("creating \(missing)") && save.stderr.contains("ENOENT"),
      "\(save.stderr)")
    let restore = try run(["restore", "-s", source.socketPath, "-i", missing])
    #expect(restore.status == 1)
    #expect(restore.stderr.contains("opening \(missing): ENOENT"), "\(restore.stderr)")
    #expect(
      !restore.stderr.contains("NSCocoaErrorDomain") && !save.stderr.contains("NSCocoaErrorDomain"))
    waitIdle(source)
    #expect(try source.connect().migrationState() == .running)
  }

  @Test func saveToAFullDeviceOrAClosedPipeLeavesTheSourceRunning() throws {
    let source = try ServeProcess(keep)
    defer { _ = source.stop() }
    let marks = try markDevice(try source.connect(), vram: vram, seed: 3)
    waitIdle(source)
    // --no-compress: the marked device's stream stays 256 MiB on the wire, bigger than what fails.
    let full = try run([
      "save", "-s", source.socketPath, "-o", "/dev/full", "--quiet", "--no-compress",
    ])
    #expect(full.status == 1)
    #expect(full.stderr.contains("writing /dev/full: ENOSPC"), "\(full.stderr)")
    var st = stat()
    #expect(stat("/dev/full", &st) == 0 && st.st_mode & S_IFMT == S_IFCHR)
    waitIdle(source)
    try expectMarked(source, marks, seed: 3)
    waitIdle(source)
    // The reader goes away after 1 MiB: EPIPE, reported, not a SIGPIPE death.
    let binary = executable.path
    let piped = try run([
      "__shell__",
      "\(binary) save -s \(source.socketPath) -o - --quiet --no-compress | head -c 1048576 > /dev/null; exit ${PIPESTATUS[0]}",
    ])
    #expect(piped.status == 1, "\(piped.stderr)")
    #expect(piped.stderr.contains("writing standard output: EPIPE"), "\(piped.stderr)")
    #expect(piped.stderr.contains("is RUNNING again, with its state"), "\(piped.stderr)")
    waitIdle(source)
    try expectMarked(source, marks, seed: 3)
  }

  /// A filesystem that fills up mid-save: the source keeps running, the file
  /// that was there is untouched and no partial file is left behind.
  @Test func saveOntoAFullFilesystemKeepsTheOldCheckpoint() throws {
    let source = try ServeProcess(keep)
    defer { _ = source.stop() }
    let marks = try markDevice(try source.connect(), vram: vram, seed: 4)
    waitIdle(source)
    let mountPoint = source.directory + "/small"
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
    let mounted = try run(["__shell__", "mount -t tmpfs -o size=64m tmpfs \(mountPoint)"])
    try #require(mounted.status == 0, "tmpfs mount needs root: \(mounted.stderr)")
    defer { _ = try? run(["__shell__", "umount \(mountPoint)"]) }
    let target = mountPoint + "/vf.xesave"
    try Data("previous checkpoint".utf8).write(to: URL(fileURLWithPath: target))
    let result = try run([
      "save", "-s", source.socketPath, "-o", target, "--quiet", "--no-compress",
    ])
    #expect(result.status == 1)
    #expect(result.stderr.contains("ENOSPC"), "\(result.stderr)")
    #expect(try String(contentsOfFile: target, encoding: .utf8) == "previous checkpoint")
    #expect(try FileManager.default.contentsOfDirectory(atPath: mountPoint) == ["vf.xesave"])
    waitIdle(source)
    try expectMarked(source, marks, seed: 4)
  }

  @Test func saveWritesWhatThePathNamesAndReplacesNothingElse() throws {
    let source = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    let destination = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    defer { [source, destination].forEach { _ = $0.stop() } }
    let marks = try markDevice(try source.connect(), vram: 16 << 20, seed: 5)
    _ = try destination.connect()
    let dir = source.directory
    // A character device of our own (a copy of /dev/null): written, never replaced.
    #expect(try run(["__shell__", "mknod \(dir)/null c 1 3"]).status == 0)
    waitIdle(source)
    #expect(try run(["save", "-s", source.socketPath, "-o", dir + "/null", "--quiet"]).status == 0)
    var st = stat()
    #expect(lstat(dir + "/null", &st) == 0 && st.st_mode & S_IFMT == S_IFCHR)
    // A FIFO: its reader gets the whole checkpoint, and it stays a FIFO.
    #expect(mkfifo(dir + "/fifo", 0o600) == 0)
    waitIdle(source)
    let viaFIFO = try run([
      "__shell__",
      "cat \(dir)/fifo > \(dir)/from-fifo & \(executable.path) save -s \(source.socketPath) -o \(dir)/fifo --quiet --no-compress; wait",
    ])
    #expect(viaFIFO.status == 0, "\(viaFIFO.stderr)")
    #expect(lstat(dir + "/fifo", &st) == 0 && st.st_mode & S_IFMT == S_IFIFO)
    // A symlink: the link stays, the file it names gets the checkpoint.
    try Data("old".utf8).write(to: URL(fileURLWithPath: dir + "/real"))
    #expect(symlink("real", dir + "/link") == 0)
    waitIdle(source)
    #expect(
      try run(["save", "-s", source.socketPath, "-o", dir + "/link", "--quiet", "--no-compress"])
        .status == 0)
    #expect(lstat(dir + "/link", &st) == 0 && st.st_mode & S_IFMT == S_IFLNK)
    let viaLink = try Data(contentsOf: URL(fileURLWithPath: dir + "/real"))
    let viaPipe = try Data(contentsOf: URL(fileURLWithPath: dir + "/from-fifo"))
    #expect(viaLink.count > 16 << 20 && viaLink.prefix(8) == Data("XEVFUSAV".utf8))
    // Both are complete checkpoints of the same device.
    waitIdle(destination)
    let restore = try run([
      "restore", "-s", destination.socketPath, "-i", dir + "/from-fifo", "--quiet",
    ])
    #expect(restore.status == 0, "\(restore.stderr)")
    waitIdle(destination)
    try expectMarked(destination, marks, seed: 5)
    #expect(viaPipe.count == viaLink.count)
    // No staging file is left anywhere.
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".partial") }
        .isEmpty)
  }

  @Test func aFailedSaveNeverLeavesAFileThatLooksWhole() throws {
    let source = try ServeProcess(keep)
    defer { _ = source.stop() }
    _ = try markDevice(try source.connect(), vram: vram, seed: 6)
    waitIdle(source)
    let target = source.directory + "/vf.xesave"
    try Data("previous checkpoint".utf8).write(to: URL(fileURLWithPath: target))
    let save = try Background([
      "save", "-s", source.socketPath, "-o", target, "--progress", "--no-compress",
    ])
    #expect(save.waitFor("saving: "))
    kill(source.pid, SIGKILL)  // the source server dies mid-save
    #expect(save.wait() == 1)
    #expect(save.stderr.contains("-s \(source.socketPath)"), "\(save.stderr)")
    #expect(try String(contentsOfFile: target, encoding: .utf8) == "previous checkpoint")
    // Nothing beside it (the killed server's sockets aside): no partial file.
    #expect(
      try FileManager.default.contentsOfDirectory(atPath: source.directory).filter {
        $0 != "vf0.sock" && $0 != "vf0.sock.control"
      } == ["vf.xesave"])
  }

  @Test func leftStoppedMeansStoppedWithItsStateUntilResumed() throws {
    let source = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    let destination = try ServeProcess(["--vram-size", "16M", "--on-disconnect", "keep"])
    defer { [source, destination].forEach { _ = $0.stop() } }
    let marks = try markDevice(try source.connect(), vram: 16 << 20, seed: 7)
    _ = try destination.connect()
    waitIdle(source)
    let file = source.directory + "/vf.xesave"
    let save = try run(["save", "-s", source.socketPath, "-o", file, "--keep-stopped", "--quiet"])
    #expect(save.status == 0 && save.stderr.contains("device left in STOP"), "\(save.stderr)")
    waitIdle(source)
    do {
      let client = try source.connect()
      #expect(try client.migrationState() == .stop)
      #expect(try client.read32(region: 0, offset: scratch0) == 0x5eed_0007)
    }
    waitIdle(source)
    let resume = try run(["resume", "-s", source.socketPath])
    #expect(resume.status == 0 && resume.stderr.contains("STOP → RUNNING"), "\(resume.stderr)")
    waitIdle(source)
    try expectMarked(source, marks, seed: 7)
    waitIdle(source)
    // migrate --no-start: the destination holds the state, stopped, until resumed.
    let migrate = try run([
      "migrate", "--from", source.socketPath, "--to", destination.socketPath, "--no-start",
      "--quiet",
    ])
    #expect(migrate.status == 0, "\(migrate.stderr)")
    waitIdle(destination)
    #expect(try destination.connect().migrationState() == .stop)
    waitIdle(destination)
    #expect(try run(["resume", "-s", destination.socketPath]).status == 0)
    waitIdle(destination)
    try expectMarked(destination, marks, seed: 7)
  }

  /// With the default `--on-disconnect reset`, a client change is an FLR: the
  /// next client never reads the VRAM or registers the last one wrote.
  @Test func resetPolicyShowsTheNextClientNothingOfTheLast() throws {
    let serve = try ServeProcess(["--vram-size", "16M"])
    defer { _ = serve.stop() }
    _ = try markDevice(try serve.connect(), vram: 16 << 20, seed: 8)
    waitIdle(serve)
    let client = try serve.connect()
    #expect(try client.read32(region: 0, offset: scratch0) == 0)
    for offset in [0, 8 << 20, (16 << 20) - 4096] {
      let bytes = try client.read(region: VFIOPCIRegion.bar2, offset: UInt64(offset), count: 4096)
      #expect(bytes.allSatisfy { $0 == 0 }, "VRAM at \(offset) outlived its client")
    }
  }

  /// (`info` reads a busy server's control socket instead: this server has none.)
  @Test func busyServersAreDescribedTheSameByEveryCommand() throws {
    let serve = try ServeProcess(["--vram-size", "16M", "--control-socket", "none"])
    defer { _ = serve.stop() }
    let holder = try serve.connect()
    _ = holder
    let path = serve.socketPath
    let other = serve.directory + "/other.sock"
    for arguments in [
      ["save", "-s", path, "-o", serve.directory + "/x"],
      ["restore", "-s", path, "-i", "/dev/null"],
      ["resume", "-s", path], ["migrate", "--from", path, "--to", other], ["info", "-s", path],
    ] {
      let result = try run(arguments)
      #expect(result.status != 0)
      if arguments[0] == "restore" {
        // /dev/null is not a save file: refused before connecting.
        #expect(result.stderr.contains("not an xe-vfio-user save file"), "\(result.stderr)")
      } else {
        #expect(
          result.stderr.contains("\(path): the server is busy with another client (EBUSY)"),
          "\(arguments[0]): \(result.stderr)")
        #expect(!result.stderr.contains("Usage:"))
      }
    }
    let missing = try run(["migrate", "--from", other, "--to", path])
    #expect(
      missing.stderr.contains("--from \(other): no such socket (ENOENT)"), "\(missing.stderr)")
  }
}

@Suite("damaged checkpoints are refused", .serialized)
struct DamagedCheckpointTests {
  let args = ["--vram-size", "16M", "--on-disconnect", "keep"]

  /// A checkpoint of a marked device, and a destination marked 0x1234 to restore it into.
  func withCheckpoint(_ body: (Data, ServeProcess) throws -> Void) throws {
    let source = try ServeProcess(args)
    let destination = try ServeProcess(args)
    defer { [source, destination].forEach { _ = $0.stop() } }
    let bytes = try checkpoint(source)
    try markDestination(destination)
    try body(bytes, destination)
  }

  /// Saves a marked device once; each test damages its own copy.
  func checkpoint(_ source: ServeProcess) throws -> Data {
    _ = try markDevice(try source.connect(), vram: 16 << 20, seed: 9)
    waitIdle(source)
    let file = source.directory + "/good.xesave"
    let save = try run(["save", "-s", source.socketPath, "-o", file, "--quiet"])
    try #require(save.status == 0, "\(save.stderr)")
    return try Data(contentsOf: URL(fileURLWithPath: file))
  }

  /// Restores `bytes` from a file (or stdin) into a device marked 0x1234.
  func restore(_ bytes: Data, into destination: ServeProcess, viaPipe: Bool = false) throws -> (
    status: Int32, stderr: String
  ) {
    let file = destination.directory + "/damaged.xesave"
    try bytes.write(to: URL(fileURLWithPath: file))
    waitIdle(destination)
    let result =
      viaPipe
      ? try run([
        "__shell__",
        "cat \(file) | \(executable.path) restore -s \(destination.socketPath) -i - --quiet",
      ])
      : try run(["restore", "-s", destination.socketPath, "-i", file, "--quiet"])
    return (result.status, result.stderr)
  }

  func markDestination(_ destination: ServeProcess) throws {
    waitIdle(destination)
    try destination.connect().write32(region: 0, offset: scratch0, 0x1234)
  }

  /// After a refused restore the destination runs, but with none of the damaged state.
  func expectNotRestored(_ destination: ServeProcess, untouched: Bool) throws {
    waitIdle(destination)
    let client = try destination.connect()
    #expect(try client.migrationState() == .running)
    #expect(try client.read32(region: 0, offset: scratch0) == (untouched ? 0x1234 : 0))
  }

  @Test func fourCorruptBytesAreACheckumMismatch() throws {
    try withCheckpoint { original, destination in
      var bytes = original
      // Inside the largest record's body (a damaged header is a different message).
      let record = try #require(try savedRecords(original).max { $0.bodyLength < $1.bodyLength })
      let at = Int(record.start) + 16 + record.bodyLength / 2
      for i in 0..<4 { bytes[at + i] ^= 0xA5 }
      // A regular file is checked whole first: the device keeps its own state.
      let result = try restore(bytes, into: destination)
      #expect(result.status == 1)
      #expect(result.stderr.contains("checksum mismatch"), "\(result.stderr)")
      #expect(result.stderr.contains("device untouched"), "\(result.stderr)")
      try expectNotRestored(destination, untouched: true)
      // Through a pipe the damage is met on the way: the device is reset.
      let piped = try restore(bytes, into: destination, viaPipe: true)
      #expect(piped.status == 1)
      #expect(piped.stderr.contains("checksum mismatch"), "\(piped.stderr)")
      #expect(piped.stderr.contains("device reset"), "\(piped.stderr)")
      try expectNotRestored(destination, untouched: false)
    }
  }

  @Test func aTruncatedFileIsRefusedBeforeTouchingTheDevice() throws {
    try withCheckpoint { bytes, destination in
      let cut = bytes.count * 2 / 3  // the file is small: elided zero pages, compressed marks
      let result = try restore(bytes.prefix(cut), into: destination)
      #expect(result.status == 1)
      #expect(
        result.stderr.contains("input truncated at byte \(cut) of \(bytes.count)"),
        "\(result.stderr)"
      )
      try expectNotRestored(destination, untouched: true)
      // Through a pipe the length is known only at the end: the device is reset, at once
      // (before, the PF was left to time out on a restore without its trailer).
      let piped = try restore(bytes.prefix(cut), into: destination, viaPipe: true)
      #expect(piped.status == 1)
      #expect(
        piped.stderr.contains("input truncated at byte \(cut) of \(bytes.count)"), "\(piped.stderr)"
      )
      #expect(!piped.stderr.contains("ETIMEDOUT"))
      try expectNotRestored(destination, untouched: false)
    }
  }

  @Test func damagedHeadersReorderedRecordsAndTrailingBytesAreRefused() throws {
    try withCheckpoint { bytes, destination in
      // The header's JSON (identity) is covered by its own CRC.
      var header = bytes
      header[40] ^= 0x01
      let badHeader = try restore(header, into: destination)
      #expect(badHeader.stderr.contains("header checksum mismatch"), "\(badHeader.stderr)")
      try expectNotRestored(destination, untouched: true)
      // Two records swapped: each is intact, but the chain is not.
      let records = try savedRecords(bytes)
      let (first, second, third) = (
        Int(records[0].start), Int(records[1].start), Int(records[2].start)
      )
      var swapped = bytes.prefix(first)
      swapped += bytes[second..<third]
      swapped += bytes[first..<second]
      swapped += bytes[third...]
      let reordered = try restore(Data(swapped), into: destination)
      #expect(reordered.stderr.contains("checksum mismatch in the record"), "\(reordered.stderr)")
      try expectNotRestored(destination, untouched: true)
      let reorderedPiped = try restore(Data(swapped), into: destination, viaPipe: true)
      #expect(
        reorderedPiped.stderr.contains("checksum mismatch in the record"),
        "\(reorderedPiped.stderr)")
      try expectNotRestored(destination, untouched: false)
      // Bytes after the end record.
      try markDestination(destination)
      let trailing = try restore(bytes + Data([0]), into: destination, viaPipe: true)
      #expect(
        trailing.stderr.contains("unexpected data after the end record"), "\(trailing.stderr)")
      try expectNotRestored(destination, untouched: false)
    }
  }
}

@Suite("serve refuses to replace what is not a socket")
struct ServeSocketPathTests {
  @Test func aRegularFileAndADirectoryAreLeftAlone() throws {
    try withTemporaryDirectory("xvu-path") { dir in try leftAlone(in: dir) }
  }

  func leftAlone(in dir: String) throws {
    let file = dir + "/notes.txt"
    try Data("keep me".utf8).write(to: URL(fileURLWithPath: file))
    let onFile = try run(["serve", "-s", file, "--quiet"])
    #expect(onFile.status == 1)
    #expect(onFile.stderr.contains("\(file) exists and is not a socket"), "\(onFile.stderr)")
    #expect(try String(contentsOfFile: file, encoding: .utf8) == "keep me")
    let onDirectory = try run(["serve", "-s", dir, "--quiet"])
    #expect(onDirectory.status == 1)
    #expect(onDirectory.stderr.contains("\(dir) is a directory"), "\(onDirectory.stderr)")
    #expect(!onDirectory.stderr.contains("another server"))
  }

  @Test func aBadVRAMSizeGetsServesUsage() throws {
    let result = try run(["serve", "--vram-size", "3G"])
    #expect(result.status != 0)
    #expect(result.stderr.contains("--vram-size must be a power of two"), "\(result.stderr)")
    #expect(result.stderr.contains("xe-vfio-user serve"), "\(result.stderr)")
  }
}
