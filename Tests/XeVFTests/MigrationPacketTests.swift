import SystemPackage
import Testing
import XeStream

@testable import XeVF

/// The packet codec against protocol/xe-packets.json (built with Python
/// struct.pack, not with this codec), and the GuC blob.
@Suite struct MigrationPacketTests {
  @Test(arguments: XePacketFixtures.loaded.packets)
  func goldenPacketDecodesAndEncodes(_ fixture: XePacketFixture) throws {
    let bytes = fixture.bytes
    let header = try XePacketHeader(decoding: Array(bytes[..<XePacketHeader.size]))
    let h = fixture.header
    #expect(header.version == h.version)
    #expect(header.type.rawValue == h.type)
    #expect(header.tile == h.tile)
    #expect(header.gt == h.gt)
    #expect(header.flags == h.flags)
    #expect(header.offset == h.offset)
    #expect(header.size == h.size)
    // Re-encoding gives the same bytes.
    let rebuilt = XePacketHeader(
      version: h.version, type: XePacketType(rawValue: h.type), tile: h.tile, gt: h.gt,
      flags: h.flags, offset: h.offset, size: h.size)
    #expect(rebuilt.encoded + fixture.payload == bytes)
    if fixture.headerOnly != true { #expect(Int(header.size) == fixture.payload.count) }

    if let klvs = fixture.klvs {
      let decoded = try XeKLV.decode(fixture.payload.littleEndianWords(UInt32.self))
      #expect(decoded.map(\.key) == klvs.map(\.key))
      #expect(decoded.map(\.value) == klvs.map(\.value))
      #expect(
        [UInt8](littleEndian: XeKLV.encode(klvs.map { XeKLV(key: $0.key, value: $0.value) }))
          == fixture.payload)
    }
  }

  @Test func descriptorsOfTheProfilesMatchTheGoldenPackets() throws {
    let golden = Dictionary(
      uniqueKeysWithValues: XePacketFixtures.loaded.packets.map { ($0.name, $0.payload) })
    #expect(XeMigrationDescriptor(profile: .bmg).payload == golden["descriptor-bmg"])
    #expect(XeMigrationDescriptor(profile: .ptl).payload == golden["descriptor-ptl"])
    // The media GT's GuC blob of a bmg VF.
    #expect(GuCVFState(gt: 1, gmdID: XeProfile.bmg.mediaGMDID).encoded == golden["guc-gt1-bmg"])
  }

  @Test func headerNeedsExactly24Bytes() {
    #expect(throws: Errno.invalidArgument) {
      try XePacketHeader(decoding: [UInt8](repeating: 0, count: 23))
    }
    #expect(throws: Errno.invalidArgument) {
      try XePacketHeader(decoding: [UInt8](repeating: 0, count: 25))
    }
    #expect(XePacketType(rawValue: 6).description == "VRAM")
    #expect(XePacketType(rawValue: 9).description == "TYPE_9")
  }

  @Test func descriptorValidation() {
    let bmg = XeMigrationDescriptor(profile: .bmg)
    #expect(throws: Never.self) { try bmg.validate(bmg.payload) }
    #expect(throws: Never.self) { try bmg.validate([]) }  // nothing to check, as on the PF
    #expect(throws: Errno.operationNotSupportedByDevice) {
      try bmg.validate(XeMigrationDescriptor(profile: .ptl).payload)
    }
    #expect(throws: Errno.operationNotSupportedByDevice) {
      try bmg.validate(XeMigrationDescriptor(deviceID: 0xE211, revisionID: 3).payload)
    }
    #expect(throws: Errno.invalidArgument) { try bmg.validate([1, 2, 3]) }
    // Truncated: a KLV announcing 3 dwords with 1 left.
    #expect(throws: Errno.invalidArgument) {
      try bmg.validate([UInt8](littleEndian: [UInt32(0xF001_0003), 0xE211]))
    }
    // Unknown keys are skipped.
    let unknown = [UInt8](littleEndian: XeKLV.encode([XeKLV(key: 0x1234, value: [1, 2])]))
    #expect(throws: Never.self) { try bmg.validate(unknown + bmg.payload) }
  }

  @Test func gucBlobRoundTripsAndIsChecked() throws {
    let engine = GuCVFState.Engine(
      src: 0x1_2345_6789, dst: 0xABCD, len: 4096, ctrl: 0x8000_0301, status: 1, completed: 7,
      held: GuCVFState.HeldTransfer(
        toDevice: true, deviceOffset: 0x40, clientAddress: 0x1_0000_0000, length: 4096, vector: 3))
    let msix = GuCVFState.MSIX(
      table: (0..<64).map { UInt32($0 * 3) }, pending: 0x8001, clientDrivesTable: true, held: 0x4)
    let sram = pattern(Int(XeSimRegisters.sramSize), seed: 4)
    let state = GuCVFState(gt: 0, gmdID: 0x1234, engine: engine, msix: msix, sram: sram)
    let blob = state.encoded
    #expect(blob.count % 4 == 0)
    #expect(blob.count <= GuCVFState.querySize(gt: 0, sramSize: sram.count))
    let sramSize = Int(XeSimRegisters.sramSize)
    #expect(try GuCVFState(decoding: blob, gt: 0, gmdID: 0x1234, sramSize: sramSize) == state)

    // The GuC refuses another GT's, another IP's, a truncated or a bad record.
    #expect(throws: Errno.ioError) {
      try GuCVFState(decoding: blob, gt: 1, gmdID: 0x1234, sramSize: sramSize)
    }
    #expect(throws: Errno.ioError) {
      try GuCVFState(decoding: blob, gt: 0, gmdID: 0x1235, sramSize: sramSize)
    }
    #expect(throws: Errno.ioError) {
      try GuCVFState(decoding: Array(blob.dropLast(4)), gt: 0, gmdID: 0x1234, sramSize: sramSize)
    }
    #expect(throws: Errno.ioError) {
      try GuCVFState(decoding: blob, gt: 0, gmdID: 0x1234, sramSize: 1024)
    }

    // An unknown record is skipped.
    var extended = GuCVFState(gt: 1, gmdID: 9).encoded
    extended[16] = 1  // one record
    extended += [UInt8](littleEndian: [UInt32(77), 2, 0xAA, 0xBB])
    #expect(
      try GuCVFState(decoding: extended, gt: 1, gmdID: 9, sramSize: nil)
        == GuCVFState(gt: 1, gmdID: 9))
  }

  @Test func savedStreamStartsWithTheDescriptorAndEndsWithTheTrailer() throws {
    let golden = Dictionary(
      uniqueKeysWithValues: XePacketFixtures.loaded.packets.map { ($0.name, $0.bytes) })
    let vf = try migratableVF(.bmgSmall, vram: 1 << 20)
    let stream = try vf.save()
    let descriptor = try #require(golden["descriptor-bmg"])
    let trailer = try #require(golden["trailer"])
    #expect(Array(stream.prefix(descriptor.count)) == descriptor)
    #expect(Array(stream.suffix(trailer.count)) == trailer)
  }
}
