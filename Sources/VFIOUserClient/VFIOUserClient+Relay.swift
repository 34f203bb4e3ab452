import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// A relay failure, and the end it happened on.
public enum RelayError: Error {
  case source(VFIOUserClientError)
  case destination(VFIOUserClientError)
}

extension VFIOUserClient {
  /// Moves a source's STOP_COPY stream into a destination in RESUMING, the
  /// way `migrate` does: MIG_DATA_READ requests to the source and
  /// MIG_DATA_WRITE requests to the destination, each of `chunk` bytes with
  /// up to `depth` of each in flight, so neither server waits for the other
  /// or for this client. The data of each reply goes from the source's
  /// socket to the destination's by splice, never through this process's
  /// memory: the 24 bytes of each reply's header are read, the write's
  /// header is sent, and the kernel passes the payload's pages along.
  ///
  /// Replies are taken in order and checked as `migDataRead` checks them; a
  /// short reply ends the stream, and the replies to the reads still in
  /// flight must then be empty. Returns the stream bytes moved; `progress`
  /// hears the running total.
  ///
  /// On a failure both connections are left in step for the caller's next
  /// request (a rollback): the source's unread replies are read and dropped,
  /// a write cut short is completed with zeros (the caller resets that
  /// destination anyway), and the acknowledgements in flight are collected,
  /// as far as each end still answers.
  public static func relayMigrationData(
    from source: VFIOUserClient, to destination: VFIOUserClient, chunk: Int, depth: Int = 4,
    progress: (UInt64) -> Void = { _ in }
  ) throws(RelayError) -> UInt64 {
    let relay = try MigrationRelay(source: source, destination: destination, chunk: chunk)
    do throws(RelayError) {
      return try relay.run(depth: depth, progress: progress)
    } catch {
      relay.resynchronise()
      throw error
    }
  }

  /// Sends a MIG_DATA_READ of `size` bytes without waiting; returns its id.
  func sendMigDataRead(size: Int) throws(VFIOUserClientError) -> UInt16 {
    let id = allocateID()
    let request = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<24])
    MessageHeader(messageID: id, command: .migDataRead, size: 24).encode(into: request)
    MigDataHeader(argsz: UInt32(8 + size), size: UInt32(size)).encode(
      into: UnsafeMutableRawBufferPointer(rebasing: request[16...]))
    do throws(Errno) { try channel.send(UnsafeRawBufferPointer(request)) } catch {
      throw .system(error)
    }
    return id
  }

  /// Reads the 24-byte head of the MIG_DATA_READ reply to `id` and nothing
  /// more: its data, the count returned, is left in the socket.
  func receiveMigDataReadHead(id: UInt16, chunk: Int) throws(VFIOUserClientError) -> Int {
    let ready = cvfu_wait_readable(socket.rawValue, timeoutMilliseconds)
    if ready == 0 { throw .timedOut }
    if ready < 0 { throw .system(Errno(rawValue: -ready)) }
    let head = UnsafeMutableRawBufferPointer(rebasing: requestScratch[32..<56])
    try readExactly(UnsafeMutableRawBufferPointer(rebasing: head[0..<16]))
    let header: MessageHeader
    do throws(Errno) { header = try MessageHeader(framing: UnsafeRawBufferPointer(head)) } catch {
      throw .protocolViolation("unframeable reply")
    }
    guard header.isReply, header.messageID == id, header.command == Command.migDataRead.rawValue
    else {
      throw .protocolViolation(
        "reply id \(header.messageID) command \(header.command), expected MIG_DATA_READ \(id)")
    }
    if header.isError {
      guard header.size == UInt32(MessageHeader.size) else {
        throw .protocolViolation("error reply with a payload")
      }
      throw .server(Errno(rawValue: Int32(bitPattern: header.error)), command: header.command)
    }
    let size = Int(header.size)
    guard size >= 24, size - 24 <= chunk else {
      throw .protocolViolation("MIG_DATA_READ reply size \(size) for \(chunk)")
    }
    try readExactly(UnsafeMutableRawBufferPointer(rebasing: head[16..<24]))
    let count = size - 24
    let migHead = UnsafeRawBufferPointer(rebasing: head[16..<24])
    guard (try? MigDataHeader(decoding: migHead))?.size == UInt32(count) else {
      throw .protocolViolation("MIG_DATA_READ size field disagrees with its data")
    }
    return count
  }

  private func readExactly(_ bytes: UnsafeMutableRawBufferPointer) throws(VFIOUserClientError) {
    let complete: Bool
    do throws(Errno) { complete = try channel.readExactly(bytes) } catch { throw .system(error) }
    guard complete else { throw .disconnected }
  }

  /// MIG_DATA_READ of the whole stream into `buffer`, `chunk` bytes a
  /// request with up to `depth` in flight (the server reads the next while
  /// this side takes the last); each reply lands straight in its place.
  /// Returns the stream length; `buffer` must hold it and `depth` more chunks.
  public func migDataReadAll(into buffer: UnsafeMutableRawBufferPointer, chunk: Int, depth: Int)
    throws(VFIOUserClientError) -> Int
  {
    var ids: [UInt16] = []
    var next = 0
    var length = 0
    var ended = false
    for _ in 0..<depth { ids.append(try sendMigDataRead(size: chunk)) }
    while next < ids.count {
      let id = ids[next]
      next += 1
      let place = UnsafeMutableRawBufferPointer(rebasing: buffer[length..<(length + chunk)])
      let (_, n) = try receiveDirect(id: id, command: .migDataRead, head: 8, data: place)
      if ended {
        guard n == 0 else { throw .protocolViolation("MIG_DATA_READ data after the end") }
        continue
      }
      length += n
      if n < chunk { ended = true } else { ids.append(try sendMigDataRead(size: chunk)) }
    }
    return length
  }

  /// Sends the 24-byte head of a MIG_DATA_WRITE of `size` bytes; the caller
  /// sends the data right after it. Returns its id.
  func sendMigDataWriteHead(size: Int) throws(VFIOUserClientError) -> UInt16 {
    let (id, request) = migDataWriteHead(size: size)
    do throws(Errno) { try channel.send(request) } catch {
      throw .system(error)
    }
    return id
  }
}

