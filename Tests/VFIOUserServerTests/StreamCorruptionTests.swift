import Logging
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeStream
import XeVF

/// Issue 10, migration-stream corruption: a real save of a simulated BMG VF,
/// corrupted every systematic way and written through MIG_DATA_WRITE over the
/// real socket into a second server's VF. Each corrupted stream must be
/// refused (by a write, or by RESUMING → RUNNING) and leave the destination
/// in ERROR until a reset; a stream that is not refused must have restored
/// exactly the source's state. A payload bit flip is the exception the Xe
/// format cannot see (no checksum; protocol/xe-migration-stream.md): those are
/// counted, not required to fail. The source is never touched.
@Suite("Xe migration stream corruption over the socket")
struct StreamCorruptionTests {
  typealias R = XeSimRegisters
  static let vram: UInt64 = 2 << 20

  /// A packet of the saved stream: where it starts, its header and payload size.
  struct Packet {
    var start: Int
    var header: XePacketHeader
    var end: Int { start + XePacketHeader.size + Int(header.size) }
  }

  struct Case {
    var name: String
    var bytes: [UInt8]
    /// A payload bit flip, which the format cannot detect.
    var payloadFlip = false
    /// Two packets swapped that a save may emit in either order (the GTs'
    /// packets interleave in any order; only the DESCRIPTOR is first and the
    /// TRAILER last): a valid stream.
    var validReorder = false
  }

  enum Outcome: Equatable {
    case refusedByWrite(Errno)
    case refusedAtEnd(Errno)
    /// Restored, and the destination holds exactly the source's state.
    case restoredIdentical
    /// Restored with a state that differs from the source's.
    case restoredWrong
  }

  static func packets(_ stream: [UInt8]) throws -> [Packet] {
    var out: [Packet] = []
    var at = 0
    while at < stream.count {
      let header = try XePacketHeader(decoding: Array(stream[at..<at + XePacketHeader.size]))
      out.append(Packet(start: at, header: header))
      at += XePacketHeader.size + Int(header.size)
    }
    try #require(at == stream.count)
    return out
  }

  static func bmg(vram: UInt64, profile: XeProfile = .bmg) throws -> SimulatedXeVF {
    var quiet = Logger(label: "test")
    quiet.logLevel = .critical
    var small = profile
    small.ggttQuota = 1 << 20
    let vf = try SimulatedXeVF(
      profile: small, vramSize: small.hasVRAM ? vram : nil, logger: quiet)
    vf.pfTiming = PFTiming.kernel.scaled(by: 0.25)
    vf.vramChunkSize = 512 << 10
    return vf
  }

