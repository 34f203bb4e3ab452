import CVFIOUser
import SystemPackage
import VFIOUser

/// One message taken off the stream. `payload` points into the framer's
/// buffer and is valid until the framer is asked for the next step.
public struct ReceivedMessage: ~Copyable {
  public var header: MessageHeader
  public var payload: UnsafeRawBufferPointer
  /// Descriptors that arrived with this message, owned: those not taken are
  /// closed when the message goes.
  public var fds: OwnedFileDescriptors
}

/// Where the framer stands in the stream: everything but the bytes and
/// descriptors it holds. A plain value, so it can be inspected and handed on
/// with the buffered bytes (`MessageFramer.bufferedBytes`).
public struct FramerState: Sendable, Equatable {
  /// First unconsumed byte of the buffer.
  public internal(set) var start = 0
  /// One past the last received byte of the buffer.
  public internal(set) var end = 0
  /// Stream position of the buffer's first byte. Payload bytes read past the
  /// buffer (`MessageChannel.receivePayload`) are not counted: positions are
  /// only compared with each other.
  public internal(set) var streamBase: UInt64 = 0
  /// Bytes still to drop: the rest of an oversized, malformed or refused message.
  public internal(set) var discardRemaining: UInt64 = 0
  /// Stream end of the read that brought the descriptors held.
  public internal(set) var fdChunkEnd: UInt64 = 0
  /// Payload bytes of the taken parted message not yet received.
  public internal(set) var payloadLeft = 0
  /// Stream position of a parted message offered and not taken: framed whole next.
  public internal(set) var offeredAt: UInt64?

  public init() {}
}

/// What the framer found in the bytes it holds.
public enum FramerStep: ~Copyable {
  case message(ReceivedMessage)
  /// A message larger than `maxMessageSize`: its body is dropped unread
  /// (the stream stays in step) and any descriptors with it were closed.
  case oversized(MessageHeader)
  /// A message of the kind `partedReceive` names, with `head` (its fixed
  /// payload head, in the buffer until the next step) here and the rest
  /// still arriving. Taken with `takeParted()`, or framed whole by the next
  /// `next()`.
  case parted(MessageHeader, head: UnsafeRawBufferPointer)
  /// Nothing more can be framed: read at most `space.count` bytes of the
  /// stream into `space` and report them with `received`. `partial`: part
  /// of a message has arrived, or one is being dropped, so the rest is due.
  case read(UnsafeMutableRawBufferPointer, partial: Bool)
}

/// vfio-user message framing without I/O: bytes in, messages out, and the
/// decisions of where the next bytes go. `MessageChannel` moves the bytes.
///
/// Descriptors: Linux stops a `recvmsg` right after the segment that carried
/// SCM_RIGHTS, and that segment starts with the header of the message they
/// were sent with, so the descriptors belong to the last message that begins
/// in the bytes of that read. (A peer that packs several messages into one
/// `sendmsg` with descriptors is ambiguous by construction; none of the known
/// clients do.)
public struct MessageFramer: ~Copyable {
  /// Largest message framed whole; larger ones are dropped (`FramerStep.oversized`).
  public var maxMessageSize: Int
  /// Most descriptors kept per read; surplus ones are closed.
  public var maxFDs: Int = Int(CVFU_SCM_MAX_FD)
  /// Which messages are offered before their payload has arrived
  /// (`FramerStep.parted`), so the receiver can place the payload itself:
  /// commands of this number, of at least `minimumPayload` bytes after their
  /// fixed `head`, that bring no descriptors (nil: every message whole).
  /// While set, a read takes only what completes the message being
  /// assembled plus `readAhead` bytes, so a parted message's payload stays
  /// in the stream for the receiver to place.
  public var partedReceive: (command: UInt16, head: Int, minimumPayload: Int)?
  /// Bytes a read takes beyond the message being assembled while `partedReceive` is set.
  public static let readAhead = 4096

  public private(set) var state = FramerState()
  private let buffer: UnsafeMutableRawBufferPointer
  /// The descriptors of the last read that brought any, until a message claims them.
  private var fdBatch = OwnedFileDescriptors()

  /// - Parameters:
  ///   - capacity: buffer bytes; must hold the largest accepted message.
  public init(capacity: Int, maxMessageSize: Int? = nil) {
    self.maxMessageSize = maxMessageSize ?? capacity
    buffer = .allocate(byteCount: max(capacity, 4096), alignment: 16)
  }

  deinit { buffer.deallocate() }

