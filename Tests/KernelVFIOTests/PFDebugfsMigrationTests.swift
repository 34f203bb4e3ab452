import Foundation
import KernelVFIO
import Logging
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// The PF's control files as the backend meets them: each errno of the
/// tables of protocol/xe-kernel-facts.md (§5.4, §8), the boolean writes, the position rules.
@Suite("PF debugfs: the control files' semantics")
struct PFControlFileTests {
  func open(_ host: FakeXeHost, _ n: Int, _ control: PFControl) throws -> any PFControlFile {
    try host.debugfs.open(host.system.debugfsVF(host.pf, n) + "/" + control.rawValue, control).get()
  }

  func write(_ file: any PFControlFile, _ text: String, at offset: Int64 = 0) -> Result<Int, Errno>
  {
    Array(text.utf8).withUnsafeBytes { file.pwrite($0, at: offset) }
  }

  func controls(_ host: FakeXeHost, _ n: Int = 1) throws -> PFVFControls {
    try host.device(n).pfMigration.controls
  }

  @Test func booleansPositionsAndWriteOnlyFiles() throws {
    let host = try FakeXeHost()
    let pause = try open(host, 1, .pause)
    #expect(write(pause, "pause") == .failure(.invalidArgument))  // a word, not a bool
    #expect(write(pause, "1", at: 1) == .failure(.invalidArgument))
    #expect(write(pause, "0\n") == .success(2))  // false: nothing happens
    #expect(host.vfs[0].simulatedPF.state(gt: 0).isEmpty)
    #expect(write(pause, "on\n") == .success(3))
    #expect(host.vfs[0].simulatedPF.state(gt: 0).contains(.paused))
    var byte = [UInt8](repeating: 0, count: 8)
    #expect(
      byte.withUnsafeMutableBytes { pause.pread(into: $0, at: 0) } == .failure(.badFileDescriptor))
    let size = try open(host, 1, .migrationSize)
    #expect(write(size, "1") == .failure(.badFileDescriptor))
    let data = try open(host, 1, .migrationData)
    #expect(byte.withUnsafeMutableBytes { data.pread(into: $0, at: 1) } == .failure(.illegalSeek))
    #expect(write(data, "x", at: 8) == .failure(.illegalSeek))
  }

  @Test func migrationSizeReadsShortAtTheEnd() throws {
    let host = try FakeXeHost()
    let expected = try host.vfs[0].simulatedPF.stopCopySize()
    #expect(try controls(host).migrationSize() == expected)
    let file = try open(host, 1, .migrationSize)
    let text = Array("\(expected)\n".utf8)
    var buffer = [UInt8](repeating: 0, count: 4)
    #expect(try buffer.withUnsafeMutableBytes { try file.pread(into: $0, at: 0).get() } == 4)
    #expect(Array(buffer) == Array(text[0..<4]))
    var rest = [UInt8](repeating: 0, count: 64)
    let n = try rest.withUnsafeMutableBytes { try file.pread(into: $0, at: 4).get() }
    #expect(n == text.count - 4)
    #expect(
      try rest.withUnsafeMutableBytes { try file.pread(into: $0, at: Int64(text.count)).get() } == 0
    )
  }

  /// The PF's preconditions, as the controls answer them. pause, resume and
  /// stop run on every GT and answer EUCLEAN when both refuse (the kernel's
  /// `result = result ? -EUCLEAN : err`), so the GT's own errno shows when
  /// only one GT refuses; save and restore stop at the first GT's errno.
  @Test func theStateMachinesErrnos() throws {
    let host = try FakeXeHost()
    let c = try controls(host)
    let pf = host.vfs[0].simulatedPF
    func errno(_ body: () throws(Errno) -> Void) -> Errno? {
      do throws(Errno) { try body() } catch { return error }
      return nil
    }
    let euclean = Errno(rawValue: EUCLEAN)
    #expect(errno { () throws(Errno) in try c.trigger(.save) } == .notPermitted)  // not paused
    #expect(errno { () throws(Errno) in try c.trigger(.restore) } == .notPermitted)
    #expect(errno { () throws(Errno) in try c.trigger(.resume) } == euclean)  // EPERM on both
    try pf.pause(gt: 0)
    #expect(errno { () throws(Errno) in try c.trigger(.resume) } == .notPermitted)  // GT1's EPERM
    try pf.pause(gt: 1)  // GT0 was resumed by the device-level resume
    #expect(errno { () throws(Errno) in try c.trigger(.pause) } == .staleNFSFileHandle)  // GT1: ESTALE
    #expect(errno { () throws(Errno) in try c.trigger(.pause) } == euclean)  // both paused
    // A save that cannot finish yet, however the threads are scheduled:
    // GT0's 11 packets (4 MiB of VRAM in 512 KiB chunks) outnumber the PF's
    // ring, so it waits for a reader. (A save merely slow, with a GT done
    // before the other, would not do: finish_save completes the done GTs
    // before it fails on the first that is not, as the kernel's loop does,
    // and every later finish then fails.)
    host.vfs[0].vramChunkSize = 512 << 10
    #expect(errno { () throws(Errno) in try c.trigger(.save) } == nil)
    #expect(errno { () throws(Errno) in try c.trigger(.save) } == .alreadyInProcess)  // EALREADY
    #expect(errno { () throws(Errno) in try c.trigger(.restore) } == .resourceBusy)  // EBUSY
    #expect(errno { () throws(Errno) in try c.trigger(.resume) } == euclean)  // EBUSY on both
    #expect(errno { () throws(Errno) in try c.finish(.save) } == .ioError)  // GT0 in progress
    // Read to the end of the stream: every GT has then produced all its data.
    let data = try open(host, 1, .migrationData)
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    var streamed = 0
    while case let n = try chunk.withUnsafeMutableBytes({ try data.pread(into: $0, at: 0).get() }),
      n > 0
    {
      streamed += n
    }
    #expect(streamed > 4 << 20)
    #expect(errno { () throws(Errno) in try c.finish(.save) } == nil)
    #expect(errno { () throws(Errno) in try c.trigger(.stop) } == nil)
    #expect(errno { () throws(Errno) in try c.trigger(.stop) } == euclean)  // ESTALE on both
    #expect(errno { () throws(Errno) in try c.trigger(.save) } == .notPermitted)  // stopped
    // Only an FLR leaves STOPPED.
    #expect(errno { () throws(Errno) in try c.trigger(.reset) } == nil)
    #expect(pf.state(gt: 0).isEmpty)
    #expect(pf.state(gt: 1).isEmpty)
    #expect(errno { () throws(Errno) in try c.trigger(.pause) } == nil)
    // A restore whose stream never ends: finishing times out (20 s; 0.3 s here).
    host.vfs[0].pfTiming.restore = .milliseconds(300)
    #expect(errno { () throws(Errno) in try c.trigger(.restore) } == nil)
    #expect(errno { () throws(Errno) in try c.finish(.restore) } == .timedOut)
  }

  /// A save read from `migration_data` directly: reads fill the buffer and
  /// are short only at the end, then 0. Written to a VF of another device,
  /// the descriptor is refused with ENODEV (devid mismatch).
  @Test func aSaveReadsShortAtTheEndAndAnotherDeviceRefusesIt() throws {
    let bmg = try FakeXeHost(vfs: 1)
    let ptl = try FakeXeHost(profile: .ptl, pf: "0000:00:02.0", vfs: 1, vram: nil)
    let source = try controls(bmg)
    try source.trigger(.pause)
    // Each GuC step takes 150 ms: the first read blocks until the PF has produced a buffer's worth.
    // (Timed from the trigger: a test thread held up past the GuC step
    // would otherwise find the data ready and time nothing.)
    bmg.vfs[0].pfTiming.gucLatency = .milliseconds(150)
    let start = ContinuousClock.now
    try source.trigger(.save)
    let data = try open(bmg, 1, .migrationData)
    var stream: [UInt8] = []
    var counts: [Int] = []
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    let first = try buffer.withUnsafeMutableBytes { try data.pread(into: $0, at: 0).get() }
    #expect(ContinuousClock.now - start >= .milliseconds(150) && first == 1 << 20)
    bmg.vfs[0].pfTiming.gucLatency = .zero
    counts.append(first)
    stream += buffer[0..<first]
    while true {
      let n = try buffer.withUnsafeMutableBytes { try data.pread(into: $0, at: 0).get() }
      counts.append(n)
      stream += buffer[0..<n]
      if n == 0 { break }
    }
    // 4 MiB of VRAM and more: full reads, one short one, then the end.
    #expect(counts.count >= 6 && counts.suffix(2).last == 0, "\(counts)")
    #expect(counts.dropLast(2).allSatisfy { $0 == 1 << 20 } && counts[counts.count - 2] < 1 << 20)
    try source.finish(.save)
    let destination = try controls(ptl)
    try destination.trigger(.pause)
    try destination.trigger(.restore)
    let sink = try open(ptl, 1, .migrationData)
    #expect(
      stream.withUnsafeBytes { sink.pwrite($0, at: 0) } == .failure(.operationNotSupportedByDevice))
  }

  /// GuC faults surface as the PF returns them: EIO when rejected on one
  /// GT, EUCLEAN when a GT after a failed one is tried too.
  @Test func guCFailuresComeBackAsThePFsErrnos() throws {
    let host = try FakeXeHost()
    let c = try controls(host)
    func pause() -> Errno? {
      do throws(Errno) { try c.trigger(.pause) } catch { return error }
      return nil
    }
    host.vfs[0].pfFaults.inject(.rejected, on: .pause, gt: 1)
    #expect(pause() == .ioError)
    try c.trigger(.reset)
    host.vfs[0].pfFaults.inject(.rejected, on: .pause)
    #expect(pause() == Errno(rawValue: EUCLEAN))
  }
}