  /// Puts data in every place a VF keeps state.
  static func fill(_ client: VFIOUserClient, vram: UInt64?, salt: UInt32) throws {
    if let vram {
      let data = (0..<Int(vram)).map {
        UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 10 &+ Int(salt))
      }
      var offset = 0
      while offset < data.count {
        try client.write(
          region: 2, offset: UInt64(offset), data: Array(data[offset..<(offset + (1 << 20))]))
        offset += 1 << 20
      }
    }
    for gt in 0..<2 {
      for i in 0..<R.scratchCount {
        try client.write32(
          region: 0, offset: R.scratch(gt: gt, index: i), salt &+ UInt32(gt * 16 + i))
      }
    }
    for pte in 0..<4 {
      try client.write64(
        region: 0, offset: R.ggttWindow + UInt64(pte) * 8,
        UInt64(salt) << 32 | UInt64(pte) << 12 | 1)
    }
    try client.write64(region: 0, offset: R.msixTable + 16, 0xFEE0_1000)
    try client.write32(region: 0, offset: R.msixTable + 24, salt)
  }

  /// Everything `XeMigrationTests.state` compares, and VRAM.
  static func snapshot(_ client: VFIOUserClient, vram: UInt64?) throws -> [UInt64] {
    var values = try XeMigrationTests().state(client)
    if let vram {
      var offset: UInt64 = 0
      while offset < vram {
        let bytes = try client.read(region: 2, offset: offset, count: 1 << 20)
        // A cheap digest per MiB: FNV-1a.
        values.append(bytes.reduce(0xcbf2_9ce4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 })
        offset += 1 << 20
      }
    }
    return values
  }

  /// A whole save over the socket (RUNNING → STOP_COPY, read to the end, → RUNNING).
  static func save(_ client: VFIOUserClient) throws -> [UInt8] {
    try client.setMigrationState(.stopCopy)
    var stream: [UInt8] = []
    while true {
      let part = try client.migDataRead(size: 1 << 20)
      stream += part
      if part.count < 1 << 20 { break }
    }
    try client.setMigrationState(.running)
    return stream
  }

  /// Writes `bytes` through MIG_DATA_WRITE and ends RESUMING; the
  /// destination is reset afterwards, whatever happened.
  static func restore(
    _ bytes: [UInt8], into client: VFIOUserClient, expected: [UInt64]
  ) throws -> Outcome {
    defer { try? client.reset() }
    try client.setMigrationState(.resuming)
    var at = 0
    while at < bytes.count {
      let end = min(at + (1 << 20), bytes.count)
      do { try client.migDataWrite(Array(bytes[at..<end])) } catch {
        let errno = try #require(error.errno)
        // A refused stream: RESUMING cannot end well, and the device stops.
        #expect(throws: VFIOUserClientError.self) { try client.setMigrationState(.running) }
        #expect(try client.migrationState() == .error)
        return .refusedByWrite(errno)
      }
      at = end
    }
    do { try client.setMigrationState(.running) } catch {
      #expect(try client.migrationState() == .error, "a failed restore leaves ERROR")
      return .refusedAtEnd(try #require(error.errno))
    }
    #expect(try client.migrationState() == .running)
    return try snapshot(client, vram: vram) == expected ? .restoredIdentical : .restoredWrong
  }

  /// The systematic corruptions of `stream`.
  static func cases(_ stream: [UInt8], packets: [Packet]) -> [Case] {
    var cases: [Case] = []
    // One packet of each kind (per GT): the first of its type and GT.
    var kinds: [Packet] = []
    for packet in packets
    where !kinds.contains(where: {
      $0.header.type == packet.header.type && $0.header.gt == packet.header.gt
    }) {
      kinds.append(packet)
    }
    // Header fields: (name, offset, width); the lowest and highest bit of each.
    let fields = [
      ("version", 0, 1), ("type", 1, 1), ("tile", 2, 1), ("gt", 3, 1), ("flags", 4, 4),
      ("offset", 8, 8), ("size", 16, 8),
    ]
    for packet in kinds {
      let kind = "\(packet.header.type)/GT\(packet.header.gt)"
      for (field, offset, width) in fields {
        for bit in [0, 8 * width - 1] {
          var bytes = stream
          bytes[packet.start + offset + bit / 8] ^= UInt8(1 << (bit % 8))
          cases.append(Case(name: "\(kind) header \(field) bit \(bit)", bytes: bytes))
        }
      }
      // Payload: the first, middle and last byte's low bit.
      let payload = packet.start + XePacketHeader.size
      if packet.header.size > 0 {
        for at in Set([0, Int(packet.header.size) / 2, Int(packet.header.size) - 1]).sorted() {
          var bytes = stream
          bytes[payload + at] ^= 1
          cases.append(
            Case(name: "\(kind) payload byte \(at) bit 0", bytes: bytes, payloadFlip: true))
        }
      }
    }
    // Truncation at every packet boundary, and inside every header and payload.
    for (i, packet) in packets.enumerated() {
      cases.append(
        Case(name: "truncated before packet \(i)", bytes: Array(stream[..<packet.start])))
      cases.append(
        Case(
          name: "truncated inside packet \(i)'s header",
          bytes: Array(stream[..<(packet.start + XePacketHeader.size / 2)])))
      if packet.header.size > 0 {
        cases.append(
          Case(
            name: "truncated inside packet \(i)'s payload",
            bytes: Array(
              stream[..<(packet.start + XePacketHeader.size + Int(packet.header.size) / 2)])))
      }
    }
    func bytes(of packet: Packet) -> [UInt8] { Array(stream[packet.start..<packet.end]) }
    // Dropped, duplicated, and swapped with the next packet.
    for i in packets.indices {
      var dropped = packets
      dropped.remove(at: i)
      cases.append(Case(name: "packet \(i) dropped", bytes: dropped.flatMap(bytes)))
      var duplicated = packets
      duplicated.insert(packets[i], at: i)
      cases.append(Case(name: "packet \(i) duplicated", bytes: duplicated.flatMap(bytes)))
      if i + 1 < packets.count {
        var swapped = packets
        swapped.swapAt(i, i + 1)
        let fixed: Set<XePacketType> = [.descriptor, .trailer]
        cases.append(
          Case(
            name: "packets \(i) and \(i + 1) swapped", bytes: swapped.flatMap(bytes),
            validReorder: !fixed.contains(packets[i].header.type)
              && !fixed.contains(packets[i + 1].header.type)))
      }
    }
    return cases
  }

  @Test func everyCorruptionIsRefusedOrHarmless() throws {
    let source = try Self.bmg(vram: Self.vram)
    let destination = try Self.bmg(vram: Self.vram)
    let ptlSource = try Self.bmg(vram: 0, profile: .ptl)
    let smallSource = try Self.bmg(vram: Self.vram / 2)
    let largeSource = try Self.bmg(vram: Self.vram * 2)
    try withServer(source) { src, _ in
      try withServer(destination) { dst, _ in
        let a = try src.connect()
        let b = try dst.connect()
        try Self.fill(a, vram: Self.vram, salt: 0x5A00)
        try Self.fill(b, vram: Self.vram, salt: 0x3300)
        let sourceState = try Self.snapshot(a, vram: Self.vram)
        let stream = try Self.save(a)
        let packets = try Self.packets(stream)
        #expect(packets.first?.header.type == .descriptor && packets.last?.header.type == .trailer)

        // The stream as saved restores the source's state.
        #expect(try Self.restore(stream, into: b, expected: sourceState) == .restoredIdentical)

        var all = Self.cases(stream, packets: packets)
        // Streams of other VFs: another profile, another VRAM size (each filled alike).
        for (name, other, vram) in [
          ("ptl", ptlSource, nil), ("half the VRAM", smallSource, Self.vram / 2),
          ("twice the VRAM", largeSource, Self.vram * 2),
        ] as [(String, SimulatedXeVF, UInt64?)] {
          try withServer(other) { o, _ in
            let c = try o.connect()
            try Self.fill(c, vram: vram, salt: 0x5A00)
            all.append(Case(name: "a stream from a VF with \(name)", bytes: try Self.save(c)))
          }
        }

        var detected = 0
        var harmless: [String] = []
        var undetectedPayload: [String] = []
        for corruption in all {
          let outcome = try Self.restore(corruption.bytes, into: b, expected: sourceState)
          switch outcome {
          case .refusedByWrite, .refusedAtEnd: detected += 1
          case .restoredIdentical: harmless.append(corruption.name)
          case .restoredWrong:
            if corruption.payloadFlip {
              undetectedPayload.append(corruption.name)
            } else {
              Issue.record("\(corruption.name): restored, and the destination runs a wrong state")
            }
          }
        }
        let payloadCases = all.filter(\.payloadFlip).count
        print(
          "stream corruption: \(all.count) cases (\(payloadCases) payload bit flips), \(detected) refused, "
            + "\(harmless.count) restored the source's state exactly (\(harmless.joined(separator: "; "))), "
            + "\(undetectedPayload.count) payload flips undetected (\(undetectedPayload.joined(separator: "; ")))"
        )
        // Every corruption outside a payload is refused; a valid reorder restores.
        #expect(
          harmless.allSatisfy { name in
            all.first { $0.name == name }.map { $0.payloadFlip || $0.validReorder } == true
          }, "accepted: \(harmless)")
        for reorder in all where reorder.validReorder {
          #expect(harmless.contains(reorder.name), "\(reorder.name) is a valid stream")
        }
        #expect(detected + harmless.count + undetectedPayload.count == all.count)

        // The source was only read: still RUNNING, with its state.
        #expect(try a.migrationState() == .running)
        #expect(try Self.snapshot(a, vram: Self.vram) == sourceState)
        // And the destination still takes the real stream after all that.
        #expect(try Self.restore(stream, into: b, expected: sourceState) == .restoredIdentical)
      }
    }
  }
}
