import CVFIOUser
import Logging
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// `bench --cpus`: where the server's and the client's threads run.
public enum CPUPlacement: String, CaseIterable, Sendable {
  case same, split
  case unpinned = "none"
}

/// What `bench` measures, as the CLI parsed it (its options and their
/// defaults stay there); `run()` measures and prints the figures.
public struct BenchConfiguration: Sendable {
  /// Round trips per latency figure.
  public var iterations: Int
  public var cpus: CPUPlacement
  /// VRAM of the simulated VF.
  public var vramSize: UInt64
  /// Live DMA windows for the large DMA_MAP figure.
  public var liveMappings: Int
  /// Also count instructions per REGION_READ with valgrind.
  public var instructions: Bool
  /// A comma-separated subset of the figures, or nil for all.
  public var only: String?
  /// VRAM sizes for the migration figures.
  public var migrationVRAM: [UInt64]

  public init(
    iterations: Int, cpus: CPUPlacement, vramSize: UInt64, liveMappings: Int,
    instructions: Bool, only: String?, migrationVRAM: [UInt64]
  ) {
    self.iterations = iterations
    self.cpus = cpus
    self.vramSize = vramSize
    self.liveMappings = liveMappings
    self.instructions = instructions
    self.only = only
    self.migrationVRAM = migrationVRAM
  }
}

/// A `serve` child (or valgrind's) that did not start: the CLI reports it as
/// ArgumentParser's ValidationError, as it always has.
public struct BenchSetupError: Error, CustomStringConvertible {
  public var description: String
  init(_ description: String) { self.description = description }
}