/// A server on a fake VF whose PF migrates it through debugfs: the client
/// sees `xe-vfio-pci`'s behaviour (flags, arcs, the PF's errnos), and an FLR
/// in the middle of a save or restore leaves everything consistent.
@Suite("PF debugfs: migration through the server")
struct PFDebugfsServerTests {
  @Test func theClientSeesStopCopyP2PAndThePFsErrnos() throws {
    let host = try FakeXeHost()
    let device = try host.device(1)
    try withServer(device) { server in
      let client = try server.connect()
      #expect(try client.migrationFlags() == [.stopCopy, .p2p])
      #expect(try client.stopCopySize() == (try host.vfs[0].simulatedPF.stopCopySize()))
      // The PF refuses the pause (rejected on GT1): the arc fails with EIO, nothing moved.
      host.vfs[0].pfFaults.inject(.rejected, on: .pause, gt: 1)
      #expect(errno { try client.setMigrationState(.runningP2P) } == .ioError)
      #expect(try client.migrationState() == .running)
      host.vfs[0].pfFaults = PFFaults()
      try client.reset()
      try client.setMigrationState(.stop)
      #expect(host.vfs[0].workHeld)
      // A whole save through the server, then back to RUNNING: the PF resumes the VF.
      #expect(try save(client) > 0)
      try client.setMigrationState(.running)
      #expect(try client.migrationState() == .running)
      #expect(!host.vfs[0].workHeld)
    }
  }

