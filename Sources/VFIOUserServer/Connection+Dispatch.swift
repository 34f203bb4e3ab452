import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

extension Connection {
  /// Handles one command. Returns non-nil when the connection must close.
  /// Each handler decodes and validates (the codec), acts on the device,
  /// and writes its reply payload in `replyArea`; errors become error replies.
  func dispatch(_ message: inout ReceivedMessage) -> ConnectionEnd? {
    let header = message.header
    guard header.hasValidType else {
      logger.warning(
        "message \(header.messageID) has invalid type bits \(header.flags & MessageHeader.typeMask): EINVAL"
      )
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    }
    guard let command = header.knownCommand else {
      logger.warning("unknown command \(header.command) (message \(header.messageID)): ENOSYS")
      if header.wantsReply { sendError(to: header, .noFunction) }
      return nil
    }
    guard header.hasOnlyCommandFlags else {
      logger.warning(
        "\(command) id=\(header.messageID) with flags 0x\(String(header.flags, radix: 16)) error \(header.error): only NO_REPLY may be set on a command; EINVAL"
      )
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    }
    if traceEnabled {
      logger.trace(
        "<- \(command) id=\(header.messageID) size=\(header.size) fds=\(message.fds.count)")
    }
    if command == .version { return handleVersion(header, message.payload, fds: &message.fds) }
    guard negotiated else {
      logger.warning("\(command) before VERSION: EINVAL")
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    }
    var replyFD: Int32 = -1
    do throws(Errno) {
      let payload = message.payload
      // Only these commands take descriptors; any sent with another are closed unread.
      if !message.fds.isEmpty, command != .dmaMap, command != .deviceSetIRQs {
        throw .invalidArgument
      }
      let size: Int
      switch command {
      case .regionRead:
        guard let n = try regionRead(payload, header: header) else { return nil }  // already sent
        size = n
      case .regionWrite: size = try regionWrite(payload)
      case .regionWriteMulti: size = try regionWriteMulti(payload)
      case .dmaMap: size = try dmaMap(payload, fds: &message.fds)
      case .dmaUnmap: size = try dmaUnmap(payload)
      case .deviceGetInfo: size = try deviceInfo(payload)
      case .deviceGetRegionInfo: size = try regionInfo(payload, fd: &replyFD)
      case .deviceGetRegionIOFDs: size = try regionIOFDs(payload)
      case .deviceGetIRQInfo: size = try irqInfo(payload)
      case .deviceSetIRQs: size = try setIRQs(payload, fds: &message.fds)
      case .deviceReset: size = try deviceReset(payload)
      case .deviceFeature: size = try deviceFeature(payload)
      case .migDataRead:
        guard let n = try migDataRead(payload, header: header) else { return nil }  // already sent
        size = n
      case .migDataWrite: size = try migDataWrite(payload)
      case .dmaRead, .dmaWrite, .version:
        throw .invalidArgument  // server-to-client commands are not valid requests
      }
      if header.wantsReply { sendReply(to: header, payloadSize: size, fd: replyFD) }
    } catch {
      if header.wantsReply {
        logger.debug("\(command) id=\(header.messageID) failed: \(error.name)")
        sendError(to: header, error)
      } else {
        logger.warning("posted \(command) id=\(header.messageID) failed: \(error.name)")
        stats.counters.failed(header.command)
        stats.recordError("posted \(command) id=\(header.messageID): \(error.name)")
      }
    }
    return nil
  }

  // MARK: VERSION

