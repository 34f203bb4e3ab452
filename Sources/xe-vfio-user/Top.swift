import ArgumentParser
import Control
import MigrationTools

#if canImport(Glibc)
  import Glibc
#endif

/// `top`: every server on the host, refreshed each interval, as top and
/// `virsh domstats` show theirs.
struct Top: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Show every server live: messages/s, DMA, interrupts/s, state, migration, client.",
    discussion: """
      Reads each live server's record and control socket (as `metrics` does) \
      every interval and prints one line per server; rates are over the last \
      interval. On a terminal the screen is cleared before each frame; \
      otherwise frames follow one another as plain text. Ctrl-C ends it.
      """)

  @Flag(help: "Print one frame (rates over one interval) and exit.")
  var once = false

  @Option(
    name: [.customShort("n"), .customLong("count")], help: "Print this many frames and exit.")
  var count: Int?

  @Option(help: "Seconds between frames.")
  var interval: Double = 1

  func validate() throws {
    guard interval >= 0.1, interval <= 3600 else {
      throw ValidationError("--interval is from 0.1 to 3600 seconds")
    }
    if let count, count < 1 { throw ValidationError("-n is at least 1") }
  }

  func run() throws {
    let frames = once ? 1 : count
    let clear = isatty(1) != 0
    var previous = Dictionary(
      LiveServer.gather().map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
    var shown = 0
    while frames.map({ shown < $0 }) ?? true {
      usleep(UInt32(interval * 1_000_000))
      let now = LiveServer.gather()
      let frame = Self.render(now, previous: previous, interval: interval, time: time(nil))
      print((clear ? "\u{1B}[H\u{1B}[2J" : "") + frame, terminator: "")
      fflush(nil)
      previous = Dictionary(now.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
      shown += 1
    }
  }

  static let header = [
    "SERVER", "PID", "CLIENT", "STATE", "MSG/S", "DMA MAP/UNMAP", "IRQ/S", "MIGRATION",
  ]

  /// One frame: a title line, a header, a line per server.
  static func render(
    _ servers: [LiveServer], previous: [String: LiveServer], interval: Double, time: Int
  ) -> String {
    var rows = [header]
    for server in servers {
      guard server.stats != nil else {
        rows.append([
          server.name, "\(server.record.pid)", "?", "?", "-", "-", "-",
          server.unreachable ?? "no answer",
        ])
        continue
      }
      let before = previous[server.name]
      func rate(_ value: (LiveServer) -> UInt64) -> String {
        guard let before, before.stats != nil else { return "-" }
        let delta = value(server) &- value(before)
        return delta > value(server) ? "-" : "\(Int((Double(delta) / interval).rounded()))"
      }
      let migration = migrationColumn(server, before: before, interval: interval)
      rows.append([
        server.name, "\(server.record.pid)", server.clientPID.map { "\($0)" } ?? "-",
        server.state ?? "-", rate(\.totalMessages),
        "\(server.counter("dma", "maps"))/\(server.counter("dma", "unmaps"))",
        rate { $0.counter("interrupts", "signalled") }, migration,
      ])
    }
    let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
    var out =
      "xe-vfio-user top: \(servers.count) server\(servers.count == 1 ? "" : "s"), \(Info.utcTime(Int64(time))), every \(interval) s\n"
    for row in rows {
      let cells = row.enumerated().map { column, cell in
        column == row.count - 1
          ? cell : cell + String(repeating: " ", count: widths[column] - cell.count)
      }
      out += cells.joined(separator: "  ") + "\n"
    }
    if servers.isEmpty { out += "(no server: none has a record in \(ServedRecord.directory))\n" }
    return out
  }

  /// A migration's progress: its direction, bytes so far and rate; "-" when none runs.
  static func migrationColumn(_ server: LiveServer, before: LiveServer?, interval: Double)
    -> String
  {
    let saving = ["STOP_COPY", "PRE_COPY", "PRE_COPY_P2P"].contains(server.state ?? "")
    guard saving || server.state == "RESUMING" else { return "-" }
    let key = saving ? "bytes-read" : "bytes-written"
    let bytes = server.counter("migration", key)
    let earlier = before?.counter("migration", key) ?? bytes
    let rate = bytes >= earlier ? UInt64(Double(bytes - earlier) / interval) : 0
    return "\(saving ? "save" : "load") \(formatBytes(bytes)) total, \(formatBytes(rate))/s"
  }
}