extension BenchConfiguration {
  public func run() throws {
    let clientCPU: Int32? = cpus == .unpinned ? nil : 0
    let serverCPU: Int32? = cpus == .unpinned ? nil : (cpus == .split ? 1 : 0)
    if let clientCPU { _ = cvfu_pin_to_cpu(clientCPU) }
    let selected = Set(
      (only
        ?? "read,write,inflight,large,dma,dmalog,rss,liveupdate,migration,save,checkpoint,counters")
        .split(
          separator: ","
        )
        .map(String.init)
    )
    var logger = Logger(label: "bench")
    logger.logLevel = .error
    let device = try SimulatedXeVF(profile: .bmg, vramSize: vramSize, logger: logger)
    let path = "/tmp/xe-vfio-user-bench-\(getpid()).sock"
    let server = VFIOUserServer(
      backend: device, logger: logger,
      connectionThreadSetup: { if let serverCPU { _ = cvfu_pin_to_cpu(serverCPU) } })
    try server.listen(socketPath: path)
    server.start()
    defer { server.stop() }
    let client = try VFIOUserClient.connect(path: path)
    _ = cvfu_socket_buffers(client.socket.rawValue, 8 << 20)

    let placement =
      switch cpus {
      case .same: "server and client both pinned to CPU 0"
      case .split: "server on CPU 1, client on CPU 0"
      case .unpinned: "not pinned"
      }
    print(
      "xe-vfio-user bench: simulated bmg VF, \(formatBytes(vramSize)) VRAM, \(placement), \(iterations) round trips per figure\n"
    )
    var table = ReportTable()
    let scratch = XeSimRegisters.vfSwFlag(0)
    let n = iterations

    if selected.contains("read") {
      let (ours, floor) = try interleaved(n, request: 32, reply: 36, serverCPU: serverCPU) {
        try readOnce(client, scratch, 4)
      }
      table.latency("4-byte REGION_READ", ours, floor)
    }
    if selected.contains("write") {
      var value: UInt32 = 0
      let (ours, floor) = try interleaved(n, request: 36, reply: 32, serverCPU: serverCPU) {
        value &+= 1
        let id = try withUnsafeBytes(of: &value) {
          try client.sendRegionWrite(region: 0, offset: scratch, data: $0)
        }
        try client.receiveAck(id: id)
      }
      table.latency("4-byte REGION_WRITE", ours, floor)
    }
    if selected.contains("inflight") {
      let floor = LatencySummary(
        SocketFloor.roundTrips(
          requestSize: 32, replySize: 36, count: n, inFlight: 16, serverCPU: serverCPU))
      let ours = LatencySummary(try pipelined(client, scratch, depth: 16, count: n))
      table.rate(
        "4-byte REGION_READ, 16 in flight", ours.opsPerSecond, floor.opsPerSecond, unit: "ops/s",
        target: "≥ 200 k ops/s")
    }
    if selected.contains("large") {
      let size = 1 << 20
      let count = max(200, n / 50)
      let floor = LatencySummary(
        SocketFloor.roundTrips(
          requestSize: 32, replySize: 32 + size, count: count, serverCPU: serverCPU))
      try writeVRAMData(client, count: size)
      let ours = LatencySummary(
        try measure(count) { try readOnce(client, 0, UInt32(size), region: 2) })
      let copy = SocketFloor.memcpyRate(size: size, repeats: count)
      table.rate(
        "1 MiB REGION_READ (BAR2)", ours.opsPerSecond * Double(size),
        floor.opsPerSecond * Double(size), unit: "B/s",
        target: "≥ 5.8 GB/s", extra: "memcpy \(String(printf: "%.1f", copy / 1e9)) GB/s")
    }
    if selected.contains("dma") {
      // A pair is two round trips, the first with a descriptor: the floor is the
      // socket's doing the same, beside each count of live windows.
      let floorFD = cvfu_memfd_create("bench-floor", 0)
      defer { close(floorFD) }
      let floor = DMABench.pairFloor(
        count: min(20_000, max(2_000, n / 5)), fd: floorFD, serverCPU: serverCPU)
      for live in [10, 1_000, liveMappings] {
        let pairs = try dmaPairs(client, live: live, pairs: min(20_000, max(2_000, n / 5)))
        table.rate(
          "DMA_MAP+DMA_UNMAP with fd, \(live) live", pairs, floor, unit: "pairs/s",
          target: "≥ 48 k pairs/s, flat")
      }
      // As QEMU sends them for a guest behind intel-iommu (VIOMMUGuestTests):
      // one 4 KiB window per guest page, each DMA_MAP carrying the RAM memfd.
      let pairs = min(20_000, max(2_048, n / 5))
      for ranged in [false, true] {
        let rate = try viommuPairs(client, pairs: pairs, rangedUnmap: ranged)
        table.rate(
          ranged
            ? "vIOMMU: 512 × 4 KiB maps of one memfd, one 2 MiB unmap"
            : "vIOMMU: 4 KiB map+unmap of one memfd, page by page",
          rate, nil, unit: "pairs/s", target: "")
      }
    }
    if selected.contains("dmalog") {
      let f = try DMABench.logging(client, vram: vramSize, serverCPU: serverCPU)
      let memcpy = "memcpy \(String(printf: "%.1f", f.memcpy / 1e9)) GB/s"
      let rows: [(String, Double, String)] = [
        ("DMA engine → fd window, logging off", f.plain, ""),
        (
          "DMA engine → fd window, logging on", f.logged,
          String(printf: "%.3f× of off", f.logged / f.plain)
        ),
        (
          "DMA engine → sealed memfd window (no SIGBUS guard)", f.sealed,
          String(printf: "guarded %.3f× of this", f.plain / f.sealed)
        ),
        ("DMA engine ← fd window (client → device)", f.read, ""),
        (
          "DMA engine ← sealed memfd window (no SIGBUS guard)", f.readSealed,
          String(printf: "guarded %.3f× of this", f.read / f.readSealed)
        ),
      ]
      for (name, rate, target) in rows {
        table.rate(name, rate, nil, unit: "B/s", target: target, extra: memcpy)
      }
      table.latency("DMA_LOGGING_REPORT, 4 GiB window, clean", f.reportClean, f.reportFloor)
      table.latency(
        "DMA_LOGGING_REPORT, 4 GiB window, \(f.dirtied >> 20) MiB dirty", f.reportDirty,
        f.reportFloor)
    }
    if selected.contains("counters") {
      try countersFigures(&table, logger: logger, count: n, serverCPU: serverCPU)
    }
    if selected.contains("rss") {
      let rss = try residentMemory()
      table.memory(
        "idle RSS of `serve`, no client (VRAM untouched)", rss.idle, floor: rss.floor,
        missingFloor: "floor not built", target: "≤ 8 MiB")
      table.memory("RSS of `serve`, one client connected", rss.connected, floor: nil, target: "")
      table.memory(
        "RSS of `serve` after a client saved the VF (STOP_COPY) and left", rss.afterSave,
        floor: rss.floor, missingFloor: "floor not built", target: "≈ idle")
      if rss.floor == nil {
        print(
          "(the idle floor is xe-vfio-user-idle-floor next to this executable: swift build -c release --static-swift-stdlib --product xe-vfio-user-idle-floor)"
        )
      }
    }
    if instructions {
      if let perRead = try? instructionsPerRead() {
        table.plain(
          "user-space instructions per 4-byte REGION_READ (callgrind)", "\(perRead)",
          target: "≤ 1,500")
      } else {
        table.plain(
          "user-space instructions per 4-byte REGION_READ",
          "not measured (valgrind missing or failed)", target: "")
      }
    }
    print(table.render())
    if selected.contains("liveupdate") {
      _ = cvfu_unpin()
      let floor = LatencySummary(
        SocketFloor.roundTrips(requestSize: 32, replySize: 36, count: 20_000, serverCPU: nil))
      var rows: [[String]] = [
        [
          "live update of", "client's longest wait", "successor's pause", "old server's handover",
          "raw socket round trip p50", "wait ÷ round trip",
        ]
      ]
      let largest = migrationVRAM.max() ?? 4 << 30
      for (name, vram, windows, data) in [
        ("idle device, 256 MiB VRAM", UInt64(256 << 20), 0, UInt64(0)),
        ("60,000 DMA windows", UInt64(256 << 20), min(liveMappings, 60_000), UInt64(0)),
        ("\(formatBytes(largest)) VRAM, 1 GiB of it data", largest, 0, min(largest, 1 << 30)),
      ] {
        let f = try LiveUpdateBench.run(vram: vram, windows: windows, dataBytes: data, name: name)
        rows.append([
          f.name, String(printf: "%.1f ms", f.clientPause), "\(f.successorPause) ms",
          "\(f.handover) ms", String(printf: "%.2f µs", floor.p50),
          String(printf: "%.0f×", f.clientPause * 1000 / floor.p50),
        ])
      }
      print(
        "\nLive update: a serve child updated to this executable while a client thread sends 4-byte REGION_READs back to back; each figure the best of \(LiveUpdateBench.rounds) updates (target: milliseconds)"
      )
      print(ReportTable(rows: rows).render())
    }
    if selected.contains("migration") {
      var rows: [[String]] = [
        [
          "VRAM", "stream", "MIG_DATA_READ", "MIG_DATA_WRITE", "migration", "downtime",
          "raw: memcpy", "raw: socket", "READ ÷ socket", "WRITE ÷ socket", "downtime ÷ socket",
          "peak extra memory",
        ]
      ]
      // Migration runs several threads per side (reader, writer, servers, PF
      // workers): pinning them all to one CPU would measure the scheduler.
      _ = cvfu_unpin()
      for size in migrationVRAM {
        let f = try MigrationBench.run(vram: size, logger: logger, serverCPU: nil)
        rows.append([
          formatBytes(f.vram), formatRate(f.streamBytes),
          String(printf: "%.2f GB/s", f.readRate / 1e9),
          String(printf: "%.2f GB/s", f.writeRate / 1e9),
          String(printf: "%.3f s", f.migrationSeconds),
          String(printf: "%.3f s", f.downtime), String(printf: "%.3f s", f.memcpySeconds),
          String(printf: "%.3f s", f.socketSeconds),
          String(printf: "%.2f×", f.readRate * f.socketSeconds / Double(f.streamBytes)),
          String(printf: "%.2f×", f.writeRate * f.socketSeconds / Double(f.streamBytes)),
          String(printf: "%.2f×", f.downtime / f.socketSeconds),
          String(printf: "%.1f MiB", Double(f.peakAnonGrowth) / 1_048_576),
        ])
      }
      print(
        "\nMigration of the simulated BMG VF, threads not pinned, each figure the best of \(MigrationBench.rounds) rounds interleaved with the raw limits' (targets: MIG_DATA_READ and MIG_DATA_WRITE ≥ 0.8× the raw socket stream, 4 GiB downtime ≤ 1.3× it):"
      )
      print(ReportTable(rows: rows).render())
      let size = migrationVRAM.max() ?? 4 << 30
      let f = try MigrationBench.runSparse(vram: size, logger: logger)
      print(
        "\nmigrate of \(formatBytes(size)) VRAM with 10% of its pages holding data, best of 2 each: downtime \(fixed(f.sparseDowntime, 3)) s over the sparse stream (\(formatRate(f.sparseBytes)) on the wire), \(fixed(f.rawDowntime, 3)) s over the raw one (\(formatRate(f.rawBytes))), \(fixed(f.sparseDowntime / f.rawDowntime, 2))× of it; raw: socket stream of the raw bytes \(fixed(f.socketSeconds, 3)) s (sparse downtime ÷ socket \(fixed(f.sparseDowntime / f.socketSeconds, 2))×); the source's VRAM allocated: \(formatBytes(f.sourceAllocated.before)) before, \(formatBytes(f.sourceAllocated.after)) after"
      )
    }
    if selected.contains("save") {
      _ = cvfu_unpin()
      let size = migrationVRAM.max() ?? 4 << 30
      let f = try SaveBench.run(vram: size, logger: logger)
      let slower = (f.checksummedSeconds / f.plainSeconds - 1) * 100
      print(
        "\nsave of \(formatBytes(f.vram)) VRAM (\(formatRate(f.streamBytes)) stream) to /dev/null, best of 5 each: \(fixed(f.checksummedSeconds, 3)) s with CRC-32C records, \(fixed(f.plainSeconds, 3)) s without (\(fixed(slower, 1))% slower; target ≤ 10%); raw: CRC-32C \(fixed(f.crcRate / 1e9, 1)) GB/s, memcpy \(fixed(f.memcpyRate / 1e9, 1)) GB/s"
      )
    }
    if selected.contains("checkpoint") { try printCheckpoints(logger: logger) }
  }

