import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// What `receive()` found.
public enum ReceiveResult: ~Copyable {
  case message(ReceivedMessage)
  /// A message larger than `maxMessageSize`: its body was discarded unread
  /// (the stream stays in step) and any descriptors with it were closed.
  case oversized(MessageHeader)
  /// The peer closed the stream (or the socket was shut down).
  case closed
  /// A message of the kind `partedReceive` names, with `head` (its fixed
  /// payload head, in the receive buffer until the next call) here and the
  /// rest still arriving. The receiver takes it in parts (`takeParted()`,
  /// then `receivePayload`/`nextPayload`) or calls `receive()` again, which
  /// then returns it whole like any other message.
  case parted(MessageHeader, head: UnsafeRawBufferPointer)
  /// Woken between two messages (`MessageChannel.wake`): nothing was read,
  /// and nothing of a message is buffered.
  case interrupted
}

/// A vfio-user message stream: a `MessageFramer` fed by a transport, a
/// connected Unix stream socket or memory.
///
/// Receiving reads as much as the transport has in one `recvmsg`, so
/// pipelined requests cost one system call for several messages (see
/// `MessageFramer` for which message the descriptors of a read belong to).
public final class MessageChannel {
  /// The framing state: cursors, buffered bytes, descriptors held.
  public private(set) var framer: MessageFramer
  public let transport: MessageTransport
  /// The socket, closed once, by `close()` or when the channel goes.
  private var socket: OwnedFileDescriptor?
  /// Largest message accepted whole; larger ones are discarded (see `ReceiveResult.oversized`).
  public var maxMessageSize: Int {
    get { framer.maxMessageSize }
    set { framer.maxMessageSize = newValue }
  }
  /// Most descriptors kept per received message; surplus ones are closed.
  public var maxFDs: Int {
    get { framer.maxFDs }
    set { framer.maxFDs = newValue }
  }
  /// Which messages `receive()` hands over before their payload has arrived
  /// (`ReceiveResult.parted`); see `MessageFramer.partedReceive`.
  public var partedReceive: (command: UInt16, head: Int, minimumPayload: Int)? {
    get { framer.partedReceive }
    set { framer.partedReceive = newValue }
  }
  /// Bytes a read takes beyond the message being assembled while `partedReceive` is set.
  public static var readAhead: Int { MessageFramer.readAhead }
  /// How long the rest of a message that has begun to arrive may take, in
  /// milliseconds, before `receive()` throws ETIMEDOUT (0: no bound). Waiting
  /// between messages is never bounded: a VMM may be idle for hours.
  public var partialMessageTimeoutMilliseconds: Int32 = 0
  /// Set by the thread that receives, so that another thread can wake it
  /// while it waits for the next message (`cvfu_wake`); `receive()` then
  /// returns `.interrupted`. Only that wait is woken, never one for the rest
  /// of a message.
  public var wake: ThreadWake?
  /// When the message now partly buffered began to be waited for (ms, monotonic), or 0.
  private var partialSince: Int64 = 0
  /// Where one recvmsg puts the descriptors it brings, until they are owned.
  private let scratchFDs = UnsafeMutableBufferPointer<Int32>.allocate(
    capacity: Int(CVFU_SCM_MAX_FD))

  /// - Parameters:
  ///   - capacity: receive buffer bytes; must hold the largest accepted message.
  public init(socket: consuming OwnedFileDescriptor, capacity: Int, maxMessageSize: Int? = nil) {
    framer = MessageFramer(capacity: capacity, maxMessageSize: maxMessageSize)
    transport = .socket(socket.descriptor)
    self.socket = consume socket
  }

  /// A channel over memory (`MemoryTransport`), for tests.
  public init(memory: MemoryTransport, capacity: Int, maxMessageSize: Int? = nil) {
    framer = MessageFramer(capacity: capacity, maxMessageSize: maxMessageSize)
    transport = .memory(memory)
  }

  deinit { scratchFDs.deallocate() }

  /// Live update: takes over the bytes and descriptors another channel's
  /// framer held at a message boundary (`MessageFramer.adopt`).
  public func adopt(
    buffered bytes: [UInt8], held: consuming OwnedFileDescriptors, chunkEnd: Int
  ) throws(Errno) {
    try framer.adopt(buffered: bytes, held: held, chunkEnd: chunkEnd)
  }

