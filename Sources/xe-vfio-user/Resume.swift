import ArgumentParser
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

#if canImport(Glibc)
  import Glibc
#endif

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
