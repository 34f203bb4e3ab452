import CVFIOUser
import MigrationTools
import SystemPackage
import VFIODevice
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
  /// (48 → 16 and 40 → 40 bytes) over a plain Unix socket between two
  /// threads, the first carrying `fd` as SCM_RIGHTS, which the serving thread
  /// receives and closes as a server must. Pairs per second.
  static func pairFloor(count: Int, fd: Int32, serverCPU: Int32?) -> Double {
    var pair: [Int32] = [-1, -1]
    precondition(cvfu_socketpair(&pair) == 0)
    defer {
      close(pair[0])
      close(pair[1])
    }
    let serverFD = pair[1]
    let done = Semaphore(value: 0)
    let failed = startThread(name: "pair-floor") {
      if let serverCPU { _ = cvfu_pin_to_cpu(serverCPU) }
      var buffer = [UInt8](repeating: 0, count: 64)
      var fds: [Int32] = [-1, -1]
      buffer.withUnsafeMutableBytes { raw in
        for _ in 0..<(count + 100) {
          var received: Int32 = 0
          guard cvfu_recvmsg(serverFD, raw.baseAddress, 48, &fds, 2, &received, 0) == 48,
            received == 1
          else { break }
          close(fds[0])
          guard SocketFloor.writeFully(serverFD, raw.baseAddress!, 16),
            SocketFloor.readFully(serverFD, raw.baseAddress!, 40),
            SocketFloor.writeFully(serverFD, raw.baseAddress!, 40)
          else { break }
        }
      }
      done.signal()
    }
    precondition(failed == nil, "cannot start the floor's server thread: \(failed!)")
    var request = [UInt8](repeating: 1, count: 48)
    var reply = [UInt8](repeating: 0, count: 40)
    var descriptor = fd
    func exchange() {
      request.withUnsafeMutableBytes { raw in
        var iov = iovec(iov_base: raw.baseAddress, iov_len: 48)
        _ = cvfu_sendmsg(pair[0], &iov, 1, &descriptor, 1)
      }
      reply.withUnsafeMutableBytes { raw in
        _ = SocketFloor.readFully(pair[0], raw.baseAddress!, 16)
        _ = SocketFloor.writeFully(pair[0], raw.baseAddress!, 40)
        _ = SocketFloor.readFully(pair[0], raw.baseAddress!, 40)
      }
    }
    for _ in 0..<100 { exchange() }
    let rate = bestBurstRate(total: count, exchange)
    done.wait()
    return rate
  }

  /// Operations per second of the fastest burst of `burst` among `total`:
  /// on a VM shared with other work, the bursts the scheduler left alone
  /// compare two measurements better than an average over its interruptions.
  static func bestBurstRate(total: Int, burst: Int = 1_000, _ body: () throws -> Void) rethrows
    -> Double
  {
    var best = 0.0
    for _ in 0..<max(1, total / burst) {
      let start = now()
      for _ in 0..<burst { try body() }
      best = max(best, Double(burst) / (Double(now() - start) / 1e9))
    }
    return best
  }

  typealias D = XeSimRegisters.DMA

  /// Runs one device → client transfer of the DMA engine to its end.
  static func engineWrite(
    _ client: VFIOUserClient, device: UInt64, to address: UInt64, length: UInt32
  )
    throws
  {
    try engineTransfer(client, device: device, client: address, length: length, toDevice: false)
  }

  /// Runs one transfer of the DMA engine to its end.
  static func engineTransfer(
    _ client: VFIOUserClient, device: UInt64, client address: UInt64, length: UInt32,
    toDevice: Bool
  ) throws {
    try client.write64(region: 0, offset: toDevice ? D.dst : D.src, device)
    try client.write64(region: 0, offset: toDevice ? D.src : D.dst, address)
    try client.write32(region: 0, offset: D.len, length)
    try client.write32(region: 0, offset: D.ctrl, D.control(toDevice: toDevice))
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
    /// Device → client into a memfd sealed against shrinking: plain copies, no SIGBUS guard.
    var sealed: Double
    /// Client → device, from the unsealed window (guarded copies) and the sealed one.
    var read: Double
    var readSealed: Double
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
    try client.dmaMap(
      address: base, size: windowSize, flags: [.read, .write], fd: FileDescriptor(rawValue: fd))
    defer { _ = try? client.dmaUnmapAll() }
    try writeVRAMData(client, count: Int(transfer))
    // 64 MiB of the window, over and over: warm pages, as a guest's DMA buffers are.
    // Each REPORT after STOP and START again starts from an empty log.
    let span: UInt64 = 64 << 20
    var offset: UInt64 = 0
    func writeNext() throws {
      try engineWrite(client, device: 0, to: base + offset, length: transfer)
      offset = (offset + UInt64(transfer)) % span
    }
    for _ in 0..<16 { try writeNext() }
    // The same span of a memfd sealed against shrinking (as QEMU's
    // memory-backend-memfd makes guest RAM): the server copies through it
    // without the SIGBUS guard that the unsealed window's copies take.
    let sealedFD = cvfu_memfd_create("bench-dmalog-sealed", UInt32(CVFU_MFD_ALLOW_SEALING))
    defer { close(sealedFD) }
    ftruncate(sealedFD, off_t(span))
    guard cvfu_seal_shrink(sealedFD) == 0 else { throw CLIError("cannot seal a memfd") }
    let sealedBase: UInt64 = 2 << 40
    try client.dmaMap(
      address: sealedBase, size: span, flags: [.read, .write],
      fd: FileDescriptor(rawValue: sealedFD))
    func transferNext(_ base: UInt64, toDevice: Bool) -> () throws -> Void {
      {
        try engineTransfer(
          client, device: 0, client: base + offset, length: transfer, toDevice: toDevice)
        offset = (offset + UInt64(transfer)) % span
      }
    }
    // Each kind alternately, the best 25-transfer burst of each: the load of
    // the VM moves more than logging (a few words set per 4 MiB) or the guard costs.
    let whole = [DMALoggingRange(iova: base, length: windowSize)]
    var plain = 0.0
    var logged = 0.0
    var sealed = 0.0
    var read = 0.0
    var readSealed = 0.0
    func best(_ body: () throws -> Void) throws -> Double {
      try bestBurstRate(total: 100, burst: 25, body) * Double(transfer)
    }
    for _ in 0..<4 {
      plain = max(plain, try best(writeNext))
      sealed = max(sealed, try best(transferNext(sealedBase, toDevice: false)))
      read = max(read, try best(transferNext(base, toDevice: true)))
      readSealed = max(readSealed, try best(transferNext(sealedBase, toDevice: true)))
      try client.startDMALogging(pageSize: 4096, ranges: whole)
      logged = max(logged, try best(writeNext))
      try client.stopDMALogging()
    }
    try client.startDMALogging(pageSize: 4096, ranges: whole)
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
      plain: plain, logged: logged, sealed: sealed, read: read, readSealed: readSealed,
      memcpy: SocketFloor.memcpyRate(size: Int(transfer), repeats: 400),
      reportClean: clean, reportDirty: LatencySummary(dirty), reportFloor: floor, dirtied: span)
  }
}

/// Writes a pattern with no zero byte over the first `count` bytes of VRAM,
/// 1 MiB a message: a bench that reads VRAM must read what the VF wrote, as
/// a hole would leave from the zero page, which flatters the figure.
func writeVRAMData(_ client: VFIOUserClient, count: Int) throws {
  let pattern = (0..<min(count, 1 << 20)).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) }
  for offset in stride(from: 0, to: count, by: pattern.count) {
    try client.write(
      region: VFIOPCIRegion.bar2, offset: UInt64(offset),
      data: Array(pattern.prefix(count - offset)))
  }
}
