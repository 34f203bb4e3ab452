import CVFIOUser
import Control
import Foundation
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient

/// `list`, `top`, `metrics` and `resume` on live servers, as an operator runs
/// them: servers of the simulated VF in processes of their own, with their
/// records in a run directory of the test's.
@Suite("Operating live servers: list, top, metrics, resume", .serialized)
struct OperateTests {
  let runDirectory: String

  init() throws {
    runDirectory = NSTemporaryDirectory() + "xvu-run-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(
      atPath: runDirectory, withIntermediateDirectories: true)
  }

  func serve(_ arguments: [String] = []) throws -> ServeProcess {
    try ServeProcess(arguments, environment: ["XE_VFU_RUN_DIR": runDirectory])
  }

  /// Runs the CLI with the test's run directory.
  func cli(_ arguments: String) throws -> (status: Int32, stdout: String, stderr: String) {
    try run(["__shell__", "XE_VFU_RUN_DIR='\(runDirectory)' '\(executable.path)' \(arguments)"])
  }

  /// Waits for `serve`'s record and control socket.
  func ready(_ server: ServeProcess) throws -> VFIOUserClient {
    let client = try server.connect()
    let record = runDirectory + "/simulated-\(server.pid)"
    for _ in 0..<500
    where !FileManager.default.fileExists(atPath: server.socketPath + ".control")
      || !FileManager.default.fileExists(atPath: record)
    {
      usleep(10_000)
    }
    return client
  }

  @Test func listShowsEveryServerItsClientAndStateAndRemovesStaleRecords() throws {
    let busy = try serve()
    defer { _ = busy.stop() }
    let idle = try serve()
    defer { _ = idle.stop() }
    let client = try ready(busy)
    try client.setMigrationState(.stop)
    _ = consume client
    let other = try ready(idle)
    _ = consume other
    // An unlocked record written long ago: its server died without removing it.
    let stale = runDirectory + "/simulated-999999"
    try "device=simulated-999999\npid=999999\nsocket=/gone.sock\nmigration=x\n".write(
      toFile: stale, atomically: true, encoding: .utf8)
    var old = [timeval(tv_sec: 1_000_000, tv_usec: 0), timeval(tv_sec: 1_000_000, tv_usec: 0)]
    #expect(utimes(stale, &old) == 0)
    // Both clients have left: wait for the servers to say so.
    var text = try cli("list")
    for _ in 0..<100
    where text.stdout.contains("Client: pid") {
      usleep(20_000)
      text = try cli("list")
    }
    #expect(text.status == 0, "\(text.stderr)")
    let busyPID = busy.pid
    #expect(text.stdout.contains("Servers (records in \(runDirectory)):"), "\(text.stdout)")
    #expect(
      text.stdout.contains(
        "simulated-\(busyPID): pid \(busyPID), simulated Xe VF bmg [8086:e211], 256 MiB VRAM on \(busy.socketPath)"
      ), "\(text.stdout)")
    #expect(text.stdout.contains("simulated-\(idle.pid): pid"))
    #expect(text.stdout.contains("Removed the record simulated-999999: its server is gone"))
    #expect(!FileManager.default.fileExists(atPath: stale))
    let json = try JSON.parse(Array(try cli("list --json").stdout.utf8))
    let servers = try #require(json["servers"]?.array)
    #expect(servers.count == 2)
    // The client left: the busy server's device stays in STOP only with keep; it was reset.
    #expect(servers.allSatisfy { $0["control"]?.string?.hasSuffix(".control") == true })
  }

  @Test func listShowsTheAttachedClientsPidAndTheDevicesState() throws {
    let server = try serve(["--on-disconnect", "keep"])
    defer { _ = server.stop() }
    let client = try ready(server)
    try client.setMigrationState(.stop)
    let text = try cli("list")
    #expect(text.stdout.contains("Client: pid \(getpid()), device STOP"), "\(text.stdout)")
    _ = client
  }

  @Test func resumeGoesThroughTheControlSocketWhileAClientIsAttached() throws {
    let server = try serve()
    defer { _ = server.stop() }
    let client = try ready(server)
    try client.setMigrationState(.stop)
    let done = Locked<(Int32, String)?>(nil)
    let socket = server.socketPath
    Thread {
      let result = try? run(["resume", "-s", socket])
      done.withLock { $0 = result.map { ($0.status, $0.stderr) } ?? (-1, "did not run") }
    }.start()
    // The server resumes it between two of this client's messages.
    for _ in 0..<200_000 where done.withLock({ $0 == nil }) {
      _ = try client.read32(region: VFIOPCIRegion.config, offset: 0)
    }
    let (status, stderr) = try #require(done.withLock { $0 })
    #expect(status == 0, "\(stderr)")
    #expect(stderr.contains("device STOP → RUNNING, with its state (through \(socket).control"))
    #expect(try client.migrationState() == .running)
  }

  /// The exposition format, checked line by line: every sample's family has
  /// HELP and TYPE first, names and labels are well formed, counters end in
  /// _total; and counters only grow between two scrapes with traffic between.
  @Test func metricsIsStrictPrometheusTextAndCountersOnlyGrow() throws {
    let server = try serve()
    defer { _ = server.stop() }
    let client = try ready(server)
    for _ in 0..<100 { _ = try client.read32(region: VFIOPCIRegion.config, offset: 0) }
    let first = try cli("metrics")
    #expect(first.status == 0, "\(first.stderr)")
    let before = try Self.parse(first.stdout)
    for _ in 0..<250 { _ = try client.read32(region: VFIOPCIRegion.config, offset: 0) }
    try client.dmaMap(address: 1 << 30, size: 1 << 20, flags: [.read, .write])
    let after = try Self.parse(try cli("metrics").stdout)
    let name = "simulated-\(server.pid)"
    let reads = "xe_vfio_user_messages_total{server=\"\(name)\",command=\"REGION_READ\"}"
    #expect(after.samples[reads]! - before.samples[reads]! == 250)
    #expect(after.samples["xe_vfio_user_up{server=\"\(name)\"}"] == 1)
    #expect(after.samples["xe_vfio_user_client_pid{server=\"\(name)\"}"] == Double(getpid()))
    #expect(
      after.samples["xe_vfio_user_dma_maps_total{server=\"\(name)\"}"]! > before.samples[
        "xe_vfio_user_dma_maps_total{server=\"\(name)\"}"]!)
    let p50 =
      "xe_vfio_user_message_latency_seconds{server=\"\(name)\",command=\"REGION_READ\",quantile=\"0.5\"}"
    #expect((after.samples[p50] ?? 0) > 0 && (after.samples[p50] ?? 1) < 1)
    for (series, value) in before.samples where before.types[Self.family(series)] == "counter" {
      #expect(
        (after.samples[series] ?? -1) >= value,
        "\(series) went from \(value) to \(after.samples[series] ?? -1)")
    }
    _ = client
  }

  static func family(_ series: String) -> String {
    String(series.prefix { $0 != "{" && $0 != " " })
  }

  /// The samples (series → value) and each family's type; throws at the first line out of format.
  static func parse(_ text: String) throws -> (samples: [String: Double], types: [String: String]) {
    struct Malformed: Error, CustomStringConvertible { var description: String }
    let help = #/# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) \S.*/#
    let type = #/# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge)/#
    let sample =
      #/([a-zA-Z_:][a-zA-Z0-9_:]*)\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*")*)\} (-?[0-9.e+-]+)/#
    var helps: Set<String> = []
    var types: [String: String] = [:]
    var samples: [String: Double] = [:]
    #expect(text.hasSuffix("\n") && !text.isEmpty)
    for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
      if let m = try help.wholeMatch(in: line) {
        guard helps.insert(String(m.1)).inserted else {
          throw Malformed(description: "HELP twice: \(line)")
        }
      } else if let m = try type.wholeMatch(in: line) {
        guard helps.contains(String(m.1)), types[String(m.1)] == nil else {
          throw Malformed(description: "TYPE without HELP first, or twice: \(line)")
        }
        types[String(m.1)] = String(m.2)
        if m.2 == "counter", !m.1.hasSuffix("_total") {
          throw Malformed(description: "a counter not named _total: \(line)")
        }
      } else if let m = try sample.wholeMatch(in: line) {
        guard types[String(m.1)] != nil, let value = Double(m.3) else {
          throw Malformed(description: "a sample without HELP and TYPE, or no number: \(line)")
        }
        let series = String(line[..<line.lastIndex(of: " ")!])
        guard samples.updateValue(value, forKey: series) == nil else {
          throw Malformed(description: "series twice: \(line)")
        }
      } else {
        throw Malformed(description: "not the exposition format: \(line)")
      }
    }
    return (samples, types)
  }

  @Test func topOncePrintsPlainTextWithRates() throws {
    let server = try serve()
    defer { _ = server.stop() }
    let client = try ready(server)
    let result = Locked<(status: Int32, stdout: String, stderr: String)?>(nil)
    let line = "XE_VFU_RUN_DIR='\(runDirectory)' '\(executable.path)' top --once --interval 0.5"
    Thread {
      let ran = (try? run(["__shell__", line])) ?? (-1, "", "did not run")
      result.withLock { $0 = ran }
    }.start()
    // Traffic while top measures.
    for _ in 0..<1_000_000 where result.withLock({ $0 == nil }) {
      _ = try client.read32(region: VFIOPCIRegion.config, offset: 0)
    }
    let top = try #require(result.withLock { $0 })
    #expect(top.status == 0, "\(top.stderr)")
    #expect(!top.stdout.contains("\u{1B}"), "no escape sequence when stdout is not a terminal")
    let lines = top.stdout.split(separator: "\n")
    #expect(lines.first?.hasPrefix("xe-vfio-user top: 1 server, ") == true, "\(top.stdout)")
    #expect(lines.count == 3)
    #expect(lines[1].hasPrefix("SERVER") && lines[1].contains("MSG/S"))
    let row = lines[2].split(separator: " ", omittingEmptySubsequences: true)
    #expect(row[0] == "simulated-\(server.pid)")
    #expect(row[2] == "\(getpid())" && row[3] == "RUNNING")
    #expect((Int(row[4]) ?? 0) > 0, "messages/s while the client reads: \(lines[2])")
    let frames = try cli("top -n 2 --interval 0.2")
    #expect(frames.stdout.components(separatedBy: "xe-vfio-user top:").count == 3)
  }

  /// `top` as a person sees it: in a terminal (tmux), refreshed in place.
  @Test func topInATerminalRefreshesInPlace() throws {
    let server = try serve()
    defer { _ = server.stop() }
    let client = try ready(server)
    try client.setMigrationState(.stop)
    let session = "xvu-top-\(getpid())"
    let started = try run([
      "__shell__",
      "for fd in /proc/$$/fd/*; do n=${fd##*/}; [ $n -gt 2 ] && eval \"exec $n>&-\"; done 2>/dev/null; tmux new-session -d -s \(session) -x 160 -y 30 \"XE_VFU_RUN_DIR='\(runDirectory)' '\(executable.path)' top -n 4 --interval 0.3; sleep 30\" </dev/null >/dev/null 2>&1",
    ])
    // tmux's server would keep the pipes `run` reads to their end (those it
    // was given, and the copies bash inherits from Foundation): it gets none.
    #expect(started.status == 0, "\(started.stderr)")
    defer { _ = try? run(["__shell__", "tmux kill-session -t \(session)"]) }
    var screen = ""
    for _ in 0..<100 {
      usleep(100_000)
      screen = (try? run(["__shell__", "tmux capture-pane -p -t \(session)"]))?.stdout ?? ""
      if screen.contains("STOP") { break }
    }
    #expect(screen.contains("SERVER"), "\(screen)")
    let row = screen.split(separator: "\n").first { $0.hasPrefix("simulated-") } ?? ""
    #expect(row.contains("\(getpid())") && row.contains("STOP"), "\(screen)")
    // After the last frame: one frame on the screen, the title at the top (cleared each time).
    usleep(1_500_000)
    screen = (try? run(["__shell__", "tmux capture-pane -p -t \(session)"]))?.stdout ?? ""
    #expect(screen.components(separatedBy: "xe-vfio-user top:").count == 2, "\(screen)")
    #expect(screen.hasPrefix("xe-vfio-user top: 1 server"), "\(screen)")
    _ = client
  }
}
