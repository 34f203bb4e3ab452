import KernelVFIO
import KernelVFIOBackend
import SystemPackage
import Testing
import VFIODevice
import VFIOUser

/// Builds kernel replies byte by byte, as the kernel lays them out.
struct RawReply {
  var bytes: [UInt8]
  init(count: Int) { bytes = Array(repeating: 0, count: count) }
  mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    withUnsafeBytes(of: value.littleEndian) {
      bytes.replaceSubrange(offset..<offset + $0.count, with: $0)
    }
  }

  /// A vfio_region_info reply with capability headers at the given offsets.
  static func region(
    index: UInt32, flags: VFIORegionFlags, size: UInt64, offset: UInt64, argsz: Int = 32,
    capOffset: UInt32 = 0
  ) -> RawReply {
    var r = RawReply(count: argsz)
    r.put(UInt32(argsz), at: 0)
    r.put(flags.rawValue, at: 4)
    r.put(index, at: 8)
    r.put(capOffset, at: 12)
    r.put(size, at: 16)
    r.put(offset, at: 24)
    return r
  }

  mutating func capHeader(at offset: Int, id: UInt16, version: UInt16 = 1, next: UInt32) {
    put(id, at: offset)
    put(version, at: offset + 2)
    put(next, at: offset + 4)
  }
}

@Suite("Kernel VFIO: region info capability chains")
struct RegionInfoTests {
  let rw: VFIORegionFlags = [.read, .write]
  let bar2Offset: UInt64 = 2 << 40  // vfio-pci puts region N at N << 40

  @Test func aPlainRegionHasNoCapabilities() throws {
    let raw = RawReply.region(index: 7, flags: rw, size: 4096, offset: 7 << 40)
    let info = try KernelRegionInfo(parsing: raw.bytes)
    #expect(info == KernelRegionInfo(index: 7, flags: rw, size: 4096, offset: 7 << 40))
    #expect(info.sparseAreas == nil && info.type == nil && !info.msixMappable)
  }

  /// BAR0 with the MSI-X table in it, as vfio-pci reports it since 4.16: MMAP
  /// plus the MSIX_MAPPABLE capability.
  @Test func msixMappable() throws {
    var raw = RawReply.region(
      index: 0, flags: rw.union([.mmap, .caps]), size: 16 << 20, offset: 0,
      argsz: 40, capOffset: 32)
    raw.capHeader(at: 32, id: 3, next: 0)
    let info = try KernelRegionInfo(parsing: raw.bytes)
    #expect(info.msixMappable)
    #expect(info.sparseAreas == nil)
  }