  /// Capacity of the receive buffer.
  public var capacity: Int { framer.capacity }

  /// Closes the socket; a second call does nothing. For ThreadSanitizer, a
  /// hang-up the peer's clean-up is ordered after (`cvfu_tsan_hang_up`;
  /// nothing in other builds).
  public func close() {
    switch transport {
    case .socket:
      guard let socket = socket.take() else { return }
      cvfu_tsan_hang_up()
      socket.close()
    case .memory(let memory): memory.close()
    }
  }

  /// Wakes a thread blocked in `receive()` (it then sees `.closed`).
  public func shutdown() { transport.shutdown() }

  /// Whether the peer has closed its end of the socket (POLLHUP), asked
  /// without reading or waiting. A long request checks it between the steps
  /// it cannot interrupt, so it stops working for a client that has gone.
  public var peerHasHungUp: Bool { transport.peerHasHungUp }

  /// Whether a whole message is already buffered (no system call needed).
  public var hasBufferedMessage: Bool { framer.hasBufferedMessage }

  /// Payload bytes of the taken parted message not yet received.
  public var payloadLeft: Int { framer.payloadLeft }

  /// Stream bytes received but not yet consumed: a splice from the socket
  /// would skip them, so it must find none.
  public var bufferedByteCount: Int { framer.bufferedByteCount }

  /// The next message. Throws on a socket error or a header that cannot be
  /// framed (size < 16): the stream can't be resynchronised after that.
  public func receive() throws(Errno) -> ReceiveResult {
    while true {
      switch try framer.next() {
      case .read(let space, let partial):
        do {
          guard try fill(space, partial: partial) else { return .closed }
        } catch  where error == .interrupted && wake != nil && !partial {
          return .interrupted
        }
      case .message(let message):
        partialSince = 0
        return .message(message)
      case .oversized(let header):
        partialSince = 0
        return .oversized(header)
      case .parted(let header, let head):
        return .parted(header, head: head)
      }
    }
  }

  /// Takes the parted message `receive()` just offered: its header and head
  /// are consumed, and its payload (`payloadLeft` bytes) is the receiver's to
  /// take with `receivePayload` and `nextPayload`, in order. A `receive()`
  /// before all of it is taken drops the rest, so the stream stays in step.
  public func takeParted() {
    framer.takeParted()
    if framer.payloadLeft == 0 { partialSince = 0 }
  }

  /// Fills `bytes` (at most `payloadLeft` of them) with the next bytes of the
  /// taken parted message's payload: what is buffered first, the rest
  /// straight from the socket into `bytes`. Waits for the rest within the
  /// partial-message bound (ETIMEDOUT). False when the peer closed first.
  public func receivePayload(into bytes: UnsafeMutableRawBufferPointer) throws(Errno) -> Bool {
    var got = framer.takeBufferedPayload(into: bytes)
    while got < bytes.count {
      guard
        let n = try receivePart(
          UnsafeMutableRawBufferPointer(rebasing: bytes[got...]))
      else { return false }
      got += n
      framer.payloadReceivedPastBuffer(n)
    }
    if framer.payloadLeft == 0 { partialSince = 0 }
    return true
  }

  /// The next 1...`count` bytes of the taken parted message's payload (never
  /// past its end), in the receive buffer until the next call: buffered
  /// bytes if there are any, else one read from the socket. Waits as
  /// `receivePayload` does; nil when the peer closed.
  public func nextPayload(upTo count: Int) throws(Errno) -> UnsafeRawBufferPointer? {
    if let space = framer.payloadSpace(upTo: count) {
      guard let n = try receivePart(space) else { return nil }
      framer.received(n)
    }
    let bytes = framer.takePayload(upTo: count)
    if framer.payloadLeft == 0 { partialSince = 0 }
    return bytes
  }

  /// Drops what is left of the taken parted message's payload (a refused
  /// MIG_DATA_WRITE): buffered bytes now, the rest as it arrives.
  public func discardPayload() { framer.discardPayload() }

