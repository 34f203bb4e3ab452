import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

extension Connection {
  /// What became of a MIG_DATA_WRITE the channel offered before its data.
  enum InPlaceWrite {
    /// Not taken: the channel delivers it whole and `dispatch` answers it.
    case declined
    case served
    case ended(ConnectionEnd)
  }

  /// MIG_DATA_WRITEs of at least this much data are received in place.
  static let inPlaceWriteMinimum = 16 * 1024

  /// The channel offers MIG_DATA_WRITEs before their data when the device migrates.
  func offerMigDataWritesInParts() {
    guard migratable != nil else { return }
    channel.partedReceive = (
      Command.migDataWrite.rawValue, MigDataHeader.size, Self.inPlaceWriteMinimum
    )
  }

  /// MIG_DATA_WRITE with its data received where the restore stream takes it
  /// (`MigrationSink.placement`): a VRAM packet's payload straight into VRAM,
  /// the rest (packet headers, small payloads, a kernel `data_fd`'s bytes)
  /// through the channel's buffer and `write`, as `migDataWrite` does.
  ///
  /// Before a byte of data is read, the message must pass every check
  /// `dispatch` and `migDataWrite` make; one that fails any is declined,
  /// received whole and refused by them with the same errno, nothing of it
  /// written. Once taken, a refusal by the stream drops the rest of the data
  /// unread (the stream refuses everything after its first error anyway).
  func migDataWriteInPlace(_ header: MessageHeader, head: UnsafeRawBufferPointer) -> InPlaceWrite {
    // The admission of every request, then `migDataWrite`'s own checks.
    guard admission(of: header, descriptors: 0) == .admitted(.migDataWrite),
      let sink = try? migDataWriteSink(head: head, payloadSize: header.payloadSize)
    else { return .declined }
    channel.takeParted()
    if traceEnabled {
      logger.trace("<- MIG_DATA_WRITE id=\(header.messageID) size=\(header.size) (data in place)")
    }
    var placed: UInt64 = 0
    defer { if placed > 0 { stats.update { $0.migrationBytesPlaced += placed } } }
    while channel.payloadLeft > 0 {
      let taken: Result<Void, Errno>
      switch sink.placement(ofNext: channel.payloadLeft) {
      case .memory(let span):
        do throws(Errno) {
          guard try channel.receivePayload(into: span) else { return .ended(closedEnd) }
        } catch { return .ended(receiveFailed(error)) }
        taken = Result { () throws(Errno) in try sink.placed(span.count) }
        placed += UInt64(span.count)
      case .write(let count):
        let bytes: UnsafeRawBufferPointer
        do throws(Errno) {
          guard let next = try channel.nextPayload(upTo: count) else { return .ended(closedEnd) }
          bytes = next
        } catch { return .ended(receiveFailed(error)) }
        taken = Result { () throws(Errno) in try Self.writeAll(bytes, to: sink) }
      }
      if case .failure(let error) = taken {
        channel.discardPayload()
        if header.wantsReply {
          logger.debug("MIG_DATA_WRITE id=\(header.messageID) failed: \(error.name)")
          sendError(to: header, error)
        } else {
          logger.warning("posted MIG_DATA_WRITE id=\(header.messageID) failed: \(error.name)")
        }
        return .served
      }
    }
    if header.wantsReply { sendReply(to: header, payloadSize: 0) }
    return .served
  }

  /// MIG_DATA_WRITE: valid in RESUMING; every byte is handed over (partial writes retried).
  /// Large ones with data for VRAM are taken in place instead (`migDataWriteInPlace`).
  func migDataWrite(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let sink = try migDataWriteSink(head: payload, payloadSize: payload.count)
    try Self.writeAll(UnsafeRawBufferPointer(rebasing: payload[MigDataHeader.size...]), to: sink)
    stats.counters.migrationWritten(payload.count - MigDataHeader.size)
    return 0
  }

  /// Where a MIG_DATA_WRITE with MIG_DATA head `head` and `payloadSize`
  /// bytes of payload goes, once it passes the checks both ways of receiving
  /// one make (whole in `migDataWrite`, in place here): its `size` agrees with
  /// the message and is within max_data_xfer_size, and the device migrates
  /// (EINVAL otherwise); the session holds a restore stream. With the sparse
  /// form negotiated, that form's sink: it offers VRAM only for the bytes of
  /// a data segment, so framing is always decoded, never placed.
  func migDataWriteSink(head: UnsafeRawBufferPointer, payloadSize: Int) throws(Errno)
    -> any MigrationSink
  {
    let request = try MigDataHeader(decoding: head)
    guard payloadSize - MigDataHeader.size == Int(request.size),
      request.size <= limits.maxDataXferSize, migratable != nil
    else { throw .invalidArgument }
    return try sparse(sink: migration.sink())
  }

  /// Hands `bytes` to `sink`, every byte (partial writes retried).
  static func writeAll(_ bytes: UnsafeRawBufferPointer, to sink: any MigrationSink) throws(Errno) {
    var rest = bytes
    while !rest.isEmpty {
      let accepted = try sink.write(rest)
      guard accepted > 0 else { throw .ioError }
      rest = UnsafeRawBufferPointer(rebasing: rest[accepted...])
    }
  }
}