  public var capacity: Int { buffer.count }
  /// Stream bytes received and not yet consumed.
  public var bufferedByteCount: Int { state.end - state.start }
  public var bufferedBytes: UnsafeRawBufferPointer {
    UnsafeRawBufferPointer(rebasing: buffer[state.start..<state.end])
  }
  /// Descriptors held for a message that has not been framed yet.
  public var heldDescriptorCount: Int { fdBatch.count }
  public var payloadLeft: Int { state.payloadLeft }

  /// Whether a whole message is already buffered (no read needed).
  public var hasBufferedMessage: Bool {
    guard state.end - state.start >= MessageHeader.size else { return false }
    let size = sizeField(at: state.start)
    return size < MessageHeader.size || size > maxMessageSize || state.end - state.start >= size
  }

  /// The next step. Throws on a header that cannot be framed (size < 16):
  /// the stream cannot be resynchronised after that.
  public mutating func next() throws(Errno) -> FramerStep {
    if state.payloadLeft > 0 { discardPayload() }
    if state.discardRemaining > 0 {
      let drop = min(UInt64(state.end - state.start), state.discardRemaining)
      state.start += Int(drop)
      state.discardRemaining -= drop
      if state.discardRemaining > 0 {
        let (space, partial) = readSpace()
        return .read(space, partial: partial)
      }
    }
    if state.end - state.start >= MessageHeader.size {
      let start = state.start
      let header = try MessageHeader(
        framing: UnsafeRawBufferPointer(rebasing: buffer[start..<state.end]))
      let size = Int(header.size)
      let messageStart = state.streamBase + UInt64(start)
      if size > maxMessageSize {
        _ = takeFDs(messageStart: messageStart, messageEnd: messageStart + UInt64(size))
        // Drop what is buffered now; later steps drop the rest before reading on.
        let drop = min(state.end - start, size)
        state.start += drop
        state.discardRemaining = UInt64(size - drop)
        return .oversized(header)
      }
      if state.end - start >= size {
        let fds = takeFDs(messageStart: messageStart, messageEnd: messageStart + UInt64(size))
        let payload = UnsafeRawBufferPointer(
          rebasing: buffer[(start + MessageHeader.size)..<(start + size)])
        state.start += size
        return .message(ReceivedMessage(header: header, payload: payload, fds: fds))
      }
      if let parted = partedReceive, offersParted(header, at: messageStart),
        state.end - start >= MessageHeader.size + parted.head,
        fdBatch.isEmpty || messageStart >= state.fdChunkEnd
      {
        state.offeredAt = messageStart
        let head = UnsafeRawBufferPointer(
          rebasing: buffer[
            (start + MessageHeader.size)..<(start + MessageHeader.size + parted.head)])
        return .parted(header, head: head)
      }
      if state.discardRemaining == 0, start + size > buffer.count { compact() }
    } else if state.start + MessageHeader.size > buffer.count {
      compact()
    }
    let (space, partial) = readSpace()
    return .read(space, partial: partial)
  }

  /// `count` bytes arrived in the space the last `.read` offered, no descriptors with them.
  @inline(__always)
  public mutating func received(_ count: Int) {
    state.end += count
  }

  /// `count` bytes and `descriptors` arrived in the space the last `.read`
  /// offered (`count` may be 0 when the peer closed as it sent them).
  public mutating func received(_ count: Int, descriptors: consuming OwnedFileDescriptors) {
    if !descriptors.isEmpty {
      descriptors.keepFirst(maxFDs)  // the surplus ones close
      fdBatch = descriptors  // the batch before, never claimed, closes
      state.fdChunkEnd = state.streamBase + UInt64(state.end) + UInt64(count)
    }
    state.end += count
  }

  /// Takes the parted message `next()` just offered: its header and head
  /// are consumed, and its payload (`payloadLeft` bytes) is the receiver's
  /// to take, in order. A `next()` before all of it is taken drops the rest.
  public mutating func takeParted() {
    guard let parted = partedReceive, state.end - state.start >= MessageHeader.size + parted.head
    else { preconditionFailure("takeParted() without a parted message offered") }
    let size = sizeField(at: state.start)
    let messageStart = state.streamBase + UInt64(state.start)
    // An earlier message's, never claimed (a parted message brings none): closed.
    _ = takeFDs(messageStart: messageStart, messageEnd: messageStart + UInt64(size))
    state.start += MessageHeader.size + parted.head
    state.payloadLeft = size - MessageHeader.size - parted.head
    state.offeredAt = nil
  }

  /// Copies buffered bytes (at most `bytes.count`) to the start of `bytes`
  /// and consumes them, counting them off the parted payload. Returns how many.
  public mutating func takeBufferedPayload(into bytes: UnsafeMutableRawBufferPointer) -> Int {
    precondition(bytes.count <= state.payloadLeft, "more than the parted message holds")
    let n = takeBuffered(into: bytes)
    state.payloadLeft -= n
    return n
  }