  /// Sparse mmap (two areas around a hole), then a type capability, chained.
  @Test func sparseThenType() throws {
    var raw = RawReply.region(
      index: 2, flags: rw.union([.mmap, .caps]), size: 1 << 20,
      offset: bar2Offset, argsz: 32 + 48 + 16, capOffset: 32)
    raw.capHeader(at: 32, id: 1, next: 80)
    raw.put(UInt32(2), at: 40)
    raw.put(UInt64(0), at: 48)
    raw.put(UInt64(0x1000), at: 56)
    raw.put(UInt64(0x2000), at: 64)
    raw.put(UInt64(0xFE000), at: 72)
    raw.capHeader(at: 80, id: 2, next: 0)
    raw.put(UInt32(0x8086_0000), at: 88)
    raw.put(UInt32(7), at: 92)
    let info = try KernelRegionInfo(parsing: raw.bytes)
    #expect(
      info.sparseAreas == [
        SparseMmapArea(offset: 0, size: 0x1000), SparseMmapArea(offset: 0x2000, size: 0xFE000),
      ])
    #expect(info.type?.type == 0x8086_0000 && info.type?.subtype == 7)
    #expect(info.unknownCapabilities.isEmpty)
  }

  @Test func unknownCapabilitiesAreSkippedAndListed() throws {
    var raw = RawReply.region(
      index: 9, flags: rw.union(.caps), size: 4096, offset: 9 << 40, argsz: 32 + 24 + 16,
      capOffset: 32)
    raw.capHeader(at: 32, id: 4, next: 56)  // NVLINK2_SSATGT: 24 bytes, not ours
    raw.capHeader(at: 56, id: 2, next: 0)
    raw.put(UInt32(3), at: 64)
    raw.put(UInt32(1), at: 68)
    let info = try KernelRegionInfo(parsing: raw.bytes)
    #expect(info.unknownCapabilities == [4])
    #expect(info.type?.type == 3 && info.type?.subtype == 1)
  }

  @Test func theNeededSizeOfAShortReplyIsSeen() throws {
    // The kernel answers a 32-byte request with argsz = what the chain needs, and no chain.
    var raw = RawReply.region(
      index: 2, flags: rw.union([.mmap, .caps]), size: 1 << 20,
      offset: bar2Offset)
    raw.put(UInt32(64), at: 0)
    let info = try KernelRegionInfo(parsing: raw.bytes)
    #expect(info.sparseAreas == nil, "no chain is read past the bytes received")
  }

  @Test func malformedChainsAreRefused() {
    func refuses(_ raw: RawReply, _ why: String) {
      #expect(throws: KernelStructError.self, "\(why)") { try KernelRegionInfo(parsing: raw.bytes) }
    }
    let caps = rw.union(.caps)
    var loop = RawReply.region(
      index: 0, flags: caps, size: 4096, offset: 0, argsz: 48, capOffset: 32)
    loop.capHeader(at: 32, id: 3, next: 32)
    refuses(loop, "a capability pointing at itself")
    var back = RawReply.region(
      index: 0, flags: caps, size: 4096, offset: 0, argsz: 48, capOffset: 40)
    back.capHeader(at: 40, id: 3, next: 32)
    refuses(back, "a capability pointing backwards")
    var inside = RawReply.region(
      index: 0, flags: caps, size: 4096, offset: 0, argsz: 48, capOffset: 8)
    inside.capHeader(at: 32, id: 3, next: 0)
    refuses(inside, "a chain starting inside the fixed part")
    var outside = RawReply.region(
      index: 0, flags: caps, size: 4096, offset: 0, argsz: 48, capOffset: 44)
    outside.capHeader(at: 32, id: 3, next: 0)
    refuses(outside, "a header running past the reply")
    var tooMany = RawReply.region(
      index: 0, flags: caps, size: 4096, offset: 0, argsz: 48, capOffset: 32)
    tooMany.capHeader(at: 32, id: 1, next: 0)
    tooMany.put(UInt32(100), at: 40)
    refuses(tooMany, "more sparse areas than the reply holds")
    var huge = RawReply.region(
      index: 0, flags: caps, size: 4096, offset: 0, argsz: 64, capOffset: 32)
    huge.capHeader(at: 32, id: 1, next: 0)
    huge.put(UInt32(1), at: 40)
    huge.put(UInt64(0x800), at: 48)
    huge.put(UInt64(0x1000), at: 56)
    refuses(huge, "a sparse area past the region's end")
  }

  // MARK: Translation to the server's description

  @Test func aMappableRegionOffersTheDeviceFDAtItsOffset() throws {
    let whole = KernelRegionInfo(
      index: 2, flags: rw.union(.mmap), size: 256 << 20, offset: bar2Offset)
    let d = KernelVFIOBackend.describe(whole, deviceFD: 42)
    #expect(
      d
        == RegionDescription(
          index: 2, size: 256 << 20,
          mmap: MmapSource(fd: FileDescriptor(rawValue: 42), offset: bar2Offset)))

    let sparse = KernelRegionInfo(
      index: 0, flags: rw.union([.mmap, .caps]), size: 16 << 20, offset: 0,
      sparseAreas: [
        SparseMmapArea(offset: 0, size: 0x3F8000), SparseMmapArea(offset: 0x3FA000, size: 0xC06000),
      ])
    let s = KernelVFIOBackend.describe(sparse, deviceFD: 42)
    #expect(s.mmap == MmapSource(fd: FileDescriptor(rawValue: 42), offset: 0))
    #expect(s.sparseAreas == sparse.sparseAreas)

    // MSIX_MAPPABLE reaches the client with the mapping, and only with one.
    var msix = sparse
    msix.msixMappable = true
    #expect(KernelVFIOBackend.describe(msix, deviceFD: 42).msixMappable)
    var unmappable = msix
    unmappable.flags.remove(.mmap)
    #expect(!KernelVFIOBackend.describe(unmappable, deviceFD: 42).msixMappable)

    // A sparse capability with no (non-empty) areas: nothing may be mapped.
    let none = KernelRegionInfo(
      index: 0, flags: rw.union([.mmap, .caps]), size: 4096, offset: 0,
      sparseAreas: [SparseMmapArea(offset: 0, size: 0)])
    #expect(KernelVFIOBackend.describe(none, deviceFD: 42).mmap == nil)
  }

  @Test func configAndEmptyRegionsAndTypes() {
    let config = KernelRegionInfo(index: 7, flags: rw, size: 4096, offset: 7 << 40)
    #expect(
      KernelVFIOBackend.describe(config, deviceFD: 5) == RegionDescription(index: 7, size: 4096))
    let rom = KernelRegionInfo(
      index: 6, flags: .read, size: 0x20000, offset: 6 << 40)
    #expect(
      KernelVFIOBackend.describe(rom, deviceFD: 5)
        == RegionDescription(index: 6, size: 0x20000, writable: false))
    let vga = KernelRegionInfo(index: 8, flags: [], size: 0, offset: 8 << 40)
    #expect(
      KernelVFIOBackend.describe(vga, deviceFD: 5)
        == RegionDescription(index: 8, size: 0, readable: false, writable: false))
    let typed = KernelRegionInfo(
      index: 9, flags: [.read, .caps], size: 8192, offset: 9 << 40,
      type: (0x8086_0000 | 3, 1))
    let t = KernelVFIOBackend.describe(typed, deviceFD: 5)
    #expect(t.type?.type == 0x8086_0003 && t.type?.subtype == 1 && t.mmap == nil)
  }
}

