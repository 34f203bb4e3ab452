import CVFIOUser
import Control
import Foundation
import Synchronization
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// Event listeners that misbehave or are many, and the check for a guest
/// that uses a device it did not enable again after a reset.
@Suite("Control event listeners and the enable check", .serialized)
struct ControlListenerTests {
  /// A listener that never reads fills its socket, then its queue: what it
  /// misses is counted, the device client is answered throughout, and once
  /// it reads it is told how many it missed.
  @Test func aListenerThatNeverReadsLosesEventsNotTheDevicesTime() throws {
    let running = try ControlledServer(sendTimeoutMilliseconds: 20_000, eventQueueCapacity: 16)
    defer { running.close() }
    let stalled = try running.listener()
    let client = try running.connect()
    let toggles = 4000
    let start = Date()
    for i in 0..<toggles { try client.setMigrationState(i % 2 == 0 ? .stop : .running) }
    let elapsed = Date().timeIntervalSince(start)
    #expect(elapsed < 10, "\(toggles) state changes took \(elapsed) s beside a stalled listener")
    #expect(try client.migrationState() == .running)

    let stats = try running.controlClient().execute("query-stats")
    let listener = try #require(stats["events"]?["listeners"]?.array?.first)
    let dropped = try #require(listener["dropped"]?.integer)
    #expect(dropped > 0 && listener["pid"] == .int(Int64(getpid())))
    #expect(listener["queued"] == .int(16), "its queue is full")
    #expect(stats["events"]?["dropped"]?.integer == dropped)
    #expect(stats["events"]?["posted"]?.integer == Int64(toggles + 1))

    // It reads now: what its socket held, its queue, then the count of what it missed.
    var received: Int64 = 0
    var missed: Int64 = 0
    var notices = 0
    // Until every event is accounted for (a missing one ends it with the receive timeout).
    while received + missed < Int64(toggles + 1) {
      let event = try stalled.nextEvent()
      if event["event"] == .string("EVENTS_DROPPED") {
        missed += event["data"]?["count"]?.integer ?? 0
        notices += 1
      } else {
        received += 1
      }
    }
    #expect(notices >= 1)
    #expect(missed == dropped, "each missed event is told, once")
  }