  /// `count` bytes of the parted payload were received past the buffer.
  public mutating func payloadReceivedPastBuffer(_ count: Int) {
    state.payloadLeft -= count
  }

  /// Where to read the next bytes of the parted payload when none are
  /// buffered (nil when some are): at most `count`, within the payload.
  public mutating func payloadSpace(upTo count: Int) -> UnsafeMutableRawBufferPointer? {
    precondition(count > 0 && state.payloadLeft > 0, "no parted payload left")
    guard state.start == state.end else { return nil }
    rebase()
    return UnsafeMutableRawBufferPointer(
      rebasing: buffer[0..<min(count, state.payloadLeft, buffer.count)])
  }

  /// The next 1...`count` buffered bytes of the parted payload, consumed; in
  /// the buffer until the next step. At least one must be buffered.
  public mutating func takePayload(upTo count: Int) -> UnsafeRawBufferPointer {
    let n = min(state.end - state.start, count, state.payloadLeft)
    let bytes = UnsafeRawBufferPointer(rebasing: buffer[state.start..<(state.start + n)])
    state.start += n
    state.payloadLeft -= n
    return bytes
  }

  /// Drops what is left of the taken parted message's payload (a refused
  /// MIG_DATA_WRITE): buffered bytes now, the rest as it arrives.
  public mutating func discardPayload() {
    let drop = min(state.end - state.start, state.payloadLeft)
    state.start += drop
    state.discardRemaining += UInt64(state.payloadLeft - drop)
    state.payloadLeft = 0
  }

