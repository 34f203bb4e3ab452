import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// One message taken off the stream. `payload` points into the channel's
/// receive buffer and is valid until the next call to `receive()`.
public struct ReceivedMessage {
  public var header: MessageHeader
  public var payload: UnsafeRawBufferPointer
  /// Descriptors that arrived with this message; the receiver owns them.
  public var fds: FDList
}

/// What `receive()` found.
public enum ReceiveResult {
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
}

/// A small owned list of descriptors with no heap allocation for the common
/// cases (up to 16). Whatever is not taken is closed by `closeAll()`.
public struct FDList {
  public private(set) var count: Int = 0
  private var storage:
    (
      Int32, Int32, Int32, Int32, Int32, Int32, Int32, Int32,
      Int32, Int32, Int32, Int32, Int32, Int32, Int32, Int32
    ) = (-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1)
  private var overflow: [Int32] = []

  public init() {}
  public init(_ fds: [Int32]) { for fd in fds { append(fd) } }

  public var isEmpty: Bool { count == 0 }

  public mutating func append(_ fd: Int32) {
    if count < 16 {
      withUnsafeMutableBytes(of: &storage) {
        $0.storeBytes(of: fd, toByteOffset: count * 4, as: Int32.self)
      }
    } else {
      overflow.append(fd)
    }
    count += 1
  }

  public subscript(i: Int) -> Int32 {
    if i < 16 {
      return withUnsafeBytes(of: storage) { $0.load(fromByteOffset: i * 4, as: Int32.self) }
    }
    return overflow[i - 16]
  }

  public var array: [Int32] { (0..<count).map { self[$0] } }

  /// Hands the descriptors to the caller; the list is empty afterwards.
  public mutating func take() -> [Int32] {
    let all = array
    self = FDList()
    return all
  }

  public mutating func closeAll() {
    guard count > 0 else { return }
    for i in 0..<count { _ = close(self[i]) }
    self = FDList()
  }
}

/// A vfio-user message stream over a connected Unix stream socket.
///
/// Receiving reads as much as the socket has in one `recvmsg`, so pipelined
/// requests cost one system call for several messages. Descriptors: Linux
/// stops a `recvmsg` right after the segment that carried SCM_RIGHTS, and that
/// segment starts with the header of the message they were sent with, so the
/// descriptors belong to the last message that begins in the bytes of that
/// call. (A peer that packs several messages into one `sendmsg` with
/// descriptors is ambiguous by construction; none of the known clients do.)
public final class MessageChannel {
  public let fd: Int32
  /// Largest message accepted whole; larger ones are discarded (see `ReceiveResult.oversized`).
  public var maxMessageSize: Int
  /// Most descriptors kept per received message; surplus ones are closed.
  public var maxFDs: Int = Int(CVFU_SCM_MAX_FD)
  /// How long the rest of a message that has begun to arrive may take, in
  /// milliseconds, before `receive()` throws ETIMEDOUT (0: no bound). Waiting
  /// between messages is never bounded: a VMM may be idle for hours.
  public var partialMessageTimeoutMilliseconds: Int32 = 0
  /// When the message now partly buffered began to be waited for (ms, monotonic), or 0.
  private var partialSince: Int64 = 0
  /// Which messages `receive()` hands over before their payload has arrived
  /// (`ReceiveResult.parted`), so the receiver can place the payload itself:
  /// commands of this number, of at least `minimumPayload` bytes after their
  /// fixed `head`, that bring no descriptors (nil: every message whole).
  /// While set, a read from the socket takes only what completes the message
  /// being assembled plus `readAhead` bytes, so a parted message's payload
  /// stays in the socket for the receiver to place.
  public var partedReceive: (command: UInt16, head: Int, minimumPayload: Int)?
  /// Bytes a read takes beyond the message being assembled while `partedReceive` is set.
  public static let readAhead = 4096
  /// Payload bytes of the taken parted message not yet received.
  public private(set) var payloadLeft = 0
  /// Stream position of a parted message offered and not taken: received whole.
  private var offeredAt: UInt64?