  private func printCheckpoints(logger: Logger) throws {
    _ = cvfu_unpin()
    let size = migrationVRAM.max() ?? 4 << 30
    var rows: [[String]] = [
      [
        "VRAM", "stream", "checkpoint", "size ÷ raw", "save", "raw save", "save ÷ raw",
        "restore", "raw restore", "restore ÷ raw", "expanded restore ÷ raw", "raw: socket",
        "VRAM allocated, before → after saves",
      ]
    ]
    for content in CheckpointBench.Content.allCases {
      let f = try CheckpointBench.run(vram: size, content: content, logger: logger)
      rows.append([
        "\(formatBytes(size)) \(f.content)", formatRate(f.streamBytes),
        formatRate(f.containerBytes),
        percent(f.containerBytes, of: f.streamBytes),
        String(printf: "%.3f s", f.containerSave), String(printf: "%.3f s", f.rawSave),
        String(printf: "%.2f×", f.containerSave / f.rawSave),
        String(printf: "%.3f s", f.containerRestore), String(printf: "%.3f s", f.rawRestore),
        String(printf: "%.2f×", f.containerRestore / f.rawRestore),
        String(printf: "%.2f×", f.expandedRestore / f.rawRestore),
        String(printf: "%.3f s", f.socketSeconds),
        "\(formatBytes(f.allocatedBeforeSaves)) → \(formatBytes(f.allocatedAfterSaves))",
      ])
    }
    print(
      "\nCheckpoints (save format 3) against the raw stream, files in /dev/shm, best of 3 saves and 2 restores; the container over the sparse stream, and restored expanded as before it (targets: 10% data ≤ 12% of the raw size and restore ≤ 0.2× raw; random save ≤ 1.05× raw):"
    )
    print(ReportTable(rows: rows).render())
  }

