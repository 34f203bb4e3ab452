import ArgumentParser
import Checkpoint
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
    do { header = try SaveFileHeader(json: reader.readHeader(), name: name) } catch {
      throw CLIError("\(error)")
    }
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
      // Through the descriptor already open: the file checked is the file restored,
      // even if the path is renamed over meanwhile.
      do {
        try SaveFileReader.verifyWholeFile(at: "/proc/self/fd/\(fd.rawValue)", name: name)
      } catch {
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
