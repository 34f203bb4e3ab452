import Glibc
import SystemPackage
import Testing
import VFIOUser

@testable import XeVF

@Suite struct VRAMTests {
  /// Maps the BAR2 memfd as a client would.
  func mapVRAM(_ vf: SimulatedXeVF) throws -> UnsafeMutableRawBufferPointer {
    let region = try #require(vf.region(2))
    let source = try #require(region.mmap)
    let pointer = mmap(
      nil, Int(region.size), PROT_READ | PROT_WRITE, MAP_SHARED, source.fd.rawValue,
      off_t(source.offset))
    let mapped = try #require(pointer)
    try #require(mapped != UnsafeMutableRawPointer(bitPattern: -1))
    return UnsafeMutableRawBufferPointer(start: mapped, count: Int(region.size))
  }

  func unmap(_ buffer: UnsafeMutableRawBufferPointer) { munmap(buffer.baseAddress, buffer.count) }

  @Test func regionAccessAndClientMappingSeeTheSameBytes() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 16 << 20)
    let mapped = try mapVRAM(vf)
    defer { unmap(mapped) }

    let data = pattern(4096 + 13)
    try vf.writeBytes(2, 0x12_3456, data)
    #expect(Array(mapped[0x12_3456..<0x12_3456 + data.count]) == data)
    #expect(try vf.readBytes(2, 0x12_3456, count: data.count) == data)

    // The other way: the client writes through its mapping.
    let end = (16 << 20) - 7
    for i in 0..<7 { mapped[end + i] = UInt8(0xF0 + i) }
    #expect(
      try vf.readBytes(2, UInt64(end), count: 7) == [0xF0, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6])
    #expect(vf.withDeviceMemory { $0[end] } == 0xF0)

    #expect(throws: Errno.invalidArgument) { try vf.readBytes(2, UInt64(end), count: 8) }
  }

  @Test func initDoesNotTouchVRAMPages() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 64 << 20)
    let mapped = try mapVRAM(vf)
    defer { unmap(mapped) }
    let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    var resident = [UInt8](repeating: 0xFF, count: mapped.count / pageSize)
    func residentPages() -> Int {
      _ = resident.withUnsafeMutableBufferPointer {
        mincore(mapped.baseAddress, mapped.count, $0.baseAddress)
      }
      return resident.filter { $0 & 1 != 0 }.count
    }
    #expect(residentPages() == 0)
    try vf.writeBytes(2, UInt64(5 * pageSize), [1])
    #expect(residentPages() == 1)
  }

  /// The PF scrubs a VF's LMEM on FLR: the next client never reads what the
  /// last one wrote, and the memfd's pages go back to the kernel.
  @Test func resetScrubsVRAMAndFreesItsPages() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 1 << 20)
    let mapped = try mapVRAM(vf)
    defer { unmap(mapped) }
    try vf.writeBytes(2, 64, [9, 8, 7])
    try vf.writeBytes(2, 512 << 10, [6])
    #expect(mapped[64] == 9)
    var st = stat()
    fstat(try #require(vf.vramFD).rawValue, &st)
    #expect(st.st_blocks > 0)
    try vf.reset()
    fstat(try #require(vf.vramFD).rawValue, &st)
    #expect(st.st_blocks == 0)
    #expect(try vf.readBytes(2, 64, count: 3) == [0, 0, 0])
    #expect(try vf.readBytes(2, 512 << 10, count: 1) == [0])
    #expect(mapped[64] == 0)  // the client's mapping sees the scrub too
  }

  @Test(arguments: [XeProfile.ptl, .wcl])
  func resetScrubsSRAM(profile: XeProfile) throws {
    let vf = try SimulatedXeVF(profile: profile)
    vf.withDeviceMemory { $0[100] = 0x5A }
    try vf.reset()
    #expect(vf.withDeviceMemory { $0.allSatisfy { $0 == 0 } })
  }

  @Test(arguments: [XeProfile.ptl, .wcl])
  func sramIsReachableThroughBAR0(profile: XeProfile) throws {
    let vf = try SimulatedXeVF(profile: profile)
    #expect(vf.withDeviceMemory { $0.allSatisfy { $0 == 0 } })
    #expect(try vf.reg64(XeSimRegisters.sram) == 0)
    let last = XeSimRegisters.sram + XeSimRegisters.sramSize - 8
    try vf.setReg64(XeSimRegisters.sram, 0x0102_0304_0506_0708)
    try vf.setReg32(last + 4, 0xCAFE_F00D)
    #expect(try vf.reg64(XeSimRegisters.sram) == 0x0102_0304_0506_0708)
    #expect(try vf.readValue(0, XeSimRegisters.sram + 6, as: UInt16.self) == 0x0102)
    #expect(vf.withDeviceMemory { Array($0[0..<2]) } == [0x08, 0x07])
    #expect(vf.withDeviceMemory { $0[Int(XeSimRegisters.sramSize) - 1] } == 0xCA)
    // Just past the SRAM is ordinary (unmodelled) register space.
    try vf.setReg32(last + 8, 1)
    #expect(try vf.reg32(last + 8) == 0)
  }

  @Test func bmgHasNoSRAMWindow() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 1 << 20)
    try vf.setReg32(XeSimRegisters.sram, 0x1234)
    #expect(try vf.reg32(XeSimRegisters.sram) == 0)
    #expect(vf.withDeviceMemory { $0[0] } == 0)
  }
}
