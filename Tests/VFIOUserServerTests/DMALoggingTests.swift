import Foundation
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// DMA logging of the simulated VF over the socket: the pages its DMA
/// engine writes into fd-backed windows, reported as a VMM asks for them.
@Suite("DMA logging")
struct DMALoggingTests {
  typealias D = XeSimRegisters.DMA
  static let guestBase: UInt64 = 0x1000_0000
  static let guestSize = 1 << 20
  /// A window the client serves with DMA_READ / DMA_WRITE messages (no fd).
  static let messageBase: UInt64 = 0x2000_0000
  static let rw: VFIODMAMapFlags = [.read, .write]
  static let page: UInt64 = 4096

  /// A connected client with bus mastering on and the guest RAM mapped with its memfd.
  func connect(_ server: RunningServer, _ guest: GuestMemory) throws -> VFIOUserClient {
    let client = try server.connect()
    try enableBusMaster(client)
    try client.dmaMap(
      address: Self.guestBase, size: UInt64(Self.guestSize), flags: Self.rw, fd: guest.descriptor,
      offset: 0)
    return client
  }

  func enableBusMaster(_ client: VFIOUserClient) throws {
    let command = try client.read(region: VFIOPCIRegion.config, offset: 4, count: 2)
    try client.write(
      region: VFIOPCIRegion.config, offset: 4, data: [command[0] | 0x06, command[1]])
  }