  /// RESUMING → STOP on a stream without its trailer: the PF's finish
  /// times out (20 s per GT, scaled), the server gives up, the PF stops the
  /// VF, the device says ERROR until a reset, and after it a save works. A
  /// save the PF fails reaches the client as EIO.
  @Test func aFailedRestoreStopsTheVFUntilAReset() throws {
    let host = try FakeXeHost()
    try withServer(try host.device(1)) { server in
      let client = try server.connect()
      host.vfs[0].pfTiming.restore = .milliseconds(300)  // the PF's 20 s per GT
      try client.setMigrationState(.resuming)
      try client.migDataWrite([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])  // part of a header
      #expect(errno { try client.setMigrationState(.stop) } == .timedOut)
      #expect(try client.migrationState() == .error)
      #expect(host.vfs[0].simulatedPF.state(gt: 0).contains(.stopped))
      try client.reset()
      #expect(try client.migrationState() == .running)
      for gt in 0..<2 { #expect(host.vfs[0].simulatedPF.state(gt: gt).isEmpty) }
      #expect(try save(client) > 0)
      try client.setMigrationState(.running)

      host.vfs[0].pfFaults.inject(.error(.ioError), on: .save, gt: 0)
      try client.setMigrationState(.stopCopy)
      #expect(errno { _ = try client.migDataRead(size: 1 << 20) } == .ioError)
      host.vfs[0].pfFaults = PFFaults()
      try client.reset()
      #expect(try save(client) > 0)
    }
  }

  /// Issue 9: an FLR through the server while the PF saves or restores. The
  /// PF cancels, both GTs are READY, the server's state is RUNNING, the old
  /// stream is dead (ENODEV), and the next migration works.
  @Test(arguments: [MigrationState.stopCopy, .resuming])
  func anFLRDuringASaveOrRestoreLeavesEverythingConsistent(during: MigrationState) throws {
    let host = try FakeXeHost()
    let source = try host.device(1)
    let destination = try host.device(2)
    try withServer(source) { a in
      try withServer(destination) { b in
        let src = try a.connect()
        let dst = try b.connect()
        try src.write32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 1), 0x1234_5678)
        try src.setMigrationState(.stop)
        try src.setMigrationState(.stopCopy)
        let head = try src.migDataRead(size: 4096)
        #expect(head.count == 4096)
        let interrupted = during == .stopCopy ? src : dst
        if during == .resuming {
          try dst.setMigrationState(.resuming)
          try dst.migDataWrite(head)
        }
        try interrupted.reset()
        #expect(try interrupted.migrationState() == .running)
        let vf = host.vfs[during == .stopCopy ? 0 : 1]
        for gt in 0..<2 { #expect(vf.simulatedPF.state(gt: gt).isEmpty, "GT\(gt)") }
        #expect(!vf.workHeld)
        if during == .stopCopy {
          #expect(errno { _ = try src.migDataRead(size: 4096) } != nil)
          // The source was reset: its register is gone; write it again.
          try src.write32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 1), 0x1234_5678)
        } else {
          try src.setMigrationState(.stop)
          try src.setMigrationState(.running)
        }
        // The next migration, whole.
        try src.setMigrationState(.stop)
        try dst.setMigrationState(.stop)
        try dst.setMigrationState(.resuming)
        let stream = try save(src, into: dst)
        #expect(stream > 0)
        try dst.setMigrationState(.running)
        #expect(
          try dst.read32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 1)) == 0x1234_5678)
      }
    }
  }

  /// Reads the whole save (STOP → STOP_COPY → STOP), writing it to `destination`; returns its length.
  @discardableResult
  func save(_ client: VFIOUserClient, into destination: VFIOUserClient? = nil) throws -> Int {
    if try client.migrationState() != .stop { try client.setMigrationState(.stop) }
    try client.setMigrationState(.stopCopy)
    var total = 0
    while true {
      let part = try client.migDataRead(size: 1 << 20)
      if let destination, !part.isEmpty { try destination.migDataWrite(part) }
      total += part.count
      if part.count < 1 << 20 { break }  // short only at the end
    }
    try client.setMigrationState(.stop)
    if let destination { try destination.setMigrationState(.stop) }
    return total
  }
}