  func readOnce(
    _ client: VFIOUserClient, _ offset: UInt64, _ count: UInt32, region: UInt32 = 0
  ) throws {
    let id = try client.sendRegionRead(region: region, offset: offset, count: count)
    try client.receiveRegionRead(id: id, into: BenchBuffer.shared.prefix(Int(count)))
  }

  /// The server's and the floor's round trips in alternating rounds, so drift
  /// in the machine (a VM's neighbours, frequency) hits both alike.
  private func interleaved(
    _ count: Int, request: Int, reply: Int, serverCPU: Int32?, rounds: Int = 5,
    _ body: () throws -> Void
  ) throws -> (LatencySummary, LatencySummary) {
    var ours: [UInt64] = []
    var floor: [UInt64] = []
    for _ in 0..<rounds {
      floor += SocketFloor.roundTrips(
        requestSize: request, replySize: reply, count: count / rounds, serverCPU: serverCPU)
      ours += try measure(count / rounds, body)
    }
    return (LatencySummary(ours), LatencySummary(floor))
  }

  func measure(_ count: Int, _ body: () throws -> Void) throws -> [UInt64] {
    for _ in 0..<min(2000, count) { try body() }
    var samples = [UInt64](repeating: 0, count: count)
    for i in 0..<count {
      let start = now()
      try body()
      samples[i] = now() - start
    }
    return samples
  }

