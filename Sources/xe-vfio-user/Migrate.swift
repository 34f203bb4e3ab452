import ArgumentParser
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeStream

#if canImport(Glibc)
  import Glibc
#endif

struct Migrate: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Move a VF's state from one server to another (vfio-user migration v2).",
    discussion: """
      Acts as the client of both servers: puts the destination in RESUMING,
      stops the source (STOP_COPY), streams its state across, has the
      destination validate it (RESUMING to STOP) before the source finishes its
      save, and only then starts the destination. On any failure the step, the
      server and the errno are reported, the destination is reset if it had
      begun to take the state (one refused before keeps its own), and the
      source goes back to the state it was found in (RUNNING, or STOP for a
      source an earlier migration stopped) with its state.
      Neither server may have another client; run both with
      `--on-disconnect keep`, or the state is reset when this command leaves.
      """)

  @Option(help: "Source server socket.") var from: String
  @Option(help: "Destination server socket.") var to: String
  @Flag(help: "Leave the destination stopped (STOP) instead of RUNNING.") var noStart = false
  @OptionGroup var progressOptions: ProgressOptions

  var sourceEnd: String { "--from \(from)" }
  var destinationEnd: String { "--to \(to)" }

  func run() throws {
    ignoreSIGPIPE()
    let (source, destination) = try connectBoth()
    let result: (moved: MigrationVolume, seconds: Double, downtime: Double)
    var progress = Progress()
    do {
      result = try migrate(source, destination, &progress)
    } catch {
      printError("migration failed: \(error)")
      rollback(source, destination, progress)
      throw ExitCode.failure
    }
    print(
      "migrated \(result.moved.summary(seconds: result.seconds)); downtime \(fixed(result.downtime, 3)) s; destination \(noStart ? "STOP" : "RUNNING")"
    )
  }

  /// How far a migration got, so a failure undoes exactly what it did.
  struct Progress {
    /// The source's state before the migration: where a failure returns it.
    var sourceFound: MigrationState?
    var sourceStopped = false
    /// The destination entered RESUMING: its own state is gone from then on.
    var destinationResuming = false
  }

  private func migrate(
    _ source: VFIOUserClient, _ destination: VFIOUserClient, _ progress: inout Progress
  ) throws -> (MigrationVolume, Double, Double) {
    let start = now()
    for (client, end) in [(source, sourceEnd), (destination, destinationEnd)] {
      let flags = try step(.probe) { try on(end) { try client.migrationFlags() } }
      guard flags.contains(.stopCopy) else {
        throw StepError(
          step: .probe, underlying: CLIError("\(end): the device does not support STOP_COPY"))
      }
    }
    let (a, b) = try step(.identity) {
      (
        try on(sourceEnd) { try DeviceIdentity.read(from: source) },
        try on(destinationEnd) { try DeviceIdentity.read(from: destination) }
      )
    }
    if let why = a.incompatibility(with: b) {
      throw StepError(step: .identity, underlying: CLIError(why))
    }
    let found = try step(.probe) { try on(sourceEnd) { try source.migrationState() } }
    guard [.running, .stop, .runningP2P].contains(found) else {
      throw StepError(
        step: .probe,
        underlying: CLIError(
          "\(sourceEnd): the device is in \(found); a migration starts from RUNNING or STOP"))
    }
    progress.sourceFound = found
    let estimate = (try? source.stopCopySize()) ?? 0
    progress.destinationResuming = true
    try step(.resuming) { try on(destinationEnd) { try destination.setMigrationState(.resuming) } }
    let downtimeStart = now()
    progress.sourceStopped = true
    try step(.stopCopy) { try on(sourceEnd) { try source.setMigrationState(.stopCopy) } }
    let reporter = ProgressReporter(label: "migrating", total: estimate, options: progressOptions)
    // A sparse stream's state bytes are not counted (the relay does not look
    // at them): its progress is the bytes on the wire.
    let sparse = source.sparseMigration
    let moved = try step(.stream) {
      try relay(source, destination) { reporter.update(state: $0, wire: $0, sparse: sparse) }
    }
    reporter.update(
      state: moved.state ?? moved.wire, wire: moved.wire, final: true, sparse: moved.state == nil)
    // The destination proves it took the whole state before the source lets go
    // of it: a hang-up until here resumes the source (its server drains the save).
    try step(.finishRestore) { try on(destinationEnd) { try destination.setMigrationState(.stop) } }
    try step(.finishSave) { try on(sourceEnd) { try source.setMigrationState(.stop) } }
    if !noStart {
      try step(.start) { try on(destinationEnd) { try destination.setMigrationState(.running) } }
    }
    let end = now()
    let volume = MigrationVolume(
      wire: moved.wire, state: moved.state, estimate: estimate, sparse: sparse)
    return (volume, Double(end - start) / 1e9, Double(end - downtimeStart) / 1e9)
  }

  /// Both servers, with the sparse stream offered to the destination only
  /// where the source took it: then either both carry it, the relay passing
  /// the bytes through as they come, or only the source does (an older
  /// destination) and `relayExpanding` writes its zero runs out.
  private func connectBoth() throws -> (VFIOUserClient, VFIOUserClient) {
    // Else the second connection would meet the first: EBUSY, which says nothing of the mistake.
    if sameSocket(from, to) {
      throw CLIError(
        "--from and --to are the same server (\(from == to ? from : "\(from) is \(to)"))")
    }
    let source = try connectServer(from, option: "--from", sparse: true)
    let destination = try connectServer(to, option: "--to", sparse: source.sparseMigration)
    return (source, destination)
  }

  /// The stream, source to destination, without passing through this process
  /// (splice). Returns the bytes read from the source, and the state they
  /// carry where this process sees it: a sparse stream spliced through is
  /// not looked at.
  private func relay(
    _ source: VFIOUserClient, _ destination: VFIOUserClient, progress: (UInt64) -> Void
  ) throws -> (wire: UInt64, state: UInt64?) {
    if source.sparseMigration, !destination.sparseMigration {
      return try relayExpanding(source, destination, progress: progress)
    }
    do {
      let wire = try VFIOUserClient.relayMigrationData(
        from: source, to: destination, chunk: migrationChunk(source, destination),
        progress: progress)
      return (wire, source.sparseMigration ? nil : wire)
    } catch {
      switch error {
      case .source(let e): throw EndError(end: sourceEnd, underlying: e)
      case .destination(let e): throw EndError(end: destinationEnd, underlying: e)
      }
    }
  }

  /// The relay for a destination that predates the sparse stream: the
  /// source's sparse stream passes through this process, its zero runs
  /// written out as bytes. Returns the bytes read from the source and written.
  private func relayExpanding(
    _ source: VFIOUserClient, _ destination: VFIOUserClient, progress: (UInt64) -> Void
  ) throws -> (wire: UInt64, state: UInt64?) {
    let chunk = migrationChunk(source, destination)
    let input = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { input.deallocate() }
    let writer = BufferedMigDataWriter(destination, end: destinationEnd, chunk: chunk)
    defer { writer.collectAll() }
    var decoder = SparseStreamDecoder()
    var wire: UInt64 = 0
    var state: UInt64 = 0
    while true {
      let n = try on(sourceEnd) { try source.migDataRead(into: input) }
      try decoder.decode(UnsafeRawBufferPointer(rebasing: input[0..<n])) {
        (segment: XeStreamSegment) throws in
        switch segment {
        case .data(let data):
          try writer.send(data)
          state += UInt64(data.count)
        case .zeros(let count):
          try writer.sendZeros(count)
          state += UInt64(count)
        }
      }
      wire += UInt64(n)
      progress(wire)
      if n < chunk { break }
    }
    try writer.flush()
    return (wire, state)
  }

  /// The source keeps its workload (back in the state it was found in); the
  /// destination must not look healthy with half a state, and one the
  /// migration never touched keeps its own.
  private func rollback(
    _ source: VFIOUserClient, _ destination: VFIOUserClient, _ progress: Progress
  ) {
    if progress.destinationResuming {
      do {
        try destination.reset()
        printError("destination \(destinationEnd) reset: it holds none of the source's state")
      } catch  where isHangUp(error) {
        printError("destination \(destinationEnd) is gone; its server resets it on the hang-up")
      } catch {
        printError(
          "warning: \(destinationEnd): could not reset the destination: \(describe(error))")
      }
    } else {
      printError("destination \(destinationEnd) untouched: it keeps its own state")
    }
    if progress.sourceStopped, let found = progress.sourceFound {
      returnSource(source, to: found, option: "--from", path: from)
    } else {
      printError("source \(sourceEnd) untouched: it is as it was, with its state")
    }
  }
}

/// Returns a source to the state it was found in (RUNNING, or STOP for one
/// whose state already runs elsewhere) after a failed or abandoned save. Its
/// server drains what was left of the stream, so the VF keeps all its state.
/// A source that cannot get there is left as it is, with its state, rather
/// than reset: the message says how to retry.
func returnSource(
  _ source: VFIOUserClient, to found: MigrationState, option: String, path: String
) {
  let end = "\(option) \(path)"
  do {
    try source.setMigrationState(found)
    printError("source \(end) is \(found) again, with its state (as it was found)")
  } catch {
    let state = (try? source.migrationState()).map { "\($0)" } ?? "an unknown state"
    let retry =
      found == .running
      ? "retry with `xe-vfio-user resume -s \(path)`"
      : "it was found in \(found), so nothing runs it"
    printError(
      "warning: \(end): the source could not return to \(found) (\(describe(error))); it is left in \(state) with its state: \(retry)"
    )
  }
}