  /// Copies buffered bytes (at most `bytes.count`) to the start of `bytes`
  /// and consumes them. Returns how many.
  public mutating func takeBuffered(into bytes: UnsafeMutableRawBufferPointer) -> Int {
    let n = min(state.end - state.start, bytes.count)
    if n > 0 {
      UnsafeMutableRawBufferPointer(rebasing: bytes[0..<n]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: buffer[state.start..<(state.start + n)]))
      state.start += n
    }
    return n
  }

  // MARK: Messages of a known layout (a client's large replies)

  /// Where to read before the next message's header and `head` bytes of
  /// fixed payload are buffered (nil once they are, or once an error reply,
  /// a header alone, is). Reads no further: the data is for `takeDirect`'s caller.
  public mutating func directSpace(head: Int) -> (
    space: UnsafeMutableRawBufferPointer, partial: Bool
  )? {
    guard state.end - state.start < MessageHeader.size + head else { return nil }
    if state.end - state.start >= MessageHeader.size,
      sizeField(at: state.start) == MessageHeader.size
    {
      return nil  // an error reply: header only
    }
    if state.start + MessageHeader.size + head > buffer.count { compact() }
    return readSpace(limit: MessageHeader.size + head - (state.end - state.start))
  }

  /// Takes the message `directSpace` found: its header, `head` (copied
  /// into `head` unless the message is an error reply, a header alone) and
  /// the buffered part of its data (copied into `data`). Returns the header,
  /// the data length and how much of it was buffered; the rest is the
  /// caller's to read into `data`. A message of any other size is dropped
  /// and reported as EPROTO.
  public mutating func takeDirect(
    head: UnsafeMutableRawBufferPointer, data: UnsafeMutableRawBufferPointer
  ) throws(Errno) -> (header: MessageHeader, count: Int, buffered: Int) {
    let header = try MessageHeader(
      framing: UnsafeRawBufferPointer(rebasing: buffer[state.start..<state.end]))
    let messageStart = state.streamBase + UInt64(state.start)
    _ = takeFDs(messageStart: messageStart, messageEnd: messageStart + UInt64(header.size))
    if header.size == UInt32(MessageHeader.size) {
      state.start += MessageHeader.size
      return (header, 0, 0)
    }
    let size = Int(header.size)
    guard size >= MessageHeader.size + head.count,
      size <= MessageHeader.size + head.count + data.count
    else {
      if size <= state.end - state.start {
        state.start += size
      } else {
        state.discardRemaining = UInt64(size - (state.end - state.start))
        state.start = state.end
      }
      throw .protocolError
    }
    let count = size - MessageHeader.size - head.count
    state.start += MessageHeader.size
    head.copyMemory(
      from: UnsafeRawBufferPointer(rebasing: buffer[state.start..<(state.start + head.count)]))
    state.start += head.count
    let buffered = takeBuffered(
      into: UnsafeMutableRawBufferPointer(rebasing: data[0..<count]))
    return (header, count, buffered)
  }

  // MARK: Internals

  private func sizeField(at offset: Int) -> Int {
    Int(UnsafeRawBufferPointer(buffer).loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self))
  }

  /// Descriptors of the message at [messageStart, messageEnd) if it is the
  /// last message beginning inside the read that carried them.
  @inline(__always)
  private mutating func takeFDs(messageStart: UInt64, messageEnd: UInt64) -> OwnedFileDescriptors {
    guard !fdBatch.isEmpty else { return OwnedFileDescriptors() }
    if messageStart < state.fdChunkEnd, messageEnd >= state.fdChunkEnd {
      return fdBatch.takeAll()
    }
    if messageStart >= state.fdChunkEnd {
      fdBatch = OwnedFileDescriptors()  // nobody claimed them: closed, never leaked
    }
    return OwnedFileDescriptors()
  }

  // MARK: Live update

  /// Whether the framer stands between two messages: nothing of a message
  /// being dropped or placed in parts. Its buffered bytes (whole messages or
  /// the start of one) and held descriptors can then be handed on.
  public var isAtMessageBoundary: Bool {
    state.payloadLeft == 0 && state.discardRemaining == 0 && state.offeredAt == nil
  }

  /// The descriptors held for a message not framed yet (lent), and where the
  /// read that brought them ended, counted from the first buffered byte.
  public var heldDescriptors: (descriptors: [FileDescriptor], chunkEnd: Int) {
    var lent: [FileDescriptor] = []
    for i in 0..<fdBatch.count { if let fd = fdBatch[i] { lent.append(fd) } }
    let first = state.streamBase + UInt64(state.start)
    let chunkEnd = state.fdChunkEnd > first ? Int(state.fdChunkEnd - first) : 0
    return (lent, chunkEnd)
  }

  /// Takes over what another framer held (`bufferedBytes`, `heldDescriptors`)
  /// at a message boundary. The framer must be new.
  public mutating func adopt(
    buffered bytes: [UInt8], held: consuming OwnedFileDescriptors, chunkEnd: Int
  ) throws(Errno) {
    guard state == FramerState(), bytes.count <= buffer.count, chunkEnd >= 0,
      chunkEnd <= bytes.count
    else { throw .invalidArgument }
    if !bytes.isEmpty {
      bytes.withUnsafeBytes {
        buffer.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count)
      }
    }
    state.end = bytes.count
    if !held.isEmpty {
      fdBatch = held
      state.fdChunkEnd = UInt64(chunkEnd)
    }
  }

  private mutating func rebase() {
    state.streamBase += UInt64(state.start)
    state.start = 0
    state.end = 0
  }

  private mutating func compact() {
    let live = state.end - state.start
    if live > 0, state.start > 0 {
      buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + state.start, byteCount: live)
    }
    state.streamBase += UInt64(state.start)
    state.start = 0
    state.end = live
  }

  /// The free tail of the buffer a read may fill, up to `limit` bytes.
  @inline(__always)
  private mutating func readSpace(limit: Int = .max) -> (
    space: UnsafeMutableRawBufferPointer, partial: Bool
  ) {
    let partial = state.end > state.start || state.discardRemaining > 0
    if state.start == state.end {
      rebase()
    } else if state.end == buffer.count {
      compact()
    }
    let length = min(buffer.count - state.end, readLimit, limit)
    return (
      UnsafeMutableRawBufferPointer(rebasing: buffer[state.end..<(state.end + length)]), partial
    )
  }

  /// How much one read may take: anything while messages are framed whole;
  /// with `partedReceive` set, what completes the message being assembled
  /// and `readAhead` more, so that a parted message's payload is not
  /// swallowed into the buffer with the messages before it.
  @inline(__always)
  private var readLimit: Int {
    guard let parted = partedReceive else { return .max }
    guard state.discardRemaining == 0,
      let header = try? MessageHeader(
        framing: UnsafeRawBufferPointer(rebasing: buffer[state.start..<state.end]))
    else { return Self.readAhead }
    // A message that will be offered parted needs its head only.
    let wanted =
      offersParted(header, at: state.streamBase + UInt64(state.start))
      ? MessageHeader.size + parted.head : Int(header.size)
    return max(0, wanted - (state.end - state.start)) + Self.readAhead
  }

  /// Whether the message with `header` at stream `position` is one to offer
  /// parted (unless it was offered already and declined).
  @inline(__always)
  private func offersParted(_ header: MessageHeader, at position: UInt64) -> Bool {
    guard let parted = partedReceive else { return false }
    return header.command == parted.command && header.isCommand
      && Int(header.size) - MessageHeader.size - parted.head >= parted.minimumPayload
      && state.offeredAt != position
  }
}