  private func pipelined(_ client: VFIOUserClient, _ offset: UInt64, depth: Int, count: Int) throws
    -> [UInt64]
  {
    var ids: [UInt16] = []
    for _ in 0..<depth {
      ids.append(try client.sendRegionRead(region: 0, offset: offset, count: 4))
    }
    var samples = [UInt64](repeating: 0, count: count)
    var head = 0
    for i in 0..<count {
      let start = now()
      ids.append(try client.sendRegionRead(region: 0, offset: offset, count: 4))
      try client.receiveRegionRead(id: ids[head], into: BenchBuffer.shared.prefix(4))
      head += 1
      samples[i] = now() - start
    }
    while head < ids.count {
      try client.receiveRegionRead(id: ids[head], into: BenchBuffer.shared.prefix(4))
      head += 1
    }
    return samples
  }

  /// DMA_MAP + DMA_UNMAP pairs per second (the best burst, `DMABench.bestBurstRate`), each
  /// map sending a memfd, with `live` other windows mapped (of the same memfd: one server
  /// mapping serves them all).
  private func dmaPairs(_ client: VFIOUserClient, live: Int, pairs: Int) throws -> Double {
    let fd = cvfu_memfd_create("bench-guest", 0)
    defer { close(fd) }
    let memfd = FileDescriptor(rawValue: fd)  // lent to each DMA_MAP
    ftruncate(fd, off_t(live + 1) * 4096)
    let base: UInt64 = 1 << 32
    for i in 0..<live {
      try client.dmaMap(
        address: base + UInt64(i) * 8192, size: 4096, flags: [.read, .write], fd: memfd,
        offset: UInt64(i) * 4096)
    }
    let probe = base + UInt64(live) * 8192
    for _ in 0..<200 {
      try client.dmaMap(address: probe, size: 4096, flags: [.read, .write], fd: memfd, offset: 0)
      try client.dmaUnmap(address: probe, size: 4096)
    }
    let rate = try DMABench.bestBurstRate(total: pairs) {
      try client.dmaMap(address: probe, size: 4096, flags: [.read, .write], fd: memfd, offset: 0)
      try client.dmaUnmap(address: probe, size: 4096)
    }
    try client.dmaUnmapAll()
    return rate
  }

  /// DMA_MAP+DMA_UNMAP pairs per second for a vIOMMU guest's 2 MiB buffer:
  /// 512 windows of 4 KiB at consecutive IOVAs, each a DMA_MAP with the one
  /// guest-RAM memfd. Unmapped page by page (guest pages scattered in RAM, as
  /// the guest's IOMMU unmaps them) or with one DMA_UNMAP of the 2 MiB range
  /// (a huge page, whose page table the guest frees at once).
  private func viommuPairs(_ client: VFIOUserClient, pairs: Int, rangedUnmap: Bool) throws
    -> Double
  {
    let windows = 512
    let fd = cvfu_memfd_create("bench-viommu", 0)
    defer { close(fd) }
    let memfd = FileDescriptor(rawValue: fd)  // lent to each DMA_MAP
    ftruncate(fd, off_t(windows) * 4096)
    let base: UInt64 = 1 << 32
    func round() throws {
      for i in 0..<windows {
        // Scattered pages, or the consecutive ones of a huge page.
        let page = rangedUnmap ? i : (i * 37) % windows
        try client.dmaMap(
          address: base + UInt64(i) * 4096, size: 4096, flags: [.read, .write], fd: memfd,
          offset: UInt64(page) * 4096)
      }
      if rangedUnmap {
        try client.dmaUnmap(address: base, size: UInt64(windows) * 4096)
      } else {
        for i in 0..<windows { try client.dmaUnmap(address: base + UInt64(i) * 4096, size: 4096) }
      }
    }
    try round()
    let rounds = max(1, pairs / windows)
    let start = now()
    for _ in 0..<rounds { try round() }
    return Double(rounds * windows) / (Double(now() - start) / 1e9)
  }

