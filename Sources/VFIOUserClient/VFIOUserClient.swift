import CVFIOUser
import SystemPackage
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// A reply (or a server request) copied out of the stream, with the
/// descriptors that came with it: the receiver's, closed when it lets the
/// message go unless it took them (`fds.take(_:)`).
public struct ClientMessage: ~Copyable {
  public var header: MessageHeader
  public var payload: [UInt8]
  public var fds: OwnedFileDescriptors

  public init(
    header: MessageHeader, payload: [UInt8],
    fds: consuming OwnedFileDescriptors = OwnedFileDescriptors()
  ) {
    self.header = header
    self.payload = payload
    self.fds = fds
  }
}

/// DEVICE_GET_REGION_INFO's answer: the region, and the descriptor to map
/// it by when it is mappable (the caller's, closed with the value unless taken).
public struct RegionInfoReply: ~Copyable {
  public var info: RegionInfoPayload
  public var fd: OwnedFileDescriptor?

  public init(info: RegionInfoPayload, fd: consuming OwnedFileDescriptor?) {
    self.info = info
    self.fd = fd
  }

  /// `fd`, lent for as long as this reply holds it.
  public var descriptor: FileDescriptor? {
    switch fd {
    case .some(let owned): owned.descriptor
    case .none: nil
    }
  }
}

/// DEVICE_GET_REGION_IO_FDS's answer and the descriptors its sub-regions name (the caller's).
public struct RegionIOFDsReply: ~Copyable {
  public var payload: RegionIOFDsPayload
  public var fds: OwnedFileDescriptors

  public init(payload: RegionIOFDsPayload, fds: consuming OwnedFileDescriptors) {
    self.payload = payload
    self.fds = fds
  }
}

/// A vfio-user client: speaks every command, answers the server's DMA_READ /
/// DMA_WRITE from `memory`, and checks that each reply matches its request.
/// One thread at a time.
public final class VFIOUserClient {
  public let channel: MessageChannel
  /// The connected socket, lent: the channel owns it.
  public let socket: FileDescriptor
  public private(set) var serverCapabilities = Capabilities()
  public private(set) var serverVersion: (major: UInt16, minor: UInt16) = (0, 0)
  /// This client offered the sparse migration stream and the server echoed
  /// it: MIG_DATA_READ and MIG_DATA_WRITE carry that form (protocol/sparse-migration.md).
  public private(set) var sparseMigration = false
  public let dmaLayout: DMATransferLayout
  public var memory = ClientMemory()
  /// Server-to-client requests answered so far.
  public private(set) var serverRequestsHandled = 0
  /// Milliseconds to wait for any reply.
  public var timeoutMilliseconds: Int32 = 10_000
  private var nextID: UInt16 = 1
  let requestScratch: UnsafeMutableRawBufferPointer

  /// Wraps a connected socket, which it owns from then on, without
  /// negotiating (for raw protocol tests).
  public init(
    socket connected: consuming OwnedFileDescriptor, dmaLayout: DMATransferLayout = .spec,
    capacity: Int = (1 << 20) + 4096
  ) {
    socket = connected.descriptor
    channel = MessageChannel(socket: connected, capacity: max(capacity, 64 * 1024 + 64))
    self.dmaLayout = dmaLayout
    requestScratch = .allocate(byteCount: 64, alignment: 16)
  }

  deinit {
    channel.close()
    requestScratch.deallocate()
  }

  /// Connects to `path` (no VERSION yet).
  public static func open(
    path: String, dmaLayout: DMATransferLayout = .spec, capacity: Int = (1 << 20) + 4096
  )
    throws(VFIOUserClientError) -> VFIOUserClient
  {
    let fd = cvfu_connect_unix(path)
    guard fd >= 0 else { throw .system(Errno(rawValue: -fd)) }
    return VFIOUserClient(
      socket: OwnedFileDescriptor(taking: FileDescriptor(rawValue: fd)), dmaLayout: dmaLayout,
      capacity: capacity)
  }

