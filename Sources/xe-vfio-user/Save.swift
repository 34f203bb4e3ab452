import ArgumentParser
import Checkpoint
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

#if canImport(Glibc)
  import Glibc
#endif

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
        writer.header(
          json: try SaveFileHeader(
            identity: identity, estimatedBytes: estimate,
            created: noTimestamp ? nil : try checkpointTimestamp(), source: socketPath
          ).json()))
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
      if out.seekable {
        try out.patch(
          SaveFormat.fileLengthField(out.bytesWritten), at: SaveFormat.fileLengthOffset)
      }
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
      if out.seekable {
        // Committed: only the device's return failed, and the checkpoint is whole.
        printError(
          out.committed
            ? "\(out.name) holds the complete checkpoint"
            : "\(out.name) is as it was: the partial copy was removed")
      }
      if stopped {
        returnSource(client, to: found, option: "-s", path: socketPath)
      } else {
        printError("the device was not stopped: it is \(found) with its state")
      }
      throw ExitCode(interruption.exitCode ?? ExitCode.failure.rawValue)
    }
  }
}
