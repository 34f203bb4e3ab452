import CVFIOUser
import Testing

/// The save file's checksum: CRC-32C as iSCSI defines it, whichever of the
/// shim's paths (table, SSE4.2 lanes, VPCLMULQDQ folding) a length takes.
@Suite struct CRC32CTests {
  /// Bit by bit, straight from the definition (reflected polynomial 0x82F63B78).
  func reference(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
    var crc = ~seed
    for byte in bytes {
      crc ^= UInt32(byte)
      for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
  }

  func crc(_ bytes: ArraySlice<UInt8>, seed: UInt32 = 0) -> UInt32 {
    bytes.withUnsafeBytes { cvfu_crc32c(seed, $0.baseAddress, $0.count) }
  }

  @Test func checkValue() {
    #expect(crc(Array("123456789".utf8)[...]) == 0xE306_9283)
    #expect(crc([UInt8](repeating: 0, count: 32)[...]) == 0x8A91_36AA)  // RFC 3720 B.4
    #expect(crc([UInt8](repeating: 0xFF, count: 32)[...]) == 0x62A8_AB43)
  }

  @Test func everyPathAgreesWithTheDefinition() {
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    let data = (0..<210_000).map { _ -> UInt8 in
      state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      return UInt8(truncatingIfNeeded: state >> 56)
    }
    // Short lengths, lengths around the folding threshold and block sizes, and long ones.
    let lengths =
      Array(0...64) + [255, 256, 257, 1023, 1024, 1025, 1279, 1280, 4096 + 77, 24_576, 24_577]
      + [65_536 + 3, 199_999]
    for length in lengths {
      for (offset, seed) in [(0, UInt32(0)), (3, 0xDEAD_BEEF)] {
        let slice = data[offset..<(offset + length)]
        #expect(crc(slice, seed: seed) == reference(Array(slice), seed: seed), "length \(length)")
      }
    }
  }

  @Test func chainingIsConcatenation() {
    let data = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ $0 >> 7) }
    let whole = crc(data[...])
    for cut in [0, 1, 255, 1024, 50_000, 99_999, 100_000] {
      #expect(crc(data[cut...], seed: crc(data[..<cut])) == whole, "cut at \(cut)")
    }
  }
}