  /// Resident memory (VmRSS, KiB) of `serve` children of this very executable,
  /// before any client, with one client connected and after a client saved
  /// the VF and left, and of the idle floor
  /// (`xe-vfio-user-idle-floor`, built next to it) in the same run.
  private func residentMemory() throws -> (
    idle: Int, connected: Int, afterSave: Int, floor: Int?
  ) {
    let executable = currentExecutable()
    let path = "/tmp/xe-vfio-user-rss-\(getpid()).sock"
    let serve = try startServe(path, vram: vramSize)
    defer {
      serve.interrupt()
      serve.wait()
    }
    guard let idle = settledRSS(of: serve, listeningOn: path) else {
      throw BenchSetupError("`serve` did not start listening on \(path)")
    }
    let connected: Int
    do {
      let client = try VFIOUserClient.connect(path: path)
      _ = try client.deviceInfo()
      connected = settledRSS(of: serve, listeningOn: path) ?? 0
      // A whole save through the socket, then the client leaves: what the
      // server keeps of it is what an idle server carries after a migration.
      try client.setMigrationState(.stop)
      try client.setMigrationState(.stopCopy)
      while try !client.migDataRead(size: 1 << 20).isEmpty {}
      try client.setMigrationState(.running)
    }
    let afterSave = settledRSS(of: serve, listeningOn: path) ?? 0

    var floor: Int?
    let floorExecutable =
      String(executable[..<(executable.lastIndex(of: "/") ?? executable.startIndex)])
      + "/xe-vfio-user-idle-floor"
    if access(floorExecutable, X_OK) == 0 {
      let floorPath = "/tmp/xe-vfio-user-rss-floor-\(getpid()).sock"
      let child = try ChildProcess(floorExecutable, [floorPath])
      floor = settledRSS(of: child, listeningOn: floorPath)
      child.interrupt()
      child.wait()
      unlink(floorPath)
    }
    return (idle, connected, afterSave, floor)
  }

  /// VmRSS of `child` once `socket` exists and the figure has stopped moving.
  private func settledRSS(of child: ChildProcess, listeningOn socket: String) -> Int? {
    var status = stat()
    for _ in 0..<500 {
      if stat(socket, &status) == 0, status.st_mode & S_IFMT == S_IFSOCK { break }
      usleep(10_000)
    }
    guard stat(socket, &status) == 0 else { return nil }
    var last = -1
    for _ in 0..<40 {
      usleep(50_000)
      guard let rss = procStatusKiB("VmRSS", pid: "\(child.pid)") else { return nil }
      if rss == last { break }
      last = rss
    }
    return last
  }

  /// Instructions per 4-byte read: callgrind totals of a `serve` child with 0 and with N reads.
  private func instructionsPerRead() throws -> Int? {
    guard access("/usr/bin/valgrind", X_OK) == 0 else { return nil }
    // valgrind 3.19 cannot read the DWARF 5 the Swift toolchain emits: count on a copy without it.
    let binary = "/tmp/xe-vfio-user-cg-\(getpid())"
    try copyFile(currentExecutable(), to: binary, permissions: [.ownerReadWriteExecute])
    defer { unlink(binary) }
    try ChildProcess("/usr/bin/strip", ["--strip-debug", binary]).wait()
    func run(reads: Int) throws -> Int {
      let path = "/tmp/xe-vfio-user-cg-\(getpid()).sock"
      let out = "/tmp/xe-vfio-user-cg-\(getpid()).out"
      let child = try ChildProcess(
        "/usr/bin/valgrind",
        [
          "--tool=callgrind", "--callgrind-out-file=\(out)", binary, "serve", "--socket-path", path,
          "--quiet", "--log-level", "error",
        ], silenceStandardError: true)
      var client: VFIOUserClient?
      for _ in 0..<3000 where client == nil {
        client = try? VFIOUserClient.connect(path: path)
        if client == nil { usleep(20_000) }
      }
      guard let client else {
        child.interrupt()
        child.wait()
        throw BenchSetupError("valgrind'ed server did not start")
      }
      for _ in 0..<reads { try readOnce(client, XeSimRegisters.vfSwFlag(0), 4) }
      child.interrupt()
      child.wait()
      let text = try readTextFile(out)
      unlink(out)
      guard
        let line = text.split(separator: "\n").first(where: {
          $0.hasPrefix("totals:") || $0.hasPrefix("summary:")
        }),
        let total = Int(line.split(separator: " ")[1])
      else { throw BenchSetupError("no callgrind totals") }
      return total
    }
    let reads = 20_000
    let base = try run(reads: 0)
    let loaded = try run(reads: reads)
    return (loaded - base) / reads
  }
}