  private let buffer: UnsafeMutableRawBufferPointer
  private var start = 0  // first unconsumed byte
  private var end = 0  // one past the last received byte
  private var streamBase: UInt64 = 0  // stream position of buffer[0]
  private var discardRemaining: UInt64 = 0
  private var fdChunkEnd: UInt64 = 0  // stream end of the recvmsg that brought `fdBatch`
  private var fdBatch = FDList()
  private var scratchFDs = [Int32](repeating: -1, count: Int(CVFU_SCM_MAX_FD))

  /// - Parameters:
  ///   - capacity: receive buffer bytes; must hold the largest accepted message.
  public init(fd: Int32, capacity: Int, maxMessageSize: Int? = nil) {
    self.fd = fd
    self.maxMessageSize = maxMessageSize ?? capacity
    buffer = .allocate(byteCount: max(capacity, 4096), alignment: 16)
  }

  deinit {
    fdBatch.closeAll()
    buffer.deallocate()
  }

  /// Capacity of the receive buffer.
  public var capacity: Int { buffer.count }

  /// Closes the socket (idempotent use is the owner's job). For
  /// ThreadSanitizer, a hang-up the peer's clean-up is ordered after
  /// (`cvfu_tsan_hang_up`; nothing in other builds).
  public func close() {
    cvfu_tsan_hang_up()
    _ = Glibc.close(fd)
  }

  /// Wakes a thread blocked in `receive()` (it then sees `.closed`).
  public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

  /// Whether the peer has closed its end of the socket (POLLHUP), asked
  /// without reading or waiting. A long request checks it between the steps
  /// it cannot interrupt, so it stops working for a client that has gone.
  public var peerHasHungUp: Bool {
    var entry = pollfd(fd: fd, events: 0, revents: 0)
    return poll(&entry, 1, 0) > 0 && entry.revents & Int16(POLLHUP) != 0
  }

  /// Whether a whole message is already buffered (no system call needed).
  public var hasBufferedMessage: Bool {
    guard end - start >= MessageHeader.size else { return false }
    let size = Int(
      UnsafeRawBufferPointer(buffer).loadUnaligned(fromByteOffset: start + 4, as: UInt32.self))
    return size < MessageHeader.size || size > maxMessageSize || end - start >= size
  }

  /// The next message. Throws on a socket error or a header that cannot be
  /// framed (size < 16): the stream can't be resynchronised after that.
  public func receive() throws(Errno) -> ReceiveResult {
    if payloadLeft > 0 { discardPayload() }
    while true {
      if discardRemaining > 0 {
        let have = UInt64(end - start)
        let drop = min(have, discardRemaining)
        start += Int(drop)
        discardRemaining -= drop
        if discardRemaining > 0 {
          guard try fill() else { return .closed }
          continue
        }
      }
      if end - start >= MessageHeader.size {
        let raw = UnsafeRawBufferPointer(rebasing: buffer[start..<end])
        let header = try MessageHeader(framing: raw)
        let size = Int(header.size)
        let messageStart = streamBase + UInt64(start)
        if size > maxMessageSize {
          var fds = takeFDs(messageStart: messageStart, messageEnd: messageStart + UInt64(size))
          fds.closeAll()
          // Drop what is buffered now; later calls drop the rest before reading on.
          let drop = min(end - start, size)
          start += drop
          discardRemaining = UInt64(size - drop)
          partialSince = 0
          return .oversized(header)
        }
        if end - start >= size {
          let fds = takeFDs(messageStart: messageStart, messageEnd: messageStart + UInt64(size))
          let payload = UnsafeRawBufferPointer(
            rebasing: buffer[(start + MessageHeader.size)..<(start + size)])
          start += size
          partialSince = 0
          return .message(ReceivedMessage(header: header, payload: payload, fds: fds))
        }
        if let parted = partedReceive, offersParted(header, at: messageStart),
          end - start >= MessageHeader.size + parted.head,
          fdBatch.isEmpty || messageStart >= fdChunkEnd
        {
          offeredAt = messageStart
          let head = UnsafeRawBufferPointer(
            rebasing: buffer[
              (start + MessageHeader.size)..<(start + MessageHeader.size + parted.head)])
          return .parted(header, head: head)
        }
        if discardRemaining == 0, start + size > buffer.count { compact() }
      } else if start + MessageHeader.size > buffer.count {
        compact()
      }
      guard try fill() else { return .closed }
    }
  }

