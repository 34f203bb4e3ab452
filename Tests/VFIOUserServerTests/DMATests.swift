import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

/// Guest memory backed by a memfd, mapped in the test too.
final class GuestMemory {
  let fd: Int32
  /// `fd`, lent for as long as this lives (DMA_MAP sends it).
  var descriptor: FileDescriptor { FileDescriptor(rawValue: fd) }
  let bytes: UnsafeMutableRawBufferPointer
  init(size: Int) {
    fd = cvfu_memfd_create("guest", 0)
    ftruncate(fd, off_t(size))
    bytes = UnsafeMutableRawBufferPointer(
      start: mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), count: size)
  }
  deinit {
    munmap(bytes.baseAddress, bytes.count)
    close(fd)
  }
}

@Suite("DMA windows and device DMA")
struct DMATests {
  @Test func mapUnmapRules() throws {
    var limits = ServerLimits()
    limits.maxDMAMaps = 4
    try withServer(TestDevice(), limits: limits) { server, device in
      let client = try server.connect()
      let guest = GuestMemory(size: 1 << 20)
      let rw: VFIODMAMapFlags = [.read, .write]
      try client.dmaMap(
        address: 0x10_0000, size: 0x1_0000, flags: rw, fd: guest.descriptor, offset: 0)
      #expect(server.server.statistics.snapshot.dmaRegions == 1)
      #expect(device.mappedWindows == 1)
      // Overlaps, exact and partial, at either end.
      expectServerError(.fileExists) {
        try client.dmaMap(address: 0x10_0000, size: 0x1000, flags: rw)
      }
      expectServerError(.fileExists) {
        try client.dmaMap(address: 0xF_F000, size: 0x2000, flags: rw)
      }
      expectServerError(.fileExists) {
        try client.dmaMap(address: 0x10_F000, size: 0x2000, flags: rw)
      }
      // Adjacent is fine; no fd is fine (message-based access).
      try client.dmaMap(address: 0x11_0000, size: 0x1000, flags: rw)
      try client.dmaMap(address: 0xF_F000, size: 0x1000, flags: .read)
      // Unaligned and zero sizes.
      expectServerError(.invalidArgument) {
        try client.dmaMap(address: 0x20_0800, size: 0x1000, flags: rw)
      }
      expectServerError(.invalidArgument) {
        try client.dmaMap(address: 0x20_0000, size: 0, flags: rw)
      }
      try client.dmaMap(address: 0x30_0000, size: 0x1000, flags: rw)
      // max_dma_maps = 4
      expectServerError(.noSpace) { try client.dmaMap(address: 0x40_0000, size: 0x1000, flags: rw) }
      // An unmap may not cut through a window; one that holds none succeeds (DMAUnmapRangeTests).
      expectServerError(.invalidArgument) { try client.dmaUnmap(address: 0x10_0000, size: 0x1000) }
      try client.dmaUnmap(address: 0x50_0000, size: 0x1000)
      #expect(server.server.statistics.snapshot.dmaRegions == 4)
      let echoed = try client.dmaUnmap(address: 0x10_0000, size: 0x1_0000)
      #expect(echoed == DMAUnmapPayload(address: 0x10_0000, size: 0x1_0000))
      #expect(server.server.statistics.snapshot.dmaRegions == 3)
      let all = try client.dmaUnmapAll()
      #expect(all.flags == VFIODMAUnmapFlags.all)
      #expect(server.server.statistics.snapshot.dmaRegions == 0 && device.mappedWindows == 0)
    }
  }

