import CVFIOUser
import VFIOUser
import VFIOUserClient
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// DMA figures: map storms at several live-window counts beside the socket's
/// round trips, and the simulated DMA engine with and without logging.
enum DMABench {
  /// The raw limit of one DMA_MAP + DMA_UNMAP pair: the same two round trips
  /// (48 → 16 and 40 → 40 bytes) over a plain Unix socket, without the
  /// descriptor DMA_MAP carries.
  static func pairFloor(count: Int, serverCPU: Int32?) -> Double {
    let map = LatencySummary(
      SocketFloor.roundTrips(requestSize: 48, replySize: 16, count: count, serverCPU: serverCPU))
    let unmap = LatencySummary(
      SocketFloor.roundTrips(requestSize: 40, replySize: 40, count: count, serverCPU: serverCPU))
    return 1 / (1 / map.opsPerSecond + 1 / unmap.opsPerSecond)
  }

  typealias D = XeSimRegisters.DMA

  /// Runs one device → client transfer of the DMA engine to its end.
  static func engineWrite(
    _ client: VFIOUserClient, device: UInt64, to address: UInt64, length: UInt32
  )
    throws
  {
    try client.write64(region: 0, offset: D.src, device)
    try client.write64(region: 0, offset: D.dst, address)
    try client.write32(region: 0, offset: D.len, length)
    try client.write32(region: 0, offset: D.ctrl, D.control(toDevice: false))
    try client.write32(region: 0, offset: D.doorbell, 1)
    // The transfer runs after the doorbell's reply and before the next request.
    let status = try client.read32(region: 0, offset: D.status)
    guard status & D.statusDone != 0 else {
      throw CLIError("DMA engine transfer failed: status 0x\(String(status, radix: 16))")
    }
    try client.write32(region: 0, offset: D.status, D.statusDone)
  }

  struct LoggingFigures {
    var plain: Double
    var logged: Double
    var memcpy: Double
    var reportClean: LatencySummary
    var reportDirty: LatencySummary
    var reportFloor: LatencySummary
    var dirtied: UInt64
  }

  /// The DMA engine's device → client bytes per second into a memfd window,
  /// without and with logging, and REPORTs of a 4 GiB window.
  static func logging(_ client: VFIOUserClient, vram: UInt64, serverCPU: Int32?) throws
    -> LoggingFigures
  {
    let windowSize: UInt64 = 4 << 30
    let transfer = UInt32(min(vram, 4 << 20))
    let fd = cvfu_memfd_create("bench-dmalog", 0)
    defer { close(fd) }
    ftruncate(fd, off_t(windowSize))
    let base: UInt64 = 1 << 40
    try client.write32(region: VFIOPCIRegion.config, offset: 4, 0x0006)  // memory + bus master
    try client.dmaMap(address: base, size: windowSize, flags: 3, fd: fd)
    defer { _ = try? client.dmaUnmapAll() }
    // 64 MiB of the window, over and over: warm pages, as a guest's DMA buffers are.
    let span: UInt64 = 64 << 20
    func rate() throws -> Double {
      var offset: UInt64 = 0
      for _ in 0..<16 { try engineWrite(client, device: 0, to: base + offset, length: transfer) }
      let count = 400
      let start = now()
      for _ in 0..<count {
        try engineWrite(client, device: 0, to: base + offset, length: transfer)
        offset = (offset + UInt64(transfer)) % span
      }
      return Double(count) * Double(transfer) / (Double(now() - start) / 1e9)
    }
    let plain = try rate()
    let whole = [DMALoggingRange(iova: base, length: windowSize)]
    try client.startDMALogging(pageSize: 4096, ranges: whole)
    let logged = try rate()
    func reports(_ count: Int) throws -> [UInt64] {
      try (0..<count).map { _ in
        let start = now()
        _ = try client.dmaLoggingReport(iova: base, length: windowSize, pageSize: 4096)
        return now() - start
      }
    }
    let clean = LatencySummary(try reports(50))
    var dirty: [UInt64] = []
    for _ in 0..<20 {
      for i in 0..<(span / UInt64(transfer)) {
        try engineWrite(client, device: 0, to: base + i * UInt64(transfer), length: transfer)
      }
      dirty += try reports(1)
    }
    try client.stopDMALogging()
    let bitmap = DMALoggingReportData.bitmapSize(length: windowSize, pageSize: 4096)!
    let floor = LatencySummary(
      SocketFloor.roundTrips(
        requestSize: 16 + 32, replySize: 16 + 32 + bitmap, count: 200, serverCPU: serverCPU))
    return LoggingFigures(
      plain: plain, logged: logged,
      memcpy: SocketFloor.memcpyRate(size: Int(transfer), repeats: 400),
      reportClean: clean, reportDirty: LatencySummary(dirty), reportFloor: floor, dirtied: span)
  }
}