  /// One recv of a partly received message into `space`, past the buffer;
  /// nil on EOF. Bounded like `fill`: no wait when bytes are ready, else
  /// within the partial-message bound. No descriptors can arrive this way
  /// (the kernel closes any it would pass).
  private func receivePart(_ space: UnsafeMutableRawBufferPointer) throws(Errno) -> Int? {
    let bounded = partialMessageTimeoutMilliseconds > 0
    while true {
      let n = transport.receiveBytes(into: space, dontWait: bounded, waitAll: false)
      if n > 0 { return n }
      if n == 0 { return nil }
      switch Int32(-n) {
      case EINTR: continue
      case EAGAIN where bounded: try waitForRestOfMessage()
      case ECONNRESET, EPIPE: return nil
      case let error: throw Errno(rawValue: error)
      }
    }
  }

  /// Waits for the rest of a message only until `partialMessageTimeoutMilliseconds`
  /// after the first wait for it: a peer that sends half a message and goes
  /// quiet gets ETIMEDOUT. (An idle peer, with nothing of a message sent, is
  /// waited for without a bound.)
  private func waitForRestOfMessage() throws(Errno) {
    let now = cvfu_monotonic_ms()
    if partialSince == 0 { partialSince = now }
    let left = partialSince + Int64(partialMessageTimeoutMilliseconds) - now
    if left <= 0 || transport.waitReadable(milliseconds: Int32(left)) == 0 { throw .timedOut }
  }

  /// Receives the next message when its layout is known: `head` bytes of
  /// fixed payload, then up to `data.count` bytes of data copied straight into
  /// `data` (large REGION_READ and MIG_DATA_READ replies: the bulk skips the
  /// receive buffer). Returns the header and the data length; an error reply
  /// (header only) leaves `head` and `data` untouched. A message of any other
  /// size is discarded and reported as EPROTO. nil when the peer closed.
  public func receiveDirect(
    head: UnsafeMutableRawBufferPointer, data: UnsafeMutableRawBufferPointer
  )
    throws(Errno) -> (header: MessageHeader, count: Int)?
  {
    // Only the header and head: the data is read straight into `data`, not via the buffer.
    while let next = framer.directSpace(head: head.count) {
      guard try fill(next.space, partial: next.partial) else { return nil }
    }
    let (header, count, buffered) = try framer.takeDirect(head: head, data: data)
    var got = buffered
    while got < count {
      let n = transport.receiveBytes(
        into: UnsafeMutableRawBufferPointer(rebasing: data[got..<count]), dontWait: false,
        waitAll: false)
      if n == 0 { return nil }
      if n < 0 {
        if -n == EINTR { continue }
        throw Errno(rawValue: Int32(-n))
      }
      got += n
    }
    return (header, count)
  }

  /// Reads exactly `bytes.count` bytes of the stream: the buffered ones first,
  /// then from the socket without reading ahead, so what follows stays in the
  /// socket for another reader (a splice). False when the peer closed first.
  public func readExactly(_ bytes: UnsafeMutableRawBufferPointer) throws(Errno) -> Bool {
    var got = framer.takeBuffered(into: bytes)
    while got < bytes.count {
      let n = transport.receiveBytes(
        into: UnsafeMutableRawBufferPointer(rebasing: bytes[got...]), dontWait: false,
        waitAll: true)
      if n == 0 { return false }
      if n < 0 {
        if -n == EINTR { continue }
        throw Errno(rawValue: Int32(-n))
      }
      got += n
    }
    return true
  }

