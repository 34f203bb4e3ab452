import CVFIOUser
import Control
import Foundation
import Logging
import Synchronization
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// Events, `resume`, `set-log-level` and the counters added beside them,
/// over real sockets (protocol/control.md).
@Suite("Control events and commands over real sockets", .serialized)
struct ControlEventTests {
  /// The next events' names and data, in order.
  func next(_ control: ControlClient, _ count: Int) throws -> [(String, JSON)] {
    try (0..<count).map { _ in
      let event = try control.nextEvent()
      let stamp = try #require(event["timestamp"])
      #expect((stamp["seconds"]?.integer ?? 0) > 1_700_000_000)
      #expect((0..<1_000_000).contains(stamp["microseconds"]?.integer ?? -1))
      return (event["event"]?.string ?? "?", event["data"] ?? .null)
    }
  }

  /// Reads the save to its end (a short reply).
  func drainSave(_ client: VFIOUserClient) throws -> Int {
    var total = 0
    while true {
      let chunk = try client.migDataRead(size: 1 << 20)
      total += chunk.count
      if chunk.count < 1 << 20 { return total }
    }
  }

  @Test func noEventsBeforeCapabilitiesThenEveryStateChangeInOrder() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let quiet = try running.controlClient()
    let control = try running.listener()
    var client: VFIOUserClient? = try running.connect()
    let connected = try next(control, 1)
    #expect(connected[0].0 == "CLIENT_CONNECTED")
    #expect(connected[0].1["pid"] == .int(Int64(getpid())))
    #expect(connected[0].1["uid"] == .int(Int64(getuid())))

    try client!.setMigrationState(.stop)
    try client!.setMigrationState(.stopCopy)
    let saved = try drainSave(client!)
    try client!.setMigrationState(.stop)
    try client!.setMigrationState(.running)
    try client!.reset()
    let save = try next(control, 7)
    #expect(
      save.map(\.0) == [
        "DEVICE_STATE_CHANGED", "DEVICE_STATE_CHANGED", "MIGRATION_STARTED",
        "DEVICE_STATE_CHANGED", "MIGRATION_FINISHED", "DEVICE_STATE_CHANGED", "DEVICE_RESET",
      ])
    #expect(save[0].1 == .object([("from", .string("RUNNING")), ("to", .string("STOP"))]))
    #expect(save[2].1 == .object([("direction", .string("save"))]))
    #expect(save[4].1["direction"] == .string("save"))
    #expect(save[4].1["bytes"] == .int(Int64(saved)))
    #expect(saved > 0)
    #expect(save[5].1 == .object([("from", .string("STOP")), ("to", .string("RUNNING"))]))
    #expect(save[6].1 == .object([("cause", .string("client-request"))]))

    // A save the client leaves halfway fails: the hang-up resets the device.
    try client!.setMigrationState(.stopCopy)
    _ = try client!.migDataRead(size: 4096)
    client = nil
    let left = try next(control, 6)
    #expect(
      left.map(\.0) == [
        "DEVICE_STATE_CHANGED", "MIGRATION_STARTED", "DEVICE_RESET", "DEVICE_STATE_CHANGED",
        "MIGRATION_FAILED", "CLIENT_DISCONNECTED",
      ])
    #expect(left[2].1["cause"] == .string("client-left"))
    #expect(left[4].1["reason"]?.string?.contains("device reset in STOP_COPY") == true)
    #expect(left[4].1["state"] == .string("RUNNING"))
    #expect(left[5].1["reason"] == .string("client-closed"))
    #expect(left[5].1["pid"] == .int(Int64(getpid())))

    // The client that never asked got replies only.
    #expect(try quiet.execute("query-status")["client"] == .null)
    #expect(quiet.events.isEmpty)
    let stats = try quiet.execute("query-stats")
    #expect(stats["events"]?["posted"]?.integer == 14)
    #expect(stats["events"]?["dropped"] == .int(0))
    #expect(stats["device"]?["resets"] == .int(2))
  }
}

