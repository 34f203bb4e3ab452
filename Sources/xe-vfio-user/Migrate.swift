import ArgumentParser
import FoundationEssentials
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

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
      server and the errno are reported, the destination is reset, and the
      source goes back to RUNNING with its state, so the workload keeps going.
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
      try decode(&decoder, UnsafeRawBufferPointer(rebasing: input[0..<n])) {
        switch $0 {
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

struct Save: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Save a VF's migration stream to a file or stdout (a checkpoint).",
    discussion: """
      Stops the device (STOP_COPY), writes a header that identifies the device
      and the stream in CRC-checked records sealed by an end record
      (protocol/save-format.md), then leaves the device in the state it found
      it in: a RUNNING device runs again, a stopped one (after `migrate`, or
      `save --keep-stopped`) stays stopped, so a saved source never runs
      beside its copy. --resume or --keep-stopped choose otherwise. A regular
      file is written beside the path and renamed into place only when
      complete; a device, FIFO or symlink is written as what it names. On
      failure, or on SIGINT, SIGTERM or SIGHUP, the partial file is removed
      and the device returns to the state it was found in, with its state.
      `save --output - | ssh host xe-vfio-user restore --input -` moves a VF
      between hosts.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String
  @Option(name: [.short, .long], help: "File to write, or - for stdout.") var output: String
  @Flag(help: "Leave the device stopped (STOP) after saving.") var keepStopped = false
  @Flag(help: "Return the device to RUNNING after saving, even if it was found stopped.")
  var resume = false
  @Flag(help: "Store every byte: no zero-page elision, no compression (a larger, plainer file).")
  var noCompress = false
  @Flag(
    help:
      "Leave the creation time out of the header, so two saves of the same state are byte for byte the same (as does SOURCE_DATE_EPOCH, which sets it)."
  )
  var noTimestamp = false
  @OptionGroup var progressOptions: ProgressOptions

  func validate() throws {
    if keepStopped, resume { throw ValidationError("--keep-stopped and --resume are exclusive") }
  }

  func run() throws {
    ignoreSIGPIPE()
    // First: a signal from here on waits for the command to clean up.
    let interruption = try Interruption()
    let end = "-s \(socketPath)"
    let client = try connectServer(socketPath, option: "-s", sparse: !noCompress)
    _ = try step(.probe) { try on(end) { try client.migrationFlags() } }
    let found = try on(end) { try client.migrationState() }
    guard [.running, .stop, .runningP2P].contains(found) else {
      throw CLIError(
        "\(end): the device is in \(found); save starts from RUNNING or STOP (a device mid-restore holds no state to save)"
      )
    }
    let after: MigrationState = keepStopped ? .stop : resume ? .running : found
    let out = try SaveOutput(path: output)
    if let partial = out.temporaryPath { interruption.setLastResort { unlink(partial) } }
    var stopped = false
    do {
      let identity = try step(.identity) { try on(end) { try DeviceIdentity.read(from: client) } }
      let estimate = (try? client.stopCopySize()) ?? 0
      let writer = SaveFileWriter()
      writer.elideZeros = !noCompress
      writer.compress = !noCompress
      writer.sparseInput = client.sparseMigration
      try interruption.check()
      try out.write(
        try writer.header(
          SaveFileHeader(
            identity: identity, estimatedBytes: estimate,
            created: noTimestamp ? nil : try checkpointTimestamp(), source: socketPath)))
      try step(.stopCopy) { try on(end) { try client.setMigrationState(.stopCopy) } }
      stopped = true
      let progress = ProgressReporter(label: "saving", total: estimate, options: progressOptions)
      let bytes = try step(.stream) {
        try writeRecords(
          from: client, end: end, into: out, writer: writer, progress: progress,
          interruption: interruption)
      }
      try writer.finish(to: out)
      progress.update(state: bytes, wire: out.bytesWritten, final: true)
      // A regular file records its length, so a restore can tell a cut-short copy at once.
      if out.seekable { try out.patch(le(out.bytesWritten), at: SaveFormat.fileLengthOffset) }
      try interruption.check()
      try out.commit()
      try step(.finishSave) { try on(end) { try client.setMigrationState(after) } }
      let left = after == found ? "device \(after), as it was found" : "device left in \(after)"
      printError(
        "saved \(formatRate(bytes)) of \(identity) state to \(out.name) as \(formatRate(out.bytesWritten)) (\(percent(out.bytesWritten, of: bytes))); \(left)"
      )
    } catch {
      out.abandon()
      printError("save failed: \(error)")
      if out.seekable { printError("\(out.name) is as it was: the partial copy was removed") }
      if stopped {
        returnSource(client, to: found, option: "-s", path: socketPath)
      } else {
        printError("the device was not stopped: it is \(found) with its state")
      }
      throw ExitCode(interruption.exitCode ?? ExitCode.failure.rawValue)
    }
  }
}

/// Streams the device's STOP_COPY data into `out` as checksummed records
/// (the caller writes the end with `writer.finish`).
func writeRecords(
  from client: VFIOUserClient, end: String, into out: SaveOutput, writer: SaveFileWriter,
  progress: ProgressReporter, interruption: Interruption? = nil
) throws -> UInt64 {
  let chunk = min(migrationChunk(client), SaveFormat.maxRecord)
  _ = try pipeline(bufferSize: chunk) { buffer in
    try interruption?.check()
    let n = try on(end) { try client.migDataRead(into: buffer) }
    return (n, n < buffer.count)
  } consume: { data in
    try writer.append(data, to: out)
    progress.update(state: writer.appendedBytes, wire: out.bytesWritten)
  }
  return writer.appendedBytes
}

struct Restore: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Restore a saved migration stream into a VF.",
    discussion: """
      Refuses a file saved from an incompatible device (IDs, revision, VRAM
      size) before touching the device. A regular file is read whole first,
      every record's checksum and the end record checked, so a damaged or
      cut-short file leaves the device exactly as it was, with its own state.
      From a pipe (--input -) every record is verified before it reaches the
      device and the end record before the device may leave RESUMING; damage
      found on the way resets the device, so it never runs with half a state
      or a damaged one.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String
  @Option(name: [.short, .long], help: "File to read, or - for stdin.") var input: String
  @Flag(help: "Leave the device stopped (STOP) instead of RUNNING.") var noStart = false
  @OptionGroup var progressOptions: ProgressOptions

  func run() throws {
    let end = "-s \(socketPath)"
    let name = input == "-" ? "standard input" : input
    let fd: FileDescriptor
    if input == "-" {
      fd = .standardInput
    } else {
      do { fd = try FileDescriptor.open(input, .readOnly, options: [.closeOnExec]) } catch {
        throw CLIError("opening \(input): \(describe(error))")
      }
    }
    let reader = SaveFileReader(input: fd, name: name)
    let header: SaveFileHeader
    do { header = try reader.readHeader() } catch { throw CLIError("\(error)") }
    let client = try connectServer(socketPath, option: "-s", sparse: true)
    let identity = try step(.identity) { try on(end) { try DeviceIdentity.read(from: client) } }
    if let why = header.identity.incompatibility(with: identity) {
      throw CLIError(
        "refusing to restore: the stream is from \(header.identity), this device is \(identity): \(why)"
      )
    }
    _ = try step(.probe) { try on(end) { try client.migrationFlags() } }
    let found = try on(end) { try client.migrationState() }
    // A regular file can be read twice: the whole of it is checked before the
    // device gives up its own state, so a damaged file changes nothing.
    // A pipe can be read once, and its damage is found on the way (then reset).
    var st = stat()
    if input != "-", fstat(fd.rawValue, &st) == 0, st.st_mode & S_IFMT == S_IFREG {
      do { try SaveFileReader.verifyWholeFile(at: input, name: name) } catch {
        printError("restore refused: \(error)")
        printError("device untouched: it is \(found) with its own state")
        throw ExitCode.failure
      }
    }
    do {
      try step(.resuming) { try on(end) { try client.setMigrationState(.resuming) } }
      let progress = ProgressReporter(
        label: "restoring", total: header.estimatedBytes, options: progressOptions)
      let total = try step(.restoreStream) {
        try restoreRecords(from: reader, into: client, end: end, progress: progress)
      }
      progress.update(state: total, wire: reader.position, final: true)
      try step(.finishRestore) {
        try on(end) { try client.setMigrationState(noStart ? .stop : .running) }
      }
      printError(
        "restored \(formatRate(total)) of state from \(formatRate(reader.position)) of \(name); device \(noStart ? "STOP" : "RUNNING")"
      )
    } catch {
      printError("restore failed: \(error)")
      do {
        try client.reset()
        printError("device reset: it holds none of the restored state")
      } catch {
        printError("warning: \(end): could not reset the device: \(describe(error))")
      }
      throw ExitCode.failure
    }
  }
}

/// Streams a save file's records, expanded and verified, into a device in
/// RESUMING; returns the stream bytes written. The file is read on a thread
/// of its own while the previous record is being written.
func restoreRecords(
  from reader: SaveFileReader, into client: VFIOUserClient, end: String,
  progress: ProgressReporter
) throws -> UInt64 {
  let chunk = migrationChunk(client)
  let job = Handoff(reader)
  var total: UInt64 = 0
  if client.sparseMigration {
    return try restoreSparse(from: job, into: client, end: end, chunk: chunk) {
      total += UInt64($0)
      progress.update(state: total, wire: reader.bytesRead.load(ordering: .relaxed))
    }
  }
  return try pipeline(bufferSize: SaveFormat.maxRecord) { buffer in
    try job.value.readRecords(into: buffer)
  } consume: { data in
    try on(end) { try client.migDataWrite(from: data, chunk: chunk, depth: 2) }
    total += UInt64(data.count)
    progress.update(state: total, wire: reader.bytesRead.load(ordering: .relaxed))
  }
}

/// `restoreRecords` on a connection that negotiated the sparse stream: the
/// file's zero records cross the socket as zero segments, never as bytes.
/// The reader thread tags each record (`readTaggedRecords`); this thread
/// builds the sparse stream from them and sends it in `chunk`-byte writes.
/// Returns the expanded stream bytes restored.
private func restoreSparse(
  from job: Handoff<SaveFileReader>, into client: VFIOUserClient, end: String, chunk: Int,
  progress: (Int) -> Void
) throws -> UInt64 {
  let writer = BufferedMigDataWriter(client, end: end, chunk: chunk)
  let send = writer.send
  var builder = SparseStreamBuilder()
  var total: UInt64 = 0
  // On a failure the acknowledgements still due are read, so the reset that follows gets its own.
  defer { writer.collectAll() }
  _ = try pipeline(bufferSize: SaveFormat.maxRecord + SparseMigration.segmentHeaderSize) {
    buffer in
    try job.value.readTaggedRecords(into: buffer)
  } consume: { tagged in
    var at = 0
    while at < tagged.count {
      let word = UInt64(
        littleEndian: tagged.loadUnaligned(fromByteOffset: at, as: UInt64.self))
      let length = Int(word >> 32)
      at += SparseMigration.segmentHeaderSize
      if UInt8(truncatingIfNeeded: word) == SparseMigration.SegmentKind.zeros.rawValue {
        try builder.append(.zeros(length), send)
      } else {
        try builder.append(
          .data(UnsafeRawBufferPointer(rebasing: tagged[at..<(at + length)])), send)
        at += length
      }
      total += UInt64(length)
      progress(length)
    }
  }
  try writer.flush()
  return total
}

/// MIG_DATA_WRITEs of a stream given in pieces of any size, up to `depth`
/// in flight: small pieces (segment headers, pages of data) are gathered into
/// `chunk`-byte messages, large ones sent from where they are.
final class BufferedMigDataWriter {
  let client: VFIOUserClient
  let end: String
  let chunk: Int
  let depth = 4
  private let out: UnsafeMutableRawBufferPointer
  private var pending = 0
  private var inFlight: [UInt16] = []
  private var oldest = 0
  /// Pieces at least this long are sent without being copied.
  static let direct = 64 << 10

  init(_ client: VFIOUserClient, end: String, chunk: Int) {
    self.client = client
    self.end = end
    self.chunk = chunk
    out = .allocate(byteCount: chunk, alignment: 4096)
  }

  deinit { out.deallocate() }

  func send(_ bytes: UnsafeRawBufferPointer) throws {
    if bytes.count >= Self.direct {
      // A few bytes gathered (a segment header) travel in the same message.
      let prefix = pending <= 32 ? pending : 0
      try sendPending(ifOver: 32)
      var rest = bytes
      var head = UnsafeRawBufferPointer(rebasing: out[0..<prefix])
      while !rest.isEmpty {
        let n = min(rest.count, chunk - head.count)
        try write(UnsafeRawBufferPointer(rebasing: rest[0..<n]), prefix: head)
        head = UnsafeRawBufferPointer(rebasing: out[0..<0])
        rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      }
      pending = 0
      return
    }
    var rest = bytes
    while !rest.isEmpty {
      let n = min(rest.count, chunk - pending)
      UnsafeMutableRawBufferPointer(rebasing: out[pending..<(pending + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: rest[0..<n]))
      pending += n
      rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      if pending == chunk { try sendPending() }
    }
  }

  func sendZeros(_ count: Int) throws {
    var left = count
    while left > 0 {
      let n = min(left, SparseMigration.zeroPage.count)
      try send(UnsafeRawBufferPointer(rebasing: SparseMigration.zeroPage[0..<n]))
      left -= n
    }
  }

  /// Sends what is gathered and waits for every acknowledgement.
  func flush() throws {
    try sendPending()
    while oldest < inFlight.count { try collect() }
  }

  /// Reads the acknowledgements still due, whatever they say (after a failure).
  func collectAll() {
    while oldest < inFlight.count {
      let id = inFlight[oldest]
      oldest += 1
      do throws(VFIOUserClientError) { _ = try client.receiveAck(id: id) } catch {
        if case .server = error { continue }
        return  // the server is gone or silent: nothing more will come
      }
    }
  }

  /// Sends what is gathered if it is more than `limit` bytes.
  private func sendPending(ifOver limit: Int = 0) throws {
    guard pending > limit else { return }
    try write(UnsafeRawBufferPointer(rebasing: out[0..<pending]))
    pending = 0
  }

  /// The bytes are in the socket when `sendMigDataWrite` returns: `data` may be reused.
  private func write(
    _ data: UnsafeRawBufferPointer,
    prefix: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)
  ) throws {
    inFlight.append(try on(end) { try client.sendMigDataWrite(data, prefix: prefix) })
    while inFlight.count - oldest > depth { try collect() }
  }

  private func collect() throws {
    let id = inFlight[oldest]
    oldest += 1
    _ = try on(end) { try client.receiveAck(id: id) }
  }
}

/// `SparseStreamDecoder.decode` for a caller whose `emit` throws any error:
/// that error comes out as it was; a malformed stream is a `CLIError`.
func decode(
  _ decoder: inout SparseStreamDecoder, _ bytes: UnsafeRawBufferPointer,
  _ emit: (SparseMigration.Segment) throws -> Void
) throws {
  var failure: Error?
  do throws(Errno) {
    try decoder.decode(bytes) { segment throws(Errno) in
      do { try emit(segment) } catch {
        failure = error
        throw .ioError
      }
    }
  } catch {
    throw failure ?? CLIError("the sparse migration stream is malformed (\(error.name))")
  }
}

struct Resume: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Return a stopped VF to RUNNING with its state.",
    discussion: """
      A device left in STOP (save --keep-stopped, migrate --no-start, or a
      command that could not finish) keeps its state on a server run with
      `--on-disconnect keep`; this command starts it again. A device that
      holds an incomplete restore (RESUMING, ERROR) is refused: reset it.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String

  func run() throws {
    let end = "-s \(socketPath)"
    let client = try connectServer(socketPath, option: "-s")
    let state = try on(end) { try client.migrationState() }
    switch state {
    case .running:
      printError("\(end): the device is already RUNNING")
    case .resuming, .error:
      throw CLIError(
        "\(end): the device is in \(state) and holds an incomplete state; it cannot run until it is reset"
      )
    default:
      try on(end) { try client.setMigrationState(.running) }
      printError("\(end): device \(state) → RUNNING, with its state")
    }
  }
}
