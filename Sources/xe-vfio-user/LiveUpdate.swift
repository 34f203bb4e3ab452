import ArgumentParser
import Control
import MigrationTools

#if canImport(Glibc)
  import Glibc
#endif

struct LiveUpdateCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "live-update",
    abstract: "Replace a running server with a new binary, without the client noticing.",
    discussion: """
      Asks the server (through its control socket) to start the new binary
      (default: the server's own executable, so an upgrade is "install, then
      live-update") and hand it everything it holds, between two of the
      client's messages: the listening sockets, the client's connection, its
      DMA windows and eventfds, and the device with its state. The client
      keeps its connection and sees its requests answered by the new process
      after a pause of milliseconds. If anything fails the old server carries
      on serving as before, and this command says why (exit status 1).
      A device behind the kernel's VFIO (serve --device) is handed over
      open, its DMA windows staying mapped in the IOMMU: this needs
      VFIO_UPDATE_VADDR (Linux 5.12 or later, no mdev in the container)
      while windows are mapped, and is refused on the iommufd path.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s")],
    help: "The server's device socket (default: \(defaultSocketPath)).")
  var socketPath: String = defaultSocketPath

  @Option(help: "The server's control socket (default: the socket path with .control appended).")
  var controlSocket: String?

  @Option(help: "The new binary (default: the running server's own executable).")
  var binary: String?

  func run() throws {
    let path = controlSocket ?? socketPath + ".control"
    let answer: JSON
    do {
      let client = try ControlClient(path: path, timeoutMilliseconds: 60_000)
      answer = try client.execute(
        "live-update",
        arguments: binary.map { .object([("binary", .string(absolute($0)))]) })
    } catch {
      throw CLIError("live update of \(socketPath) failed: \(Info.describeControl(error))")
    }
    let pid = answer["pid"]?.integer ?? 0
    var line =
      "live update: pid \(pid) (\(answer["version"]?.string ?? "?")) serves \(socketPath) now; handover \(answer["handover-ms"]?.integer ?? 0) ms"
    // The successor answers on the same control socket once the old process has gone.
    for _ in 0..<200 {
      if let status = try? ControlClient(path: path, timeoutMilliseconds: 2000).execute(
        "query-status"),
        status["server"]?["pid"]?.integer == pid,
        let pause = status["server"]?["live-update"]?["pause-ms"]?.integer
      {
        line += ", requests paused \(pause) ms"
        break
      }
      usleep(10_000)
    }
    print(line)
  }

  /// The binary as the server will find it: relative to this directory, not the server's.
  private func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : ServedRecord.absolutePath(path)
  }
}
