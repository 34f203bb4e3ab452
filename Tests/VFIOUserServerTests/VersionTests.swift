import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

@Suite("VERSION negotiation")
struct VersionTests {
  @Test func negotiatesAndReportsServerLimits() throws {
    var limits = ServerLimits()
    limits.maxDataXferSize = 4 << 20
    limits.maxDMAMaps = 1000
    try withServer(TestDevice(), limits: limits) { server, _ in
      let client = try server.connect()
      let caps = client.serverCapabilities
      #expect(caps.maxMsgFDs == 16)
      #expect(caps.maxDataXferSize == 4 << 20)
      #expect(caps.maxDMAMaps == 1000)
      #expect(caps.pgsizes == 4096)
      #expect(caps.writeMultiple == true)
      #expect(caps.twinSocket == nil)
      #expect(client.serverVersion == (0, 0))
    }
  }

  @Test func qemuProposalIsAcceptedAndTwinSocketDeclined() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try VFIOUserClient.open(path: server.path)
      let qemu =
        #"{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true,"twin_socket":{"supported":true},"future_key":[1,2]}}"#
      let reply = try client.request(
        .version, payload: VersionPayload(major: 0, minor: 3, json: qemu).encoded())
      let version = try VersionPayload(decoding: reply.payload)
      #expect(version.major == 0 && version.minor == 0)
      let caps = try Capabilities.parse(json: try #require(version.json))
      #expect(caps.twinSocket == .init(supported: false))
      #expect(caps.writeMultiple == true)
    }
  }

  @Test func writeMultipleOnlyWhenProposed() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect(capabilities: Capabilities(maxMsgFDs: 4))
      #expect(client.serverCapabilities.writeMultiple == nil)
      expectServerError(.notSupported) {
        try client.writeMulti([WriteMultiEntry(offset: 0, region: 0, count: 4, data: 1)])
      }
    }
  }

  @Test(arguments: [
    ("major 1", VersionPayload(major: 1, minor: 0, json: "{}").encoded()),
    ("no NUL", [0, 0, 0, 0] + Array(#"{"capabilities":{}}"#.utf8)),
    ("not JSON", VersionPayload(major: 0, minor: 0, json: "{capabilities").encoded()),
    ("not an object", VersionPayload(major: 0, minor: 0, json: "[1]").encoded()),
    (
      "wrong type",
      VersionPayload(major: 0, minor: 0, json: #"{"capabilities":{"max_msg_fds":"8"}}"#).encoded()
    ),
    (
      "negative",
      VersionPayload(major: 0, minor: 0, json: #"{"capabilities":{"max_data_xfer_size":-1}}"#)
        .encoded()
    ),
    (
      "trailing bytes",
      VersionPayload(major: 0, minor: 0, json: #"{"capabilities":{}} x"#).encoded()
    ),
    ("short", [0, 0]),
  ])
  func badVersionGetsErrorThenDisconnect(_ name: String, _ payload: [UInt8]) throws {
    try withServer(TestDevice()) { server, _ in
      let client = try VFIOUserClient.open(path: server.path)
      try client.sendRaw(encodeMessage(id: 7, command: Command.version.rawValue, payload: payload))
      let reply = try requireMessage(client)
      #expect(reply.header.messageID == 7)
      #expect(reply.header.isError && reply.header.error == UInt32(EINVAL), "\(name)")
      #expect(throws: VFIOUserClientError.disconnected) { _ = try client.receiveMessage() }
      // The server keeps serving.
      #expect(server.waitFor { !$0.clientConnected })
      _ = try server.connect().deviceInfo()
    }
  }

  @Test func commandBeforeVersionIsRefusedAndConnectionSurvives() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try VFIOUserClient.open(path: server.path)
      expectServerError(.invalidArgument) { _ = try client.deviceInfo() }
      try client.negotiate(capabilities: VFIOUserClient.defaultCapabilities)
      #expect(try client.deviceInfo().numRegions == 9)
      expectServerError(.invalidArgument) {
        try client.negotiate(capabilities: VFIOUserClient.defaultCapabilities)
      }
    }
  }

  @Test func serverRefusesLargerMinorIsNotNeeded() throws {
    // The reply minor never exceeds the proposal: propose 0.0 and get 0.0.
    try withServer(TestDevice()) { server, _ in
      let client = try VFIOUserClient.open(path: server.path)
      try client.negotiate(capabilities: Capabilities(), major: 0, minor: 0)
      #expect(client.serverVersion.minor == 0)
    }
  }
}

@Suite("Framing and unknown commands")
struct FramingTests {
  @Test(arguments: [UInt16(14), 99, 0, 0xFFFF])
  func unknownCommandIsENOSYS(_ command: UInt16) throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      try client.sendRaw(encodeMessage(id: 3, command: command, payload: [1, 2, 3]))
      let reply = try requireMessage(client)
      #expect(reply.header.isReply && reply.header.isError && reply.header.error == UInt32(ENOSYS))
      #expect(reply.header.messageID == 3 && reply.header.command == command)
      #expect(try client.deviceInfo().numIRQs == 5)
    }
  }

  @Test func noReplyFlagSuppressesTheReply() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      try client.write32(region: 0, offset: 0, 0x1234, posted: true)
      // Even an error on a posted command sends nothing: the next reply is the read's.
      try client.write32(region: 0, offset: 0x1000_0000, 1, posted: true)
      #expect(try client.read32(region: 0, offset: 0) == 0x1234)
      _ = device
    }
  }

  @Test func headerSmallerThan16Disconnects() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      var bytes = encodeMessage(id: 1, command: 4, payload: [])
      bytes[4] = 8  // msg_size 8 < 16: the stream cannot be resynchronised
      try client.sendRaw(bytes)
      #expect(throws: VFIOUserClientError.disconnected) { _ = try client.receiveMessage() }
      #expect(server.waitFor { !$0.clientConnected && $0.lastEnd != .clientClosed })
    }
  }

  @Test func oversizedMessageIsDiscardedAndAnsweredE2BIG() throws {
    var limits = ServerLimits()
    limits.maxDataXferSize = 4096
    try withServer(TestDevice(), limits: limits) { server, _ in
      let client = try server.connect()
      let big = RegionAccessHeader(offset: 0, region: 2, count: 100_000).encoded(
        data: [UInt8](repeating: 7, count: 100_000))
      try client.sendRaw(encodeMessage(id: 9, command: Command.regionWrite.rawValue, payload: big))
      let reply = try requireMessage(client)
      #expect(reply.header.messageID == 9 && reply.header.error == UInt32(E2BIG))
      // The stream is still in step.
      #expect(try client.read(region: 2, offset: 0, count: 4) == [0, 0, 0, 0])
    }
  }

  @Test func replyTypeOnUnsolicitedMessageIsIgnored() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      try client.sendRaw(
        encodeMessage(id: 0x4444, command: 11, flags: .reply, payload: []))
      #expect(try client.deviceInfo().numRegions == 9)
    }
  }

  @Test func badTypeBitsGetEINVAL() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      try client.sendRaw(
        encodeMessage(
          id: 5, command: 4, flags: .init(rawValue: 0x3), payload: DeviceInfoPayload().encoded()))
      // Type 3 is neither command nor reply; the size still frames it, so the stream survives.
      let reply = try requireMessage(client)
      #expect(
        reply.header.messageID == 5 && reply.header.isError && reply.header.error == UInt32(EINVAL))
      #expect(try client.deviceInfo().numRegions == 9)
    }
  }
}