  private func handleVersion(
    _ header: MessageHeader, _ payload: UnsafeRawBufferPointer, fds: inout FDList
  )
    -> ConnectionEnd?
  {
    let brought = fds.count
    fds.closeAll()
    if negotiated {
      logger.warning("second VERSION refused: EINVAL")
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    }
    guard brought == 0 else {
      return refuseVersion(header, "VERSION with \(brought) descriptors (it takes none)")
    }
    let proposal: VersionPayload
    do throws(Errno) {
      proposal = try VersionPayload(decoding: payload)
    } catch {
      return refuseVersion(header, "malformed VERSION payload (no NUL-terminated JSON)")
    }
    guard proposal.major == 0 else {
      return refuseVersion(header, "unsupported protocol major version \(proposal.major)")
    }
    var caps = Capabilities()
    if let json = proposal.json {
      do throws(Capabilities.ParseError) {
        caps = try Capabilities.parse(json: json)
      } catch {
        return refuseVersion(header, "\(error)")
      }
    }
    if !caps.unknownKeys.isEmpty {
      logger.warning("ignoring unknown capabilities: \(caps.unknownKeys.joined(separator: ", "))")
    }
    clientCapabilities = caps
    writeMultipleNegotiated = caps.writeMultiple == true
    let offer = limits.offer(
      to: caps, dma: dmaLimits, xeStream: migratable?.streamIsXePackets == true)
    // Spoken exactly when the reply echoes it.
    sparseMigration = offer.sparseMigration != nil
    // The spec's layout, which QEMU 11.1 uses too; `--dma-layout qemu` serves QEMU builds
    // whose hw/vfio-user/protocol.h still has the `count u32, data@12` struct.
    dmaLayout = limits.dmaLayout ?? .spec
    let reply = VersionPayload(major: 0, minor: 0, json: offer.json())
    let size = reply.encodedSize
    reply.encode(into: replyArea)
    negotiated = true
    channel.maxMessageSize = limits.maxMessageSize
    if caps.effectiveMaxMsgFDs == 0, regions.contains(where: { $0?.mmap != nil }) {
      logger.notice(
        "client accepts no descriptors (max_msg_fds 0): its regions are offered without mmap, so every access is a REGION_READ/WRITE"
      )
    }
    logger.info(
      "client negotiated protocol 0.\(proposal.minor) → 0.0: max_msg_fds=\(caps.effectiveMaxMsgFDs) max_data_xfer_size=\(caps.effectiveMaxDataXferSize) write_multiple=\(writeMultipleNegotiated) sparse_migration=\(sparseMigration) dma_layout=\(dmaLayout)"
    )
    stats.update { $0.client?.negotiated = true }
    sendReply(to: header, payloadSize: size)
    return nil
  }

  private func refuseVersion(_ header: MessageHeader, _ why: String) -> ConnectionEnd {
    logger.error("VERSION refused, closing: \(why)")
    stats.recordError("VERSION refused: \(why)")
    if header.wantsReply { sendError(to: header, .invalidArgument) }
    return .protocolError(why)
  }

  // MARK: Regions

  /// Checks an access against the region description: index, bounds, width, permission.
  @inline(__always)
  private func checkAccess(region: UInt32, offset: UInt64, count: UInt32, write: Bool) throws(Errno)
  {
    guard count > 0 else { throw .invalidArgument }
    guard count <= limits.maxDataXferSize else { throw .argListTooLong }
    guard Int(region) < regions.count, let description = regions[Int(region)] else {
      throw .invalidArgument
    }
    guard write ? description.writable : description.readable else { throw .invalidArgument }
    let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
    guard !overflow, end <= description.size else { throw .invalidArgument }
  }

  func regionRead(_ payload: UnsafeRawBufferPointer, header: MessageHeader) throws(Errno) -> Int? {
    guard payload.count == RegionAccessHeader.size else { throw .invalidArgument }
    let access = try RegionAccessHeader(decoding: payload)
    try checkAccess(region: access.region, offset: access.offset, count: access.count, write: false)
    if awaitingEnable {
      noteAccessAwaitingEnable(region: access.region, offset: access.offset, write: false)
    }
    let out = replyArea
    access.encode(into: out)
    let count = Int(access.count)
    if count >= Self.directReadThreshold, header.wantsReply,
      let memory = backend.directRead(region: access.region, offset: access.offset, count: count)
    {
      // Large reads of plain memory leave straight from it: no copy into the reply buffer.
      sendReply(to: header, payloadSize: RegionAccessHeader.size, extra: memory)
      return nil
    }
    try backend.read(
      region: access.region, offset: access.offset,
      into: UnsafeMutableRawBufferPointer(
        rebasing: out[RegionAccessHeader.size..<(RegionAccessHeader.size + count)]))
    return RegionAccessHeader.size + count
  }

