import CVFIOUser
import SystemPackage
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

extension VFIOUserClient {
  private func decode<P: WirePayload>(_ type: P.Type, _ message: borrowing ClientMessage)
    throws(VFIOUserClientError) -> P
  {
    do throws(Errno) {
      return try P(decoding: message.payload)
    } catch {
      throw .protocolViolation("malformed \(message.header.knownCommand?.description ?? "?") reply")
    }
  }

  public func deviceInfo(argsz: UInt32 = 16) throws(VFIOUserClientError) -> DeviceInfoPayload {
    try decode(
      DeviceInfoPayload.self,
      request(.deviceGetInfo, payload: DeviceInfoPayload(argsz: argsz).encoded()))
  }

  /// Region info with its capability chain, and the mmap descriptor when the
  /// region is mappable (the caller's). Re-asks with a larger argsz when the
  /// first answer says the capabilities did not fit, as QEMU does.
  public func regionInfo(_ index: UInt32, argsz: UInt32 = 32) throws(VFIOUserClientError)
    -> RegionInfoReply
  {
    var size = argsz
    while true {
      // Descriptors of a short answer, and any past the first, close with it.
      var reply = try request(
        .deviceGetRegionInfo, payload: RegionInfoPayload(argsz: size, index: index).encoded())
      let info = try decode(RegionInfoPayload.self, reply)
      if info.argsz > size {
        size = info.argsz
        continue
      }
      return RegionInfoReply(info: info, fd: reply.fds.isEmpty ? nil : reply.fds.take(0))
    }
  }

  /// DEVICE_GET_REGION_IO_FDS, with the descriptors its sub-regions name (the caller's).
  public func regionIOFDs(_ index: UInt32) throws(VFIOUserClientError) -> RegionIOFDsReply {
    var reply = try request(
      .deviceGetRegionIOFDs, payload: RegionIOFDsPayload(argsz: 4096, index: index).encoded())
    return RegionIOFDsReply(
      payload: try decode(RegionIOFDsPayload.self, reply), fds: reply.fds.takeAll())
  }

  public func irqInfo(_ index: UInt32) throws(VFIOUserClientError) -> IRQInfoPayload {
    try decode(
      IRQInfoPayload.self,
      request(.deviceGetIRQInfo, payload: IRQInfoPayload(index: index).encoded()))
  }

  /// DEVICE_SET_IRQS with `fds` (lent: the caller keeps its eventfds).
  public func setIRQs(_ payload: IRQSetPayload, fds: [FileDescriptor] = [])
    throws(VFIOUserClientError)
  {
    try request(.deviceSetIRQs, payload: payload.encoded(), fds: fds)
  }

  /// Eventfds (lent) for `fds.count` vectors from `start`, in messages of at
  /// most `chunk` descriptors (QEMU sends max_msg_fds at a time).
  public func setIRQEventfds(index: UInt32, start: UInt32, fds: [FileDescriptor], chunk: Int)
    throws(VFIOUserClientError)
  {
    var offset = 0
    while offset < fds.count {
      let part = Array(fds[offset..<min(offset + chunk, fds.count)])
      try setIRQs(
        IRQSetPayload(
          flags: [.dataEventfd, .actionTrigger], index: index,
          start: start + UInt32(offset), count: UInt32(part.count)), fds: part)
      offset += part.count
    }
  }

  public func read(region: UInt32, offset: UInt64, count: Int) throws(VFIOUserClientError)
    -> [UInt8]
  {
    let reply = try request(
      .regionRead,
      payload: RegionAccessHeader(offset: offset, region: region, count: UInt32(count)).encoded())
    guard reply.payload.count == RegionAccessHeader.size + count else {
      throw .protocolViolation("REGION_READ reply of \(reply.payload.count) bytes for \(count)")
    }
    return Array(reply.payload[RegionAccessHeader.size...])
  }

