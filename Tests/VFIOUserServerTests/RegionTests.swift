import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

@Suite("Device, region and IRQ info; region access")
struct RegionTests {
  @Test func deviceInfo() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let info = try client.deviceInfo()
      #expect(info.argsz == 16)
      #expect(info.flags == [.pci, .reset])
      #expect(info.numRegions == 9 && info.numIRQs == 5)
      expectServerError(.invalidArgument) { _ = try client.deviceInfo(argsz: 8) }
    }
  }

  @Test func regionInfoWithSparseMmapAndFD() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      // argsz 32 is too small for the capability chain: the short reply says how much is needed.
      let short = try client.request(
        .deviceGetRegionInfo, payload: RegionInfoPayload(argsz: 32, index: 2).encoded())
      let shortInfo = try RegionInfoPayload(decoding: short.payload)
      #expect(short.payload.count == 32 && short.fds.isEmpty)
      #expect(shortInfo.argsz == 32 + 16 + 32)
      #expect(shortInfo.flags.contains(.caps) && shortInfo.capOffset == 32)

      let region = try client.regionInfo(2)  // its descriptor closes with it, after the defers
      let info = region.info
      #expect(info.size == UInt64(TestDevice.bar2Size))
      #expect(
        info.flags == [.read, .write, .mmap, .caps])
      #expect(
        info.capabilities == [
          .sparseMmap([
            SparseMmapArea(offset: 0, size: 0x4000), SparseMmapArea(offset: 0x8000, size: 0x8000),
          ])
        ])
      let lent = region.descriptor
      let mapFD = try #require(lent).rawValue
      // The descriptor maps the device's memory: a store through it is what the device sees.
      let p = try #require(
        mmap(nil, 0x4000, PROT_READ | PROT_WRITE, MAP_SHARED, mapFD, off_t(info.offset)))
      defer { munmap(p, 0x4000) }
      p.storeBytes(of: 0xfeed_f00d as UInt32, toByteOffset: 0x10, as: UInt32.self)
      #expect(device.memory.loadUnaligned(fromByteOffset: 0x10, as: UInt32.self) == 0xfeed_f00d)
      #expect(try client.read(region: 2, offset: 0x10, count: 4) == le32(0xfeed_f00d))
    }
  }

  /// max_msg_fds 0: the client takes no descriptors, so it is never sent one;
  /// BAR2 comes without mmap and is reached through messages.
  @Test func aClientTakingNoDescriptorsGetsNoMmap() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect(capabilities: Capabilities(maxMsgFDs: 0))
      let region = try client.regionInfo(2)
      let info = region.info
      #expect(region.descriptor == nil)
      #expect(info.flags == [.read, .write])
      #expect(info.capabilities.isEmpty && info.size == UInt64(TestDevice.bar2Size))
      try client.write(region: 2, offset: 0x20, data: le32(0x1234_5678))
      #expect(try client.read(region: 2, offset: 0x20, count: 4) == le32(0x1234_5678))
    }
  }

  /// MSIX_MAPPABLE follows the mapping: offered with it, never without it.
  @Test func msixMappableRegionsSaySo() throws {
    let device = TestDevice()
    device.bar2MSIXMappable = true
    try withServer(device) { server, _ in
      do {
        let info = try server.connect().regionInfo(2).info  // its descriptor closes with it
        #expect(info.capabilities.contains(.msixMappable))
        #expect(info.capabilities.contains { if case .sparseMmap = $0 { true } else { false } })
      }
      #expect(server.waitFor { !$0.clientConnected })
      // No descriptors, no mapping, so no MSI-X table to map either.
      let bare = try server.connect(capabilities: Capabilities(maxMsgFDs: 0)).regionInfo(2)
      #expect(bare.descriptor == nil && bare.info.capabilities.isEmpty)
    }
    try withServer(TestDevice()) { server, _ in
      let info = try server.connect().regionInfo(2).info  // its descriptor closes with it
      #expect(!info.capabilities.contains(.msixMappable))
    }
  }

  @Test func plainRegionsAndErrors() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let bar0Reply = try client.regionInfo(0)
      let bar0 = bar0Reply.info
      #expect(
        bar0Reply.descriptor == nil && bar0.size == 4096
          && bar0.flags == [.read, .write])
      #expect(bar0.capabilities.isEmpty && bar0.argsz == 32)
      let rom = try client.regionInfo(6).info
      #expect(rom.flags == .read)
      let vga = try client.regionInfo(8).info
      #expect(vga.size == 0 && vga.flags.isEmpty)
      expectServerError(.invalidArgument) { _ = try client.regionInfo(9) }
      expectServerError(.invalidArgument) {
        try client.request(
          .deviceGetRegionInfo, payload: RegionInfoPayload(argsz: 16, index: 0).encoded())
      }
    }
  }

  @Test func regionIOFDsIsAnEmptySet() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let answer = try client.regionIOFDs(0)
      let reply = answer.payload
      #expect(
        reply.count == 0 && reply.argsz == 16 && reply.index == 0 && reply.subRegions.isEmpty
          && answer.fds.isEmpty)
      expectServerError(.invalidArgument) { _ = try client.regionIOFDs(42) }
      expectServerError(.invalidArgument) {
        try client.request(
          .deviceGetRegionIOFDs,
          payload: RegionIOFDsPayload(argsz: 16, flags: 1, index: 0).encoded())
      }
    }
  }

  @Test func irqInfo() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let intx = try client.irqInfo(VFIOPCIIRQ.intx)
      #expect(intx.count == 1 && intx.flags.contains(.automasked))
      #expect(try client.irqInfo(VFIOPCIIRQ.msix).count == 8)
      expectServerError(.invalidArgument) { _ = try client.irqInfo(5) }
    }
  }

  @Test func readWriteAndBounds() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      try client.write32(region: 0, offset: 0, 0xdead_beef)
      #expect(device.scratch == 0xdead_beef)
      #expect(try client.read32(region: 0, offset: 0) == 0xdead_beef)
      // Outside the region, unsupported width, zero count, read-only region, empty region.
      expectServerError(.invalidArgument) { _ = try client.read(region: 0, offset: 4096, count: 4) }
      expectServerError(.invalidArgument) { _ = try client.read(region: 0, offset: 4094, count: 4) }
      expectServerError(.invalidArgument) { _ = try client.read(region: 0, offset: 0, count: 2) }
      expectServerError(.invalidArgument) { _ = try client.read(region: 0, offset: 0, count: 0) }
      expectServerError(.invalidArgument) { try client.write(region: 6, offset: 0, data: [1]) }
      expectServerError(.invalidArgument) { _ = try client.read(region: 8, offset: 0, count: 1) }
      expectServerError(.invalidArgument) { _ = try client.read(region: 77, offset: 0, count: 1) }
      expectServerError(.invalidArgument) {
        _ = try client.read(region: 0, offset: UInt64.max - 1, count: 4)
      }
      // count beyond max_data_xfer_size
      expectServerError(.argListTooLong) {
        _ = try client.read(region: 2, offset: 0, count: (1 << 20) + 1)
      }
      // A REGION_WRITE whose count disagrees with its data.
      var payload = RegionAccessHeader(offset: 0, region: 0, count: 8).encoded(data: [1, 2, 3, 4])
      expectServerError(.invalidArgument) { try client.request(.regionWrite, payload: payload) }
      payload =
        RegionAccessHeader(offset: 0, region: 0, count: 4).encoded(data: [1, 2, 3, 4]) + [0]
      expectServerError(.invalidArgument) { try client.request(.regionRead, payload: payload) }
    }
  }

  @Test func everyWriteSizeUpToTheLimitWorks() throws {
    var limits = ServerLimits()
    limits.maxDataXferSize = 65536
    try withServer(TestDevice(), limits: limits) { server, device in
      let client = try server.connect(
        capabilities: Capabilities(maxMsgFDs: 16, maxDataXferSize: 65536))
      for size in [1, 2, 3, 7, 8, 63, 4095, 4096, 4097, 32768, 65535, 65536] {
        let data = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ size) }
        try client.write(region: 2, offset: 0, data: data)
        #expect(Array(device.memory[0..<size]) == data, "write of \(size) bytes")
        #expect(try client.read(region: 2, offset: 0, count: size) == data, "read of \(size) bytes")
      }
      expectServerError(.argListTooLong) {
        try client.write(region: 2, offset: 0, data: [UInt8](repeating: 0, count: 65537))
      }
    }
  }

  @Test func writeMultiple() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let done = try client.writeMulti([
        WriteMultiEntry(offset: 0, region: 0, count: 4, data: 0x1111),
        WriteMultiEntry(offset: 0x100, region: 2, count: 8, data: 0x0102_0304_0506_0708),
        WriteMultiEntry(offset: 0x108, region: 2, count: 1, data: 0xAB),
      ])
      #expect(done == 3)
      #expect(device.scratch == 0x1111)
      #expect(
        try client.read(region: 2, offset: 0x100, count: 9) == [8, 7, 6, 5, 4, 3, 2, 1, 0xAB])
      // Posted, like QEMU sends them, then an ordered read sees the effect.
      try client.writeMulti(
        [WriteMultiEntry(offset: 0, region: 0, count: 4, data: 0x2222)], posted: true)
      #expect(try client.read32(region: 0, offset: 0) == 0x2222)
      // A bad entry stops the batch with an error; earlier entries took effect.
      expectServerError(.invalidArgument) {
        try client.writeMulti([
          WriteMultiEntry(offset: 0, region: 0, count: 4, data: 0x3333),
          WriteMultiEntry(offset: 0, region: 0, count: 2, data: 0),
        ])
      }
      #expect(device.scratch == 0x3333)
    }
  }
}
