import CVFIOUser
import Foundation
import SystemPackage
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// What a server process holds: descriptors, mappings and resident memory.
struct ProcessFootprint: Equatable, CustomStringConvertible {
  var fds: Int
  var mappings: Int
  var rssKiB: Int
  var anonKiB: Int
  var shmemKiB: Int

  init(_ pid: Int32) {
    fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
    mappings = maps.split(separator: "\n").count
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    func kiB(_ field: String) -> Int {
      status.split(separator: "\n").first { $0.hasPrefix(field) }
        .flatMap { Int($0.split(whereSeparator: \.isWhitespace)[1]) } ?? -1
    }
    rssKiB = kiB("VmRSS:")
    anonKiB = kiB("RssAnon:")
    shmemKiB = kiB("RssShmem:")
  }

  var description: String {
    "\(fds) fds, \(mappings) mappings, \(rssKiB) KiB RSS (anon \(anonKiB), shmem \(shmemKiB))"
  }
}

/// A thousand clients, each leaving at a random point of its life; the
/// server (a `serve` process) ends where it began.
@Suite("Lifecycle stress", .serialized)
struct LifecycleStressTests {
  enum Ending: CaseIterable {
    case beforeVersion, midHeader, midBody, midMessageWithDescriptor, dmaAndEventfdsLive
    case inStopCopy, inResuming
  }

  /// What the clients share: a memfd for DMA, eventfds, the head of a real save.
  final class Material {
    let memfd: Int32
    let eventfds: [Int32]
    var save: [UInt8] = []
    init() {
      memfd = cvfu_memfd_create("xvu-stress", 1)
      ftruncate(memfd, 1 << 16)
      eventfds = (0..<4).map { _ in cvfu_eventfd(0, O_CLOEXEC) }
    }
    deinit {
      close(memfd)
      eventfds.forEach { close($0) }
    }
  }

  /// Connects, retrying while the server still tears the previous client down (EBUSY).
  static func connect(_ serve: ServeProcess) throws -> VFIOUserClient {
    for _ in 0..<200 {
      do {
        return try VFIOUserClient.connect(path: serve.socketPath)
      } catch {
        guard error.errno == .resourceBusy else { throw error }
        usleep(5000)
      }
    }
    return try VFIOUserClient.connect(path: serve.socketPath)
  }