  /// One recvmsg into `space`, the free tail of the framer's buffer, whose
  /// bytes and descriptors the framer then takes. Returns false on EOF.
  private func fill(_ space: UnsafeMutableRawBufferPointer, partial: Bool) throws(Errno) -> Bool {
    // Part of a message is here (or an oversized one is being dropped): the
    // read does not block, and only when nothing is ready is the rest waited
    // for, within the bound. The common case costs no extra system call.
    let bounded = partialMessageTimeoutMilliseconds > 0 && partial
    if !bounded { partialSince = 0 }
    var count: Int32 = 0
    let wakeable = partial ? nil : wake?.state
    if let wakeable { cvfu_wake_enter(wakeable) }
    var n = transport.receive(
      into: space, descriptors: scratchFDs, descriptorCount: &count, dontWait: bounded,
      wakeable: wakeable != nil)
    if let wakeable { cvfu_wake_leave(wakeable) }
    if bounded, -n == EAGAIN {
      try waitForRestOfMessage()
      n = transport.receive(
        into: space, descriptors: scratchFDs, descriptorCount: &count, dontWait: false)
    }
    if n < 0 {
      if -n == ECONNRESET || -n == EPIPE { return false }
      throw Errno(rawValue: Int32(-n))
    }
    if count > 0 {
      var descriptors = OwnedFileDescriptors()
      for i in 0..<Int(min(count, CVFU_SCM_MAX_FD)) {
        descriptors.append(OwnedFileDescriptor(taking: FileDescriptor(rawValue: scratchFDs[i])))
      }
      framer.received(n, descriptors: descriptors)
    } else {
      framer.received(n)
    }
    return n > 0
  }

  /// Sends `first` then `second` as one message, with `fds` (lent) attached
  /// to its first byte. Partial sends are continued until everything is out;
  /// with a send timeout on the socket, one that makes no progress throws ETIMEDOUT.
  public func send(
    _ first: UnsafeRawBufferPointer,
    _ second: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0),
    fds: UnsafeBufferPointer<Int32> = UnsafeBufferPointer(start: nil, count: 0)
  ) throws(Errno) {
    var a = first
    var b = second
    var fdsToSend = fds
    while a.count + b.count > 0 {
      var iov = (
        iovec(iov_base: UnsafeMutableRawPointer(mutating: a.baseAddress), iov_len: a.count),
        iovec(iov_base: UnsafeMutableRawPointer(mutating: b.baseAddress), iov_len: b.count)
      )
      let n = withUnsafeMutableBytes(of: &iov) { raw -> Int in
        let vecs = raw.bindMemory(to: iovec.self)
        let start = a.count == 0 ? 1 : 0
        return transport.send(
          UnsafeBufferPointer(rebasing: vecs[start...]), descriptors: fdsToSend)
      }
      // A blocking socket says EAGAIN only when its send timeout (SO_SNDTIMEO) ran out.
      if n < 0 { throw -n == EAGAIN ? .timedOut : Errno(rawValue: Int32(-n)) }
      fdsToSend = UnsafeBufferPointer(start: nil, count: 0)
      var sent = n
      let fromA = min(sent, a.count)
      a = UnsafeRawBufferPointer(rebasing: a[fromA...])
      sent -= fromA
      b = UnsafeRawBufferPointer(rebasing: b[sent...])
    }
  }

  /// Sends a message with at most one descriptor (lent: region info replies).
  public func send(
    _ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer, fd: FileDescriptor?
  ) throws(Errno) {
    var one = fd?.rawValue ?? -1
    let result: Result<Void, Errno> = withUnsafePointer(to: &one) { p in
      do throws(Errno) {
        try send(first, second, fds: UnsafeBufferPointer(start: p, count: fd != nil ? 1 : 0))
        return .success(())
      } catch { return .failure(error) }
    }
    try result.get()
  }

  /// Convenience for non-hot paths; `fds` are lent.
  public func send(bytes: [UInt8], fds: [Int32] = []) throws(Errno) {
    let result: Result<Void, Errno> = bytes.withUnsafeBytes { raw in
      fds.withUnsafeBufferPointer { f in
        do throws(Errno) {
          try send(raw, fds: f)
          return .success(())
        } catch { return .failure(error) }
      }
    }
    try result.get()
  }
}

extension ReceiveResult {
  /// The header of a command (not a reply) received whole, if that is what this is.
  public var commandHeader: MessageHeader? {
    switch self {
    case .message(let message): return message.header.isCommand ? message.header : nil
    default: return nil
    }
  }
}

extension ReceiveResult {
  /// The message received whole, if that is what this is, with its descriptors.
  public consuming func wholeMessage() -> ReceivedMessage? {
    switch consume self {
    case .message(let message): return message
    default: return nil
    }
  }
}