@Suite("Control commands: resume, set-log-level, latency and counters", .serialized)
struct ControlCommandTests {
  @Test func resumeRunsOnTheConnectionThreadBetweenTheClientsMessagesEvenWhenItIsIdle() throws {
    let running = try ControlledServer(requestTimeoutMilliseconds: 300)
    defer { running.close() }
    let control = try running.controlClient()
    #expect(throws: ControlClientError.self) { _ = try control.execute("resume") }
    let client = try running.connect()
    try client.setMigrationState(.stop)
    // Let its thread go idle, waiting for the next message.
    usleep(100_000)
    // An idle client: the connection is woken between two messages and resumes the device.
    #expect(
      try control.execute("resume").serialized()
        == "{\"from\":\"STOP\",\"to\":\"RUNNING\",\"changed\":true}")
    #expect(try client.migrationState() == .running)
    try client.setMigrationState(.stop)
    // A busy client: the request is carried out between two of its messages.
    let answer = Locked<String?>(nil)
    let thread = Thread {
      do {
        let returned = try running.controlClient().execute("resume")
        answer.withLock { $0 = returned.serialized() }
      } catch {
        answer.withLock { $0 = "\(error)" }
      }
    }
    thread.start()
    for _ in 0..<20_000 where answer.withLock({ $0 == nil }) {
      _ = try client.read32(region: VFIOPCIRegion.config, offset: 0)
    }
    #expect(answer.withLock { $0 } == "{\"from\":\"STOP\",\"to\":\"RUNNING\",\"changed\":true}")
    #expect(try client.migrationState() == .running)
    // A device in RESUMING is refused, as the CLI's resume refuses it.
    try client.setMigrationState(.stop)
    try client.setMigrationState(.resuming)
    let refused = Locked<String?>(nil)
    Thread {
      do {
        _ = try running.controlClient().execute("resume")
        refused.withLock { $0 = "answered" }
      } catch {
        refused.withLock { $0 = "\(error)" }
      }
    }.start()
    for _ in 0..<20_000 where refused.withLock({ $0 == nil }) {
      _ = try client.read32(region: VFIOPCIRegion.config, offset: 0)
    }
    #expect(refused.withLock { $0 }?.contains("holds an incomplete state") == true)
    #expect(try client.migrationState() == .resuming)
  }

  @Test func setLogLevelChangesTheLevelLoggersRead() throws {
    let level = RuntimeLogLevel(.critical)
    let running = try ControlledServer(logLevel: level)
    defer { running.close() }
    let control = try running.controlClient()
    let answer = try control.execute(
      "set-log-level", arguments: .object([("level", .string("debug"))]))
    #expect(answer == .object([("from", .string("critical")), ("to", .string("debug"))]))
    #expect(level.level == .debug)
    // A logger made before the change reads the new level.
    var logger = Logger(label: "made-before") { _ in level.handler(SwiftLogNoOpLogHandler()) }
    #expect(logger.logLevel == .debug)
    logger.logLevel = .warning
    #expect(level.level == .warning)
    for (arguments, words) in [
      (JSON.object([("level", .string("loud"))]), "'level' is one of trace, debug"),
      (.object([]), "parameter 'level' is missing"),
      (.object([("level", .string("info")), ("x", .int(1))]), "parameter 'x' is unexpected"),
    ] {
      do {
        _ = try control.execute("set-log-level", arguments: arguments)
        Issue.record("\(arguments) accepted")
      } catch {
        #expect("\(error)".contains(words), "\(error)")
      }
    }
    let fixed = try ControlledServer()
    defer { fixed.close() }
    #expect(throws: ControlClientError.self) {
      _ = try fixed.controlClient().execute(
        "set-log-level", arguments: .object([("level", .string("info"))]))
    }
  }

  /// Service time per message type, interrupts the device signals, and a
  /// server that counts nothing.
  @Test func latencyInterruptsAndCountingOff() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let client = try running.connect()
    for _ in 0..<1000 { _ = try client.read32(region: VFIOPCIRegion.config, offset: 0) }
    // An interrupt: bus master and MSI-X on, a DMA of the engine that raises vector 2.
    try client.write(
      region: VFIOPCIRegion.config, offset: 4,
      data: [UInt8(XePCIConfig.commandMemory | XePCIConfig.commandBusMaster), 0])
    try client.write(
      region: VFIOPCIRegion.config, offset: UInt64(XePCIConfig.msixCap + 3), data: [0x80])
    let memfd = cvfu_memfd_create("guest", 0)
    defer { close(memfd) }
    ftruncate(memfd, 1 << 20)
    try client.dmaMap(
      address: 1 << 30, size: 1 << 20, flags: [.read, .write], fd: FileDescriptor(rawValue: memfd))
    let eventfd = cvfu_eventfd(0, 0)
    defer { close(eventfd) }
    try client.setIRQEventfds(
      index: VFIOPCIIRQ.msix, start: 2, fds: [FileDescriptor(rawValue: eventfd)], chunk: 1)
    typealias D = XeSimRegisters.DMA
    try client.write64(region: 0, offset: D.src, 0)
    try client.write64(region: 0, offset: D.dst, 1 << 30)
    try client.write32(region: 0, offset: D.len, 8)
    try client.write32(
      region: 0, offset: D.ctrl, D.control(toDevice: false, vector: 2, interrupt: true))
    try client.write32(region: 0, offset: D.doorbell, 1)
    _ = try client.read32(region: 0, offset: D.status)
    var value: UInt64 = 0
    #expect(read(eventfd, &value, 8) == 8 && value == 1, "the vector's eventfd was signalled")

    let stats = try running.controlClient().execute("query-stats")
    let read = try #require(
      stats["messages"]?.array?.first { $0["command"] == .string("REGION_READ") })
    let latency = try #require(read["latency-ns"])
    #expect(latency["samples"] == read["count"])
    let (p50, p99, max) = (
      latency["p50"]?.integer ?? 0, latency["p99"]?.integer ?? 0, latency["max"]?.integer ?? 0
    )
    #expect(p50 > 0 && p50 <= p99 && p99 <= max + max / 8, "\(latency)")
    #expect(p99 < 1_000_000_000, "a REGION_READ is served within a second: \(latency)")
    #expect(stats["interrupts"]?["signalled"] == .int(1))
    #expect(stats["dma"]?["maps"] == .int(1))

    let uncounted = try ControlledServer(counting: false)
    defer { uncounted.close() }
    let other = try uncounted.connect()
    for _ in 0..<10 { _ = try other.read32(region: VFIOPCIRegion.config, offset: 0) }
    let none = try uncounted.controlClient().execute("query-stats")
    #expect(none["counting"] == .bool(false))
    #expect(
      none["messages"]?.array?.allSatisfy { $0["count"] == .int(0) && $0["latency-ns"] == .null }
        == true)
  }

  @Test func histogramBucketsBoundEveryValue() {
    for value: UInt64 in [0, 1, 7, 8, 9, 15, 16, 100, 1000, 12345, 1 << 30, 1 << 40, UInt64.max] {
      let bucket = LatencyHistograms.bucket(value)
      let (low, width) = LatencyHistograms.range(bucket)
      #expect(low <= value, "\(value) in bucket \(bucket) from \(low)")
      if value < 1 << 39 {
        #expect(value < low + width, "\(value) in bucket \(bucket) [\(low), +\(width))")
        #expect(width <= max(1, low / 8), "a bucket is at most 12.5% wide")
      }
    }
  }
}