  func regionWrite(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let access = try RegionAccessHeader(decoding: payload)
    guard payload.count - RegionAccessHeader.size == Int(access.count) else {
      throw .invalidArgument
    }
    try checkAccess(region: access.region, offset: access.offset, count: access.count, write: true)
    let data = UnsafeRawBufferPointer(rebasing: payload[RegionAccessHeader.size...])
    if awaitingEnable {
      noteAccessAwaitingEnable(region: access.region, offset: access.offset, write: true)
    }
    try backend.write(region: access.region, offset: access.offset, from: data)
    if access.region == VFIOPCIRegion.config { noteConfigWrite(offset: access.offset, data) }
    access.encode(into: replyArea)
    return RegionAccessHeader.size
  }

  func regionWriteMulti(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    guard writeMultipleNegotiated else { throw .notSupported }
    let count = try WriteMultiPayload.validate(payload)
    // Writes apply in order; the first failure stops the batch and is reported.
    for i in 0..<count {
      let entry = WriteMultiPayload.entry(i, in: payload)
      try checkAccess(region: entry.region, offset: entry.offset, count: entry.count, write: true)
      if awaitingEnable {
        noteAccessAwaitingEnable(region: entry.region, offset: entry.offset, write: true)
      }
      try entry.withData { data throws(Errno) in
        try backend.write(region: entry.region, offset: entry.offset, from: data)
        if entry.region == VFIOPCIRegion.config { noteConfigWrite(offset: entry.offset, data) }
      }
    }
    WriteMultiReply(wrCnt: UInt64(count)).encode(into: replyArea)
    return WriteMultiReply.size
  }

  func regionInfo(_ payload: UnsafeRawBufferPointer, fd: inout Int32) throws(Errno) -> Int {
    let request = try RegionInfoPayload(decoding: payload)
    guard payload.count == RegionInfoPayload.fixedSize else { throw .invalidArgument }
    guard request.argsz >= UInt32(RegionInfoPayload.fixedSize) else { throw .invalidArgument }
    guard Int(request.index) < regions.count else { throw .invalidArgument }
    var info = RegionInfoPayload(index: request.index)
    if let region = regions[Int(request.index)] {
      info.size = region.size
      if region.size > 0 {
        if region.readable { info.flags |= VFIORegionFlags.read }
        if region.writable { info.flags |= VFIORegionFlags.write }
      }
      // A client that takes no descriptors cannot be handed the mapping: it
      // reaches the region through REGION_READ/WRITE instead.
      if let mmap = region.mmap, region.size > 0, clientCapabilities.effectiveMaxMsgFDs > 0 {
        info.flags |= VFIORegionFlags.mmap
        info.offset = mmap.offset
        if !region.sparseAreas.isEmpty { info.capabilities.append(.sparseMmap(region.sparseAreas)) }
        if region.msixMappable { info.capabilities.append(.msixMappable) }
      }
      if let type = region.type {
        info.capabilities.append(.type(type: type.type, subtype: type.subtype))
      }
    }
    let full = info.fullSize
    info.argsz = UInt32(full)
    if !info.capabilities.isEmpty {
      info.flags |= VFIORegionFlags.caps
      // QEMU checks cap_offset lies within argsz even in a short reply, then asks again.
      info.capOffset = UInt32(RegionInfoPayload.fixedSize)
    }
    let out = replyArea
    if Int(request.argsz) < full {
      var short = info
      short.capabilities = []
      short.encode(into: out)
      return RegionInfoPayload.fixedSize
    }
    info.encode(into: out)
    if info.flags & VFIORegionFlags.mmap != 0, let mmap = regions[Int(request.index)]?.mmap {
      fd = mmap.fd.rawValue  // lent: sent, not closed
    }
    return full
  }

  func regionIOFDs(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    guard payload.count == RegionIOFDsPayload.fixedSize else { throw .invalidArgument }
    let request = try RegionIOFDsPayload(decoding: payload)
    guard request.argsz >= UInt32(RegionIOFDsPayload.fixedSize), request.flags == 0,
      request.count == 0,
      Int(request.index) < regions.count
    else { throw .invalidArgument }
    // No sub-region of this device is served by an ioeventfd: the empty set.
    RegionIOFDsPayload(argsz: 16, index: request.index).encode(
      into: replyArea)
    return RegionIOFDsPayload.fixedSize
  }