/// One relay's bookkeeping: what is in flight on each connection, so a
/// failure can leave both in step (`resynchronise`).
private final class MigrationRelay {
  let source: VFIOUserClient
  let destination: VFIOUserClient
  let chunk: Int
  var pipe: [Int32] = [-1, -1]
  /// MIG_DATA_READs sent whose replies have not been read, oldest first.
  var reads: [UInt16] = []
  var nextRead = 0
  /// MIG_DATA_WRITEs sent whose acknowledgements have not been read.
  var writes: [UInt16] = []
  var nextAck = 0
  /// Data of the current read reply still in the source's socket.
  var sourceLeft = 0
  /// Data the destination still expects for the current write.
  var destinationLeft = 0

  init(source: VFIOUserClient, destination: VFIOUserClient, chunk: Int) throws(RelayError) {
    self.source = source
    self.destination = destination
    self.chunk = chunk
    guard source.channel.bufferedByteCount == 0 else {
      throw .source(.protocolViolation("unread bytes before the relay"))
    }
    let made = cvfu_relay_pipe(&pipe)
    guard made == 0 else { throw .source(.system(Errno(rawValue: -made))) }
  }

  deinit {
    close(pipe[0])
    close(pipe[1])
  }

  func run(depth: Int, progress: (UInt64) -> Void) throws(RelayError) -> UInt64 {
    var ended = false
    var total: UInt64 = 0
    for _ in 0..<depth { try sendRead() }
    while nextRead < reads.count {
      let id = reads[nextRead]
      let n: Int
      do throws(VFIOUserClientError) {
        n = try source.receiveMigDataReadHead(id: id, chunk: chunk)
      } catch { throw .source(error) }
      nextRead += 1
      sourceLeft = n
      if ended {
        guard n == 0 else {
          throw .source(.protocolViolation("MIG_DATA_READ returned \(n) bytes after the end"))
        }
        continue
      }
      if n > 0 {
        do throws(VFIOUserClientError) {
          writes.append(try destination.sendMigDataWriteHead(size: n))
        } catch { throw .destination(error) }
        destinationLeft = n
        try splice(n)
        total += UInt64(n)
        progress(total)
        if writes.count - nextAck > depth { try collectAck() }
      }
      if n < chunk { ended = true } else { try sendRead() }
    }
    while nextAck < writes.count { try collectAck() }
    return total
  }

  private func sendRead() throws(RelayError) {
    do throws(VFIOUserClientError) { reads.append(try source.sendMigDataRead(size: chunk)) } catch {
      throw .source(error)
    }
  }

  private func collectAck() throws(RelayError) {
    do throws(VFIOUserClientError) { try destination.receiveAck(id: writes[nextAck]) } catch {
      nextAck += 1
      throw .destination(error)
    }
    nextAck += 1
  }

  private func splice(_ count: Int) throws(RelayError) {
    var side: Int32 = 0
    var moved = 0
    var taken = 0
    let result = cvfu_splice_exact(
      source.socket.rawValue, destination.socket.rawValue, pipe, count, &side, &moved, &taken)
    // What was taken from the source but did not reach the destination is gone
    // with it; what was not taken yet is still in the source's socket, for
    // `resynchronise` to drop so the source stays in step for the rollback.
    sourceLeft -= taken
    destinationLeft -= moved
    guard result < 0 else { return }
    let errno = Errno(rawValue: -result)
    if side == 0 {
      throw .source(errno == .connectionReset ? .disconnected : .system(errno))
    }
    throw .destination(.system(errno))
  }

  /// Best effort, each end until it stops answering: drop the source's
  /// unread replies, complete a cut-short write with zeros, collect the
  /// destination's acknowledgements (whatever they say).
  func resynchronise() {
    var scratch = [UInt8](repeating: 0, count: 64 << 10)
    func discard(_ count: Int) -> Bool {
      var left = count
      while left > 0 {
        let n = scratch.withUnsafeMutableBytes {
          recv(source.socket.rawValue, $0.baseAddress, min(left, $0.count), 0)
        }
        if n < 0, errno == EINTR { continue }
        if n <= 0 { return false }
        left -= n
      }
      return true
    }
    var sourceInStep = discard(sourceLeft)
    while sourceInStep, nextRead < reads.count {
      let id = reads[nextRead]
      nextRead += 1
      guard let n = try? source.receiveMigDataReadHead(id: id, chunk: chunk) else { break }
      sourceInStep = discard(n)
    }
    scratch = [UInt8](repeating: 0, count: scratch.count)
    var destinationInStep = true
    while destinationInStep, destinationLeft > 0 {
      let n = min(destinationLeft, scratch.count)
      destinationInStep =
        (try? scratch.withUnsafeBytes {
          try destination.channel.send(UnsafeRawBufferPointer(rebasing: $0[0..<n]))
        }) != nil
      destinationLeft -= n
    }
    while destinationInStep, nextAck < writes.count {
      do throws(VFIOUserClientError) {
        try destination.receiveAck(id: writes[nextAck])
      } catch {
        if case .server = error {} else { destinationInStep = false }
      }
      nextAck += 1
    }
  }
}
