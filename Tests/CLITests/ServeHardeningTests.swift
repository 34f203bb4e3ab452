import CVFIOUser
import Foundation
import SystemPackage
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

/// Waits until `path` exists (the server is listening) or 5 s pass.
func waitForSocket(_ path: String) {
  for _ in 0..<500 where !FileManager.default.fileExists(atPath: path) { usleep(10_000) }
}

/// A socket file at `path` that nobody listens on (a server that died).
func makeStaleSocket(_ path: String) {
  let fd = cvfu_listen_unix(path, 1)
  precondition(fd >= 0)
  close(fd)
}

/// Runs `body` with a fresh directory under the temporary directory, removed afterwards.
func withTemporaryDirectory(_ prefix: String, _ body: (String) throws -> Void) throws {
  let directory = NSTemporaryDirectory() + "\(prefix)-\(UUID().uuidString.prefix(8))"
  try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
  defer { try? FileManager.default.removeItem(atPath: directory) }
  try body(directory)
}

/// The socket path rules, signals in every state, dropping root, and bounded waits, with `serve` as a process.
@Suite("serve: socket rules, signals, privileges", .serialized)
struct ServeHardeningTests {
  // MARK: Its log

  /// `serve 2>&1 | head -1`, or a `tee` or log collector that restarts: the
  /// reader leaves, and the next log line must not kill the server (SIGPIPE),
  /// which would take the VM's device with it and leave a stale socket.
  @Test(arguments: [SIGTERM, SIGHUP])
  func aLogReaderThatLeavesNeverKillsTheServer(stop signal: Int32) throws {
    try withTemporaryDirectory("xvu-log") { directory in
      var ends: [Int32] = [-1, -1]
      #expect(pipe(&ends) == 0)
      let serve = try ServeProcess(
        ["--vram-size", "16M"], directory: directory, outputDescriptor: ends[1])
      let path = serve.socketPath
      close(ends[1])
      defer { serve.stop(signal: SIGKILL, keepDirectory: true) }
      // Like `head -1`: the first line, then the reader is gone.
      var byte: UInt8 = 0
      while read(ends[0], &byte, 1) == 1, byte != UInt8(ascii: "\n") {}
      close(ends[0])
      // Each client's arrival and departure is logged: every line now meets EPIPE.
      for round in 0..<3 {
        waitForSocket(path)
        var client: VFIOUserClient?
        for _ in 0..<500 where client == nil {
          client = try? VFIOUserClient.connect(path: path)
          if client == nil { usleep(10_000) }
        }
        let served = try #require(client, "round \(round): the server is gone")
        #expect(try served.deviceInfo().numRegions == 9)
        #expect(serve.isRunning, "round \(round)")
      }
      // Exit 0, not a signal's end (128 + the signal).
      #expect(serve.stop(signal: signal, keepDirectory: true).status == 0)
      #expect(!FileManager.default.fileExists(atPath: path), "the socket was left behind")
    }
  }

  // MARK: Socket rules

  @Test func aStaleSocketIsReplacedAndALiveOneIsNot() throws {
    try withTemporaryDirectory("xvu-stale") { directory in try staleSocketIsReplaced(in: directory)
    }
  }

  func staleSocketIsReplaced(in directory: String) throws {
    let path = directory + "/vf0.sock"
    makeStaleSocket(path)
    let serve = try ServeProcess(["--quiet"], directory: directory)
    #expect(serve.socketPath == path)
    defer { serve.stop(keepDirectory: true) }
    var client: VFIOUserClient?
    for _ in 0..<500 where client == nil {
      client = try? VFIOUserClient.connect(path: path)
      if client == nil { usleep(10_000) }
    }
    #expect(try #require(client).deviceInfo().numRegions == 9, "served on the replaced socket")
    let second = try run(["serve", "--socket-path", path])
    #expect(second.status != 0 && second.stderr.contains("another server is listening there"))
  }

  /// A symbolic link at the socket path is never followed or replaced, wherever it points.
  @Test(arguments: ["stale-socket", "file", "dangling"])
  func aSymbolicLinkIsRefused(target kind: String) throws {
    try withTemporaryDirectory("xvu-link") { directory in
      try symbolicLinkIsRefused(in: directory, target: kind)
    }
  }