  // MARK: Device and IRQs

  func deviceInfo(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let request = try DeviceInfoPayload(decoding: payload)
    guard request.argsz >= UInt32(DeviceInfoPayload.size) else { throw .invalidArgument }
    DeviceInfoPayload(
      argsz: UInt32(DeviceInfoPayload.size), flags: backend.deviceFlags,
      numRegions: backend.regionCount,
      numIRQs: backend.irqCount
    ).encode(into: replyArea)
    return DeviceInfoPayload.size
  }

  func irqInfo(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let request = try IRQInfoPayload(decoding: payload)
    guard request.argsz >= UInt32(IRQInfoPayload.size), request.index < backend.irqCount else {
      throw .invalidArgument
    }
    let description = irqDescriptions[Int(request.index)]
    IRQInfoPayload(
      argsz: UInt32(IRQInfoPayload.size), flags: description.flags, index: request.index,
      count: description.count
    ).encode(into: replyArea)
    return IRQInfoPayload.size
  }

  /// DEVICE_SET_IRQS: decoded, checked against the index it names, and handed
  /// to the device with its eventfds (which the device keeps or lets go).
  func setIRQs(_ payload: UnsafeRawBufferPointer, fds: inout FDList) throws(Errno) -> Int {
    let descriptors = OwnedFileDescriptors(
      taking: fds.take().map { FileDescriptor(rawValue: $0) })
    let descriptorCount = descriptors.count
    let payload = try IRQSetPayload(decoding: payload)  // the descriptors close on a throw
    let irq =
      payload.index < UInt32(irqDescriptions.count) ? irqDescriptions[Int(payload.index)] : nil
    try backend.setIRQs(IRQSetRequest(payload, descriptors: descriptors, irq: irq))
    // Checked by IRQSetRequest: the index exists. A disable (count 0) undoes the rest.
    irqIndexesSet[Int(payload.index)] = payload.count > 0
    noteWiring(payload, eventFDs: descriptorCount)
    let wired = irqVectorsWired.map { $0.count { $0 } }
    stats.update {
      $0.irqFDs = backend.eventFDCount
      $0.irqVectorsWired = wired
    }
    return 0
  }

  /// What a SET_IRQS the device accepted did to the wiring: TRIGGER with
  /// eventfds wires its vectors, without any unwires them, a disable (count 0)
  /// unwires the index; masks and the other data types leave it alone.
  private func noteWiring(_ payload: IRQSetPayload, eventFDs: Int) {
    let index = Int(payload.index)
    guard payload.action == VFIOIRQSetFlags.actionTrigger else { return }
    if payload.count == 0 {
      for vector in irqVectorsWired[index].indices { irqVectorsWired[index][vector] = false }
    } else if payload.dataType == VFIOIRQSetFlags.dataEventfd {
      for vector in Int(payload.start)..<Int(payload.start + payload.count) {
        irqVectorsWired[index][vector] = eventFDs > 0
      }
    }
  }

  func deviceReset(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    guard payload.isEmpty else { throw .invalidArgument }
    abortDMAJobs()
    deferred = []
    let before = migratable != nil ? deviceMigrationState() : nil
    defer { recordMigrationState() }
    try backend.reset()
    migration.deviceWasReset()
    noteReset(.clientRequest)
    dropStaleSparseStream()
    if let before, before != .running {
      logger.info("device reset (migration state \(before) → RUNNING, stream invalidated)")
    } else {
      logger.info("device reset")
    }
    return 0
  }

  // MARK: Features and migration data