  public func write(region: UInt32, offset: UInt64, data: [UInt8], posted: Bool = false)
    throws(VFIOUserClientError)
  {
    try request(
      .regionWrite,
      payload: RegionAccessHeader(offset: offset, region: region, count: UInt32(data.count))
        .encoded(data: data),
      noReply: posted)
  }

  public func read32(region: UInt32, offset: UInt64) throws(VFIOUserClientError) -> UInt32 {
    try Self.decodeReply("REGION_READ", try read(region: region, offset: offset, count: 4)) {
      r throws(Errno) in try r.u32(at: 0)
    }
  }

  public func write32(region: UInt32, offset: UInt64, _ value: UInt32, posted: Bool = false)
    throws(VFIOUserClientError)
  {
    try write(
      region: region, offset: offset, data: withUnsafeBytes(of: value.littleEndian) { Array($0) },
      posted: posted)
  }

  public func read64(region: UInt32, offset: UInt64) throws(VFIOUserClientError) -> UInt64 {
    try Self.decodeReply("REGION_READ", try read(region: region, offset: offset, count: 8)) {
      r throws(Errno) in try r.u64(at: 0)
    }
  }

  public func write64(region: UInt32, offset: UInt64, _ value: UInt64, posted: Bool = false)
    throws(VFIOUserClientError)
  {
    try write(
      region: region, offset: offset, data: withUnsafeBytes(of: value.littleEndian) { Array($0) },
      posted: posted)
  }

  @discardableResult
  public func writeMulti(_ entries: [WriteMultiEntry], posted: Bool = false)
    throws(VFIOUserClientError) -> UInt64
  {
    let reply = try request(
      .regionWriteMulti, payload: WriteMultiPayload(entries: entries).encoded(), noReply: posted)
    guard !posted else { return UInt64(entries.count) }
    guard let decoded = try? WriteMultiReply(decoding: reply.payload) else {
      throw .protocolViolation("REGION_WRITE_MULTI reply size")
    }
    return decoded.wrCnt
  }

  /// DMA_MAP, optionally with the fd that backs the window (lent: sent with
  /// SCM_RIGHTS, the caller keeps it). No allocation.
  public func dmaMap(
    address: UInt64, size: UInt64, flags: VFIODMAMapFlags, fd: FileDescriptor? = nil,
    offset: UInt64 = 0
  )
    throws(VFIOUserClientError)
  {
    let id = allocateID()
    let request = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<48])
    MessageHeader(messageID: id, command: .dmaMap, size: 48).encode(into: request)
    DMAMapRequest(flags: flags, offset: offset, address: address, size: size).encode(
      into: UnsafeMutableRawBufferPointer(rebasing: request[16...]))
    do throws(Errno) {
      try channel.send(
        UnsafeRawBufferPointer(request), UnsafeRawBufferPointer(start: nil, count: 0),
        fd: fd)
    } catch { throw .system(error) }
    try receiveAck(id: id)
  }

  /// DMA_UNMAP of a range (every window inside it goes); returns the echoed entry.
  @discardableResult
  public func dmaUnmap(address: UInt64, size: UInt64) throws(VFIOUserClientError) -> DMAUnmapPayload
  {
    let id = allocateID()
    let request = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<40])
    MessageHeader(messageID: id, command: .dmaUnmap, size: 40).encode(into: request)
    let entry = DMAUnmapPayload(address: address, size: size)
    entry.encode(into: UnsafeMutableRawBufferPointer(rebasing: request[16...]))
    do throws(Errno) { try channel.send(UnsafeRawBufferPointer(request)) } catch {
      throw .system(error)
    }
    let echoed = try receiveAck(id: id, payload: DMAUnmapPayload.size)
    do throws(Errno) { return try DMAUnmapPayload(decoding: echoed) } catch {
      throw .protocolViolation("DMA_UNMAP reply does not echo a valid entry")
    }
  }

  @discardableResult
  public func dmaUnmapAll() throws(VFIOUserClientError) -> DMAUnmapPayload {
    try decode(
      DMAUnmapPayload.self,
      request(
        .dmaUnmap,
        payload: DMAUnmapPayload(flags: .all, address: 0, size: 0).encoded()))
  }

  public func reset() throws(VFIOUserClientError) { try request(.deviceReset) }

  public func feature(flags: UInt32, data: [UInt8] = [], argsz: UInt32? = nil)
    throws(VFIOUserClientError)
    -> DeviceFeaturePayload
  {
    try decode(
      DeviceFeaturePayload.self,
      request(
        .deviceFeature,
        payload: DeviceFeaturePayload(argsz: argsz, flags: flags, data: data).encoded()))
  }

  /// MIG_DATA_READ: fewer bytes than asked means the stream ended.
  public func migDataRead(size: UInt32) throws(VFIOUserClientError) -> [UInt8] {
    var payload = [UInt8](repeating: 0, count: MigDataHeader.size)
    payload.withUnsafeMutableBytes {
      MigDataHeader(argsz: UInt32(MigDataHeader.size) + size, size: size).encode(into: $0)
    }
    let reply = try request(.migDataRead, payload: payload)
    let head: MigDataHeader
    do throws(Errno) {
      head = try decodeBytes(reply.payload) { raw throws(Errno) in try MigDataHeader(decoding: raw)
      }
    } catch { throw .protocolViolation("malformed MIG_DATA_READ reply") }
    guard head.size <= size, reply.payload.count == MigDataHeader.size + Int(head.size) else {
      throw .protocolViolation("MIG_DATA_READ reply size \(head.size) for \(size)")
    }
    return Array(reply.payload[MigDataHeader.size...])
  }

  public func migDataWrite(_ data: [UInt8]) throws(VFIOUserClientError) {
    var payload = [UInt8](repeating: 0, count: MigDataHeader.size)
    payload.withUnsafeMutableBytes {
      MigDataHeader(argsz: UInt32(MigDataHeader.size), size: UInt32(data.count)).encode(into: $0)
    }
    try request(.migDataWrite, payload: payload + data)
  }
}