  func symbolicLinkIsRefused(in directory: String, target kind: String) throws {
    let target = directory + "/target"
    switch kind {
    case "stale-socket": makeStaleSocket(target)
    case "file": try Data("keep me".utf8).write(to: URL(fileURLWithPath: target))
    default: break
    }
    let link = directory + "/vf0.sock"
    #expect(symlink(target, link) == 0)
    let result = try run(["serve", "--socket-path", link])
    #expect(result.status != 0)
    #expect(result.stderr.contains("is a symbolic link"), "\(result.stderr)")
    var st = stat()
    #expect(lstat(link, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK, "the link is left alone")
    if kind == "file" {
      #expect(try String(contentsOfFile: target, encoding: .utf8) == "keep me")
    }
    if kind == "stale-socket" {
      #expect(
        lstat(target, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK, "the target is left alone")
    }
  }

  // MARK: SIGTERM and SIGINT in every state

  /// The end of a stopped server: exit 0, the socket gone, the client hung up.
  func expectCleanStop(
    _ serve: ServeProcess, _ client: VFIOUserClient?, signal: Int32 = SIGTERM,
    logs expected: [String], sourceLocation: SourceLocation = #_sourceLocation
  ) {
    let socket = serve.socketPath
    let result = serve.stop(signal: signal, keepDirectory: true)
    defer { try? FileManager.default.removeItem(atPath: serve.directory) }
    #expect(result.status == 0, "\(result.stderr)", sourceLocation: sourceLocation)
    #expect(!FileManager.default.fileExists(atPath: socket), sourceLocation: sourceLocation)
    for line in expected + ["server stopped"] {
      #expect(
        result.stderr.contains(line), "no '\(line)' in: \(result.stderr)",
        sourceLocation: sourceLocation)
    }
    if let client {
      do {
        _ = try client.deviceInfo()
        Issue.record("the client is still served", sourceLocation: sourceLocation)
      } catch .disconnected {
      } catch .system(let errno) where errno == .brokenPipe || errno == .connectionReset {
      } catch {
        Issue.record("the client saw \(error), not a hang-up", sourceLocation: sourceLocation)
      }
    }
  }

  @Test(arguments: [SIGTERM, SIGINT])
  func signalWhileIdle(_ signal: Int32) throws {
    let serve = try ServeProcess(["--quiet"])
    waitForSocket(serve.socketPath)
    expectCleanStop(serve, nil, signal: signal, logs: ["signal \(signal): shutting down"])
  }

  @Test(arguments: [SIGTERM, SIGINT])
  func signalWithDMAMapsAndEventfdsLive(_ signal: Int32) throws {
    let serve = try ServeProcess(["--quiet", "--profile", "ptl"])
    let client = try serve.connect()
    let memfd = cvfu_memfd_create("xvu-signal", 1)
    defer { close(memfd) }
    ftruncate(memfd, 1 << 20)
    try client.dmaMap(
      address: 1 << 30, size: 1 << 20, flags: [.read, .write], fd: FileDescriptor(rawValue: memfd))
    let eventfds = (0..<4).map { _ in cvfu_eventfd(0, O_CLOEXEC) }
    defer { eventfds.forEach { close($0) } }
    try client.setIRQEventfds(
      index: VFIOPCIIRQ.msix, start: 0, fds: eventfds.map(FileDescriptor.init(rawValue:)), chunk: 4)
    expectCleanStop(
      serve, client, signal: signal,
      logs: ["client disconnected (shutdown); DMA and eventfds released, device reset"])
  }

  /// A server of a VF with 16 MiB of VRAM and a client that moved it through STOP to `state`.
  func serverIn(_ state: MigrationState) throws -> (ServeProcess, VFIOUserClient) {
    let serve = try ServeProcess(["--quiet", "--vram-size", "16M"])
    let client = try serve.connect()
    try client.setMigrationState(.stop)
    try client.setMigrationState(state)
    return (serve, client)
  }

  @Test(arguments: [SIGTERM, SIGINT])
  func signalInStopCopyMidStream(_ signal: Int32) throws {
    let (serve, client) = try serverIn(.stopCopy)
    #expect(try !client.migDataRead(size: 64 * 1024).isEmpty, "the save has begun")
    expectCleanStop(
      serve, client, signal: signal,
      logs: [
        "shutting down with the device in STOP_COPY: migration stream invalidated, device reset, now RUNNING"
      ])
  }

  @Test(arguments: [SIGTERM, SIGINT])
  func signalInResumingMidStream(_ signal: Int32) throws {
    // Half of a real save, written to a second server in RESUMING.
    let (source, sourceClient) = try serverIn(.stopCopy)
    let head = try sourceClient.migDataRead(size: 256 * 1024)
    _ = source.stop()
    let (serve, client) = try serverIn(.resuming)
    try client.migDataWrite(Array(head.prefix(head.count / 2)))
    expectCleanStop(
      serve, client, signal: signal,
      logs: [
        "shutting down with the device in RESUMING: migration stream invalidated, device reset, now RUNNING"
      ])
  }

  // MARK: Bounded waits, from the command line

  @Test func timeoutOptionsDisconnectAHalfMessage() throws {
    let serve = try ServeProcess([
      "--quiet", "--partial-message-timeout", "0.2", "--send-timeout", "0.2",
    ])
    let client = try serve.connect()
    var header = [UInt8](repeating: 0, count: 16)
    header.withUnsafeMutableBytes {
      MessageHeader(messageID: 5, command: .deviceGetInfo, size: 32).encode(into: $0)
    }
    try client.sendRaw(header)
    #expect(throws: VFIOUserClientError.disconnected) {
      _ = try client.receiveMessage(timeoutMilliseconds: 5000)
    }
    let result = serve.stop()
    #expect(
      result.stderr.contains(
        "the client sent part of a message and nothing more for 200 ms: disconnecting it"),
      "\(result.stderr)")
    let bad = try run(["serve", "--send-timeout", "100000"])
    #expect(bad.status != 0 && bad.stderr.contains("--send-timeout is a number of seconds"))
  }

  // MARK: Dropping root

  /// The uids and gids (real, effective, saved) of a process.
  func credentials(_ pid: Int32) -> (uids: String, gids: String) {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    func line(_ key: String) -> String {
      status.split(separator: "\n").first { $0.hasPrefix(key) }.map {
        $0.dropFirst(key.count).split(whereSeparator: \.isWhitespace).prefix(3).joined(
          separator: " ")
      } ?? ""
    }
    return (line("Uid:"), line("Gid:"))
  }

  @Test(.enabled(if: getuid() == 0, "dropping privileges needs root"))
  func droppedServersStillServeAndMigrate() throws {
    let arguments = [
      "--quiet", "--vram-size", "16M", "--on-disconnect", "keep", "--user", "nobody", "--group",
      "nogroup",
    ]
    let source = try ServeProcess(arguments, directoryMode: 0o1777)
    let destination = try ServeProcess(arguments, directoryMode: 0o1777)
    defer {
      _ = source.stop()
      _ = destination.stop()
    }
    let data = try loadDevice(source, vram: 16 << 20, seed: 3)
    _ = try destination.connect()
    for serve in [source, destination] {
      let ids = credentials(serve.pid)
      #expect(ids.uids == "65534 65534 65534" && ids.gids == "65534 65534 65534", "\(ids)")
      var st = stat()
      #expect(stat(serve.socketPath, &st) == 0)
      #expect(
        st.st_uid == 65534 && st.st_mode & 0o777 == 0o600, "the socket: owner-only, the server's")
    }
    waitIdle(source)
    let migrated = try run(["migrate", "--from", source.socketPath, "--to", destination.socketPath])
    #expect(migrated.status == 0, "\(migrated.stderr)")
    waitIdle(destination)
    let client = try destination.connect()
    #expect(try client.read32(region: 0, offset: scratch0) == 0x5eed_0003)
    #expect(try readVRAM(client, 16 << 20) == data)
    let socket = destination.socketPath
    let result = destination.stop(keepDirectory: true)
    #expect(result.status == 0 && result.stderr.contains("running as uid 65534 gid 65534"))
    #expect(
      !FileManager.default.fileExists(atPath: socket), "a dropped server still removes its socket")
    try? FileManager.default.removeItem(atPath: destination.directory)
  }

  @Test func groupWithoutUserAndUnknownUserAreRefused() throws {
    let noUser = try run(["serve", "--group", "nogroup"])
    #expect(noUser.status != 0 && noUser.stderr.contains("--group goes with --user"))
    let unknown = try run(["serve", "--user", "no-such-user-xvu"])
    #expect(unknown.status != 0 && unknown.stderr.contains("no user 'no-such-user-xvu'"))
  }
}