  /// VFIO_USER_DEVICE_FEATURE with the kernel's `vfio_ioctl_device_feature` rules.
  func deviceFeature(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let request = try DeviceFeaturePayload(decoding: payload)
    let get = request.flags & VFIODeviceFeatureFlags.get != 0
    let set = request.flags & VFIODeviceFeatureFlags.set != 0
    let probe = request.flags & VFIODeviceFeatureFlags.probe != 0
    // Features this device has, and the methods each takes.
    let methods: (get: Bool, set: Bool)
    switch request.feature {
    case VFIODeviceFeature.migration where migratable != nil: methods = (true, false)
    case VFIODeviceFeature.migDeviceState where migratable != nil: methods = (true, true)
    case VFIODeviceFeature.migDataSize where migratable != nil: methods = (true, false)
    case VFIODeviceFeature.dmaLoggingStart where dmaLoggingDevice != nil,
      VFIODeviceFeature.dmaLoggingStop where dmaLoggingDevice != nil:
      methods = (false, true)
    case VFIODeviceFeature.dmaLoggingReport where dmaLoggingDevice != nil: methods = (true, false)
    default:
      // No migration ops, no DMA logging, or a feature nobody has: ENOTTY, as the kernel answers.
      throw .inappropriateIOCTLForDevice
    }
    // vfio_check_feature
    if get && !methods.get { throw .invalidArgument }
    if set && !methods.set { throw .invalidArgument }
    let out = replyArea
    if probe {
      request.encode(into: out)
      return request.encodedSize
    }
    guard get || set else { throw .invalidArgument }
    if let dmaLoggingDevice,
      [
        VFIODeviceFeature.dmaLoggingStart, VFIODeviceFeature.dmaLoggingStop,
        VFIODeviceFeature.dmaLoggingReport,
      ].contains(request.feature)
    {
      return try dmaLoggingFeature(request, logging: dmaLoggingDevice)
    }
    let minimum = 8  // every one of these features carries 8 bytes
    guard Int(request.argsz) - DeviceFeaturePayload.fixedSize >= minimum else {
      throw .invalidArgument
    }
    if set { guard request.data.count >= minimum else { throw .invalidArgument } }

    let data: [UInt8]
    switch request.feature {
    case VFIODeviceFeature.migration:
      data = MigrationFeatureData(flags: migratable!.migrationFlags).encoded()
    case VFIODeviceFeature.migDataSize:
      data = MigDataSizeData(stopCopyLength: try migratable!.stopCopySize()).encoded()
    default:  // MIG_DEVICE_STATE
      if set {
        let asked = try MigDeviceStateData(decoding: request.data)
        guard let target = asked.state else { throw .invalidArgument }
        let from = try migratable!.migrationState
        defer {
          dropStaleSparseStream()
          recordMigrationState()
        }
        do throws(Errno) {
          let dropped = try migration.set(target, on: migratable!)
          logger.info(
            "migration state \(from) → \(target)\(dropped > 0 ? " (\(dropped) unread bytes of the save dropped)" : "")"
          )
        } catch {
          let at = deviceMigrationState().map { "\($0)" } ?? "an unknown state"
          logger.warning("migration \(from) → \(target) failed at \(at): \(error.name)")
          throw error
        }
        // The reply echoes the request; vfio-user's data_fd is unused (-1).
        request.encode(into: out)
        return request.encodedSize
      }
      // GET asks the device: its state has no other copy.
      data = MigDeviceStateData(state: try migratable!.migrationState).encoded()
    }
    let reply = DeviceFeaturePayload(
      argsz: UInt32(DeviceFeaturePayload.fixedSize + data.count), flags: request.flags, data: data)
    reply.encode(into: out)
    return reply.encodedSize
  }