  /// The capabilities this client proposes by default.
  public static let defaultCapabilities = Capabilities(
    maxMsgFDs: 16, maxDataXferSize: 1 << 20, maxDMAMaps: 65535, pgsizes: 4096, writeMultiple: true)

  /// `defaultCapabilities` with the sparse migration stream offered: what
  /// `save`, `restore` and `migrate` propose.
  public static let sparseCapabilities: Capabilities = {
    var caps = defaultCapabilities
    caps.sparseMigration = Capabilities.sparseMigrationVersion
    return caps
  }()

  /// Connects and negotiates.
  public static func connect(
    path: String, capabilities: Capabilities = defaultCapabilities,
    dmaLayout: DMATransferLayout = .spec
  ) throws(VFIOUserClientError) -> VFIOUserClient {
    let capacity = Int(capabilities.effectiveMaxDataXferSize) + 64 * 1024
    let client = try open(path: path, dmaLayout: dmaLayout, capacity: capacity)
    try client.negotiate(capabilities: capabilities)
    return client
  }

  public func negotiate(capabilities: Capabilities, major: UInt16 = 0, minor: UInt16 = 0)
    throws(VFIOUserClientError)
  {
    let reply = try request(
      .version,
      payload: VersionPayload(major: major, minor: minor, json: capabilities.json()).encoded())
    let version: VersionPayload
    do throws(Errno) {
      version = try VersionPayload(decoding: reply.payload)
    } catch {
      throw .protocolViolation("malformed VERSION reply")
    }
    guard version.major == major, version.minor <= minor else {
      throw .protocolViolation("server answered version \(version.major).\(version.minor)")
    }
    serverVersion = (version.major, version.minor)
    if let json = version.json {
      do throws(Capabilities.ParseError) {
        serverCapabilities = try Capabilities.parse(json: json)
      } catch {
        throw .protocolViolation("server capabilities: \(error)")
      }
    }
    if let echoed = serverCapabilities.sparseMigration {
      guard capabilities.sparseMigration != nil, echoed == Capabilities.sparseMigrationVersion
      else {
        throw .protocolViolation(
          "server answered sparse_migration \(echoed) to an offer it did not get")
      }
      sparseMigration = true
    }
  }

  // MARK: Raw messages

  /// Sends `bytes` as they are, with `fds` (lent: the caller keeps them).
  public func sendRaw(_ bytes: [UInt8], fds: [FileDescriptor] = []) throws(VFIOUserClientError) {
    do throws(Errno) { try channel.send(bytes: bytes, fds: fds.map(\.rawValue)) } catch {
      throw .system(error)
    }
  }

  /// The next message from the server, or nil if none came within `timeoutMilliseconds`.
  public func receiveMessage(timeoutMilliseconds: Int32? = nil) throws(VFIOUserClientError)
    -> ClientMessage?
  {
    if !channel.hasBufferedMessage {
      let ready = cvfu_wait_readable(
        socket.rawValue, timeoutMilliseconds ?? self.timeoutMilliseconds)
      if ready == 0 { return nil }
      if ready < 0 { throw .system(Errno(rawValue: -ready)) }
    }
    let result: ReceiveResult
    do throws(Errno) { result = try channel.receive() } catch {
      throw .protocolViolation("unframeable message: \(error)")
    }
    switch consume result {
    case .closed: throw .disconnected
    case .oversized(let h): throw .protocolViolation("oversized message \(h.size)")
    case .parted: preconditionFailure("a client's channel receives every message whole")
    case .interrupted: preconditionFailure("a client's channel has no wake")
    case .message(var m):
      // The caller owns them from here.
      return ClientMessage(header: m.header, payload: Array(m.payload), fds: m.fds.takeAll())
    }
  }

  public func allocateID() -> UInt16 {
    let id = nextID
    nextID = nextID == 0x7FFF ? 1 : nextID + 1
    return id
  }

