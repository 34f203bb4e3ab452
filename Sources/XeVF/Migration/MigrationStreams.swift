import SystemPackage
import VFIODevice
import VFIOUser
import XeStream

/// The save `data_fd` of STOP_COPY: reads the PF's packet stream
/// (`xe_sriov_pf_migration_read`). Used on the device's thread only.
///
/// Reads return fewer bytes than asked only at the end of the stream. Each
/// waits at most `PFTiming.stream` for the PF's workers (ETIMEDOUT).
final class XeSaveStream: MigrationSource {
  private let pf: SimulatedPF
  /// Keeps VRAM mapped while the stream lives; its bytes are copied out as
  /// read, holes as zeros.
  private var vram: VRAMReader?
  let id: Int
  private var closed = false

  init(pf: SimulatedPF, memory: DeviceMemory?, id: Int) {
    self.pf = pf
    vram = memory.map(VRAMReader.init)
    self.id = id
  }

  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    guard !closed else { throw .badFileDescriptor }
    return try pf.read(into: buffer, stream: id, vram: vram)
  }

  /// VRAM payload bytes that complete `buffer` come back as a span of the
  /// mapped VRAM (kept mapped until `close`) or of `ZeroMemory`, not copied.
  func read(gathering buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> (
    count: Int, span: UnsafeRawBufferPointer?
  ) {
    guard !closed else { throw .badFileDescriptor }
    var span: UnsafeRawBufferPointer?
    let n = try pf.read(into: buffer, stream: id, vram: vram, span: &span)
    return (n, span)
  }

  /// The kernel opens the save file O_RDONLY: a write is EBADF. (Through
  /// `MigrationSource` there is no write at all; this is for a caller that
  /// holds the stream itself.)
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int { throw .badFileDescriptor }

  /// Releases the file. The PF's side ended at STOP_COPY → STOP or at the
  /// reset (`SimulatedPF.closeStream`), as the kernel disables the file there.
  func close() {
    closed = true
    vram = nil
  }
}

/// The restore `data_fd` of RESUMING (`xe_sriov_pf_migration_write`): takes
/// bytes in any segmentation, assembles packets and hands each complete one
/// to the PF. VRAM payloads go straight into VRAM as they arrive, so nothing
/// VRAM-sized is ever buffered; other payloads are buffered per packet.
///
/// After an error the stream refuses everything with that error: the packet
/// that failed is gone and the stream cannot be resynchronised.
///
/// The stream knows its own framing, so it can say at RESUMING → STOP what is
/// missing (`missing`) without waiting for the PF to time out on it.
final class XeRestoreStream: MigrationSink {
  /// Largest non-VRAM payload accepted (the kernel's kvzalloc would fail):
  /// comfortably above the 8 MiB GuC limit and a GGTT of 32 GiB.
  static let maxBufferedPayload: UInt64 = 64 << 20

  private let pf: SimulatedPF
  private let memory: DeviceMemory?
  let id: Int

  private var headerBytes: [UInt8] = []
  private var header: XePacketHeader?
  private var payload: [UInt8] = []
  private var received: UInt64 = 0
  /// This VRAM packet's bytes are written to VRAM (else dropped: the worker rejects it).
  private var intoVRAM = false
  /// The bytes `write` takes are already in VRAM (`placed`): not copied again.
  private var alreadyPlaced = false
  /// A complete packet the PF had no room for when the last write gave up waiting.
  private var unproduced: PFPacket?
  private var error: Errno?
  /// The packet (counting from 1) that `error` refused.
  private var refused = 0
  private var closed = false
  /// Bytes taken, and packets assembled completely (handed to the PF or
  /// `unproduced`): the one assembling is packet `assembled + 1`.
  private var taken: UInt64 = 0
  private var assembled = 0
  /// The PF took the TRAILER: the stream is complete.
  private(set) var trailerReceived = false
  private var missingAtClose: String?
  /// Bytes were written after the trailer (and refused).
  private var followingTrailer = false
  /// The packet types each GT's stream held, and the VRAM the VRAM packets
  /// covered (offset, size), so that a trailer after a stream with a packet
  /// dropped, or another VRAM size's, is not taken as a whole state.
  private var typesSeen: [Set<UInt8>]
  private var vramCovered: [(offset: UInt64, size: UInt64)] = []