  /// MIG_DATA_READ: valid in STOP_COPY (and PRE_COPY); a short reply ends the stream.
  /// Bytes of VRAM the device offers in place (`MigrationSource.read(gathering:)`)
  /// leave straight from it, after what was copied: no copy into the reply buffer.
  /// Returns nil when the reply was sent that way.
  func migDataRead(_ payload: UnsafeRawBufferPointer, header: MessageHeader) throws(Errno) -> Int? {
    guard payload.count == MigDataHeader.size else { throw .invalidArgument }
    let request = try MigDataHeader(decoding: payload)
    guard request.size <= limits.maxDataXferSize,
      UInt64(request.argsz) >= UInt64(MigDataHeader.size) + UInt64(request.size)
    else { throw .invalidArgument }
    guard migratable != nil else { throw .invalidArgument }
    let source = try sparse(source: migration.source())
    let out = replyArea
    // Filled from as many (bounded) reads as it takes, so a short reply means the end;
    // MigrationSession.fill says how a hang-up is still noticed meanwhile.
    let (n, span) = try MigrationSession.gather(
      UnsafeMutableRawBufferPointer(
        rebasing: out[MigDataHeader.size..<(MigDataHeader.size + Int(request.size))]),
      from: source, while: { !channel.peerHasHungUp })
    let total = n + (span?.count ?? 0)
    stats.counters.migrationRead(total)
    MigDataHeader(argsz: UInt32(MigDataHeader.size + total), size: UInt32(total)).encode(into: out)
    if let span, header.wantsReply {
      sendReply(to: header, payloadSize: MigDataHeader.size + n, extra: span)
      return nil
    }
    return MigDataHeader.size + n
  }

  /// MIG_DATA_WRITE: valid in RESUMING; every byte is handed over (partial writes retried).
  /// Large ones with data for VRAM are taken in place instead (`migDataWriteInPlace`).
  func migDataWrite(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let sink = try migDataWriteSink(head: payload, payloadSize: payload.count)
    try Self.writeAll(UnsafeRawBufferPointer(rebasing: payload[MigDataHeader.size...]), to: sink)
    stats.counters.migrationWritten(payload.count - MigDataHeader.size)
    return 0
  }

  /// On a connection that negotiated the sparse stream, the session's save
  /// stream in that form (one encoder per stream, kept across requests).
  private func sparse(source: any MigrationSource) -> any MigrationSource {
    guard sparseMigration else { return source }
    if case .source(let wrapper as SparseMigrationSource)? = sparseStream, wrapper.inner === source
    {
      return wrapper
    }
    let wrapper = SparseMigrationSource(source)
    sparseStream = .source(wrapper)
    return wrapper
  }

  /// The restore stream's counterpart of `sparse(source:)`.
  func sparse(sink: any MigrationSink) -> any MigrationSink {
    guard sparseMigration else { return sink }
    if case .sink(let wrapper as SparseMigrationSink)? = sparseStream, wrapper.inner === sink {
      return wrapper
    }
    let wrapper = SparseMigrationSink(sink)
    sparseStream = .sink(wrapper)
    return wrapper
  }

  /// Forgets the sparse form of a stream the session no longer holds (and its buffer).
  func dropStaleSparseStream() {
    switch (sparseStream, migration.stream) {
    case (.source(let wrapper as SparseMigrationSource)?, .source(let stream)?)
    where wrapper.inner === stream:
      return
    case (.sink(let wrapper as SparseMigrationSink)?, .sink(let stream)?)
    where wrapper.inner === stream:
      return
    default: sparseStream = nil
    }
  }

  // MARK: DMA windows

  /// DMA_MAP: checked (alignment, room, overlap, the device's IOVA ranges),
  /// mapped, added, then the device is told, with the client's descriptor,
  /// which becomes the device's. A refusal removes the window again.
  func dmaMap(_ payload: UnsafeRawBufferPointer, fds: inout FDList) throws(Errno) -> Int {
    // At most one descriptor; every other path closes what came.
    let request: DMAMapRequest
    do throws(Errno) {
      request = try DMAMapRequest(decoding: payload)
      guard fds.count <= 1 else { throw .invalidArgument }
      if !fds.isEmpty { try checkDMAFile(FileDescriptor(rawValue: fds[0]), for: request) }
    } catch {
      fds.closeAll()
      throw error
    }
    // Owned here until the device takes it; closed on any path that throws first.
    let lent: FileDescriptor? = fds.isEmpty ? nil : FileDescriptor(rawValue: fds[0])
    fds = FDList()
    var file: OwnedFileDescriptor? = nil
    if let lent { file = OwnedFileDescriptor(taking: lent) }
    let entry: DMATable.Entry
    do throws(Errno) {
      entry = try dma.prepare(request, file: lent)
    } catch {
      if error == .outOfRange {
        logger.warning(
          "DMA_MAP [0x\(String(request.address, radix: 16)), +0x\(String(request.size, radix: 16))) refused (ERANGE): outside the IOVA ranges the device can reach"
        )
      }
      throw error
    }
    if let backing = entry.backing, !backing.mayShrink {
      logger.debug(
        "DMA_MAP [0x\(String(request.address, radix: 16)), +0x\(String(request.size, radix: 16))): the file is sealed against shrinking (F_SEAL_SHRINK), so copies through it need no SIGBUS guard"
      )
    }
    try dma.insert(entry)
    let window = entry.window
    do throws(Errno) {
      try backend.dmaMap(window, file: file)
    } catch {
      dma.remove(inside: window.address, size: window.size)
      throw error
    }
    stats.counters.dmaMapped()
    dmaBytes += window.size
    let (count, bytes) = (dma.count, dmaBytes)
    stats.update {
      $0.dmaRegions = count
      $0.dmaBytes = bytes
    }
    return 0
  }

