import SystemPackage

/// The command numbers of the vfio-user protocol (14, the old DIRTY_PAGES, is retired).
public enum Command: UInt16, Sendable, CaseIterable, CustomStringConvertible {
  case version = 1
  case dmaMap = 2
  case dmaUnmap = 3
  case deviceGetInfo = 4
  case deviceGetRegionInfo = 5
  case deviceGetRegionIOFDs = 6
  case deviceGetIRQInfo = 7
  case deviceSetIRQs = 8
  case regionRead = 9
  case regionWrite = 10
  case dmaRead = 11
  case dmaWrite = 12
  case deviceReset = 13
  case regionWriteMulti = 15
  case deviceFeature = 16
  case migDataRead = 17
  case migDataWrite = 18

  public var description: String {
    switch self {
    case .version: "VERSION"
    case .dmaMap: "DMA_MAP"
    case .dmaUnmap: "DMA_UNMAP"
    case .deviceGetInfo: "DEVICE_GET_INFO"
    case .deviceGetRegionInfo: "DEVICE_GET_REGION_INFO"
    case .deviceGetRegionIOFDs: "DEVICE_GET_REGION_IO_FDS"
    case .deviceGetIRQInfo: "DEVICE_GET_IRQ_INFO"
    case .deviceSetIRQs: "DEVICE_SET_IRQS"
    case .regionRead: "REGION_READ"
    case .regionWrite: "REGION_WRITE"
    case .dmaRead: "DMA_READ"
    case .dmaWrite: "DMA_WRITE"
    case .deviceReset: "DEVICE_RESET"
    case .regionWriteMulti: "REGION_WRITE_MULTI"
    case .deviceFeature: "DEVICE_FEATURE"
    case .migDataRead: "MIG_DATA_READ"
    case .migDataWrite: "MIG_DATA_WRITE"
    }
  }
}

/// The 16-byte header in front of every message.
public struct MessageHeader: Equatable, Sendable {
  public static let size = 16

  /// The header's flags word: a 4-bit type field (command 0, reply 1; the
  /// other values are invalid), NO_REPLY and ERROR. A decoded word keeps its
  /// reserved bits, which a command must not set (`hasOnlyCommandFlags`).
  public struct Flags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The type field (a value, not a set of bits: test it with `type`).
    public static let typeMask = Flags(rawValue: 0xF)
    /// A command: type 0, the empty set.
    public static let command: Flags = []
    /// A reply: type 1.
    public static let reply = Flags(rawValue: 1)
    public static let noReply = Flags(rawValue: 0x10)
    public static let error = Flags(rawValue: 0x20)

    /// The type field alone: `.command`, `.reply`, or an invalid value.
    @inlinable public var type: Flags { intersection(.typeMask) }
  }

  public var messageID: UInt16
  /// Raw command number: an unknown number must still round-trip into an ENOSYS reply.
  public var command: UInt16
  /// Size of the whole message, header included.
  public var size: UInt32
  public var flags: Flags
  public var error: UInt32

  public init(
    messageID: UInt16, command: UInt16, size: UInt32, flags: Flags = .command, error: UInt32 = 0
  ) {
    self.messageID = messageID
    self.command = command
    self.size = size
    self.flags = flags
    self.error = error
  }

  public init(
    messageID: UInt16, command: Command, size: UInt32, flags: Flags = .command, error: UInt32 = 0
  ) {
    self.init(
      messageID: messageID, command: command.rawValue, size: size, flags: flags, error: error)
  }

  public var knownCommand: Command? { Command(rawValue: command) }
  public var isReply: Bool { flags.type == .reply }
  public var isCommand: Bool { flags.type == .command }
  public var wantsReply: Bool { !flags.contains(.noReply) }
  public var isError: Bool { flags.contains(.error) }
  public var payloadSize: Int { Int(size) - Self.size }

  /// Decodes and validates a header: size at least 16 and a known type (command or reply).
  @inlinable
  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    try self.init(framing: bytes)
    guard hasValidType else { throw .invalidArgument }
  }

  /// Decodes only what framing needs: a size below 16 cannot locate the next
  /// message, so it is the one header error after which a stream is lost.
  @inlinable
  public init(framing bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.size else { throw .invalidArgument }
    let r = ByteReader(bytes)
    messageID = try r.u16(at: 0)
    command = try r.u16(at: 2)
    size = try r.u32(at: 4)
    flags = Flags(rawValue: try r.u32(at: 8))
    error = try r.u32(at: 12)
    guard size >= Self.size else { throw .invalidArgument }
  }

  /// Type bits say command (0) or reply (1); the other 14 values are invalid.
  public var hasValidType: Bool { flags.type.rawValue <= Flags.reply.rawValue }

  /// A command carries no ERROR flag, no errno and no reserved flag bit:
  /// only its type and NO_REPLY.
  public var hasOnlyCommandFlags: Bool {
    flags.isSubset(of: [.typeMask, .noReply]) && error == 0
  }

  @inlinable
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.storeBytes(of: messageID, toByteOffset: 0, as: UInt16.self)
    bytes.storeBytes(of: command, toByteOffset: 2, as: UInt16.self)
    bytes.storeBytes(of: size, toByteOffset: 4, as: UInt32.self)
    bytes.storeBytes(of: flags.rawValue, toByteOffset: 8, as: UInt32.self)
    bytes.storeBytes(of: error, toByteOffset: 12, as: UInt32.self)
  }

  /// The header of the reply to this command.
  public func reply(payloadSize: Int) -> MessageHeader {
    MessageHeader(
      messageID: messageID, command: command, size: UInt32(Self.size + payloadSize),
      flags: .reply)
  }

  /// The header of an error reply to this command (an error reply is header only).
  public func errorReply(_ errno: Errno) -> MessageHeader {
    MessageHeader(
      messageID: messageID, command: command, size: UInt32(Self.size),
      flags: [.reply, .error], error: UInt32(bitPattern: errno.rawValue))
  }
}
