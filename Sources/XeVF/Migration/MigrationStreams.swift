import SystemPackage
import VFIODevice

/// The save `data_fd` of STOP_COPY: reads the PF's packet stream
/// (`xe_sriov_pf_migration_read`). Used on the device's thread only.
///
/// Reads return fewer bytes than asked only at the end of the stream. Each
/// waits at most `PFTiming.stream` for the PF's workers (ETIMEDOUT).
final class XeSaveStream: MigrationSource {
  private let pf: SimulatedPF
  /// Keeps VRAM mapped while the stream lives; its bytes are copied out as read.
  private var memory: DeviceMemory?
  let id: Int
  private var closed = false

  init(pf: SimulatedPF, memory: DeviceMemory?, id: Int) {
    self.pf = pf
    self.memory = memory
    self.id = id
  }

  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    guard !closed else { throw .badFileDescriptor }
    let vram = memory.map { UnsafeRawBufferPointer(start: $0.base, count: Int($0.size)) }
    return try pf.read(into: buffer, stream: id, vram: vram)
  }

  /// The kernel opens the save file O_RDONLY: a write is EBADF. (Through
  /// `MigrationSource` there is no write at all; this is for a caller that
  /// holds the stream itself.)
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int { throw .badFileDescriptor }

  /// Releases the file. The PF's side ended at STOP_COPY → STOP or at the
  /// reset (`SimulatedPF.closeStream`), as the kernel disables the file there.
  func close() {
    closed = true
    memory = nil
  }
}

/// The restore `data_fd` of RESUMING (`xe_sriov_pf_migration_write`): takes
/// bytes in any segmentation, assembles packets and hands each complete one
/// to the PF. VRAM payloads go straight into VRAM as they arrive, so nothing
/// VRAM-sized is ever buffered; other payloads are buffered per packet.
///
/// After an error the stream refuses everything with that error: the packet
/// that failed is gone and the stream cannot be resynchronised.
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
  /// A complete packet the PF had no room for when the last write gave up waiting.
  private var unproduced: PFPacket?
  private var error: Errno?
  private var closed = false

  init(pf: SimulatedPF, memory: DeviceMemory?, id: Int) {
    self.pf = pf
    self.memory = memory
    self.id = id
  }

  /// The kernel opens the restore file O_WRONLY: a read is EBADF (see `XeSaveStream.write`).
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    throw .badFileDescriptor
  }

  /// Releases the file, as `XeSaveStream.close`; a packet still assembling is dropped.
  func close() {
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
    while at < bytes.count {
      if header == nil {
        let take = min(XePacketHeader.size - headerBytes.count, bytes.count - at)
        headerBytes += UnsafeRawBufferPointer(rebasing: bytes[at..<at + take])
        at += take
        if headerBytes.count == XePacketHeader.size { try fail { () throws(Errno) in try begin() } }
      } else {
        at += take(UnsafeRawBufferPointer(rebasing: bytes[at...]))
      }
      guard let header, received == header.size else { continue }
      let packet = PFPacket(header, header.type == .vram ? .vram : .bytes(payload))
      self.header = nil
      headerBytes = []
      payload = []
      do throws(Errno) {
        try produce(packet)
      } catch let error where error == .timedOut {
        unproduced = packet  // accepted; handed over by the next write
        return at
      }
    }
    return bytes.count
  }

  /// A whole header arrived: `xe_sriov_packet_init_from_hdr` and `pkt_init`.
  private func begin() throws(Errno) {
    let decoded = try XePacketHeader(decoding: headerBytes)
    guard decoded.version == XePacketHeader.supportedVersion, Int(decoded.gt) < pf.gtCount else {
      throw .invalidArgument
    }
    if decoded.type == .vram {
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
    } else if intoVRAM, let memory {
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
      throw error
    }
  }

  /// Runs `body`; an error it throws sticks to the stream.
  private func fail(_ body: () throws(Errno) -> Void) throws(Errno) {
    do throws(Errno) { try body() } catch {
      self.error = error
      throw error
    }
  }
}
