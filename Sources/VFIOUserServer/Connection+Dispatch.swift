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
    let command: Command
    switch admission(of: header, descriptors: message.fds.count) {
    case .admitted(let admitted):
      command = admitted
      traceRequest(header, command, descriptors: message.fds.count)
    case .version:
      traceRequest(header, .version, descriptors: message.fds.count)
      return handleVersion(header, message.payload, fds: message.fds.takeAll())
    case .invalidType:
      logger.warning(
        "message \(header.messageID) has invalid type bits \(header.flags.type.rawValue): EINVAL"
      )
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    case .unknownCommand:
      logger.warning("unknown command \(header.command) (message \(header.messageID)): ENOSYS")
      if header.wantsReply { sendError(to: header, .noFunction) }
      return nil
    case .invalidFlags(let command):
      logger.warning(
        "\(command) id=\(header.messageID) with flags 0x\(String(header.flags.rawValue, radix: 16)) error \(header.error): only NO_REPLY may be set on a command; EINVAL"
      )
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    case .beforeVersion(let command):
      traceRequest(header, command, descriptors: message.fds.count)
      logger.warning("\(command) before VERSION: EINVAL")
      if header.wantsReply { sendError(to: header, .invalidArgument) }
      return nil
    case .unexpectedDescriptors(let command):
      // Closed unread, after the refusal, as a handler's failure is.
      traceRequest(header, command, descriptors: message.fds.count)
      refuse(header, command, .invalidArgument)
      return nil
    }
    var replyFD: FileDescriptor? = nil
    do throws(Errno) {
      let payload = message.payload
      let size: Int
      switch command {
      case .regionRead:
        guard let n = try regionRead(payload, header: header) else { return nil }  // already sent
        size = n
      case .regionWrite: size = try regionWrite(payload)
      case .regionWriteMulti: size = try regionWriteMulti(payload)
      case .dmaMap: size = try dmaMap(payload, fds: message.fds.takeAll())
      case .dmaUnmap: size = try dmaUnmap(payload)
      case .deviceGetInfo: size = try deviceInfo(payload)
      case .deviceGetRegionInfo: size = try regionInfo(payload, fd: &replyFD)
      case .deviceGetRegionIOFDs: size = try regionIOFDs(payload)
      case .deviceGetIRQInfo: size = try irqInfo(payload)
      case .deviceSetIRQs: size = try setIRQs(payload, fds: message.fds.takeAll())
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
      refuse(header, command, error)
    }
    return nil
  }

  @inline(__always)
  private func traceRequest(_ header: MessageHeader, _ command: Command, descriptors: Int) {
    if traceEnabled {
      logger.trace("<- \(command) id=\(header.messageID) size=\(header.size) fds=\(descriptors)")
    }
  }

  /// A request refused with `error`: the error reply, or for a posted one
  /// (NO_REPLY) a warning and the error recorded, since nobody else hears of it.
  private func refuse(_ header: MessageHeader, _ command: Command, _ error: Errno) {
    if header.wantsReply {
      logger.debug("\(command) id=\(header.messageID) failed: \(error.name)")
      sendError(to: header, error)
    } else {
      logger.warning("posted \(command) id=\(header.messageID) failed: \(error.name)")
      stats.counters.failed(header.command)
      stats.recordError("posted \(command) id=\(header.messageID): \(error.name)")
    }
  }

  // MARK: VERSION

  private func handleVersion(
    _ header: MessageHeader, _ payload: UnsafeRawBufferPointer,
    fds: consuming OwnedFileDescriptors
  )
    -> ConnectionEnd?
  {
    let brought = fds.count
    _ = consume fds  // VERSION takes none: closed before the reply
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
    clientCapabilityJSON = proposal.json
    writeMultipleNegotiated = caps.writeMultiple == true
    let offer = limits.offer(
      to: caps, dma: dmaLimits, sparseStream: migratable?.sparseStreamTransform != nil)
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
      let entry = try WriteMultiPayload.entry(i, in: payload)
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

  func regionInfo(_ payload: UnsafeRawBufferPointer, fd: inout FileDescriptor?) throws(Errno)
    -> Int
  {
    let request = try RegionInfoPayload(decoding: payload)
    guard payload.count == RegionInfoPayload.fixedSize else { throw .invalidArgument }
    guard request.argsz >= UInt32(RegionInfoPayload.fixedSize) else { throw .invalidArgument }
    guard Int(request.index) < regions.count else { throw .invalidArgument }
    var info = RegionInfoPayload(index: request.index)
    if let region = regions[Int(request.index)] {
      info.size = region.size
      if region.size > 0 {
        if region.readable { info.flags.insert(.read) }
        if region.writable { info.flags.insert(.write) }
      }
      // A client that takes no descriptors cannot be handed the mapping: it
      // reaches the region through REGION_READ/WRITE instead.
      if let mmap = region.mmap, region.size > 0, clientCapabilities.effectiveMaxMsgFDs > 0 {
        info.flags.insert(.mmap)
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
      info.flags.insert(.caps)
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
    if info.flags.contains(.mmap), let mmap = regions[Int(request.index)]?.mmap {
      fd = mmap.fd  // lent: sent, not closed
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
  func setIRQs(_ payload: UnsafeRawBufferPointer, fds: consuming OwnedFileDescriptors)
    throws(Errno) -> Int
  {
    let descriptorCount = fds.count
    let payload = try IRQSetPayload(decoding: payload)  // the descriptors close on a throw
    let irq =
      payload.index < UInt32(irqDescriptions.count) ? irqDescriptions[Int(payload.index)] : nil
    try backend.setIRQs(IRQSetRequest(payload, descriptors: fds, irq: irq))
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
    guard payload.flags.action == .actionTrigger else { return }
    if payload.count == 0 {
      for vector in irqVectorsWired[index].indices { irqVectorsWired[index][vector] = false }
    } else if payload.flags.dataType == .dataEventfd {
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

  /// On a connection that negotiated the sparse stream, the session's save
  /// stream in that form (one encoder per stream, kept across requests).
  /// The device's transform makes it (VERSION offered the form only to a device with one).
  private func sparse(source: any MigrationSource) -> any MigrationSource {
    guard sparseMigration, let transform = migratable?.sparseStreamTransform else { return source }
    if case .source(let wrapper as any EncodingMigrationSource)? = sparseStream,
      wrapper.inner === source
    {
      return wrapper
    }
    let wrapper = transform.encoding(source)
    sparseStream = .source(wrapper)
    return wrapper
  }

  /// The restore stream's counterpart of `sparse(source:)`.
  func sparse(sink: any MigrationSink) -> any MigrationSink {
    guard sparseMigration, let transform = migratable?.sparseStreamTransform else { return sink }
    if case .sink(let wrapper as any DecodingMigrationSink)? = sparseStream, wrapper.inner === sink
    {
      return wrapper
    }
    let wrapper = transform.decoding(into: sink)
    sparseStream = .sink(wrapper)
    return wrapper
  }

  /// Forgets the sparse form of a stream the session no longer holds (and its buffer).
  func dropStaleSparseStream() {
    switch (sparseStream, migration.stream) {
    case (.source(let wrapper as any EncodingMigrationSource)?, .source(let stream)?)
    where wrapper.inner === stream:
      return
    case (.sink(let wrapper as any DecodingMigrationSink)?, .sink(let stream)?)
    where wrapper.inner === stream:
      return
    default: sparseStream = nil
    }
  }
}
