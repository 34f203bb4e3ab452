import SystemPackage
import Testing
import VFIOUser

@Suite struct ByteCursorTests {
  @Test func littleEndianRoundTrip() throws {
    var writer = ByteWriter(count: 15)
    try writer.put(UInt8(0xAB), at: 0)
    try writer.put(UInt16(0x1234), at: 1)
    try writer.put(UInt32(0xDEAD_BEEF), at: 3)
    try writer.put(UInt64(0x0102_0304_0506_0708), at: 7)
    #expect(
      writer.bytes == [
        0xAB, 0x34, 0x12, 0xEF, 0xBE, 0xAD, 0xDE, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,
      ])
    try writer.reading { r throws(Errno) in
      #expect(try r.u8(at: 0) == 0xAB)
      #expect(try r.u16(at: 1) == 0x1234)
      #expect(try r.u32(at: 3) == 0xDEAD_BEEF)
      #expect(try r.u64(at: 7) == 0x0102_0304_0506_0708)
      #expect(try r.read(UInt8.self) == 0xAB)
      #expect(try r.read(UInt16.self) == 0x1234)
      #expect(try r.read(UInt32.self) == 0xDEAD_BEEF)
      #expect(try r.read(UInt64.self) == 0x0102_0304_0506_0708)
      #expect(r.remaining == 0)
    }
  }

  @Test func appendMatchesPut() throws {
    var appended = ByteWriter()
    appended.append(UInt32(7))
    appended.append(Int32(-1))
    appended.append([1, 2, 3])
    var placed = ByteWriter(count: 11)
    try placed.put(UInt32(7), at: 0)
    try placed.put(Int32(-1), at: 4)
    try placed.put([1, 2, 3], at: 8)
    #expect(appended.bytes == placed.bytes)
    #expect(try placed.reading { r throws(Errno) in try r.s32(at: 4) } == -1)
  }

  @Test func readsOutsideTheBytesThrow() throws {
    let bytes: [UInt8] = [1, 2, 3, 4, 5, 6, 7]
    try ByteReader.reading(bytes) { r throws(Errno) in
      #expect(throws: Errno.invalidArgument) { try r.u64(at: 0) }
      #expect(throws: Errno.invalidArgument) { try r.u32(at: 4) }
      #expect(throws: Errno.invalidArgument) { try r.u16(at: -1) }
      #expect(throws: Errno.invalidArgument) { try r.u8(at: 7) }
      #expect(throws: Errno.invalidArgument) { try r.u32(at: Int.max) }
      #expect(throws: Errno.invalidArgument) { try r.slice(at: 4, count: 4) }
      #expect(throws: Errno.invalidArgument) { try r.slice(at: 1, count: -1) }
      #expect(throws: Errno.invalidArgument) { try r.rest(from: 8) }
      #expect(try r.u32(at: 3) == 0x0706_0504)
      #expect(try r.rest(from: 7).isEmpty)
      #expect(!r.contains(Int.max, 1))
      _ = try r.read(count: 6)
      #expect(throws: Errno.invalidArgument) { try r.read(UInt16.self) }
      #expect(r.offset == 6)
      #expect(try r.read(UInt8.self) == 7)
    }
    #expect(throws: Errno.invalidArgument) {
      try ByteReader.reading([]) { r throws(Errno) in try r.u8(at: 0) }
    }
  }

  @Test func writesOutsideTheBytesThrow() {
    var writer = ByteWriter(count: 6)
    #expect(throws: Errno.invalidArgument) { try writer.put(UInt64(1), at: 0) }
    #expect(throws: Errno.invalidArgument) { try writer.put(UInt32(1), at: 3) }
    #expect(throws: Errno.invalidArgument) { try writer.put(UInt16(1), at: -1) }
    #expect(throws: Errno.invalidArgument) { try writer.put([1, 2, 3], at: 4) }
    #expect(throws: Errno.invalidArgument) { try writer.put(UInt8(1), at: Int.max) }
    #expect(writer.bytes == [0, 0, 0, 0, 0, 0])
  }
}