func errno(_ body: () throws -> Void) -> Errno? {
  do { try body() } catch let error as VFIOUserClientError { return error.errno } catch {
    return nil
  }
  return nil
}

/// A server of `backend` on a socket in a private directory.
func withServer<D: VFIODeviceBackend>(
  _ backend: D, keep: Bool = false, _ body: (TestServer) throws -> Void
) throws {
  let server = try TestServer(backend, resetOnDisconnect: !keep)
  defer { server.close() }
  try body(server)
}

final class TestServer: @unchecked Sendable {
  let server: VFIOUserServer
  let directory: String
  let path: String

  init(_ backend: any VFIODeviceBackend, resetOnDisconnect: Bool) throws {
    directory = NSTemporaryDirectory() + "pfdbg-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    path = directory + "/vf.sock"
    var logger = Logger(label: "pf-debugfs-server")
    logger.logLevel =
      ProcessInfo.processInfo.environment["XVU_TEST_LOG"] != nil ? .trace : .critical
    var limits = ServerLimits()
    limits.resetOnDisconnect = resetOnDisconnect
    server = VFIOUserServer(backend: backend, limits: limits, logger: logger)
    try server.listen(socketPath: path)
    server.start()
  }

  func connect() throws -> VFIOUserClient { try VFIOUserClient.connect(path: path) }

