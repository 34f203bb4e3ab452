import ArgumentParser
import Control
import MigrationTools
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
      On a server a VMM is attached to (EBUSY), it asks the control socket
      (protocol/control.md, `resume`), and the server resumes the device
      between two of the VMM's messages.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String

  @Option(
    help: ArgumentHelp(
      "The server's control socket, used while a client is attached (default: the socket path with .control appended).",
      valueName: "path"))
  var controlSocket: String?

  func run() throws {
    let end = "-s \(socketPath)"
    let client: VFIOUserClient
    do {
      client = try connectServer(socketPath, option: "-s")
    } catch let busy as BusyServerError {
      return try resumeLive(busy)
    }
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

extension Resume {
  /// `resume` through the control socket of a server a client is attached to.
  func resumeLive(_ busy: BusyServerError) throws {
    let path = controlSocket ?? socketPath + ".control"
    let end = "-s \(socketPath)"
    let answer: JSON
    do {
      answer = try ControlClient(path: path, timeoutMilliseconds: 10_000).execute("resume")
    } catch {
      throw CLIError(
        "\(busy); resuming through its control socket \(path) failed: \(Info.describeControl(error))"
      )
    }
    let (from, to) = (answer["from"]?.string ?? "?", answer["to"]?.string ?? "?")
    if answer["changed"]?.bool == true {
      printError(
        "\(end): device \(from) → \(to), with its state (through \(path): a client is attached)")
    } else {
      printError("\(end): the device is already \(to)")
    }
  }
}