  /// A DMA window's file must be memory the server can map: a regular file
  /// (EBADF for a socket, pipe, eventfd, directory or device) that reaches
  /// the window's end (EINVAL: touching a mapping past the end of its file
  /// would kill the server with SIGBUS).
  private func checkDMAFile(_ fd: FileDescriptor, for request: DMAMapRequest) throws(Errno) {
    let kind = try DescriptorKind(of: fd)
    guard case .regularFile(let size) = kind else {
      logger.warning(
        "DMA_MAP with a descriptor that is not a memory file (\(kind)): EBADF")
      throw .badFileDescriptor
    }
    guard request.offset <= UInt64(size), UInt64(size) - request.offset >= request.size else {
      logger.warning(
        "DMA_MAP of 0x\(String(request.size, radix: 16)) bytes at file offset 0x\(String(request.offset, radix: 16)) beyond the end of a file of 0x\(String(size, radix: 16)) bytes: EINVAL"
      )
      throw .invalidArgument
    }
  }

  /// Removes the windows inside the range (the kernel's type1v2 rules, see
  /// `DMATable.windows(inside:size:)`), or every window with UNMAP_ALL. The
  /// device is told first and may refuse, all or nothing: then the reply is
  /// its errno and no window is removed (a range over many windows included).
  /// Otherwise transfers in flight to the windows are cancelled and their
  /// memory released before the reply, which echoes the request.
  func dmaUnmap(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let request = try DMAUnmapPayload(decoding: payload)
    let all = request.flags & VFIODMAUnmapFlags.all != 0
    let windows: [DMAWindow]
    if all {
      windows = dma.windows
    } else {
      do throws(Errno) {
        windows = try dma.windows(inside: request.address, size: request.size)
      } catch {
        // The client believes this memory is no longer the device's; it still is.
        logger.warning(
          "DMA_UNMAP \(range(request)) refused (\(error.name)): it cuts through a window or is not page-aligned; nothing removed"
        )
        throw error
      }
    }
    if !windows.isEmpty {
      do throws(Errno) {
        try backend.dmaUnmap(windows)
      } catch {
        logger.warning(
          "DMA_UNMAP \(all ? "all" : range(request)) refused by the device (\(error.name)): none of its \(windows.count) windows removed"
        )
        throw error
      }
    }
    if all {
      abortDMAJobs()
      dma.removeAll()
    } else {
      for window in windows { abortDMAJobs(touching: window) }
      dma.remove(inside: request.address, size: request.size)
    }
    if traceEnabled {
      logger.trace(
        "DMA_UNMAP \(all ? "all" : range(request)): \(windows.count) windows removed")
    }
    stats.counters.dmaUnmapped()
    dmaBytes = all ? 0 : dmaBytes - windows.reduce(0) { $0 + $1.size }
    let (count, bytes) = (dma.count, dmaBytes)
    stats.update {
      $0.dmaRegions = count
      $0.dmaBytes = bytes
    }
    request.encode(into: replyArea)
    return DMAUnmapPayload.size
  }

  /// The range with its last byte: it may end at 2^64.
  private func range(_ request: DMAUnmapPayload) -> String {
    "[0x\(String(request.address, radix: 16)), 0x\(String(request.address + (request.size - 1), radix: 16))]"
  }
}
