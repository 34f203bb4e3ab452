import CVFIOUser
import Control
import Foundation
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import XeVF

/// Live update through real processes and sockets: a client in the middle
/// of its work sees the server replaced under it and carries on.
@Suite("Live update", .serialized)
struct LiveUpdateTests {
  typealias Reg = XeSimRegisters

  /// The pid serving now, as its control socket says.
  static func servingPID(_ control: String) throws -> Int32 {
    Int32(try ControlClient(path: control).execute("query-status")["server"]?["pid"]?.integer ?? -1)
  }

  static func liveUpdate(_ control: String, binary: String? = nil) throws -> JSON {
    try ControlClient(path: control, timeoutMilliseconds: 60_000).execute(
      "live-update", arguments: binary.map { .object([("binary", .string($0))]) })
  }

  /// Descriptors of `pid`, by what they are (sockets, memfds, eventfds...), for leak checks.
  static func descriptorCount(_ pid: Int32) -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
  }

  /// Whether `pid` comes back to `count` descriptors (a control connection
  /// just closed by the test may still be open on the server's side a moment).
  static func settles(_ pid: Int32, at count: Int) -> Bool {
    for _ in 0..<200 {
      if descriptorCount(pid) == count { return true }
      usleep(10_000)
    }
    return false
  }

  /// Whether `pid` exited (a zombie its new parent has not reaped yet has).
  static func waitGone(_ pid: Int32) -> Bool {
    for _ in 0..<500 {
      if kill(pid, 0) != 0 { return true }
      // read(2), not Foundation: its reader leaks when the file vanishes mid-read (LSan).
      var bytes = [UInt8](repeating: 0, count: 512)
      let fd = open("/proc/\(pid)/stat", O_RDONLY)
      let n = fd >= 0 ? read(fd, &bytes, bytes.count) : -1
      if fd >= 0 { close(fd) }
      let stat = n > 0 ? String(decoding: bytes[0..<n], as: UTF8.self) : ""
      if let close = stat.lastIndex(of: ")"),
        stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
      {
        return true
      }
      usleep(10_000)
    }
    return false
  }

  /// Runs the VF's copy engine from VRAM to client memory at `address`, raising MSI-X `vector`.
  static func copyToClient(
    _ client: VFIOUserClient, deviceOffset: UInt64, address: UInt64, length: UInt32,
    vector: UInt8
  ) throws {
    try client.write64(region: VFIOPCIRegion.bar0, offset: Reg.DMA.src, deviceOffset)
    try client.write64(region: VFIOPCIRegion.bar0, offset: Reg.DMA.dst, address)
    try client.write32(region: VFIOPCIRegion.bar0, offset: Reg.DMA.len, length)
    try client.write32(
      region: VFIOPCIRegion.bar0, offset: Reg.DMA.ctrl,
      Reg.DMA.control(toDevice: false, vector: vector, interrupt: true))
    try client.write32(region: VFIOPCIRegion.bar0, offset: Reg.DMA.doorbell, 1)
    for _ in 0..<2000 {
      let status = try client.read32(region: VFIOPCIRegion.bar0, offset: Reg.DMA.status)
      if status & Reg.DMA.statusBusy == 0, status & Reg.DMA.statusDone != 0 {
        try client.write32(
          region: VFIOPCIRegion.bar0, offset: Reg.DMA.status,
          Reg.DMA.statusDone | Reg.DMA.statusError)
        return
      }
      usleep(1000)
    }
    Issue.record("the copy engine did not finish")
  }

  @Test func aClientMidWorkCarriesOnAcrossAHundredUpdates() throws {
    let server = try ServeProcess(["--vram-size", "16M", "--quiet"])
    let control = server.socketPath + ".control"
    var pid = server.pid
    defer {
      if kill(pid, 0) == 0 { kill(pid, SIGTERM) }
      _ = server.stop()
    }
    let client = try server.connect()
    // Guest memory the device reaches through a DMA window with its file.
    let memfd = cvfu_memfd_create("guest", 0)
    defer { close(memfd) }
    ftruncate(memfd, 1 << 20)
    let guest = mmap(nil, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
    defer { munmap(guest, 1 << 20) }
    try client.dmaMap(
      address: 1 << 30, size: 1 << 20, flags: [.read, .write], fd: FileDescriptor(rawValue: memfd))
    try client.dmaMap(address: 2 << 30, size: 1 << 20, flags: [.read, .write])  // reached by messages
    // 300 windows of as many files: more descriptors than one SCM_RIGHTS message
    // carries (the handover sends them 250 at a time), and 2,000 of one file.
    var files: [Int32] = []
    defer { files.forEach { close($0) } }
    for i in 0..<300 {
      let file = cvfu_memfd_create("window-\(i)", 0)
      ftruncate(file, 4096)
      files.append(file)
      try client.dmaMap(
        address: 3 << 30 + UInt64(i) * 4096, size: 4096, flags: [.read, .write],
        fd: FileDescriptor(rawValue: file))
    }
    let shared = cvfu_memfd_create("windows", 0)
    defer { close(shared) }
    ftruncate(shared, 2000 * 4096)
    for i in 0..<2000 {
      try client.dmaMap(
        address: 4 << 30 + UInt64(i) * 4096, size: 4096, flags: [.read, .write],
        fd: FileDescriptor(rawValue: shared),
        offset: UInt64(i) * 4096)
    }
    let eventfds = (0..<4).map { _ in cvfu_eventfd(0, 0o4000) }
    defer { eventfds.forEach { close($0) } }
    try client.setIRQEventfds(
      index: VFIOPCIIRQ.msix, start: 0, fds: eventfds.map { FileDescriptor(rawValue: $0) }, chunk: 4
    )
    try client.startDMALogging(
      pageSize: 4096, ranges: [DMALoggingRange(iova: 1 << 30, length: 1 << 20)])
    // Enable memory and bus mastering, and MSI-X, as a guest driver does.
    try client.write(region: VFIOPCIRegion.config, offset: 4, data: [0x06, 0x00])
    let msixControl = UInt64(XePCIConfig.msixCap + 2)
    let control16 = try client.read(region: VFIOPCIRegion.config, offset: msixControl, count: 2)
    let enabled = (UInt16(control16[0]) | UInt16(control16[1]) << 8) | 0x8000
    try client.write(
      region: VFIOPCIRegion.config, offset: msixControl,
      data: [UInt8(enabled & 0xFF), UInt8(enabled >> 8)])
    let vram = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
    try client.write(region: VFIOPCIRegion.bar2, offset: 0x1000, data: vram)
    var before = -1

    // Requests keep coming from the client while the updates happen.
    let stop = Locked(false)
    let counted = Locked(0)
    let failure = Locked<String?>(nil)
    let lent = LentClient(client)
    let worker = Thread {
      let client = lent.client
      var i: UInt32 = 0
      while !stop.withLock({ $0 }) {
        i &+= 1
        do {
          try client.write32(
            region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 1), i)
          let read = try client.read32(
            region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 1))
          guard read == i else {
            failure.withLock { $0 = "scratch read \(read) after writing \(i)" }
            return
          }
          // A burst of posted writes (no replies) that may still be in flight
          // when the update comes: the last one is what the next read sees.
          for k in 0..<8 {
            try client.write32(
              region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 3), i &+ UInt32(k),
              posted: true)
          }
          let posted = try client.read32(
            region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 3))
          guard posted == i &+ 7 else {
            failure.withLock { $0 = "posted writes lost: read \(posted), last posted \(i &+ 7)" }
            return
          }
          counted.withLock { $0 += 1 }
        } catch {
          failure.withLock { $0 = "request \(i) failed: \(error)" }
          return
        }
      }
    }
    worker.start()
    var pauses: [Int64] = []
    for update in 1...100 {
      let answer = try LiveUpdateTests.liveUpdate(control)
      let next = Int32(answer["pid"]?.integer ?? -1)
      #expect(next > 0 && next != pid, "update \(update): \(answer.serialized())")
      #expect(LiveUpdateTests.waitGone(pid), "update \(update): pid \(pid) still runs")
      pid = next
      let status = try ControlClient(path: control).execute("query-status")
      // Counted in the first successor, once it serves: what it holds must not grow with updates.
      if update == 1 {
        usleep(100_000)
        before = LiveUpdateTests.descriptorCount(pid)
      }
      #expect(status["server"]?["pid"]?.integer == Int64(pid))
      #expect(status["server"]?["live-update"]?["count"]?.integer == Int64(update))
      pauses.append(status["server"]?["live-update"]?["pause-ms"]?.integer ?? -1)
      if let failure = failure.withLock({ $0 }) {
        Issue.record("update \(update): \(failure)")
        break
      }
    }
    stop.withLock { $0 = true }
    while !worker.isFinished { usleep(1000) }
    #expect(failure.withLock { $0 } == nil)
    #expect(counted.withLock { $0 } > 100, "the client kept working")
    print("live update pauses (ms): \(pauses)")

    // Everything the client set up is still there, in the last process.
    #expect(try client.read(region: VFIOPCIRegion.bar2, offset: 0x1000, count: vram.count) == vram)
    try LiveUpdateTests.copyToClient(
      client, deviceOffset: 0x1000, address: 1 << 30, length: 4096, vector: 2)
    #expect(
      Array(UnsafeRawBufferPointer(start: guest, count: 4096)) == Array(vram[0..<4096]))
    var count: UInt64 = 0
    #expect(read(eventfds[2], &count, 8) == 8 && count >= 1, "MSI-X vector 2 reached its eventfd")
    let report = try client.dmaLoggingReport(iova: 1 << 30, length: 1 << 20, pageSize: 4096)
    #expect(report.first.map { $0 & 1 == 1 } == true, "the copy's page is logged dirty")
    let status = try ControlClient(path: control).execute("query-status")
    #expect(status["dma"]?["windows"] == .int(2302))
    #expect(status["dma"]?["dirty-logging"] == .bool(true))
    #expect(
      status["interrupts"]?["indexes"]?.array?.first { $0["name"] == .string("MSI-X") }?[
        "vectors-wired"] == .int(4))
    #expect(before > 0 && LiveUpdateTests.settles(pid, at: before), "no descriptor leaked")
  }

  @Test func refusalsLeaveTheServerServing() throws {
    let server = try ServeProcess(["--vram-size", "16M", "--quiet"])
    let control = server.socketPath + ".control"
    let pid = server.pid
    defer { _ = server.stop() }
    let client = try server.connect()
    try client.write32(region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 0), 0xC0FFEE)
    let before = LiveUpdateTests.descriptorCount(pid)
    let directory = server.directory
    // A binary that is missing, one that crashes at start, one that speaks nonsense.
    let crashing = directory + "/crashing"
    try "#!/bin/sh\nexit 3\n".write(toFile: crashing, atomically: true, encoding: .utf8)
    chmod(crashing, 0o755)
    let silent = directory + "/silent"
    try "#!/bin/sh\necho garbage >&3\nsleep 30\n".write(
      toFile: silent, atomically: true, encoding: .utf8)
    chmod(silent, 0o755)
    // Successors that speak the handover but fail it, as a newer or broken
    // binary would: another state version; a refusal of the state; a crash
    // once the state (and its descriptors) arrived.
    func fake(_ name: String, _ body: String) throws -> String {
      let path = directory + "/" + name
      // bash and coreutils only: the handover's frames by hand (protocol/live-update.md).
      let script = """
        #!/bin/bash
        le() { local v=$1 n=$2 out=""; for ((i = 0; i < n; i++)); do out+=$(printf '\\\\x%02x' $(( (v >> (8 * i)) & 255 ))); done; printf "$out"; }
        send() { { le $1 4; le 0 4; le ${#2} 8; printf '%s' "$2"; } >&3; }
        hello() { { le 1 4; le 0 4; le 25 8; le $1 4; le $2 4; le $$ 4; le 5 8; printf 9.9.9; } >&3; }
        receive() {
          local length=$(dd bs=16 count=1 iflag=fullblock <&3 2>/dev/null | od -An -tu8 -j8 | tr -d ' ')
          dd bs=$length count=1 iflag=fullblock <&3 >/dev/null 2>&1
        }

        """ + body
      try script.write(toFile: path, atomically: true, encoding: .utf8)
      chmod(path, 0o755)
      return path
    }
    let newer = try fake("newer", "hello 2 2\nsleep 30\n")
    let refusing = try fake(
      "refusing", "hello 1 1\nreceive\nsend 4 'a check failed'\nsleep 30\n")
    let dying = try fake("dying", "hello 1 1\nreceive\nexit 9\n")
    for (binary, why) in [
      (directory + "/missing", "cannot be run"), (crashing, "closed the handover socket"),
      (silent, "did not take over"), (newer, "reads state versions 2–2, not 1"),
      (refusing, "refused the state: a check failed"), (dying, "exited with status 9"),
    ] {
      do {
        _ = try LiveUpdateTests.liveUpdate(control, binary: binary)
        Issue.record("\(binary) was accepted")
      } catch {
        #expect("\(error)".contains(why), "\(binary): \(error)")
      }
      #expect(try LiveUpdateTests.servingPID(control) == pid)
      #expect(
        try client.read32(region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 0))
          == 0xC0FFEE)
      #expect(LiveUpdateTests.settles(pid, at: before), "\(binary): no descriptor leaked")
    }
    // Mid-migration: the open stream cannot be carried yet; the server carries on.
    try client.setMigrationState(.stop)
    try client.setMigrationState(.stopCopy)
    do {
      _ = try LiveUpdateTests.liveUpdate(control)
      Issue.record("an update mid-save was accepted")
    } catch {
      #expect("\(error)".contains("migration stream is open"), "\(error)")
    }
    try client.setMigrationState(.stop)
    try client.setMigrationState(.running)
    #expect(try LiveUpdateTests.servingPID(control) == pid)
    #expect(LiveUpdateTests.settles(pid, at: before), "no descriptor leaked")
    // And then a good one goes through.
    let answer = try LiveUpdateTests.liveUpdate(control)
    let next = Int32(answer["pid"]?.integer ?? -1)
    #expect(LiveUpdateTests.waitGone(pid))
    #expect(
      try client.read32(region: VFIOPCIRegion.bar0, offset: Reg.scratch(gt: 0, index: 0))
        == 0xC0FFEE)
    kill(next, SIGTERM)
    _ = LiveUpdateTests.waitGone(next)
  }

  @Test func anIdleServerIsUpdatedByTheCommand() throws {
    let server = try ServeProcess(["--quiet"])
    defer { _ = server.stop() }
    do { _ = try server.connect() }
    let result = try run(["live-update", "-s", server.socketPath])
    #expect(result.status == 0, "\(result.stderr)")
    #expect(result.stdout.contains("serves \(server.socketPath) now"), "\(result.stdout)")
    #expect(result.stdout.contains("requests paused"), "\(result.stdout)")
    let pid = try LiveUpdateTests.servingPID(server.socketPath + ".control")
    #expect(pid != server.pid)
    // list names the successor, and that it was live-updated.
    let listed = try run(["list"])
    #expect(listed.stdout.contains("pid \(pid), live-updated 1× (last "), "\(listed.stdout)")
    // A new client is served by the successor.
    let client = try server.connect()
    #expect(try client.read32(region: VFIOPCIRegion.config, offset: 0) & 0xFFFF == 0x8086)
    kill(pid, SIGTERM)
    _ = LiveUpdateTests.waitGone(pid)
    #expect(
      !FileManager.default.fileExists(atPath: server.socketPath), "the successor removed its socket"
    )
  }

  /// Under systemd (ExecReload=... live-update): the old process names the
  /// successor the service's main process through $NOTIFY_SOCKET before it
  /// exits; and after an upgrade replaced the binary, the new file is run.
  @Test func theServiceManagerLearnsTheNewMainPIDAndAnUpgradedBinaryIsRun() throws {
    let directory = NSTemporaryDirectory() + "xvu-notify-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    // The service manager's socket.
    let notify = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
    defer { close(notify) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let notifyPath = directory + "/notify"
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, byte) in notifyPath.utf8.enumerated() { raw[i] = byte }
    }
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(notify, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    #expect(bound == 0)
    // A copy of the binary, replaced by another copy once serving (an upgrade).
    let installed = directory + "/xe-vfio-user"
    try FileManager.default.copyItem(atPath: executable.path, toPath: installed)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: installed)
    let socketPath = directory + "/vf0.sock"
    process.arguments = ["serve", "-s", socketPath, "--quiet"]
    process.environment = ProcessInfo.processInfo.environment.merging(["NOTIFY_SOCKET": notifyPath])
    { $1 }
    process.standardError = FileHandle.nullDevice
    try process.run()
    let control = socketPath + ".control"
    for _ in 0..<500 where !FileManager.default.fileExists(atPath: control) { usleep(10_000) }
    try FileManager.default.removeItem(atPath: installed)
    try FileManager.default.copyItem(atPath: executable.path, toPath: installed)
    let answer = try LiveUpdateTests.liveUpdate(control)
    let next = Int32(answer["pid"]?.integer ?? -1)
    defer { kill(next, SIGTERM) }
    var message = [UInt8](repeating: 0, count: 256)
    let n = recv(notify, &message, message.count, Int32(MSG_DONTWAIT))
    #expect(n > 0 && String(decoding: message[0..<max(n, 0)], as: UTF8.self) == "MAINPID=\(next)")
    process.waitUntilExit()
    #expect(process.terminationStatus == 0, "the old process exits cleanly")
    // The successor runs the file installed now, not the deleted one.
    var link = [UInt8](repeating: 0, count: 4096)
    let length = link.withUnsafeMutableBytes {
      readlink("/proc/\(next)/exe", $0.baseAddress!.assumingMemoryBound(to: CChar.self), 4095)
    }
    #expect(length > 0 && String(decoding: link[0..<max(length, 0)], as: UTF8.self) == installed)
  }
}

/// The client, used by one thread at a time: the worker until it finishes, then the test.
private final class LentClient: @unchecked Sendable {
  let client: VFIOUserClient
  init(_ client: VFIOUserClient) { self.client = client }
}
