import VFIOUser

extension Connection {
  /// What a request may do, from its header and the number of descriptors
  /// it brought, before a byte of its payload is looked at. Every request is
  /// judged here, whether it is received whole (`dispatch`) or in place
  /// (`migDataWriteInPlace`), so the two ways cannot drift apart.
  enum Admission: Equatable {
    /// A known command the connection serves now.
    case admitted(Command)
    /// VERSION: whether it is the first, and what it brought, is `handleVersion`'s to judge.
    case version
    /// Type bits that are neither command nor reply: EINVAL.
    case invalidType
    /// A command number nobody knows: ENOSYS.
    case unknownCommand
    /// A command with flags other than NO_REPLY (ERROR, or bits that mean nothing): EINVAL.
    case invalidFlags(Command)
    /// Any command but VERSION before VERSION: EINVAL.
    case beforeVersion(Command)
    /// Descriptors with a command that takes none (only DMA_MAP and SET_IRQS do): EINVAL.
    case unexpectedDescriptors(Command)
  }

  /// The admission of a request (a message whose type is not reply) with
  /// `header` that brought `descriptors` descriptors. The checks run in this
  /// order, and the first that fails decides the errno.
  @inline(__always)
  func admission(of header: MessageHeader, descriptors: Int) -> Admission {
    guard header.hasValidType else { return .invalidType }
    guard let command = header.knownCommand else { return .unknownCommand }
    guard header.hasOnlyCommandFlags else { return .invalidFlags(command) }
    if command == .version { return .version }
    guard negotiated else { return .beforeVersion(command) }
    if descriptors > 0, command != .dmaMap, command != .deviceSetIRQs {
      return .unexpectedDescriptors(command)
    }
    return .admitted(command)
  }
}
