import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIOUser
import VFIOUserClient
import VFIOUserServer

#if canImport(Glibc)
  import Glibc
#endif

/// Clients that misbehave in time: half a message and silence, or requests
/// whose replies are never read. Each is disconnected after the server's
/// bounded wait, with the usual clean-up; an idle client is never.
@Suite("Clients that misbehave in time")
struct MisbehavingClientTests {
  static let bound: Int32 = 300

  static var limits: ServerLimits {
    var limits = ServerLimits()
    limits.partialMessageTimeoutMilliseconds = bound
    limits.sendTimeoutMilliseconds = bound
    return limits
  }

  /// The connection ended by a timeout, within `bound` plus a margin of `start`.
  static func expectTimedOut(_ server: RunningServer, since start: Date, _ what: String) {
    #expect(server.waitFor({ !$0.clientConnected }, timeout: 10), "\(what): still connected")
    let elapsed = Date().timeIntervalSince(start)
    #expect(
      elapsed >= Double(bound) / 1000 * 0.9 && elapsed < 5,
      "\(what): disconnected after \(elapsed) s (bound \(bound) ms)")
    let end = server.server.statistics.snapshot.lastEnd
    let timedOut: Bool = if case .timedOut = end { true } else { false }
    #expect(timedOut, "\(what): ended \(String(describing: end))")
  }

  @Test(arguments: [7, 16, 20, 31])
  func halfAMessageThenSilenceIsDisconnected(bytesSent: Int) throws {
    try withServer(TestDevice(), limits: Self.limits) { server, device in
      let client = try server.connect()
      let memfd = cvfu_memfd_create("xvu-misbehaving", 1)
      defer { close(memfd) }
      ftruncate(memfd, 1 << 16)
      try client.dmaMap(
        address: 1 << 30, size: 1 << 16, flags: [.read, .write], fd: FileDescriptor(rawValue: memfd)
      )
      let eventfd = cvfu_eventfd(0, O_CLOEXEC)
      defer { close(eventfd) }
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataEventfd, .actionTrigger], index: 2, start: 0,
          count: 1), fds: [FileDescriptor(rawValue: eventfd)])
      // A DEVICE_GET_INFO (32 bytes) cut short: the rest never comes.
      var message = [UInt8](repeating: 0, count: 32)
      message.withUnsafeMutableBytes {
        MessageHeader(messageID: 9, command: .deviceGetInfo, size: 32).encode(into: $0)
        $0.storeBytes(of: UInt32(16), toByteOffset: 16, as: UInt32.self)
      }
      let start = Date()
      try client.sendRaw(Array(message[..<bytesSent]))
      Self.expectTimedOut(server, since: start, "\(bytesSent) bytes of 32")
      let snapshot = server.server.statistics.snapshot
      #expect(snapshot.dmaRegions == 0 && snapshot.irqFDs == 0 && device.mappedWindows == 0)
      #expect(try server.connect().deviceInfo().numRegions == 9, "the next client is served")
    }
  }

  @Test func aClientThatStopsReadingIsDisconnected() throws {
    try withServer(TestDevice(), limits: Self.limits) { server, _ in
      let client = try server.connect()
      // 12.5 MiB of replies, far beyond both sockets' buffers, none of them read.
      let start = Date()
      for _ in 0..<200 {
        _ = try client.sendRegionRead(region: 2, offset: 0, count: 64 * 1024)
      }
      Self.expectTimedOut(server, since: start, "replies not read")
      #expect(try server.connect().deviceInfo().numRegions == 9, "the next client is served")
    }
  }

  /// Silence between messages is not misbehaviour: QEMU may be idle for hours.
  @Test func anIdleClientStaysConnected() throws {
    try withServer(TestDevice(), limits: Self.limits) { server, _ in
      let client = try server.connect()
      usleep(UInt32(Self.bound) * 3 * 1000)
      #expect(server.server.statistics.snapshot.clientConnected)
      #expect(try client.deviceInfo().numRegions == 9)
      // A message that arrives in two parts, well within the bound, is whole.
      var message = [UInt8](repeating: 0, count: 32)
      message.withUnsafeMutableBytes {
        MessageHeader(messageID: 10, command: .deviceGetInfo, size: 32).encode(into: $0)
        $0.storeBytes(of: UInt32(16), toByteOffset: 16, as: UInt32.self)
      }
      try client.sendRaw(Array(message[..<10]))
      usleep(UInt32(Self.bound) / 3 * 1000)
      try client.sendRaw(Array(message[10...]))
      let reply = try requireMessage(client, timeoutMilliseconds: 5000)
      #expect(reply.header.messageID == 10 && !reply.header.isError)
    }
  }
}