  /// Runs one transfer of the DMA engine and returns its STATUS once done.
  @discardableResult
  func transfer(
    _ client: VFIOUserClient, toDevice: Bool = false, device: UInt64 = 0, client address: UInt64,
    length: UInt32
  ) throws -> UInt32 {
    try client.write64(region: 0, offset: toDevice ? D.dst : D.src, device)
    try client.write64(region: 0, offset: toDevice ? D.src : D.dst, address)
    try client.write32(region: 0, offset: D.len, length)
    try client.write32(region: 0, offset: D.ctrl, D.control(toDevice: toDevice))
    try client.write32(region: 0, offset: D.doorbell, 1)
    var status: UInt32 = D.statusBusy
    #expect(
      try eventually {
        status = try client.read32(region: 0, offset: D.status)
        return status & D.statusBusy == 0
      })
    try client.write32(region: 0, offset: D.status, D.statusDone | D.statusError)
    return status
  }

  /// The set bits of a report.
  func pages(_ words: [UInt64]) -> [Int] {
    words.enumerated().flatMap { w, word in
      (0..<64).filter { word & (1 << UInt64($0)) != 0 }.map { w * 64 + $0 }
    }
  }

  func report(
    _ client: VFIOUserClient, _ iova: UInt64 = guestBase, _ length: UInt64 = UInt64(guestSize),
    page: UInt64 = page
  ) throws -> [Int] {
    pages(try client.dmaLoggingReport(iova: iova, length: length, pageSize: page))
  }

  func withVF(_ body: (RunningServer, GuestMemory) throws -> Void) throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 4 << 20)
    try withServer(vf) { server, _ in try body(server, GuestMemory(size: Self.guestSize)) }
  }

  /// Exactly the pages the engine wrote: a write across a page boundary
  /// marks both pages, a read marks none, and a write into a window without
  /// an fd (DMA_WRITE messages, the client's to track) marks none. Reading clears.
  @Test func logsExactlyTheDMAEnginesWritesAndReadingClears() throws {
    try withVF { server, guest in
      let client = try connect(server, guest)
      let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 0x4000, alignment: 8)
      defer { scratch.deallocate() }
      client.memory.add(address: Self.messageBase, buffer: scratch)
      try client.dmaMap(address: Self.messageBase, size: 0x4000, flags: Self.rw)
      #expect(try client.supportsDMALogging())
      try client.startDMALogging(
        pageSize: Self.page,
        ranges: [
          DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize)),
          DMALoggingRange(iova: Self.messageBase, length: 0x4000),
        ])
      #expect(try report(client) == [])
      // 3000 bytes from 0x1F00: pages 1 and 2.
      #expect(try transfer(client, client: Self.guestBase + 0x1F00, length: 3000) == D.statusDone)
      // A read of page 5, and a write through messages: not logged.
      #expect(
        try transfer(client, toDevice: true, client: Self.guestBase + 5 * 4096, length: 4096)
          == D.statusDone)
      #expect(try transfer(client, client: Self.messageBase, length: 0x3000) == D.statusDone)
      // One byte at the last page.
      #expect(
        try transfer(client, client: Self.guestBase + UInt64(Self.guestSize) - 1, length: 1)
          == D.statusDone)
      #expect(try report(client) == [1, 2, 255])
      #expect(try report(client) == [], "reading cleared the pages")
      #expect(try report(client, Self.messageBase, 0x4000) == [])
      try client.stopDMALogging()
      try transfer(client, client: Self.guestBase, length: 64)
      expectServerError(.invalidArgument) { _ = try report(client) }
    }
  }

  /// A report at another page size than the log's: coarser pages gather
  /// the log's, finer pages each get their logged page's bit.
  @Test func reportsConvertPageSizes() throws {
    try withVF { server, guest in
      let client = try connect(server, guest)
      let whole = [DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize))]
      try client.startDMALogging(pageSize: Self.page, ranges: whole)
      for page: UInt64 in [0, 1, 17, 200] {
        try transfer(client, client: Self.guestBase + page * 4096 + 8, length: 8)
      }
      // 16 KiB pages: 4 KiB pages 0, 1 → 0; 17 → 4; 200 → 50.
      #expect(try report(client, page: 16384) == [0, 4, 50])
      #expect(try report(client) == [])
      try client.stopDMALogging()

      // A 64 KiB log read at 4 KiB: the logged page's sixteen pages.
      try client.startDMALogging(pageSize: 65536, ranges: whole)
      try transfer(client, client: Self.guestBase + 0x2_3000, length: 16)
      // Half of that 64 KiB page: reported, and kept for the other half's report.
      #expect(try report(client, Self.guestBase + 0x2_0000, 0x8000) == Array(0..<8))
      #expect(try report(client, Self.guestBase + 0x2_8000, 0x8000) == Array(0..<8))
      #expect(try report(client) == Array(32..<48))
      #expect(try report(client) == [])
    }
  }

  /// What the kernel refuses, refused alike.
  @Test func badRequestsGetTheKernelsErrors() throws {
    try withVF { server, guest in
      let client = try connect(server, guest)
      let whole = DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize))
      expectServerError(.invalidArgument) { _ = try report(client) }  // not started
      expectServerError(.invalidArgument) {
        try client.startDMALogging(pageSize: 0, ranges: [whole])
      }
      expectServerError(.invalidArgument) {
        try client.startDMALogging(pageSize: 3 << 12, ranges: [whole])
      }
      expectServerError(.invalidArgument) { try client.startDMALogging(pageSize: 4096, ranges: []) }
      expectServerError(.invalidArgument) {
        try client.startDMALogging(
          pageSize: 4096, ranges: [DMALoggingRange(iova: Self.guestBase + 512, length: 4096)])
      }
      expectServerError(.invalidArgument) {
        try client.startDMALogging(
          pageSize: 4096,
          ranges: [whole, DMALoggingRange(iova: Self.guestBase + 0x8_0000, length: 0x10_0000)])
      }
      expectServerError(.argListTooLong) {
        try client.startDMALogging(
          pageSize: 4096,
          ranges: (0..<257).map { DMALoggingRange(iova: UInt64($0) << 20, length: 4096) })
      }
      // num_ranges larger than the ranges sent; GET on START.
      var short = DMALoggingStartData(pageSize: 4096, ranges: [whole]).encoded()
      short[8] = 2
      let start = VFIODeviceFeatureFlags.set | VFIODeviceFeature.dmaLoggingStart
      expectServerError(.invalidArgument) { _ = try client.feature(flags: start, data: short) }
      expectServerError(.invalidArgument) {
        _ = try client.feature(
          flags: VFIODeviceFeatureFlags.get | VFIODeviceFeature.dmaLoggingStart, argsz: 64)
      }

      try client.startDMALogging(pageSize: 4096, ranges: [whole])
      try client.startDMALogging(pageSize: 4096, ranges: [whole])  // the same again: harmless
      expectServerError(.invalidArgument) {
        try client.startDMALogging(pageSize: 8192, ranges: [whole])
      }
      // Page sizes: not a power of two, below 4 KiB.
      expectServerError(.invalidArgument) {
        _ = try client.feature(
          flags: VFIODeviceFeatureFlags.get | VFIODeviceFeature.dmaLoggingReport,
          data: DMALoggingReportData(iova: Self.guestBase, length: 0x3000, pageSize: 0x3000)
            .encoded(), argsz: 4096)
      }
      expectServerError(.invalidArgument) { _ = try report(client, page: 2048) }
      // Outside the logged range, across its end, unaligned, wrapping.
      expectServerError(.invalidArgument) { _ = try report(client, 0x3000_0000, 4096) }
      expectServerError(.invalidArgument) {
        _ = try report(client, Self.guestBase + UInt64(Self.guestSize) - 4096, 8192)
      }
      expectServerError(.invalidArgument) { _ = try report(client, Self.guestBase + 8, 4096) }
      expectServerError(.overflow) { _ = try report(client, UInt64.max - 4095, 8192) }
      // argsz without room for the bitmap (32 bytes of it).
      expectServerError(.invalidArgument) {
        _ = try client.dmaLoggingReport(
          iova: Self.guestBase, length: UInt64(Self.guestSize), pageSize: 4096, argsz: 32 + 31)
      }
      // A PROBE of each logging feature with its method.
      for (feature, method) in [
        (VFIODeviceFeature.dmaLoggingStart, VFIODeviceFeatureFlags.set),
        (VFIODeviceFeature.dmaLoggingStop, VFIODeviceFeatureFlags.set),
        (VFIODeviceFeature.dmaLoggingReport, VFIODeviceFeatureFlags.get),
      ] {
        _ = try client.feature(flags: VFIODeviceFeatureFlags.probe | method | feature)
      }
      expectServerError(.invalidArgument) {
        _ = try client.feature(
          flags: VFIODeviceFeatureFlags.probe | VFIODeviceFeatureFlags.get
            | VFIODeviceFeature.dmaLoggingStop)
      }
      #expect(try report(client) == [], "the refusals changed nothing")
    }
  }

  /// Pages dirtied in a window the client unmaps stay logged until reported
  /// (QEMU asks after the unmap); DMA into the unmapped range fails and logs nothing.
  @Test func windowsUnmappedWhileLogging() throws {
    try withVF { server, guest in
      let client = try connect(server, guest)
      try client.startDMALogging(
        pageSize: Self.page,
        ranges: [DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize))])
      try transfer(client, client: Self.guestBase + 3 * 4096, length: 4)
      _ = try client.dmaUnmap(address: Self.guestBase, size: UInt64(Self.guestSize))
      let failed = try transfer(client, client: Self.guestBase + 7 * 4096, length: 4)
      #expect(failed & D.statusError != 0)
      #expect(try report(client) == [3])
      // Mapped again (half of it, at another file offset): logged again.
      try client.dmaMap(
        address: Self.guestBase, size: UInt64(Self.guestSize / 2), flags: Self.rw,
        fd: guest.descriptor,
        offset: 0x1000)
      try client.write(region: VFIOPCIRegion.bar2, offset: 0, data: [1, 2, 3, 4])
      try transfer(client, client: Self.guestBase + 9 * 4096, length: 4)
      let landed = 0x1000 + 9 * 4096
      #expect(Array(guest.bytes[landed..<(landed + 4)]) == [1, 2, 3, 4])
      #expect(try report(client) == [9])
    }
  }

  /// A device reset keeps the log (the pages were dirtied all the same);
  /// the client leaving stops it, and the next client starts afresh.
  @Test func resetAndHangUpWhileLogging() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 4 << 20)
    try withServer(vf) { server, _ in
      let guest = GuestMemory(size: Self.guestSize)
      let whole = [DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize))]
      do {
        let client = try connect(server, guest)
        try client.startDMALogging(pageSize: Self.page, ranges: whole)
        try transfer(client, client: Self.guestBase + 4 * 4096, length: 4)
        try client.reset()
        try enableBusMaster(client)
        try transfer(client, client: Self.guestBase + 6 * 4096, length: 4)
        #expect(try report(client) == [4, 6])
        try transfer(client, client: Self.guestBase + 8 * 4096, length: 4)
      }  // the client hangs up
      #expect(server.waitFor { !$0.clientConnected })
      let client = try connect(server, guest)
      expectServerError(.invalidArgument) { _ = try report(client) }
      try client.startDMALogging(pageSize: Self.page, ranges: whole)
      #expect(try report(client) == [], "the last client's pages went with it")
      try transfer(client, client: Self.guestBase, length: 4)
      #expect(try report(client) == [0])
    }
  }

  /// The DMA logging entries of protocol/malformed.json on a device that
  /// logs (the corpus suite sends them to one that does not: ENOTTY).
  @Test func malformedCorpusEntriesOnADeviceThatLogs() throws {
    let entries = SocketCorpus.cases.filter { $0.expectNoDMALogging != nil }
    #expect(entries.count >= 10)
    try withVF { server, guest in
      let client = try connect(server, guest)
      for entry in entries {
        let bytes = try entry.message()
        try client.sendRaw(bytes)
        let reply = try requireMessage(client, timeoutMilliseconds: 5000)
        let errno = try #require(Errno(name: entry.expect), "\(entry.name)")
        MalformedCorpusSocketTests.expectErrorReply(
          reply, to: RawHeader(bytes), errno: errno, name: entry.name)
      }
      // None of them started logging; the connection still serves.
      expectServerError(.invalidArgument) { _ = try report(client) }
      try client.startDMALogging(
        pageSize: Self.page,
        ranges: [DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize))])
      #expect(try report(client) == [])
    }
  }
}
