import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import VFIOUserSocket
import XeStream
import XeVF

/// MIG_DATA_WRITE's VRAM payload is received straight into VRAM
/// (`Connection.migDataWriteInPlace`): however the Xe stream is cut into
/// messages, a refused message writes nothing, a client that leaves or goes
/// quiet mid-payload is disconnected with the device reset, and a sink
/// without memory (a kernel `data_fd`) still gets every byte through `write`.
@Suite("MIG_DATA_WRITE received in place")
struct InPlaceWriteTests {
  static let vram: UInt64 = 1 << 20
  typealias Packet = StreamCorruptionTests.Packet

  /// A source VF with data in VRAM cut into 128 KiB packets, its state and its saved stream.
  static func savedStream() throws -> (state: [UInt64], stream: [UInt8], packets: [Packet]) {
    let source = try StreamCorruptionTests.bmg(vram: vram)
    source.vramChunkSize = 128 << 10
    var result: ([UInt64], [UInt8], [Packet])?
    try withServer(source) { src, _ in
      let a = try src.connect()
      try StreamCorruptionTests.fill(a, vram: vram, salt: 0x4100)
      let state = try StreamCorruptionTests.snapshot(a, vram: vram)
      let stream = try StreamCorruptionTests.save(a)
      result = (state, stream, try StreamCorruptionTests.packets(stream))
    }
    let (state, stream, packets) = try #require(result)
    #expect(packets.filter { $0.header.type == .vram }.count == 8)
    return (state, stream, packets)
  }

  static func vramPackets(_ packets: [Packet]) -> [Packet] {
    packets.filter { $0.header.type == .vram }
  }

  /// Writes `stream` cut at `cuts` (stream offsets, ascending), one MIG_DATA_WRITE per piece.
  static func write(_ stream: [UInt8], cutAt cuts: [Int], to client: VFIOUserClient) throws {
    var at = 0
    for end in cuts + [stream.count] where end > at {
      try stream.withUnsafeBytes {
        try client.migDataWrite(from: UnsafeRawBufferPointer(rebasing: $0[at..<end]))
      }
      at = end
    }
  }

  /// A MIG_DATA_WRITE as raw bytes, with its MIG_DATA `size` field free to disagree.
  static func rawMigDataWrite(id: UInt16, argsz: UInt32 = 8, sizeField: UInt32, data: [UInt8])
    -> [UInt8]
  {
    var head = [UInt8](repeating: 0, count: MigDataHeader.size)
    head.withUnsafeMutableBytes { MigDataHeader(argsz: argsz, size: sizeField).encode(into: $0) }
    return encodeMessage(id: id, command: Command.migDataWrite.rawValue, payload: head + data)
  }

  /// Every kind of cut through VRAM packets: inside a header (1, 7 and 23 bytes in), at the
  /// first and a middle payload byte, 1 byte before a packet's end, exactly between packets,
  /// and one message over three packets; each piece is taken in place where it holds VRAM.
  @Test func vramPacketsCutEveryWayRestoreExactly() throws {
    let (state, stream, packets) = try Self.savedStream()
    let vram = Self.vramPackets(packets)
    let payload = XePacketHeader.size
    let cuts = [
      vram[0].start + 1, vram[1].start + 7, vram[2].start + payload - 1, vram[3].start + payload,
      vram[3].start + payload + 40_000, vram[4].end - 1, vram[5].start,
      // vram[5] to vram[7]: one message across whole packets
      vram[7].start + payload + 1,
    ]
    let destination = try StreamCorruptionTests.bmg(vram: Self.vram)
    try withServer(destination) { dst, _ in
      let b = try dst.connect()
      try StreamCorruptionTests.fill(b, vram: Self.vram, salt: 0x2200)
      try b.setMigrationState(.resuming)
      try Self.write(stream, cutAt: cuts, to: b)
      try b.setMigrationState(.running)
      #expect(try StreamCorruptionTests.snapshot(b, vram: Self.vram) == state)
      // Most of VRAM came in place: all but the read-ahead after each header.
      let placed = dst.server.statistics.snapshot.migrationBytesPlaced
      #expect(placed > Self.vram - UInt64(cuts.count + 8) * UInt64(MessageChannel.readAhead))
      #expect(placed <= Self.vram)
    }
  }