  /// Sends a command with `fds` (lent) and waits for its reply, answering
  /// server requests meanwhile.
  @discardableResult
  public func request(
    _ command: Command, payload: [UInt8] = [], fds: [FileDescriptor] = [], noReply: Bool = false
  )
    throws(VFIOUserClientError) -> ClientMessage
  {
    let id = allocateID()
    let bytes = encodeMessage(
      id: id, command: command.rawValue, flags: noReply ? .noReply : .command,
      payload: payload)
    try sendRaw(bytes, fds: fds)
    if noReply {
      return ClientMessage(
        header: MessageHeader(messageID: id, command: command, size: 16), payload: [])
    }
    return try awaitReply(id: id, command: command.rawValue)
  }

  /// Waits for the reply to message `id`, serving DMA requests that arrive first.
  public func awaitReply(id: UInt16, command: UInt16) throws(VFIOUserClientError) -> ClientMessage {
    while true {
      guard let message = try receiveMessage() else { throw .timedOut }
      if message.header.isCommand {
        try serve(message)
        continue
      }
      // A reply refused here closes its descriptors as it goes.
      guard message.header.messageID == id, message.header.command == command else {
        throw .protocolViolation(
          "reply id \(message.header.messageID) command \(message.header.command), expected id \(id) command \(command)"
        )
      }
      if message.header.isError {
        throw .server(Errno(rawValue: Int32(bitPattern: message.header.error)), command: command)
      }
      return message
    }
  }

  /// Answers server requests for up to `timeoutMilliseconds`; returns how many.
  @discardableResult
  public func serveRequests(timeoutMilliseconds: Int32) throws(VFIOUserClientError) -> Int {
    var handled = 0
    while let message = try receiveMessage(
      timeoutMilliseconds: handled == 0 ? timeoutMilliseconds : 0)
    {
      guard message.header.isCommand else {
        throw .protocolViolation("unexpected reply \(message.header.messageID)")
      }
      try serve(message)
      handled += 1
    }
    return handled
  }

  /// Answers one DMA_READ / DMA_WRITE from `memory` (ENOSYS to anything else,
  /// like QEMU); descriptors it brought are closed with it.
  func serve(_ message: borrowing ClientMessage) throws(VFIOUserClientError) {
    let h = message.header
    func fail(_ e: Errno) throws(VFIOUserClientError) {
      if h.wantsReply {
        try sendRaw(
          encodeMessage(
            id: h.messageID, command: h.command,
            flags: [.reply, .error], error: UInt32(e.rawValue),
            payload: []))
      }
    }
    serverRequestsHandled += 1
    let access: DMAAccessHeader
    do throws(Errno) {
      access = try decodeBytes(message.payload) { raw throws(Errno) in
        try DMAAccessHeader(decoding: raw, layout: dmaLayout)
      }
    } catch {
      return try fail(.invalidArgument)
    }
    let count = Int(access.count)
    switch h.knownCommand {
    case .dmaRead:
      guard message.payload.count == 16 else { return try fail(.invalidArgument) }
      guard let (span, _) = memory.span(access.address, count) else { return try fail(.badAddress) }
      var reply = [UInt8](repeating: 0, count: 16 + count)
      reply.withUnsafeMutableBytes { raw in
        access.encode(into: raw, layout: dmaLayout)
        UnsafeMutableRawBufferPointer(rebasing: raw[dmaLayout.dataOffset...]).copyMemory(
          from: UnsafeRawBufferPointer(span))
      }
      if h.wantsReply {
        try sendRaw(
          encodeMessage(
            id: h.messageID, command: h.command, flags: .reply, payload: reply))
      }
    case .dmaWrite:
      guard message.payload.count == 16 + count else { return try fail(.invalidArgument) }
      guard let (span, writable) = memory.span(access.address, count) else {
        return try fail(.badAddress)
      }
      guard writable else { return try fail(.notPermitted) }
      message.payload.withUnsafeBytes { raw in
        span.copyMemory(
          from: UnsafeRawBufferPointer(
            rebasing: raw[dmaLayout.dataOffset..<(dmaLayout.dataOffset + count)]))
      }
      if h.wantsReply {
        let payload: [UInt8] = dmaLayout == .qemu ? [] : Array(message.payload[0..<16])
        try sendRaw(
          encodeMessage(
            id: h.messageID, command: h.command, flags: .reply, payload: payload))
      }
    default:
      try fail(.noFunction)
    }
  }
}