// MARK: Allocation-free paths for benchmarks

extension VFIOUserClient {
  /// Sends a REGION_READ without waiting; returns its message id.
  public func sendRegionRead(region: UInt32, offset: UInt64, count: UInt32)
    throws(VFIOUserClientError) -> UInt16
  {
    let id = allocateID()
    let buffer = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<32])
    MessageHeader(messageID: id, command: .regionRead, size: 32).encode(into: buffer)
    RegionAccessHeader(offset: offset, region: region, count: count).encode(
      into: UnsafeMutableRawBufferPointer(rebasing: buffer[16...]))
    do throws(Errno) { try channel.send(UnsafeRawBufferPointer(buffer)) } catch {
      throw .system(error)
    }
    return id
  }

  /// Receives the reply to a REGION_READ sent with `sendRegionRead`, copying its data to `into`.
  public func receiveRegionRead(id: UInt16, into: UnsafeMutableRawBufferPointer)
    throws(VFIOUserClientError)
  {
    if into.count >= 64 * 1024 { return try receiveLargeRegionRead(id: id, into: into) }
    let result: ReceiveResult
    do throws(Errno) { result = try channel.receive() } catch { throw .system(error) }
    guard let message = result.wholeMessage() else { throw .disconnected }
    let h = message.header
    guard h.messageID == id, h.command == Command.regionRead.rawValue, h.isReply else {
      throw .protocolViolation("reply id \(h.messageID) for \(id)")
    }
    if h.isError { throw .server(Errno(rawValue: Int32(bitPattern: h.error)), command: h.command) }
    guard message.payload.count == RegionAccessHeader.size + into.count else {
      throw .protocolViolation("REGION_READ reply size")
    }
    into.copyMemory(
      from: UnsafeRawBufferPointer(rebasing: message.payload[RegionAccessHeader.size...]))
  }

  /// Large replies land straight in `into` instead of passing through the receive buffer.
  private func receiveLargeRegionRead(id: UInt16, into: UnsafeMutableRawBufferPointer)
    throws(VFIOUserClientError)
  {
    let (header, count) = try receiveDirect(id: id, command: .regionRead, head: 16, data: into)
    guard header.isError || count == into.count else {
      throw .protocolViolation("REGION_READ reply size")
    }
  }

  /// Receives the reply to `id` with `head` fixed bytes (into scratch) and data into `data`.
  func receiveDirect(
    id: UInt16, command: Command, head: Int, data: UnsafeMutableRawBufferPointer
  )
    throws(VFIOUserClientError) -> (MessageHeader, Int)
  {
    let headArea = UnsafeMutableRawBufferPointer(rebasing: requestScratch[32..<(32 + head)])
    let received: (header: MessageHeader, count: Int)?
    do throws(Errno) {
      received = try channel.receiveDirect(head: headArea, data: data)
    } catch {
      throw error == .protocolError ? .protocolViolation("\(command) reply size") : .system(error)
    }
    guard let (header, count) = received else { throw .disconnected }
    guard header.messageID == id, header.command == command.rawValue, header.isReply else {
      throw .protocolViolation("reply id \(header.messageID) command \(header.command) for \(id)")
    }
    if header.isError {
      throw .server(Errno(rawValue: Int32(bitPattern: header.error)), command: header.command)
    }
    return (header, count)
  }

  /// MIG_DATA_READ into `buffer` without allocating; returns the bytes read
  /// (fewer than `buffer.count` means the stream ended).
  public func migDataRead(into buffer: UnsafeMutableRawBufferPointer) throws(VFIOUserClientError)
    -> Int
  {
    let id = try sendMigDataRead(size: buffer.count)
    let (_, count) = try receiveDirect(
      id: id, command: .migDataRead, head: MigDataHeader.size, data: buffer)
    let head = UnsafeRawBufferPointer(rebasing: requestScratch[32..<40])
    guard (try? MigDataHeader(decoding: head))?.size == UInt32(count) else {
      throw .protocolViolation("MIG_DATA_READ size field disagrees with its data")
    }
    return count
  }

  /// A new id and the 24-byte head of a MIG_DATA_WRITE of `size` bytes (in scratch).
  func migDataWriteHead(size: Int) -> (UInt16, UnsafeRawBufferPointer) {
    let id = allocateID()
    let request = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<24])
    MessageHeader(messageID: id, command: .migDataWrite, size: UInt32(24 + size)).encode(
      into: request)
    MigDataHeader(argsz: 8, size: UInt32(size)).encode(
      into: UnsafeMutableRawBufferPointer(rebasing: request[16...]))
    return (id, UnsafeRawBufferPointer(request))
  }

  /// MIG_DATA_WRITE of `data` in `chunk`-byte messages, keeping up to `depth`
  /// in flight so the server always has the next one queued.
  public func migDataWrite(from data: UnsafeRawBufferPointer, chunk: Int, depth: Int)
    throws(VFIOUserClientError)
  {
    var ids: [UInt16] = []
    var head = 0
    var offset = 0
    while offset < data.count || head < ids.count {
      if offset < data.count, ids.count - head < depth {
        let n = min(chunk, data.count - offset)
        let (id, request) = migDataWriteHead(size: n)
        do throws(Errno) {
          try channel.send(request, UnsafeRawBufferPointer(rebasing: data[offset..<(offset + n)]))
        } catch { throw .system(error) }
        ids.append(id)
        offset += n
      } else {
        try receiveAck(id: ids[head])
        head += 1
      }
    }
  }

  /// Sends a MIG_DATA_WRITE of `prefix` (at most 32 bytes: a few bytes
  /// gathered before, copied) and `data` (not copied), without waiting for its
  /// acknowledgement (`receiveAck(id:)`); returns its id.
  public func sendMigDataWrite(
    _ data: UnsafeRawBufferPointer,
    prefix: UnsafeRawBufferPointer = UnsafeRawBufferPointer(
      start: nil, count: 0)
  ) throws(VFIOUserClientError) -> UInt16 {
    precondition(prefix.count <= 32)
    let (id, _) = migDataWriteHead(size: prefix.count + data.count)
    let head = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<(24 + prefix.count)])
    UnsafeMutableRawBufferPointer(rebasing: head[24...]).copyMemory(from: prefix)
    do throws(Errno) { try channel.send(UnsafeRawBufferPointer(head), data) } catch {
      throw .system(error)
    }
    return id
  }

  /// MIG_DATA_WRITE of `data` without copying it.
  public func migDataWrite(from data: UnsafeRawBufferPointer) throws(VFIOUserClientError) {
    let (id, request) = migDataWriteHead(size: data.count)
    do throws(Errno) { try channel.send(request, data) } catch {
      throw .system(error)
    }
    try receiveAck(id: id)
  }

  /// Sends a REGION_WRITE of `data` without waiting; returns its message id.
  public func sendRegionWrite(
    region: UInt32, offset: UInt64, data: UnsafeRawBufferPointer, posted: Bool = false
  )
    throws(VFIOUserClientError) -> UInt16
  {
    let id = allocateID()
    let buffer = UnsafeMutableRawBufferPointer(rebasing: requestScratch[0..<32])
    MessageHeader(
      messageID: id, command: .regionWrite, size: UInt32(32 + data.count),
      flags: posted ? .noReply : .command
    ).encode(into: buffer)
    RegionAccessHeader(offset: offset, region: region, count: UInt32(data.count)).encode(
      into: UnsafeMutableRawBufferPointer(rebasing: buffer[16...]))
    do throws(Errno) { try channel.send(UnsafeRawBufferPointer(buffer), data) } catch {
      throw .system(error)
    }
    return id
  }

  /// Receives the reply to message `id`; its payload (`payload` bytes expected) is copied to scratch.
  @discardableResult
  public func receiveAck(id: UInt16, payload: Int = -1) throws(VFIOUserClientError)
    -> UnsafeRawBufferPointer
  {
    var message: ReceivedMessage
    while true {
      let result: ReceiveResult
      do throws(Errno) { result = try channel.receive() } catch { throw .system(error) }
      guard var received = result.wholeMessage() else { throw .disconnected }
      guard received.header.isCommand else {
        message = received
        break
      }
      // A DMA request the server sent before this reply (a transfer racing a
      // DMA_MAP or DMA_UNMAP): answered first, as `awaitReply` does.
      try serve(
        ClientMessage(
          header: received.header, payload: Array(received.payload), fds: received.fds.takeAll()))
    }
    guard message.header.messageID == id, message.header.isReply else {
      throw .protocolViolation("reply id \(message.header.messageID) for \(id)")
    }
    if message.header.isError {
      throw .server(
        Errno(rawValue: Int32(bitPattern: message.header.error)), command: message.header.command)
    }
    guard payload < 0 || message.payload.count == payload,
      message.payload.count <= 32 || payload < 0
    else {
      throw .protocolViolation("reply payload of \(message.payload.count) bytes")
    }
    let area = UnsafeMutableRawBufferPointer(
      rebasing: requestScratch[32..<(32 + min(32, message.payload.count))])
    area.copyMemory(from: UnsafeRawBufferPointer(rebasing: message.payload[0..<area.count]))
    return UnsafeRawBufferPointer(area)
  }
}

extension VFIOUserClient {
  /// Decodes a reply's bytes with the byte cursor; bytes too short for it are
  /// the server's protocol violation.
  static func decodeReply<T>(
    _ command: String, _ bytes: [UInt8], _ body: (inout ByteReader) throws(Errno) -> T
  ) throws(VFIOUserClientError) -> T {
    do throws(Errno) { return try ByteReader.reading(bytes, body) } catch {
      throw .protocolViolation("\(command) reply is cut short")
    }
  }
}
