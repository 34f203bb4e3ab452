import Logging
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserServer
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// The engine over `MemoryTransport`: a whole connection served on the
/// test's thread, with no socket, what the client sends queued up front
/// and the replies read back from memory.
@Suite("Engine over memory")
struct MemoryEngineTests {
  static func server(_ device: TestDevice = TestDevice(), limits: ServerLimits = ServerLimits())
    -> VFIOUserServer
  {
    var logger = Logger(label: "memory-engine")
    logger.logLevel = .critical
    return VFIOUserServer(backend: device, limits: limits, logger: logger)
  }

  static let version = encodeMessage(
    id: 1, command: Command.version.rawValue,
    payload: VersionPayload(major: 0, minor: 0, json: "{\"capabilities\":{}}").encoded())

  static func message(
    _ id: UInt16, _ command: Command, flags: MessageHeader.Flags = .command, _ payload: [UInt8] = []
  ) -> [UInt8] {
    encodeMessage(id: id, command: command.rawValue, flags: flags, payload: payload)
  }

  static func regionAccess(offset: UInt64, region: UInt32, count: UInt32) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: RegionAccessHeader.size)
    bytes.withUnsafeMutableBytes {
      RegionAccessHeader(offset: offset, region: region, count: count).encode(into: $0)
    }
    return bytes
  }

  /// A copy of the file's descriptor, as the client's kernel would pass it.
  static func copy(of file: GuestFile) -> OwnedFileDescriptors {
    OwnedFileDescriptors(taking: [FileDescriptor(rawValue: dup(file.fd))])
  }

  /// Splits what the server sent into (header, payload) pairs.
  static func replies(_ bytes: [UInt8]) throws -> [(MessageHeader, [UInt8])] {
    var out: [(MessageHeader, [UInt8])] = []
    var at = 0
    while at < bytes.count {
      let header = try decodeBytes(Array(bytes[at...])) { raw throws(Errno) in
        try MessageHeader(framing: raw)
      }
      let end = at + Int(header.size)
      out.append((header, Array(bytes[(at + MessageHeader.size)..<end])))
      at = end
    }
    return out
  }

  /// Pipelined requests in one send, answered in order, and the connection
  /// ends as the client hangs up, all on this thread.
  @Test func pipelinedRequestsAreAnsweredInOrder() throws {
    let device = TestDevice()
    let memory = MemoryTransport()
    var scratch = [UInt8](repeating: 0, count: 4)
    withUnsafeBytes(of: UInt32(0xC0FFEE).littleEndian) { scratch = Array($0) }
    memory.deliver(
      Self.version
        + Self.message(2, .regionWrite, Self.regionAccess(offset: 0, region: 0, count: 4) + scratch)
        + Self.message(3, .regionRead, Self.regionAccess(offset: 0, region: 0, count: 4)))
    memory.hangUp()
    #expect(Self.server(device).serve(memory: memory) == .clientClosed)
    let replies = try Self.replies(memory.sent)
    #expect(replies.map(\.0.messageID) == [1, 2, 3])
    #expect(replies.allSatisfy { $0.0.isReply && !$0.0.isError })
    #expect(Array(replies[2].1[RegionAccessHeader.size...]) == scratch)
    #expect(memory.isClosed, "the connection closed its end")
  }

  /// Every request passes one admission, in one order: type bits, command
  /// number, flags, VERSION first, descriptors only where taken. A posted
  /// request that is refused gets no reply.
  @Test func admissionRefusesInOrder() throws {
    let memory = MemoryTransport()
    let file = GuestFile(size: 4096)
    let info: [UInt8] = [16] + [UInt8](repeating: 0, count: 15)  // argsz 16
    memory.deliver(Self.message(1, .deviceGetInfo, info))  // before VERSION
    memory.deliver(encodeMessage(id: 2, command: 99, payload: []))  // unknown
    memory.deliver(Self.version)
    memory.deliver(Self.message(4, .deviceGetInfo, flags: .error, info))  // ERROR flag on a command
    memory.deliver(Self.message(5, .deviceGetInfo, flags: .init(rawValue: 0x7), info))  // type bits 7
    memory.deliver(
      Self.message(6, .deviceGetInfo, info),
      descriptors: Self.copy(of: file))
    memory.deliver(Self.message(7, .deviceGetInfo, flags: [.noReply, .error], info))
    memory.deliver(Self.message(8, .deviceGetInfo, info))
    memory.hangUp()
    #expect(Self.server().serve(memory: memory) == .clientClosed)
    let replies = try Self.replies(memory.sent)
    #expect(replies.map(\.0.messageID) == [1, 2, 1, 4, 5, 6, 8])
    #expect(
      replies.map { $0.0.isError ? Errno(rawValue: Int32($0.0.error)) : nil } == [
        .invalidArgument, .noFunction, nil, .invalidArgument, .invalidArgument, .invalidArgument,
        nil,
      ])
    #expect(file.openDescriptors == 1, "the descriptor DEVICE_GET_INFO does not take was closed")
  }

  /// Half a message and then silence disconnects the client once the bound
  /// has passed; over memory the wait is over at once.
  @Test func halfAMessageThenSilenceEndsTheConnection() throws {
    var limits = ServerLimits()
    limits.partialMessageTimeoutMilliseconds = 20
    let memory = MemoryTransport()
    memory.deliver(
      Self.version + Array(Self.message(2, .deviceGetInfo, [UInt8](repeating: 0, count: 16))[..<20])
    )
    guard case .timedOut = Self.server(limits: limits).serve(memory: memory) else {
      Issue.record("the connection did not time out")
      return
    }
    #expect(try Self.replies(memory.sent).map(\.0.messageID) == [1])
  }

  /// The server's DMA_MAP takes the client's file, owned, and lets it go
  /// when the window is unmapped; a refused one is closed before the reply.
  @Test func dmaMapDescriptorsAreOwnedOnce() throws {
    let memory = MemoryTransport()
    let refused = GuestFile(size: 0x800)  // shorter than the window: EINVAL
    memory.deliver(Self.version)
    var map = [UInt8](repeating: 0, count: DMAMapRequest.size)
    map.withUnsafeMutableBytes {
      DMAMapRequest(flags: .read, offset: 0, address: 0x10000, size: 0x1000)
        .encode(into: $0)
    }
    memory.deliver(
      Self.message(2, .dmaMap, map), descriptors: Self.copy(of: refused))
    memory.whenIdle = { memory in
      // Answered only once the refusal is out: the descriptor must be closed by then.
      #expect(refused.openDescriptors == 1)
      memory.hangUp()
    }
    #expect(Self.server().serve(memory: memory) == .clientClosed)
    let replies = try Self.replies(memory.sent)
    #expect(replies.map(\.0.error) == [0, UInt32(EINVAL)])
  }
}
