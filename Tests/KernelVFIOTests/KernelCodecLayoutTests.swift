import CVFIOUser
import SystemPackage
import Testing
import VFIOUser

@testable import KernelVFIO

/// The bytes the C compiler lays out for the structure `which` (cvfu_layout_sample).
private func cStruct(_ which: Int) -> [UInt8] {
  var bytes = [UInt8](repeating: 0, count: 64)
  let n = bytes.withUnsafeMutableBytes {
    cvfu_layout_sample(Int32(which), $0.baseAddress, Int32($0.count))
  }
  #expect(n > 0)
  return Array(bytes[..<max(Int(n), 0)])
}

/// Each ioctl codec against the structure linux/vfio.h defines: encoders write
/// exactly the C layout of the same values, decoders read it back.
@Suite("Kernel VFIO: ioctl codecs match the C structures")
struct KernelCodecLayoutTests {
  @Test func deviceInfo() throws {
    // 6.1's headers end at cap_offset (20 bytes); the codec asks for 24.
    var raw = cStruct(CVFU_SAMPLE_DEVICE_INFO)
    raw += [UInt8](repeating: 0, count: KernelDeviceInfo.size - raw.count)
    #expect(
      try KernelDeviceInfo(parsing: raw)
        == KernelDeviceInfo(flags: .init(rawValue: 0x83), numRegions: 9, numIRQs: 5)
    )
    let request = try KernelDeviceInfo.request().bytes
    #expect(request.count == KernelDeviceInfo.size)
    #expect(Array(request[0..<4]) == [24, 0, 0, 0])
  }

  @Test func regionInfo() throws {
    let raw = cStruct(CVFU_SAMPLE_REGION_INFO)
    #expect(raw.count == KernelRegionInfo.fixedSize)
    #expect(
      try KernelRegionInfo(parsing: raw)
        == KernelRegionInfo(
          index: 2, flags: .init(rawValue: 0x7), size: 0x1122_3344_5566_7788,
          offset: 0x200_0000_0000))
    var expected = ByteWriter(count: 32)
    try expected.put(UInt32(32), at: 0)
    try expected.put(UInt32(2), at: 8)
    #expect(try KernelRegionInfo.request(index: 2, argsz: 32).bytes == expected.bytes)
  }

  @Test func irqInfo() throws {
    let raw = cStruct(CVFU_SAMPLE_IRQ_INFO)
    #expect(
      try KernelIRQInfo(parsing: raw)
        == KernelIRQInfo(index: 2, flags: .init(rawValue: 0x9), count: 64))
    let request = try KernelIRQInfo.request(index: 2).bytes
    #expect(request == [16, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
  }

  @Test func irqSet() throws {
    let set = KernelIRQSet(index: 2, start: 3, count: 0, flags: .init(rawValue: 0x21))
    #expect(try set.encoded().bytes == cStruct(CVFU_SAMPLE_IRQ_SET))
    // Data follows at the C struct's flexible array.
    let triggers = try KernelIRQSet.triggers(2, start: 0, [7, -1]).encoded().bytes
    #expect(triggers.count == 28)
    #expect(Array(triggers[20...]) == [7, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
  }

  @Test func dmaMapAndUnmap() throws {
    let map = try KernelDMA.map(
      vaddr: 0x7F00_1122_3000, iova: 0xFEE0_0000, size: 0x20_0000, readable: true,
      writable: true)
    #expect(map.bytes == cStruct(CVFU_SAMPLE_DMA_MAP))
    let unmap = try KernelDMA.unmap(iova: 0xFEE0_0000, size: 0x20_0000)
    #expect(unmap.bytes == cStruct(CVFU_SAMPLE_DMA_UNMAP))
    #expect(try KernelDMA.unmappedSize(unmap) == 0x20_0000)
  }

  @Test func type1Info() throws {
    let raw = cStruct(CVFU_SAMPLE_IOMMU_INFO)
    #expect(try Type1Info(parsing: raw) == Type1Info(pageSizes: 0x4020_1000))
    #expect(try Type1Info.request(argsz: 0).bytes.count == Type1Info.fixedSize)
  }

  @Test func migrationState() throws {
    // The DEVICE_FEATURE data is the kernel's struct, through VFIOUser's codec.
    let raw = cStruct(CVFU_SAMPLE_MIG_STATE)
    #expect(MigDeviceStateData(state: .running).encoded() == raw)
    #expect(try MigDeviceStateData(decoding: raw) == MigDeviceStateData(state: .running))
  }

  @Test func cutShortRepliesAreStructErrors() {
    #expect(throws: KernelStructError.self) {
      try KernelRegionInfo(parsing: [UInt8](repeating: 0, count: 31))
    }
    #expect(throws: KernelStructError.self) { try KernelIRQInfo(parsing: [1, 2, 3]) }
    #expect(KernelRegionInfo.neededSize([]) == 0)
    #expect(Type1Info.neededSize([64, 0]) == 0)
  }
}