@Suite("Kernel VFIO: type1 IOMMU info")
struct Type1InfoTests {
  /// What a type1 container behind intel-iommu reports: 4K|2M|1G pages, the
  /// MSI window cut out of the IOVA space, and the DMA entries left.
  @Test func iovaRangesAndDMAAvail() throws {
    var raw = RawReply(count: 24 + 48 + 12 + 4)
    raw.put(UInt32(raw.bytes.count), at: 0)
    raw.put(UInt32(3), at: 4)  // PGSIZES | CAPS
    raw.put(UInt64(0x4020_1000), at: 8)
    raw.put(UInt32(24), at: 16)
    raw.capHeader(at: 24, id: 1, next: 72)
    raw.put(UInt32(2), at: 32)
    raw.put(UInt64(0), at: 40)
    raw.put(UInt64(0xFEDF_FFFF), at: 48)
    raw.put(UInt64(0xFEF0_0000), at: 56)
    raw.put(UInt64(0x7F_FFFF_FFFF), at: 64)
    raw.capHeader(at: 72, id: 3, next: 0)
    raw.put(UInt32(65000), at: 80)
    let info = try Type1Info(parsing: raw.bytes)
    #expect(info.pageSizes == 0x4020_1000)
    #expect(info.iovaRanges == [0...0xFEDF_FFFF, 0xFEF0_0000...0x7F_FFFF_FFFF])
    #expect(info.dmaAvailable == 65000)
    let ranges = info.iovaRanges!
    #expect(ranges.covers(start: 0x1_0000_0000, size: 2 << 20))
    #expect(!ranges.covers(start: 0xFEE0_0000, size: 4096), "the MSI window")
    #expect(!ranges.covers(start: 0xFED0_0000, size: 0x20_0000), "straddles the window")
    #expect(!ranges.covers(start: 0x7F_FFFF_F000, size: 0x2000), "past the top")
    #expect(!ranges.covers(start: UInt64.max - 4095, size: 8192), "wraps")
    #expect(ranges.text == "[0x0, 0xfedfffff], [0xfef00000, 0x7fffffffff]")
  }

  @Test func noCapabilitiesMeansNoRanges() throws {
    var raw = RawReply(count: 24)
    raw.put(UInt32(24), at: 0)
    raw.put(UInt32(1), at: 4)
    raw.put(UInt64(0x1000), at: 8)
    let info = try Type1Info(parsing: raw.bytes)
    #expect(info == Type1Info(pageSizes: 0x1000))
  }

  @Test func aBackwardRangeIsRefused() {
    var raw = RawReply(count: 24 + 32)
    raw.put(UInt32(raw.bytes.count), at: 0)
    raw.put(UInt32(3), at: 4)
    raw.put(UInt32(24), at: 16)
    raw.capHeader(at: 24, id: 1, next: 0)
    raw.put(UInt32(1), at: 32)
    raw.put(UInt64(0x2000), at: 40)
    raw.put(UInt64(0x1000), at: 48)
    #expect(throws: KernelStructError.self) { try Type1Info(parsing: raw.bytes) }
  }
}