  /// A hundred listeners at once each get the same events.
  @Test func aHundredListenersAtOnce() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let listeners = try (0..<100).map { _ in try running.listener() }
    let status = try listeners[0].execute("query-status")
    #expect(status["control"]?["clients"] == .int(100))
    let client = try running.connect()
    try client.setMigrationState(.stop)
    // Every listener's events wait in its own socket: read them in turn.
    var failures: [String] = []
    for (i, listener) in listeners.enumerated() {
      let first = try listener.nextEvent()
      let second = try listener.nextEvent()
      if first["event"] != .string("CLIENT_CONNECTED")
        || second["event"] != .string("DEVICE_STATE_CHANGED")
        || second["data"]?["to"] != .string("STOP")
      {
        failures.append("\(i): \(first) \(second)")
      }
    }
    #expect(failures == [])
    let stats = try listeners[0].execute("query-stats")
    #expect(stats["events"]?["listeners"]?.array?.count == 100)
    #expect(stats["events"]?["dropped"] == .int(0))
  }

  func enable(_ client: VFIOUserClient) throws {
    try client.write(
      region: VFIOPCIRegion.config, offset: 4,
      data: [UInt8(XePCIConfig.commandMemory | XePCIConfig.commandBusMaster), 0])
  }

  /// A device the guest enabled, reset (by its own request or as a client
  /// left), then driven through a BAR with no enable since: one error event
  /// and one count per reset, not per access.
  @Test func aGuestUsingADeviceItNeverEnabledAgainIsNamedOncePerReset() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let control = try running.listener()
    var client: VFIOUserClient? = try running.connect()
    // Never enabled: a test or tool reading BAR0 is not a guest that lost its device.
    _ = try client!.read32(region: VFIOPCIRegion.bar0, offset: 0)
    try client!.reset()
    _ = try client!.read32(region: VFIOPCIRegion.bar0, offset: 0)
    try enable(client!)
    try client!.reset()
    // Config space is no BAR: reading it is what a guest does before enabling.
    _ = try client!.read32(region: VFIOPCIRegion.config, offset: 0)
    for _ in 0..<3 { _ = try client!.read32(region: VFIOPCIRegion.bar0, offset: 0x10) }
    var names: [String] = []
    var used: JSON = .null
    while used == .null {
      let event = try control.nextEvent()
      names.append(event["event"]?.string ?? "?")
      if event["event"] == .string("DEVICE_USED_WITHOUT_ENABLE") { used = event["data"] ?? .null }
    }
    #expect(
      names == ["CLIENT_CONNECTED", "DEVICE_RESET", "DEVICE_RESET", "DEVICE_USED_WITHOUT_ENABLE"])
    #expect(used["access"] == .string("REGION_READ BAR0 +0x10"))
    #expect(used["likely-cause"]?.string?.contains("does not carry vfio-user device state") == true)
    var stats = try running.controlClient().execute("query-stats")
    #expect(stats["device"]?["used-without-enable"] == .int(1))

    // Enabled again, then the client leaves (the device is reset for the
    // next): a new client that drives BAR0 without enabling is named too.
    try enable(client!)
    client = nil
    let next = try running.connect()
    try next.write32(region: VFIOPCIRegion.bar0, offset: 0x10, 1)
    _ = try next.read32(region: VFIOPCIRegion.bar0, offset: 0x10)
    stats = try running.controlClient().execute("query-stats")
    #expect(stats["device"]?["used-without-enable"] == .int(2))
    #expect(stats["device"]?["resets"] == .int(3))
    // Enabling clears it: no third.
    try enable(next)
    try next.reset()
    try enable(next)
    _ = try next.read32(region: VFIOPCIRegion.bar0, offset: 0x10)
    stats = try running.controlClient().execute("query-stats")
    #expect(stats["device"]?["used-without-enable"] == .int(2))
  }

  /// What a guest restored by a VMM that drops vfio-user state looks like from
  /// here (QEMU 11.1 under `virsh restore`): COMMAND cleared, so its driver's
  /// MMIO never arrives; the device just stays disabled under the client. Once
  /// the grace has passed: one error event and one count, and none when the
  /// guest enables the device in time (a boot) or no client is attached.
  @Test func aDeviceLeftDisabledAfterAResetIsNamedOnceTheGraceHasPassed() throws {
    var limits = ServerLimits()
    limits.enableGraceMilliseconds = 300
    let running = try ControlledServer(limits: limits)
    defer { running.close() }
    let control = try running.listener()
    let client = try running.connect()
    try enable(client)
    try client.reset()
    // Config reads are what such a guest still does; they change nothing.
    _ = try client.read32(region: VFIOPCIRegion.config, offset: 4)
    var names: [String] = []
    var data: JSON = .null
    while data == .null {
      let event = try control.nextEvent()
      names.append(event["event"]?.string ?? "?")
      if event["event"] == .string("DEVICE_LEFT_DISABLED") { data = event["data"] ?? .null }
    }
    #expect(names == ["CLIENT_CONNECTED", "DEVICE_RESET", "DEVICE_LEFT_DISABLED"], "\(names)")
    #expect(data["seconds"] == .int(1))
    #expect(data["likely-cause"]?.string?.contains("does not carry vfio-user device state") == true)
    var stats = try running.controlClient().execute("query-stats")
    #expect(stats["device"]?["used-without-enable"] == .int(1))

    // A boot: the reset is followed by the firmware enabling the device in time.
    try enable(client)
    try client.reset()
    try enable(client)
    usleep(600_000)
    stats = try running.controlClient().execute("query-stats")
    #expect(stats["device"]?["used-without-enable"] == .int(1), "enabled in time: not named")
    // Once named, BAR accesses under the same reset are not named again.
    try client.reset()
    usleep(600_000)
    _ = try client.read32(region: VFIOPCIRegion.bar0, offset: 0x10)
    stats = try running.controlClient().execute("query-stats")
    #expect(stats["device"]?["used-without-enable"] == .int(2), "one per reset")
  }
}