  func close() {
    server.stop()
    try? FileManager.default.removeItem(atPath: directory)
  }
}

/// Issue 9's proof: two hosts (two fake trees, each a BMG PF with a VF on
/// vfio-pci), a server on each VF, and `xe-vfio-user migrate` as a process
/// between their sockets; the destination ends with the source's state.
@Suite("PF debugfs: xe-vfio-user migrate between two fake hosts")
struct PFDebugfsCLIMigrationTests {
  typealias R = XeSimRegisters

  func state(_ client: VFIOUserClient, vram: Int) throws -> [UInt64] {
    var values: [UInt64] = []
    for gt in 0..<2 {
      for i in 0..<R.scratchCount {
        values.append(UInt64(try client.read32(region: 0, offset: R.scratch(gt: gt, index: i))))
      }
    }
    for pte in 0..<4 {  // the PF re-encodes the VFID field (bits 11:2) for its VF
      values.append(try client.read64(region: 0, offset: R.ggttWindow + UInt64(pte) * 8) & ~0xFFC)
    }
    var offset = 0
    while offset < vram {
      let bytes = try client.read(region: 2, offset: UInt64(offset), count: 1 << 20)
      values.append(
        bytes.withUnsafeBytes { raw in
          raw.bindMemory(to: UInt64.self).reduce(UInt64(offset)) { $0 &* 31 &+ $1 }
        })
      offset += 1 << 20
    }
    return values
  }

  @Test func migrateMovesTheVFsStateBetweenHosts() throws {
    let vram = 4 << 20
    let here = try FakeXeHost(pf: "0000:03:00.0", vfs: 1, vram: UInt64(vram))
    let there = try FakeXeHost(pf: "0000:07:00.0", vfs: 2, vram: UInt64(vram))
    try withServer(try here.device(1), keep: true) { a in
      try withServer(try there.device(2), keep: true) { b in
        // Each client in its own scope: the server serves one at a time, and
        // keeps the device's state when it hangs up (`--on-disconnect keep`).
        let before = try {
          let src = try a.connect()
          for gt in 0..<2 {
            for i in 0..<R.scratchCount {
              try src.write32(
                region: 0, offset: R.scratch(gt: gt, index: i), UInt32(0xB000 + gt * 16 + i))
            }
          }
          for pte in 0..<4 {
            try src.write64(
              region: 0, offset: R.ggttWindow + UInt64(pte) * 8,
              0x2_0000_0000 + UInt64(pte) << 12 | 1)
          }
          for mib in 0..<vram >> 20 {
            let bytes = (0..<1 << 20).map {
              UInt8(truncatingIfNeeded: $0 &* 7 &+ mib &* 131 &+ $0 >> 9)
            }
            try src.write(region: 2, offset: UInt64(mib << 20), data: bytes)
          }
          return try state(src, vram: vram)
        }()
        #expect(try state(try b.connect(), vram: vram) != before)

        let result = try runCLI(["migrate", "--from", a.path, "--to", b.path])
        #expect(result.status == 0, "\(result.stderr)")

        let dst = try b.connect()
        #expect(try dst.migrationState() == .running)
        #expect(try state(dst, vram: vram) == before)
        // Both PFs are settled: the source paused (STOP after migrate), the destination running.
        for gt in 0..<2 {
          #expect(!there.vfs[1].simulatedPF.state(gt: gt).contains(.paused))
          #expect(there.vfs[1].simulatedPF.state(gt: gt).contains(.resumed))
        }
      }
    }
  }
}

/// The built `xe-vfio-user`, run as a process.
func runCLI(_ arguments: [String], environment: [String: String] = [:]) throws -> (
  status: Int32, stdout: String, stderr: String
) {
  var dir = URL(fileURLWithPath: #filePath)
  while dir.lastPathComponent != "Tests" { dir.deleteLastPathComponent() }
  let binary = dir.deletingLastPathComponent().appendingPathComponent(".build/debug/xe-vfio-user")
  let process = Process()
  process.executableURL = binary
  process.arguments = arguments
  process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
  let out = Pipe()
  let err = Pipe()
  process.standardOutput = out
  process.standardError = err
  try process.run()
  let stdout = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
  let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
  process.waitUntilExit()
  return (process.terminationStatus, stdout, stderr)
}