  static func header(_ command: Command, size: Int, id: UInt16 = 1) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: MessageHeader.size)
    bytes.withUnsafeMutableBytes {
      MessageHeader(messageID: id, command: command, size: UInt32(size)).encode(into: $0)
    }
    return bytes
  }

  /// One client's life, ended as `ending` says, at a random point of that stage.
  static func live(
    _ ending: Ending, _ serve: ServeProcess, _ material: Material,
    _ rng: inout SplitMix64
  ) throws {
    switch ending {
    case .beforeVersion:
      let client = try VFIOUserClient.open(path: serve.socketPath)
      _ = client
    case .midHeader:
      let client = try VFIOUserClient.open(path: serve.socketPath)
      let cut = Int.random(in: 1..<MessageHeader.size, using: &rng)
      try client.sendRaw(Array(header(.version, size: 64)[..<cut]))
    case .midBody:
      let client = try connect(serve)
      let message = header(.regionWrite, size: 16 + 16 + 4096) + [UInt8](repeating: 0, count: 16)
      let cut = Int.random(in: MessageHeader.size..<message.count, using: &rng)
      try client.sendRaw(Array(message[..<cut]))
    case .midMessageWithDescriptor:
      let client = try connect(serve)
      let message = header(.dmaMap, size: 16 + 32) + [UInt8](repeating: 0, count: 8)
      try client.sendRaw(message, fds: [FileDescriptor(rawValue: material.memfd)])
    case .dmaAndEventfdsLive:
      let client = try connect(serve)
      try client.dmaMap(
        address: 1 << 30, size: 1 << 16, flags: [.read, .write],
        fd: FileDescriptor(rawValue: material.memfd))
      try client.dmaMap(address: 2 << 30, size: 1 << 16, flags: [.read, .write])
      let count = Int.random(in: 1...material.eventfds.count, using: &rng)
      try client.setIRQEventfds(
        index: VFIOPCIIRQ.msix, start: 0,
        fds: material.eventfds.prefix(count).map(FileDescriptor.init(rawValue:)),
        chunk: count)
      if Bool.random(using: &rng) {
        _ = try client.regionInfo(VFIOPCIRegion.bar0)  // its descriptor closes with it
      }
    case .inStopCopy:
      let client = try connect(serve)
      try client.setMigrationState(.stop)
      try client.setMigrationState(.stopCopy)
      for _ in 0..<Int.random(in: 0...2, using: &rng) {
        _ = try client.migDataRead(size: UInt32.random(in: 1...(64 << 10), using: &rng))
      }
    case .inResuming:
      let client = try connect(serve)
      try client.setMigrationState(.stop)
      try client.setMigrationState(.resuming)
      let cut = Int.random(in: 0..<material.save.count, using: &rng)
      if cut > 0 { try client.migDataWrite(Array(material.save[..<cut])) }
    }
  }

  /// Waits until the server's footprint settles at `baseline` (its last client torn down).
  /// Waits (up to 30 s) for the server's descriptors and mappings to return
  /// to the baseline: on a loaded machine the thread of a client that just
  /// left (its stack is a mapping) can take seconds to finish its clean-up,
  /// such as draining a save the client left in STOP_COPY.
  static func settle(_ pid: Int32, at baseline: ProcessFootprint) -> ProcessFootprint {
    var now = ProcessFootprint(pid)
    for _ in 0..<3000 where now.fds != baseline.fds || now.mappings != baseline.mappings {
      usleep(10_000)
      now = ProcessFootprint(pid)
    }
    return now
  }

  /// The footprint once it holds still (the same descriptors and mappings
  /// over 200 ms, for up to 10 s), so no exiting thread is in the baseline.
  static func steady(_ pid: Int32) -> ProcessFootprint {
    var last = ProcessFootprint(pid)
    for _ in 0..<50 {
      usleep(200_000)
      let now = ProcessFootprint(pid)
      if now.fds == last.fds && now.mappings == last.mappings { return now }
      last = now
    }
    return last
  }

  @Test func aThousandClientLifetimesLeaveNothingBehind() throws {
    let seed =
      ProcessInfo.processInfo.environment["XVU_STRESS_SEED"].flatMap { UInt64($0) }
      ?? UInt64.random(in: 0...UInt64.max)
    print("lifecycle stress: seed \(seed) (XVU_STRESS_SEED=\(seed) repeats it)")
    var rng = SplitMix64(seed: seed)
    // glibc's caches would blur the count of mappings: a malloc arena per
    // contended thread (64 MiB reserved each, never returned) and the stacks
    // of exited threads. With one arena and no stack cache, every mapping the
    // server makes for a client must be gone when the client is.
    let serve = try ServeProcess(
      ["--quiet", "--profile", "ptl", "--log-level", "critical"],
      environment: [
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.pthread.stack_cache_size=0"
      ])
    defer { _ = serve.stop() }
    let pid = serve.pid
    let material = Material()
    do {
      let client = try serve.connect()
      try client.setMigrationState(.stop)
      try client.setMigrationState(.stopCopy)
      while true {
        let chunk = try client.migDataRead(size: 1 << 20)
        if chunk.isEmpty { break }
        material.save += chunk
      }
    }
    #expect(!material.save.isEmpty)
    // Warm-up: every ending a few times, so lazily made state exists before the baseline.
    for _ in 0..<3 {
      for ending in Ending.allCases { try Self.live(ending, serve, material, &rng) }
    }
    _ = try Self.connect(serve).deviceInfo()
    let baseline = Self.steady(pid)

    let lifetimes =
      ProcessInfo.processInfo.environment["XVU_STRESS_LIFETIMES"].flatMap { Int($0) } ?? 1000
    var endings: [Ending: Int] = [:]
    let start = Date()
    for _ in 0..<lifetimes {
      let ending = Ending.allCases.randomElement(using: &rng)!
      try Self.live(ending, serve, material, &rng)
      endings[ending, default: 0] += 1
    }
    let elapsed = Date().timeIntervalSince(start)
    let after = Self.settle(pid, at: baseline)
    print(
      "lifecycle stress: \(lifetimes) lifetimes in \(String(format: "%.1f", elapsed)) s (\(endings.map { "\($0.key): \($0.value)" }.sorted().joined(separator: ", "))); before \(baseline), after \(after)"
    )
    #expect(after.fds == baseline.fds, "descriptors: \(baseline) → \(after)")
    #expect(after.mappings == baseline.mappings, "mappings: \(baseline) → \(after)")
    // The server trims malloc's heap when a client leaves, so what stays is
    // what it holds: a kilobyte kept by each lifetime would show as 1 MiB.
    #expect(abs(after.anonKiB - baseline.anonKiB) <= 768, "RSS: \(baseline) → \(after)")
    #expect(abs(after.rssKiB - baseline.rssKiB) <= 1024, "RSS: \(baseline) → \(after)")
    let next = try Self.connect(serve)
    #expect(try next.deviceInfo().numRegions == 9)
    #expect(try next.migrationState() == .running)
    #expect(try next.read32(region: VFIOPCIRegion.config, offset: 0) == 0xB080_8086)
  }
}
