import LiveUpdate
import Logging
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

/// The connection's part of a live update (protocol/live-update.md, the
/// `connection` section): what VERSION negotiated, the DMA windows with
/// their files, the interrupt bookkeeping, dirty logging, and the framer's
/// buffered bytes and descriptors. Exported on the connection thread between
/// two messages; imported into a connection that has not run yet.
extension Connection {
  /// Why this connection cannot be handed over now, or nil.
  var handoverRefusal: String? {
    if migration.stream != nil {
      return
        "a migration stream is open (the device is mid-save or mid-restore): finish or cancel the migration first"
    }
    if !outstanding.isEmpty {
      return
        "the device waits on \(outstanding.count) DMA transfers through the client (DMA_READ/DMA_WRITE): try again"
    }
    if !channel.framer.isAtMessageBoundary {
      return "the connection is inside a message being placed in parts: try again"
    }
    guard let device = backend as? HandoverCapable else {
      return "this device's backend cannot be handed to a new process"
    }
    return device.handoverRefusal
  }

  func exportHandover(into out: inout HandoverEncoder) {
    guard case .socket(let socket) = channel.transport else {
      preconditionFailure("only a socket connection is handed over")
    }
    out.descriptor(socket)
    out.bool(negotiated)
    out.optional(clientCapabilityJSON) { $0.string($1) }
    out.string(dmaLayout.rawValue)
    out.bool(writeMultipleNegotiated)
    out.bool(sparseMigration)
    let tracking = stats.events.enableTracking
    out.bool(tracking.awaiting)
    out.bool(tracking.enabled)
    out.int(irqIndexesSet.count)
    for set in irqIndexesSet { out.bool(set) }
    out.int(irqVectorsWired.count)
    for vectors in irqVectorsWired {
      out.int(vectors.count)
      for wired in vectors { out.bool(wired) }
    }
    out.u16(nextRequestID)
    dma.exportHandover(into: &out)
    out.optional(dmaLogging) { out, session in
      out.u64(session.pageSize)
      out.int(session.ranges.count)
      for range in session.ranges {
        out.u64(range.iova)
        out.u64(range.length)
      }
    }
    out.bytes(Array(channel.framer.bufferedBytes))
    let held = channel.framer.heldDescriptors
    out.int(held.descriptors.count)
    for fd in held.descriptors { out.descriptor(fd) }
    out.int(held.chunkEnd)
  }

  /// A connection rebuilt from the `connection` section, over the socket it
  /// names, serving `backend` (imported already). Not running yet.
  static func importHandover(
    _ input: inout HandoverDecoder, descriptors: inout OwnedFileDescriptors,
    backend: any VFIODeviceBackend, limits: ServerLimits, logger: Logger, stats: ServerStatistics
  ) throws(HandoverRefusal) -> Connection {
    let socketIndex = try input.descriptor(count: descriptors.count)
    guard let socket = descriptors.take(socketIndex) else { throw input.corrupt() }
    let channel = MessageChannel(socket: socket, capacity: receiveCapacity(limits))
    let connection = Connection(
      channel: channel, backend: backend, limits: limits, logger: logger, stats: stats)
    try connection.importState(&input, descriptors: &descriptors)
    return connection
  }

  private func importState(_ input: inout HandoverDecoder, descriptors: inout OwnedFileDescriptors)
    throws(HandoverRefusal)
  {
    negotiated = try input.bool()
    clientCapabilityJSON = try input.optional { input throws(HandoverRefusal) in
      try input.string()
    }
    if let json = clientCapabilityJSON {
      do throws(Capabilities.ParseError) {
        clientCapabilities = try Capabilities.parse(json: json)
      } catch {
        throw HandoverRefusal("the client's capabilities do not parse here: \(error)")
      }
    }
    guard let layout = DMATransferLayout(rawValue: try input.string()) else {
      throw input.corrupt()
    }
    dmaLayout = layout
    writeMultipleNegotiated = try input.bool()
    sparseMigration = try input.bool()
    if sparseMigration, migratable?.sparseStreamTransform == nil {
      throw HandoverRefusal("the client negotiated the sparse stream, which this device lacks")
    }
    let awaiting = try input.bool()
    let enabled = try input.bool()
    // Where the enable check stands: `run()` reads it back.
    stats.events.restoreEnableTracking(enabled: enabled, awaiting: awaiting)
    guard try input.int() == irqIndexesSet.count else {
      throw HandoverRefusal("the device has a different number of interrupt indexes here")
    }
    for i in irqIndexesSet.indices { irqIndexesSet[i] = try input.bool() }
    guard try input.int() == irqVectorsWired.count else { throw input.corrupt() }
    for i in irqVectorsWired.indices {
      guard try input.int() == irqVectorsWired[i].count else {
        throw HandoverRefusal("interrupt index \(i) has a different number of vectors here")
      }
      for v in irqVectorsWired[i].indices { irqVectorsWired[i][v] = try input.bool() }
    }
    nextRequestID = try input.u16()
    try dma.importHandover(from: &input, descriptors: &descriptors)
    dmaBytes = dma.windows.reduce(0) { $0 + $1.size }
    dmaLogging = try input.optional { input throws(HandoverRefusal) in
      let pageSize = try input.u64()
      var ranges: [DMALoggingRange] = []
      for _ in 0..<(try input.count(itemBytes: 16)) {
        ranges.append(DMALoggingRange(iova: try input.u64(), length: try input.u64()))
      }
      return DMALoggingSession(pageSize: pageSize, ranges: ranges)
    }
    if dmaLogging != nil, dmaLoggingDevice == nil { throw input.corrupt() }
    let buffered = try input.bytes()
    var held = OwnedFileDescriptors()
    for _ in 0..<(try input.count(itemBytes: 4)) {
      let index = try input.descriptor(count: descriptors.count)
      guard let fd = descriptors.take(index) else { throw input.corrupt() }
      held.append(fd)
    }
    let chunkEnd = try input.int()
    try input.finish()
    if negotiated { channel.maxMessageSize = limits.maxMessageSize }
    do throws(Errno) {
      try channel.adopt(buffered: buffered, held: held, chunkEnd: chunkEnd)
    } catch {
      throw HandoverRefusal("the connection's buffered bytes do not fit this server's buffer")
    }
  }
}