  /// Takes the parted message `receive()` just offered: its header and head
  /// are consumed, and its payload (`payloadLeft` bytes) is the receiver's to
  /// take with `receivePayload` and `nextPayload`, in order. A `receive()`
  /// before all of it is taken drops the rest, so the stream stays in step.
  public func takeParted() {
    guard let parted = partedReceive, end - start >= MessageHeader.size + parted.head else {
      preconditionFailure("takeParted() without a parted message offered")
    }
    let size = Int(
      UnsafeRawBufferPointer(buffer).loadUnaligned(fromByteOffset: start + 4, as: UInt32.self))
    var stale = takeFDs(
      messageStart: streamBase + UInt64(start), messageEnd: streamBase + UInt64(start + size))
    stale.closeAll()  // an earlier message's, never claimed (a parted message brings none)
    start += MessageHeader.size + parted.head
    payloadLeft = size - MessageHeader.size - parted.head
    offeredAt = nil
    if payloadLeft == 0 { partialSince = 0 }
  }

  /// Fills `bytes` (at most `payloadLeft` of them) with the next bytes of the
  /// taken parted message's payload: what is buffered first, the rest
  /// straight from the socket into `bytes`. Waits for the rest within the
  /// partial-message bound (ETIMEDOUT). False when the peer closed first.
  public func receivePayload(into bytes: UnsafeMutableRawBufferPointer) throws(Errno) -> Bool {
    precondition(bytes.count <= payloadLeft, "more than the parted message holds")
    let buffered = min(end - start, bytes.count)
    if buffered > 0 {
      UnsafeMutableRawBufferPointer(rebasing: bytes[0..<buffered]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: buffer[start..<(start + buffered)]))
      start += buffered
      payloadLeft -= buffered
    }
    var got = buffered
    while got < bytes.count {
      guard let n = try receivePart(bytes.baseAddress! + got, bytes.count - got) else {
        return false
      }
      got += n
      payloadLeft -= n
    }
    if payloadLeft == 0 { partialSince = 0 }
    return true
  }

  /// The next 1...`count` bytes of the taken parted message's payload (never
  /// past its end), in the receive buffer until the next call: buffered
  /// bytes if there are any, else one read from the socket. Waits as
  /// `receivePayload` does; nil when the peer closed.
  public func nextPayload(upTo count: Int) throws(Errno) -> UnsafeRawBufferPointer? {
    precondition(count > 0 && payloadLeft > 0, "no parted payload left")
    if start == end {
      streamBase += UInt64(start)
      start = 0
      end = 0
      guard let n = try receivePart(buffer.baseAddress!, min(count, payloadLeft, buffer.count))
      else { return nil }
      end = n
    }
    let n = min(end - start, count, payloadLeft)
    let bytes = UnsafeRawBufferPointer(rebasing: buffer[start..<(start + n)])
    start += n
    payloadLeft -= n
    if payloadLeft == 0 { partialSince = 0 }
    return bytes
  }

  /// Drops what is left of the taken parted message's payload (a refused
  /// MIG_DATA_WRITE): buffered bytes now, the rest as it arrives.
  public func discardPayload() {
    let drop = min(end - start, payloadLeft)
    start += drop
    discardRemaining += UInt64(payloadLeft - drop)
    payloadLeft = 0
  }

  /// One recv of up to `count` bytes of a partly received message into
  /// `into`, bypassing the buffer; nil on EOF. Bounded like `fill`: no wait
  /// when bytes are ready, else within the partial-message bound. No
  /// descriptors can arrive this way (the kernel closes any it would pass).
  private func receivePart(_ into: UnsafeMutableRawPointer, _ count: Int) throws(Errno) -> Int? {
    let bounded = partialMessageTimeoutMilliseconds > 0
    while true {
      let n = recv(fd, into, count, bounded ? Int32(MSG_DONTWAIT) : 0)
      if n > 0 { return n }
      if n == 0 { return nil }
      switch errno {
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
    if left <= 0 || cvfu_wait_readable(fd, Int32(left)) == 0 { throw .timedOut }
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
    while end - start < MessageHeader.size + head.count {
      if end - start >= MessageHeader.size,
        UnsafeRawBufferPointer(buffer).loadUnaligned(fromByteOffset: start + 4, as: UInt32.self)
          == UInt32(MessageHeader.size)
      {
        break  // an error reply: header only
      }
      if start + MessageHeader.size + head.count > buffer.count { compact() }
      // Only the header and head: the data is read straight into `data`, not via the buffer.
      guard try fill(limit: MessageHeader.size + head.count - (end - start)) else { return nil }
    }
    let header = try MessageHeader(framing: UnsafeRawBufferPointer(rebasing: buffer[start..<end]))
    var fds = takeFDs(
      messageStart: streamBase + UInt64(start),
      messageEnd: streamBase + UInt64(start) + UInt64(header.size))
    fds.closeAll()
    if header.size == UInt32(MessageHeader.size) {
      start += MessageHeader.size
      return (header, 0)
    }
    let size = Int(header.size)
    guard size >= MessageHeader.size + head.count,
      size <= MessageHeader.size + head.count + data.count
    else {
      if size <= end - start {
        start += size
      } else {
        discardRemaining = UInt64(size - (end - start))
        start = end
      }
      throw .protocolError
    }
    let count = size - MessageHeader.size - head.count
    start += MessageHeader.size
    head.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[start..<(start + head.count)]))
    start += head.count
    let buffered = min(end - start, count)
    data.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[start..<(start + buffered)]))
    start += buffered
    var got = buffered
    while got < count {
      let n = recv(fd, data.baseAddress! + got, count - got, 0)
      if n == 0 { return nil }
      if n < 0 {
        if errno == EINTR { continue }
        throw Errno(rawValue: errno)
      }
      got += n
    }
    return (header, count)
  }

  /// Reads exactly `bytes.count` bytes of the stream: the buffered ones first,
  /// then from the socket without reading ahead, so what follows stays in the
  /// socket for another reader (a splice). False when the peer closed first.
  public func readExactly(_ bytes: UnsafeMutableRawBufferPointer) throws(Errno) -> Bool {
    let buffered = min(end - start, bytes.count)
    if buffered > 0 {
      UnsafeMutableRawBufferPointer(rebasing: bytes[0..<buffered]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: buffer[start..<(start + buffered)]))
      start += buffered
    }
    var got = buffered
    while got < bytes.count {
      let n = recv(fd, bytes.baseAddress! + got, bytes.count - got, Int32(MSG_WAITALL))
      if n == 0 { return false }
      if n < 0 {
        if errno == EINTR { continue }
        throw Errno(rawValue: errno)
      }
      got += n
    }
    return true
  }

  /// Stream bytes received but not yet consumed: a splice from the socket
  /// would skip them, so it must find none.
  public var bufferedByteCount: Int { end - start }

  /// Descriptors of the message at [messageStart, messageEnd) if it is the
  /// last message beginning inside the recvmsg chunk that carried them.
  @inline(__always)
  private func takeFDs(messageStart: UInt64, messageEnd: UInt64) -> FDList {
    guard !fdBatch.isEmpty else { return FDList() }
    if messageStart < fdChunkEnd, messageEnd >= fdChunkEnd {
      let fds = fdBatch
      fdBatch = FDList()
      return fds
    }
    if messageStart >= fdChunkEnd {
      fdBatch.closeAll()  // nobody claimed them: never leak
    }
    return FDList()
  }

  private func compact() {
    let live = end - start
    if live > 0, start > 0 {
      buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + start, byteCount: live)
    }
    streamBase += UInt64(start)
    start = 0
    end = live
  }

  /// How much one read may take: anything while messages are received
  /// whole; with `partedReceive` set, what completes the message being
  /// assembled and `readAhead` more, so that a parted message's payload is
  /// not swallowed into the buffer with the messages before it.
  private var readLimit: Int {
    guard let parted = partedReceive else { return .max }
    guard discardRemaining == 0,
      let header = try? MessageHeader(
        framing: UnsafeRawBufferPointer(rebasing: buffer[start..<end]))
    else { return Self.readAhead }
    // A message that will be offered parted needs its head only.
    let wanted =
      offersParted(header, at: streamBase + UInt64(start))
      ? MessageHeader.size + parted.head : Int(header.size)
    return max(0, wanted - (end - start)) + Self.readAhead
  }

  /// Whether the message with `header` at stream `position` is one to offer
  /// parted (unless it was offered already and declined).
  private func offersParted(_ header: MessageHeader, at position: UInt64) -> Bool {
    guard let parted = partedReceive else { return false }
    return header.command == parted.command && header.isCommand
      && Int(header.size) - MessageHeader.size - parted.head >= parted.minimumPayload
      && offeredAt != position
  }

  /// One recvmsg into the free tail of the buffer. Returns false on EOF.
  private func fill(limit: Int = .max) throws(Errno) -> Bool {
    // Part of a message is here (or an oversized one is being dropped): the
    // read does not block, and only when nothing is ready is the rest waited
    // for, within the bound. The common case costs no extra system call.
    let bounded = partialMessageTimeoutMilliseconds > 0 && (end > start || discardRemaining > 0)
    if !bounded { partialSince = 0 }
    if start == end {
      streamBase += UInt64(start)
      start = 0
      end = 0
    } else if end == buffer.count {
      compact()
    }
    var count: Int32 = 0
    let length = min(buffer.count - end, readLimit, limit)
    func receive(_ flags: Int32) -> Int {
      scratchFDs.withUnsafeMutableBufferPointer { fds in
        cvfu_recvmsg(
          fd, buffer.baseAddress! + end, length, fds.baseAddress, Int32(fds.count), &count, flags)
      }
    }
    var n = receive(bounded ? Int32(MSG_DONTWAIT) : 0)
    if bounded, -n == EAGAIN {
      try waitForRestOfMessage()
      n = receive(0)
    }
    if n < 0 {
      if -n == ECONNRESET || -n == EPIPE { return false }
      throw Errno(rawValue: Int32(-n))
    }
    if count > 0 {
      fdBatch.closeAll()
      for i in 0..<Int(min(count, CVFU_SCM_MAX_FD)) {
        if i < maxFDs { fdBatch.append(scratchFDs[i]) } else { _ = Glibc.close(scratchFDs[i]) }
      }
      fdChunkEnd = streamBase + UInt64(end) + UInt64(n)
    }
    if n == 0 { return false }
    end += n
    return true
  }

  /// Sends `first` then `second` as one message, with `fds` attached to its
  /// first byte. Partial sends are continued until everything is out; with a
  /// send timeout on the socket, one that makes no progress throws ETIMEDOUT.
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
        return cvfu_sendmsg(
          fd, vecs.baseAddress! + start, Int32(2 - start), fdsToSend.baseAddress,
          Int32(fdsToSend.count))
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

  /// Sends a message with at most one descriptor (region info replies).
  public func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer, fd: Int32)
    throws(Errno)
  {
    var one = fd
    let result: Result<Void, Errno> = withUnsafePointer(to: &one) { p in
      do throws(Errno) {
        try send(first, second, fds: UnsafeBufferPointer(start: p, count: fd >= 0 ? 1 : 0))
        return .success(())
      } catch { return .failure(error) }
    }
    try result.get()
  }

  /// Convenience for non-hot paths.
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
