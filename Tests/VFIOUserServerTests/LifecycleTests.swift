import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

@Suite("Connection lifecycle")
struct LifecycleTests {
  @Test func hangUpReleasesEverythingAndTheNextClientIsServed() throws {
    try withServer(TestDevice()) { server, device in
      let guest = GuestMemory(size: 1 << 16)
      let fd = makeEventFD()
      defer { close(fd) }
      do {
        let client = try server.connect()
        try client.dmaMap(
          address: 0x10000, size: 0x10000, flags: [.read, .write], fd: guest.descriptor)
        try client.dmaMap(address: 0x20000, size: 0x1000, flags: [.read, .write])
        try client.setIRQs(
          IRQSetPayload(
            flags: [.dataEventfd, .actionTrigger], index: 2, start: 0,
            count: 1),
          fds: [FileDescriptor(rawValue: fd)])
        try client.write32(region: 0, offset: 0, 42)
        #expect(server.server.statistics.snapshot.dmaRegions == 2)
      }
      #expect(server.waitFor { !$0.clientConnected })
      let snapshot = server.server.statistics.snapshot
      #expect(snapshot.dmaRegions == 0 && snapshot.irqFDs == 0 && snapshot.lastEnd == .clientClosed)
      #expect(device.mappedWindows == 0)
      #expect(device.resets == 1 && device.scratch == 0)
      #expect(device.lastIRQConfiguration[2]?.triggerFDs.allSatisfy { $0 == nil } == true)
      // The next client is accepted and sees a clean device.
      let next = try server.connect()
      #expect(try next.read32(region: 0, offset: 0) == 0)
      #expect(server.server.statistics.snapshot.connectionsServed == 2)
    }
  }

  /// SO_PEERCRED against --allow-uid/--allow-gid: a peer that is neither gets
  /// EACCES for its VERSION and is disconnected; one that is either is served.
  @Test func onlyAllowedPeersAreServed() throws {
    var strangers = ServerLimits()
    strangers.allowedUIDs = [getuid() &+ 4242]
    strangers.allowedGIDs = [getgid() &+ 4242]
    try withServer(TestDevice(), limits: strangers) { server, _ in
      expectServerError(.permissionDenied) { _ = try server.connect() }
      #expect(server.server.statistics.snapshot.connectionsServed == 0)
      #expect(server.server.statistics.snapshot.clientsRefused == 1)
    }
    for (uids, gids) in [([getuid()], [UInt32]()), ([getuid() &+ 4242], [getgid()])] {
      var limits = ServerLimits()
      limits.allowedUIDs = Set(uids)
      limits.allowedGIDs = Set(gids)
      try withServer(TestDevice(), limits: limits) { server, _ in
        let client = try server.connect()
        #expect(try client.deviceInfo().numRegions == 9)
      }
    }
  }

  @Test func secondClientIsRefusedWithEBUSY() throws {
    try withServer(TestDevice()) { server, _ in
      let first = try server.connect()
      do {
        _ = try server.connect()
        Issue.record("a second client was accepted")
      } catch let error as VFIOUserClientError {
        #expect(error == .server(.resourceBusy, command: Command.version.rawValue))
      }
      #expect(server.server.statistics.snapshot.clientsRefused == 1)
      #expect(try first.deviceInfo().numRegions == 9)
    }
  }

  @Test func stopDisconnectsTheClientAndRemovesTheSocket() throws {
    let running = try RunningServer(backend: TestDevice())
    let client = try running.connect()
    try client.write32(region: 0, offset: 0, 1)
    running.server.stop()
    #expect(!FileManager.default.fileExists(atPath: running.path))
    #expect(throws: VFIOUserClientError.self) { try client.deviceInfo() }
    #expect(running.server.statistics.snapshot.lastEnd == .shutdown)
    running.close()
  }

  @Test func staleSocketFileIsReplacedButALiveServerIsNot() throws {
    let running = try RunningServer(backend: TestDevice())
    defer { running.close() }
    let second = VFIOUserServer(backend: TestDevice(), logger: .init(label: "x"))
    #expect(throws: Errno.addressInUse) { try second.listen(socketPath: running.path) }
    // A socket file nobody listens on is replaced.
    let stalePath = running.directory + "/stale.sock"
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
      for (i, b) in stalePath.utf8.enumerated() { raw[i] = b }
    }
    _ = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    close(fd)
    #expect(FileManager.default.fileExists(atPath: stalePath))
    let third = VFIOUserServer(backend: TestDevice(), logger: .init(label: "x"))
    try third.listen(socketPath: stalePath)
    third.start()
    third.stop()
  }
}
