import CVFIOUser
import Control
import Logging
import MigrationTools
import VFIODevice
import VFIOUserClient
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

extension BenchConfiguration {
  /// What the per-message counters and latency histogram cost on the request
  /// path: 4-byte REGION_READs against a server that counts nothing, one that
  /// counts, and one that counts with a control client listening for events
  /// and asking query-stats every 10 ms (a hundred times `top`'s rate), in
  /// alternating rounds beside the raw socket, all in this one run.
  func countersFigures(
    _ table: inout ReportTable, logger: Logger, count: Int, serverCPU: Int32?
  ) throws {
    func served(counting: Bool, tag: String) throws -> (VFIOUserServer, VFIOUserClient, String) {
      let device = try SimulatedXeVF(profile: .bmg, vramSize: 1 << 20, logger: logger)
      let path = "/tmp/xe-vfio-user-bench-\(getpid())-\(tag).sock"
      let server = VFIOUserServer(
        backend: device, logger: logger,
        connectionThreadSetup: { if let serverCPU { _ = cvfu_pin_to_cpu(serverCPU) } },
        counting: counting)
      try server.listen(socketPath: path)
      server.start()
      let client = try VFIOUserClient.connect(path: path)
      _ = cvfu_socket_buffers(client.socket.rawValue, 8 << 20)
      return (server, client, path)
    }
    let (plain, plainClient, _) = try served(counting: false, tag: "off")
    defer { plain.stop() }
    let (counted, countedClient, _) = try served(counting: true, tag: "on")
    defer { counted.stop() }
    let (watched, watchedClient, watchedPath) = try served(counting: true, tag: "watched")
    defer { watched.stop() }
    let control = ControlServer(
      server: watched,
      identity: ControlIdentity(
        device: "bench", backend: "simulated", socket: watchedPath, version: "bench"),
      logger: logger)
    try control.listen(socketPath: watchedPath + ".control")
    control.start()
    defer { control.stop() }
    let watching = VFIODevice.Semaphore(value: 0)
    let stopWatching = Locked(false)
    let controlPath = watchedPath + ".control"
    let failed = startThread(name: "bench-watch") {
      // Listening for events, then asking as `top` does, only much more often.
      let listener = try? ControlClient(path: controlPath)
      _ = try? listener?.execute("qmp_capabilities")
      watching.signal()
      while !stopWatching.withLock({ $0 }) {
        _ = try? listener?.execute("query-stats")
        usleep(10_000)
      }
      watching.signal()
    }
    precondition(failed == nil, "cannot start the control client's thread")
    watching.wait()
    defer {
      stopWatching.withLock { $0 = true }
      watching.wait()
    }

    let scratch = XeSimRegisters.vfSwFlag(0)
    var (off, on, listened, floor): ([UInt64], [UInt64], [UInt64], [UInt64]) = ([], [], [], [])
    let rounds = 5
    for _ in 0..<rounds {
      floor += SocketFloor.roundTrips(
        requestSize: 32, replySize: 36, count: count / rounds, serverCPU: serverCPU)
      off += try measure(count / rounds) { try readOnce(plainClient, scratch, 4) }
      on += try measure(count / rounds) { try readOnce(countedClient, scratch, 4) }
      listened += try measure(count / rounds) { try readOnce(watchedClient, scratch, 4) }
    }
    let floorSummary = LatencySummary(floor)
    table.latency("4-byte REGION_READ, counters off", LatencySummary(off), floorSummary)
    table.latency("4-byte REGION_READ, counters on", LatencySummary(on), floorSummary)
    table.latency(
      "4-byte REGION_READ, counters on, control client listening", LatencySummary(listened),
      floorSummary)
    let base = LatencySummary(off).p50
    for (name, summary) in [("on", LatencySummary(on)), ("listening", LatencySummary(listened))] {
      table.rows.append([
        "counters \(name) / off, p50", String(printf: "%.3f×", summary.p50 / base), "", "",
        "≤ 1.02×",
      ])
    }
  }
}
