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

  public static let typeMask: UInt32 = 0xF
  public static let typeCommand: UInt32 = 0
  public static let typeReply: UInt32 = 1
  public static let noReplyFlag: UInt32 = 0x10
  public static let errorFlag: UInt32 = 0x20

  public var messageID: UInt16
  /// Raw command number: an unknown number must still round-trip into an ENOSYS reply.
  public var command: UInt16
  /// Size of the whole message, header included.
  public var size: UInt32
  public var flags: UInt32
  public var error: UInt32

  public init(
    messageID: UInt16, command: UInt16, size: UInt32, flags: UInt32 = 0, error: UInt32 = 0
  ) {
    self.messageID = messageID
    self.command = command
    self.size = size
    self.flags = flags
    self.error = error
  }

  public init(
    messageID: UInt16, command: Command, size: UInt32, flags: UInt32 = 0, error: UInt32 = 0
  ) {
    self.init(
      messageID: messageID, command: command.rawValue, size: size, flags: flags, error: error)
  }

  public var knownCommand: Command? { Command(rawValue: command) }
  public var isReply: Bool { flags & Self.typeMask == Self.typeReply }
  public var isCommand: Bool { flags & Self.typeMask == Self.typeCommand }
  public var wantsReply: Bool { flags & Self.noReplyFlag == 0 }
  public var isError: Bool { flags & Self.errorFlag != 0 }
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
    flags = try r.u32(at: 8)
    error = try r.u32(at: 12)
    guard size >= Self.size else { throw .invalidArgument }
  }

  /// Type bits say command (0) or reply (1); the other 14 values are invalid.
  public var hasValidType: Bool { flags & Self.typeMask <= Self.typeReply }

  /// A command carries no ERROR flag, no errno and no reserved flag bit:
  /// only its type and NO_REPLY.
  public var hasOnlyCommandFlags: Bool {
    flags & ~(Self.typeMask | Self.noReplyFlag) == 0 && error == 0
  }

  @inlinable
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.storeBytes(of: messageID, toByteOffset: 0, as: UInt16.self)
    bytes.storeBytes(of: command, toByteOffset: 2, as: UInt16.self)
    bytes.storeBytes(of: size, toByteOffset: 4, as: UInt32.self)
    bytes.storeBytes(of: flags, toByteOffset: 8, as: UInt32.self)
    bytes.storeBytes(of: error, toByteOffset: 12, as: UInt32.self)
  }

  /// The header of the reply to this command.
  public func reply(payloadSize: Int) -> MessageHeader {
    MessageHeader(
      messageID: messageID, command: command, size: UInt32(Self.size + payloadSize),
      flags: Self.typeReply)
  }

  /// The header of an error reply to this command (an error reply is header only).
  public func errorReply(_ errno: Errno) -> MessageHeader {
    MessageHeader(
      messageID: messageID, command: command, size: UInt32(Self.size),
      flags: Self.typeReply | Self.errorFlag, error: UInt32(bitPattern: errno.rawValue))
  }
}