  /// A MIG_DATA_WRITE whose size field disagrees with its length (or whose argsz is short)
  /// is refused with EINVAL as before, in the middle of a VRAM packet that is being received
  /// in place, and nothing of its data reaches VRAM; the stream then goes on and restores.
  @Test func aRefusedMessageWritesNothingAndTheStreamGoesOn() throws {
    let (state, stream, packets) = try Self.savedStream()
    let packet = Self.vramPackets(packets)[2]
    let cut = packet.start + XePacketHeader.size + 20_000
    let next = Int(packet.header.offset) + 20_000  // the VRAM byte the next data goes to
    let destination = try StreamCorruptionTests.bmg(vram: Self.vram)
    try withServer(destination) { dst, vf in
      let b = try dst.connect()
      try StreamCorruptionTests.fill(b, vram: Self.vram, salt: 0x2200)
      try b.setMigrationState(.resuming)
      try Self.write(Array(stream[..<cut]), cutAt: [], to: b)
      let before = vf.withDeviceMemory { Array($0[next..<(next + 100_000)]) }
      let placedBefore = dst.server.statistics.snapshot.migrationBytesPlaced
      let junk = [UInt8](repeating: 0xEE, count: 64 << 10)
      for (argsz, sizeField) in [
        (UInt32(8), UInt32(junk.count + 1)), (8, UInt32(junk.count - 1)), (8, 0),
        (4, UInt32(junk.count)),
      ] {
        let id = b.allocateID()
        try b.sendRaw(Self.rawMigDataWrite(id: id, argsz: argsz, sizeField: sizeField, data: junk))
        let error = #expect(throws: VFIOUserClientError.self) {
          _ = try b.awaitReply(id: id, command: Command.migDataWrite.rawValue)
        }
        #expect(error?.errno == .invalidArgument, "argsz \(argsz) size \(sizeField)")
      }
      let untouched = vf.withDeviceMemory { Array($0[next..<(next + 100_000)]) } == before
      #expect(untouched, "a refused message wrote into VRAM")
      #expect(dst.server.statistics.snapshot.migrationBytesPlaced == placedBefore)
      #expect(try b.migrationState() == .resuming)
      try Self.write(Array(stream[cut...]), cutAt: [], to: b)
      try b.setMigrationState(.running)
      #expect(try StreamCorruptionTests.snapshot(b, vram: Self.vram) == state)
    }
  }

  /// A message the stream refuses halfway (a VRAM packet's end, then a header of an unknown
  /// version) is answered EINVAL with the rest of its data dropped unread; the connection
  /// stays in step and RESUMING cannot end well.
  @Test func aStreamRefusalMidMessageKeepsTheConnectionInStep() throws {
    let (_, stream, packets) = try Self.savedStream()
    let vram = Self.vramPackets(packets)
    var damaged = Array(stream[..<vram[2].end])
    damaged[vram[2].start] = 9  // packet version 9
    let destination = try StreamCorruptionTests.bmg(vram: Self.vram)
    try withServer(destination) { dst, _ in
      let b = try dst.connect()
      try b.setMigrationState(.resuming)
      let error = #expect(throws: VFIOUserClientError.self) {
        try Self.write(damaged, cutAt: [vram[1].start + 100], to: b)
      }
      #expect(error?.errno == .invalidArgument)
      #expect(try b.migrationState() == .resuming)
      #expect(try b.read32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 0)) >= 0)
      #expect(throws: VFIOUserClientError.self) { try b.setMigrationState(.running) }
      #expect(try b.migrationState() == .error)
    }
  }

  /// The client hangs up, or goes quiet, with a VRAM payload half received: the
  /// connection ends (a timeout after the partial-message bound), the RESUMING device is
  /// reset, and the next client is served a RUNNING device.
  @Test(arguments: [false, true])
  func aClientThatLeavesMidPayloadGetsTheDeviceReset(goesQuiet: Bool) throws {
    let (_, stream, packets) = try Self.savedStream()
    let packet = Self.vramPackets(packets)[1]
    var limits = ServerLimits()
    limits.partialMessageTimeoutMilliseconds = 300
    let destination = try StreamCorruptionTests.bmg(vram: Self.vram)
    try withServer(destination, limits: limits) { dst, _ in
      let b = try dst.connect()
      try b.setMigrationState(.resuming)
      try Self.write(Array(stream[..<(packet.start + XePacketHeader.size + 100)]), cutAt: [], to: b)
      // Half of a 64 KiB MIG_DATA_WRITE into that packet's payload.
      let message = Self.rawMigDataWrite(
        id: b.allocateID(), sizeField: 64 << 10, data: [UInt8](repeating: 0x77, count: 64 << 10))
      try b.sendRaw(Array(message[..<(32 << 10)]))
      let start = Date()
      if goesQuiet {
        #expect(dst.waitFor({ !$0.clientConnected }, timeout: 10))
        let end = dst.server.statistics.snapshot.lastEnd
        let timedOut: Bool = if case .timedOut = end { true } else { false }
        #expect(timedOut, "ended \(String(describing: end))")
        #expect(Date().timeIntervalSince(start) >= 0.25)
      } else {
        shutdown(b.socket.rawValue, Int32(SHUT_RDWR))
        #expect(dst.waitFor({ !$0.clientConnected && $0.lastEnd == .clientClosed }))
      }
      b.channel.close()
      let next = try dst.connect()
      #expect(try next.migrationState() == .running)
    }
  }

  /// A sink that offers no memory (a kernel `data_fd`'s) gets a large MIG_DATA_WRITE's every
  /// byte, in order, through `write`, though each write takes at most 1,000 bytes; the image
  /// then restores.
  @Test func aSinkWithoutMemoryGetsEveryByteThroughWrite() throws {
    let device = MigratingTestDevice()
    let image = (0..<device.memory.count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
    let stream = MigratingTestDevice.magic + image
    try withServer(device) { server, _ in
      let client = try server.connect()
      try client.setMigrationState(.resuming)
      try stream.withUnsafeBytes { try client.migDataWrite(from: UnsafeRawBufferPointer($0)) }
      #expect(device.open?.data == stream)
      try client.setMigrationState(.running)
      #expect(Array(device.memory) == image)
      #expect(server.server.statistics.snapshot.migrationBytesPlaced == 0)
    }
  }
}