  init(pf: SimulatedPF, memory: DeviceMemory?, id: Int) {
    self.pf = pf
    self.memory = memory
    self.id = id
    typesSeen = Array(repeating: [], count: pf.gtCount)
  }

  /// The kernel opens the restore file O_WRONLY: a read is EBADF (see `XeSaveStream.write`).
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    throw .badFileDescriptor
  }

  /// Releases the file, as `XeSaveStream.close`; a packet still assembling is
  /// dropped (what it lacked is kept for `missing`).
  func close() {
    if !closed { missingAtClose = missing }
    closed = true
    headerBytes = []
    payload = []
    header = nil
    unproduced = nil
  }

  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    guard !closed else { throw .badFileDescriptor }
    try pf.locked { () throws(Errno) in try pf.check(stream: id) }
    if let error { throw error }
    if let packet = unproduced {
      try produce(packet)  // ETIMEDOUT again: nothing of `bytes` was taken
      unproduced = nil
    }
    var at = 0
    defer { taken += UInt64(at) }
    while at < bytes.count {
      if header == nil {
        if trailerReceived {
          // The trailer ends a device's state: anything after it is a
          // stream spliced or corrupted, not one the PF may complete with.
          followingTrailer = true
          try fail(packet: assembled + 1) { () throws(Errno) in throw .invalidArgument }
        }
        let take = min(XePacketHeader.size - headerBytes.count, bytes.count - at)
        headerBytes += UnsafeRawBufferPointer(rebasing: bytes[at..<at + take])
        at += take
        if headerBytes.count == XePacketHeader.size {
          try fail(packet: assembled + 1) { () throws(Errno) in try begin() }
        }
      } else {
        at += take(UnsafeRawBufferPointer(rebasing: bytes[at...]))
      }
      guard let header, received == header.size else { continue }
      if try !complete(header) { return at }
    }
    return bytes.count
  }

  /// The current packet has all its bytes: hands it to the PF. Returns false
  /// when the PF had no room (the packet is `unproduced`, handed over by the
  /// next write).
  private func complete(_ header: XePacketHeader) throws(Errno) -> Bool {
    let packet = PFPacket(header, header.type == .vram ? .vram : .bytes(payload))
    self.header = nil
    headerBytes = []
    payload = []
    assembled += 1
    do throws(Errno) {
      try produce(packet)
    } catch let error where error == .timedOut {
      unproduced = packet  // accepted; handed over by the next write
      return false
    }
    return true
  }

  /// Zero bytes of the stream (a zero run of the sparse form): inside a VRAM
  /// packet they zero VRAM without being copied (`DeviceMemory.zero`: whole
  /// pages become holes of the memfd), and the PF sees the packet as if its
  /// bytes had come; anywhere else they are written as bytes.
  func writeZeros(_ count: Int) throws(Errno) -> Int {
    guard let header, header.type == .vram, count > 0, !closed, error == nil,
      unproduced == nil
    else {
      return try writeZerosAsBytes(count)
    }
    try pf.locked { () throws(Errno) in try pf.check(stream: id) }
    let n = Int(min(UInt64(count), header.size - received))
    if intoVRAM, let memory { zeroVRAM(memory, header, from: received, count: UInt64(n)) }
    received += UInt64(n)
    taken += UInt64(n)
    if received == header.size { _ = try complete(header) }
    return n
  }

  /// VRAM of the current packet known to be zero, as VRAM offsets: the
  /// first zero run of a packet punches every whole page from there to the
  /// packet's end out of the memfd at once (one call, where a punch per run
  /// would cost a TLB flush each), and later runs find their pages zero. Data
  /// written meanwhile only ever lands before the next run: the stream moves forward.
  private var knownZero: Range<UInt64>?

  private func zeroVRAM(
    _ memory: DeviceMemory, _ header: XePacketHeader, from position: UInt64, count: UInt64
  ) {
    let start = header.offset + position
    if knownZero == nil || !(knownZero!.contains(start) || knownZero!.lowerBound > start) {
      knownZero = memory.punchPages(from: start, to: header.offset + header.size)
    }
    let zero = knownZero ?? start..<start
    // Only what lies outside the punched pages is memset: a partial page at either end.
    let head = min(start + count, max(start, zero.lowerBound))
    if head > start { memory.zero(offset: start, length: head - start) }
    let tail = max(head, min(start + count, zero.upperBound))
    if start + count > tail { memory.zero(offset: tail, length: start + count - tail) }
  }

  /// Inside the payload of a VRAM packet the PF accepts, with the stream in
  /// good standing: the VRAM the next bytes belong in, where `write` would
  /// copy them. Elsewhere (a packet header, a payload that is buffered, an
  /// error to report) the bytes go through `write`, up to where VRAM may
  /// begin again.
  func placement(ofNext count: Int) -> MigrationPlacement {
    guard let header else {
      return .write(max(1, min(count, XePacketHeader.size - headerBytes.count)))
    }
    let rest = Int(clamping: header.size - received)
    guard header.type == .vram, intoVRAM, let memory, !closed, error == nil, unproduced == nil,
      (try? pf.locked({ () throws(Errno) in try pf.check(stream: id) })) != nil
    else { return .write(max(1, min(count, rest))) }
    return .memory(
      memory.buffer(offset: header.offset + received, length: UInt64(min(count, rest))))
  }

  /// The `count` bytes `placement` offered are in VRAM: `write` takes them
  /// from there without copying them onto themselves.
  func placed(_ count: Int) throws(Errno) {
    guard let header, header.type == .vram, intoVRAM, let memory,
      UInt64(count) <= header.size - received
    else {
      throw .invalidArgument
    }
    let bytes = UnsafeRawBufferPointer(
      memory.buffer(offset: header.offset + received, length: UInt64(count)))
    alreadyPlaced = true
    defer { alreadyPlaced = false }
    var done = 0
    while done < count {
      done += try write(UnsafeRawBufferPointer(rebasing: bytes[done...]))
    }
  }

  /// What the stream lacks to be complete, for a log line; nil once the PF
  /// took the TRAILER. A stream without it can never be restored: the PF
  /// would wait for the trailer until its restore timeout.
  var missing: String? {
    if trailerReceived { return lacking.map { "the stream reached its trailer without \($0)" } }
    if closed { return missingAtClose }
    let number = assembled + 1
    if let error {
      return "packet \(refused) was refused (\(error.name)) and the stream ends there: no trailer"
    }
    if taken == 0 { return "the stream is empty: no bytes were written, no trailer" }
    if let header {
      return
        "the stream ends inside packet \(number) (\(header.type), GT \(header.gt)) at byte"
        + " \(received) of its \(header.size)-byte payload (stream byte \(taken)): no trailer"
    }
    if !headerBytes.isEmpty {
      return
        "the stream ends inside packet \(number)'s header at byte \(headerBytes.count) of"
        + " \(XePacketHeader.size) (stream byte \(taken)): no trailer"
    }
    if let unproduced {
      return
        "packet \(assembled) (\(unproduced.header.type)) still waits for room in the PF's ring"
        + " and the stream ends there (\(taken) bytes): no trailer"
    }
    return "no trailer: the stream ends after packet \(assembled) (\(taken) bytes)"
  }

  /// What a stream that reached its trailer lacks of a whole VF state: a GT's
  /// packet of a type the PF saves for it, or VRAM not covered. The kernel
  /// restores whatever arrived; a stream that lost a packet (or came from a VF
  /// with less VRAM) would leave this VF running with part of its old state.
  private var lacking: String? {
    for g in 0..<pf.gtCount {
      for type in pf.saveTypes(g) where type != .vram && !typesSeen[g].contains(type.rawValue) {
        return "a \(type) packet for GT\(g)"
      }
    }
    guard memory != nil, pf.vramSize > 0 else { return nil }
    var end: UInt64 = 0
    for range in vramCovered.sorted(by: { $0.offset < $1.offset }) where range.offset <= end {
      end = max(end, range.offset + range.size)
    }
    return end >= pf.vramSize ? nil : "VRAM from byte \(end) of \(pf.vramSize)"
  }

  /// Why a stream that reached its trailer must still not be restored: bytes
  /// followed the trailer. The kernel refuses those writes too but then
  /// completes the restore; here RESUMING → STOP fails instead.
  var excess: String? {
    guard followingTrailer else { return nil }
    return
      "bytes follow the trailer (packet \(refused) of the stream was refused): it is not one VF's saved state"
  }

  /// A whole header arrived: `xe_sriov_packet_init_from_hdr` and `pkt_init`.
  private func begin() throws(Errno) {
    let decoded = try XePacketHeader(decoding: headerBytes)
    guard decoded.version == XePacketHeader.supportedVersion, Int(decoded.gt) < pf.gtCount else {
      throw .invalidArgument
    }
    // Stricter than the kernel, which reads neither: flags are 0 in every
    // packet version 1 defines, an offset is a VRAM chunk's alone, and the
    // identity comes first, so that nothing is taken from another VF's stream.
    // Nor does a save repeat a packet: a second one of a type (or VRAM
    // already covered) is a stream spliced or replayed.
    guard decoded.flags == 0, decoded.offset == 0 || decoded.type == .vram,
      assembled > 0 || decoded.type == .descriptor,
      !typesSeen[Int(decoded.gt)].contains(decoded.type.rawValue) || decoded.type == .vram
        || !XePacketType.known.contains(decoded.type),
      decoded.type != .vram
        || !vramCovered.contains(where: {
          decoded.offset < $0.offset &+ $0.size && $0.offset < decoded.offset &+ decoded.size
        })
    else { throw .invalidArgument }
    if decoded.type == .vram {
      knownZero = nil
      intoVRAM = memory != nil && pf.acceptsVRAM(decoded)
    } else {
      guard decoded.size <= Self.maxBufferedPayload else { throw .noMemory }
      payload.reserveCapacity(Int(decoded.size))
    }
    header = decoded
    received = 0
  }

  /// Takes payload bytes of the current packet; returns how many.
  private func take(_ bytes: UnsafeRawBufferPointer) -> Int {
    guard let header else { return 0 }
    let count = Int(min(UInt64(bytes.count), header.size - received))
    let chunk = UnsafeRawBufferPointer(rebasing: bytes[..<count])
    if header.type != .vram {
      payload += chunk
    } else if intoVRAM, !alreadyPlaced, let memory {
      memory.buffer(offset: header.offset + received, length: UInt64(count)).copyMemory(from: chunk)
    }
    received += UInt64(count)
    return count
  }

  private func produce(_ packet: PFPacket) throws(Errno) {
    do throws(Errno) {
      try pf.restoreProduce(packet, stream: id)
    } catch let error where error == .timedOut {
      throw error  // nothing produced; the stream stays usable
    } catch {
      self.error = error
      refused = assembled
      throw error
    }
    let header = packet.header
    if header.type == .trailer { trailerReceived = true }
    typesSeen[Int(header.gt)].insert(header.type.rawValue)
    if header.type == .vram { vramCovered.append((header.offset, header.size)) }
  }

  /// Runs `body`; an error it throws sticks to the stream, refusing `packet`.
  private func fail(packet: Int, _ body: () throws(Errno) -> Void) throws(Errno) {
    do throws(Errno) { try body() } catch {
      self.error = error
      refused = packet
      throw error
    }
  }
}