  @Test func mapWithTwoFDsIsRefusedAndNothingLeaks() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let a = GuestMemory(size: 4096)
      let b = GuestMemory(size: 4096)
      expectServerError(.invalidArgument) {
        try client.request(
          .dmaMap,
          payload: DMAMapRequest(flags: [.read, .write], offset: 0, address: 0, size: 4096)
            .encoded(),
          fds: [a.descriptor, b.descriptor])
      }
      // An fd on a command that takes none is closed and the command refused.
      expectServerError(.invalidArgument) {
        try client.request(
          .deviceGetInfo, payload: DeviceInfoPayload().encoded(), fds: [a.descriptor])
      }
      #expect(server.server.statistics.snapshot.dmaRegions == 0)
    }
  }

  /// The device copies BAR2 → client memory and back, through an fd-backed window (memcpy).
  @Test func deviceDMAThroughSharedMemory() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let guest = GuestMemory(size: 1 << 20)
      try client.dmaMap(
        address: 0x4000_0000, size: 1 << 20, flags: [.read, .write], fd: guest.descriptor)
      for i in 0..<20000 { device.memory[i] = UInt8(truncatingIfNeeded: i * 7) }
      try runDMA(client, address: 0x4000_0000 + 0x1000, length: 20000, toClient: true)
      #expect(Array(guest.bytes[0x1000..<(0x1000 + 20000)]) == Array(device.memory[0..<20000]))
      for i in 0..<20000 { guest.bytes[0x1000 + i] = UInt8(truncatingIfNeeded: i * 3) }
      try runDMA(client, address: 0x4000_0000 + 0x1000, length: 20000, toClient: false)
      #expect(Array(device.memory[0..<20000]) == Array(guest.bytes[0x1000..<(0x1000 + 20000)]))
      // Outside every window: the transfer fails with EFAULT.
      try runDMA(client, address: 0x9000_0000, length: 16, toClient: true, expect: 3, errno: EFAULT)
    }
  }

  /// Without an fd the server uses DMA_READ / DMA_WRITE, chunked by the client's max_data_xfer_size.
  @Test(arguments: DMATransferLayout.allCases)
  func deviceDMAThroughMessages(layout: DMATransferLayout) throws {
    var caps = Capabilities(maxMsgFDs: 8, maxDataXferSize: 4096)
    caps.migration = .init(pgsize: 4096, maxBitmapSize: 1 << 28)  // as QEMU proposes: no effect on the layout
    var limits = ServerLimits()
    if layout == .qemu { limits.dmaLayout = .qemu }
    try withServer(TestDevice(), limits: limits) { server, device in
      let client = try server.connect(capabilities: caps, dmaLayout: layout)
      let guest = UnsafeMutableRawBufferPointer.allocate(byteCount: 0x10000, alignment: 16)
      defer { guest.deallocate() }
      guest.initializeMemory(as: UInt8.self, repeating: 0)
      client.memory.add(address: 0x8000_0000, buffer: guest)
      try client.dmaMap(address: 0x8000_0000, size: 0x10000, flags: [.read, .write])
      for i in 0..<10000 { device.memory[i] = UInt8(truncatingIfNeeded: i * 13 + 1) }
      try runDMA(client, address: 0x8000_0100, length: 10000, toClient: true)
      #expect(Array(guest[0x100..<(0x100 + 10000)]) == Array(device.memory[0..<10000]))
      #expect(client.serverRequestsHandled == 3)  // 4096 + 4096 + 1808
      for i in 0..<10000 { guest[0x100 + i] = UInt8(truncatingIfNeeded: i * 5) }
      try runDMA(client, address: 0x8000_0100, length: 10000, toClient: false)
      #expect(Array(device.memory[0..<10000]) == Array(guest[0x100..<(0x100 + 10000)]))
      #expect(client.serverRequestsHandled == 6)
    }
  }

  @Test func clientErrorReplyFailsTheTransfer() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      try client.dmaMap(address: 0x8000_0000, size: 0x1000, flags: [.read, .write])  // no memory registered: client answers EFAULT
      try runDMA(client, address: 0x8000_0000, length: 64, toClient: true, expect: 3, errno: EFAULT)
    }
  }

  @Test func resetCancelsTransferInFlight() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      try client.dmaMap(address: 0x8000_0000, size: 0x1000, flags: [.read, .write])
      try client.write32(region: 0, offset: 0x08, 0x8000_0000)
      try client.write32(region: 0, offset: 0x0C, 0)
      try client.write32(region: 0, offset: 0x10, 64)
      try client.write32(region: 0, offset: 0x14, 2)
      // The DMA_WRITE request is on its way; reset before answering it.
      try client.reset()
      #expect(device.resets == 1)
      #expect(try client.read32(region: 0, offset: 0x18) == 0)
      // The late request is still answered by the client; the server drops the reply quietly.
      _ = try client.serveRequests(timeoutMilliseconds: 50)
      #expect(try client.read32(region: 0, offset: 0x18) == 0)
    }
  }

  private func runDMA(
    _ client: VFIOUserClient, address: UInt64, length: UInt32, toClient: Bool, expect: UInt32 = 2,
    errno: Int32 = 0
  ) throws {
    try client.write32(region: 0, offset: 0x08, UInt32(truncatingIfNeeded: address))
    try client.write32(region: 0, offset: 0x0C, UInt32(truncatingIfNeeded: address >> 32))
    try client.write32(region: 0, offset: 0x10, length)
    try client.write32(region: 0, offset: 0x14, toClient ? 2 : 1)
    // Status reads also let the client answer DMA requests that arrive meanwhile.
    #expect(try eventually { try client.read32(region: 0, offset: 0x18) >= 2 })
    #expect(try client.read32(region: 0, offset: 0x18) == expect)
    if expect == 3 { #expect(try client.read32(region: 0, offset: 0x1C) == UInt32(errno)) }
    try client.write32(region: 0, offset: 0x0, 0)
  }
}
