import CVFIOUser
import Foundation
import KernelVFIO
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

// Drives every entry of protocol/malformed.json through a running server over a
// real Unix socket and checks the server's reaction against the entry's `expect`.
// The codec tests (Tests/VFIOUserTests) check the layers below; these check what
// a client actually sees on the wire: the error reply, the hang-up, or silence,
// and that the server keeps serving afterwards without leaking state.

/// The corpus case of TestSupport, with what replaying it over a socket needs.
typealias SocketCorpusCase = MalformedCase
typealias SocketCorpusError = CorpusError

/// `hex` as bytes, or a failure naming it.
func corpusBytes(hex: String) throws -> [UInt8] {
  guard let bytes = [UInt8](hex: hex) else { throw CorpusError("not hex: \(hex.prefix(32))") }
  return bytes
}

extension MalformedCase {
  var serverLimits: ServerLimits {
    var serverLimits = ServerLimits()
    if let maxDMAMaps = limits?.maxDMAMaps { serverLimits.maxDMAMaps = maxDMAMaps }
    return serverLimits
  }

  /// The errno of the expected error reply, or nil for "disconnect" and "no-reply".
  var expectedErrno: Errno? {
    let name =
      expectation.hasSuffix("+disconnect")
      ? String(expectation.dropLast("+disconnect".count)) : expectation
    return name == "ok" ? nil : Errno(name: name)
  }

  /// True when the bytes stop before the header says the message ends, so the
  /// client must close for the server to notice (the "client closed
  /// mid-message" kind of "disconnect"). A size below 16 is the server's to refuse.
  func endsMidMessage() throws -> Bool {
    let bytes = try message()
    guard bytes.count >= MessageHeader.size, let size = RawHeader(bytes).declaredSize else {
      return true
    }
    return size >= UInt32(MessageHeader.size) && bytes.count < Int(size)
  }

  /// The memory a setup DMA_MAP brings, for the kernel backend: a device
  /// behind VFIO reaches only fd-backed memory the server can map into its
  /// IOMMU (the simulated devices take the window without one). A memfd that
  /// covers the window's offset and size; nil for anything else.
  func setupMemory(for bytes: [UInt8]) throws -> Int32? {
    guard backend == .kernel, RawHeader(bytes).command == Command.dmaMap.rawValue,
      bytes.count >= MessageHeader.size + 32
    else { return nil }
    func u64(_ at: Int) -> UInt64 {
      (0..<8).reduce(0) { $0 | UInt64(bytes[MessageHeader.size + at + $1]) << (8 * $1) }
    }
    let fd = cvfu_memfd_create("xvu-setup", 1)  // MFD_CLOEXEC
    guard fd >= 0, ftruncate(fd, off_t(u64(8) + u64(24))) == 0 else {
      throw SocketCorpusError("cannot make the memory of a setup DMA_MAP")
    }
    return fd
  }

  /// `fds` fresh descriptors of the kinds `fd_kind` names: by default memfds
  /// of 64 KiB for DMA_MAP (the kind it maps), eventfds otherwise.
  func makeDescriptors() throws -> SentDescriptors {
    var made = SentDescriptors()
    let dmaMap = RawHeader(try message()).command == Command.dmaMap.rawValue
    let kinds = fdKind.map { $0.split(separator: ",").map(String.init) } ?? []
    for i in 0..<(fds ?? 0) {
      let kind = i < kinds.count ? kinds[i] : kinds.last ?? (dmaMap ? "memfd" : "eventfd")
      let fd = try Self.makeDescriptor(kind)
      guard fd >= 0 else {
        made.close()
        throw SocketCorpusError("cannot create a descriptor: \(Errno(rawValue: -fd))")
      }
      made.append(fd)
    }
    return made
  }

  /// A descriptor of `kind`, or -errno.
  static func makeDescriptor(_ kind: String) throws -> Int32 {
    switch kind {
    case "memfd":
      let fd = cvfu_memfd_create("xvu-corpus-\(UUID().uuidString)", 1)  // MFD_CLOEXEC
      if fd >= 0 { _ = ftruncate(fd, 64 * 1024) }
      return fd
    case "eventfd": return cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC)
    case "pipe", "socket":
      var pair: [Int32] = [-1, -1]
      let made = kind == "pipe" ? pipe(&pair) : cvfu_socketpair(&pair)
      guard made == 0 else { return -errno }
      _ = close(pair[1])
      return pair[0]
    case "directory":
      // A fresh directory, so its path identifies it in /proc/self/fd.
      var template = Array("/tmp/xvu-corpus-XXXXXX".utf8CString)
      guard let made = mkdtemp(&template) else { return -errno }
      let path = String(cString: made)
      defer { rmdir(path) }
      let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
      return fd >= 0 ? fd : -errno
    case "device":
      let fd = open("/dev/null", O_RDWR | O_CLOEXEC)
      return fd >= 0 ? fd : -errno
    default: throw SocketCorpusError("unknown fd_kind \(kind)")
    }
  }
}

/// Descriptors a test sends, and what identifies their open files in
/// /proc/self, so a copy the (in-process) server forgot to close is found.
/// Our copies stay open until after the check: an eventfd-id is unique only
/// while its eventfd lives, and the kernel hands a freed id to the next one.
struct SentDescriptors {
  private(set) var fds: [Int32] = []
  private(set) var fingerprints: [String] = []
  /// The descriptors, lent to a send.
  var lent: [FileDescriptor] { fds.map(FileDescriptor.init(rawValue:)) }

  mutating func append(_ fd: Int32) {
    fds.append(fd)
    if let fingerprint = Self.fingerprint(of: fd) { fingerprints.append(fingerprint) }
  }

  /// Closes our copies (after `leaked()`).
  mutating func close() {
    for fd in fds { _ = Glibc.close(fd) }
    fds = []
  }

  /// Descriptors of this process, other than our own copies, still open on the files we sent.
  func leaked() -> [String] {
    guard !fingerprints.isEmpty,
      let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
    else { return [] }
    return entries.compactMap { entry in
      guard let fd = Int32(entry), !fds.contains(fd), let fingerprint = Self.fingerprint(of: fd),
        fingerprints.contains(fingerprint)
      else { return nil }
      return "fd \(fd) (\(fingerprint))"
    }
  }

  /// An eventfd's `eventfd-id` (unique per eventfd, Linux 6.3 and later), or
  /// the link target of a memfd, directory, pipe or socket (unique). Nil when the descriptor has gone,
  /// or has nothing unique (an eventfd on an older kernel is not tracked).
  static func fingerprint(of fd: Int32) -> String? {
    if let info = POSIX.readText("/proc/self/fdinfo/\(fd)"),
      let id = info.split(separator: "\n").first(where: { $0.hasPrefix("eventfd-id:") })
    {
      return String(id.filter { !$0.isWhitespace })
    }
    // Memfds, directories, pipes and sockets made for a case have unique link targets.
    guard
      let link = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)"),
      ["/memfd:xvu-corpus-", "/tmp/xvu-corpus-", "pipe:[", "socket:["].contains(where: {
        link.hasPrefix($0)
      })
    else { return nil }
    return link
  }
}

enum SocketCorpus {
  static func load<T: Decodable>(_ file: String, as type: T.Type) throws -> T {
    try ProtocolFiles.load(file, as: type)
  }

  /// Empty when the file is missing or unreadable; `corpusLoads` reports why.
  static let all: [SocketCorpusCase] = ProtocolFiles.malformed

  /// The cases the simulated devices replay.
  static let cases: [SocketCorpusCase] = all.filter { $0.kernelOnly != true }

  private struct NamedVector: Decodable {
    var name: String
    var hex: String
  }

  /// QEMU's VERSION request, the `version-request-qemu` golden vector (message ID 0).
  static func qemuVersionRequest() throws -> [UInt8] {
    let vectors = try load("messages.json", as: [NamedVector].self)
    guard let vector = vectors.first(where: { $0.name == "version-request-qemu" }) else {
      throw SocketCorpusError("messages.json has no version-request-qemu")
    }
    return try corpusBytes(hex: vector.hex)
  }

  /// Entries where the corpus is right and the server is not, by name. Their
  /// checks run inside `withKnownIssue`, so the suite stays green until the
  /// server is fixed (and then fails, asking for the entry to be removed here).
  static let knownIssues: [String: Comment] = [:]

  static let replyTimeout: Int32 = 10_000
  static let silenceTimeout: Int32 = 200
}

@Suite("Malformed corpus over a real socket")
struct MalformedCorpusSocketTests {
  @Test func corpusLoads() throws {
    let cases = try SocketCorpus.load("malformed.json", as: [SocketCorpusCase].self)
    #expect(!cases.isEmpty)
    #expect(cases.count == SocketCorpus.all.count)
    #expect(Set(cases.map(\.name)).count == cases.count, "corpus names are unique")
    _ = try SocketCorpus.qemuVersionRequest()
    for entry in cases {
      for replay in [entry, entry.onKernel] {
        let known =
          ["disconnect", "no-reply", "ok"].contains(replay.expectation)
          || replay.expectedErrno != nil
        #expect(known, "\(entry.name): unknown expectation \(replay.expectation)")
      }
      _ = try entry.message()
      for hex in entry.setup ?? [] { _ = try corpusBytes(hex: hex) }
      // The pipelined burst sends setups without descriptors.
      #expect(
        entry.setupFDs == nil || entry.kernelOnly == true,
        "\(entry.name): setup_fds is for kernel_only cases")
    }
    for name in SocketCorpus.knownIssues.keys {
      #expect(cases.contains { $0.name == name }, "known issue \(name) names no corpus entry")
    }
  }

  @Test(arguments: SocketCorpus.cases)
  func corpusEntry(_ entry: SocketCorpusCase) throws {
    if let issue = SocketCorpus.knownIssues[entry.name] {
      withKnownIssue(issue) { try Self.drive(entry) }
    } else {
      try Self.drive(entry)
    }
  }

  /// Every errno-expecting post-VERSION entry back to back on one connection:
  /// everything is sent first, then every reply is read and checked in order.
  @Test func pipelinedBurstOnOneConnection() throws {
    let burst = SocketCorpus.cases.filter {
      $0.afterVersion && $0.expectedErrno != nil && !$0.disconnectsAfterError
        && $0.runsOnDefaultServer
    }
    #expect(burst.count > 50)
    try withServer(TestDevice()) { server, device in
      let client = try VFIOUserClient.open(path: server.path)
      try Self.handshake(client)

      struct Pending {
        var name: String
        var header: RawHeader
        var errno: Errno?
        var knownIssue: Comment?
      }
      var pending: [Pending] = []
      var mappedBySetup = 0
      // Setup messages first (each succeeds); none undoes another's state, and
      // cases that share one (the same window) share its single copy.
      var setupsSent: Set<String> = []
      for entry in burst {
        for (i, hex) in (entry.setup ?? []).enumerated() where setupsSent.insert(hex).inserted {
          let bytes = try corpusBytes(hex: hex)
          try client.sendRaw(bytes)
          let header = RawHeader(bytes)
          if header.command == Command.dmaMap.rawValue { mappedBySetup += 1 }
          pending.append(Pending(name: "\(entry.name) setup \(i)", header: header, errno: nil))
        }
      }
      var sent: [(name: String, descriptors: SentDescriptors)] = []
      for entry in burst {
        let bytes = try entry.message()
        let descriptors = try entry.makeDescriptors()
        defer { sent.append((entry.name, descriptors)) }
        try client.sendRaw(bytes, fds: descriptors.lent)
        pending.append(
          Pending(
            name: entry.name, header: RawHeader(bytes), errno: entry.expectedErrno,
            knownIssue: SocketCorpus.knownIssues[entry.name]))
      }

      for expected in pending {
        guard let reply = try client.receiveMessage(timeoutMilliseconds: SocketCorpus.replyTimeout)
        else {
          Issue.record("\(expected.name): no reply (the burst stalled)")
          return
        }
        func check() {
          if let errno = expected.errno {
            Self.expectErrorReply(reply, to: expected.header, errno: errno, name: expected.name)
          } else {
            Self.expectSuccessReply(reply, to: expected.header, name: expected.name)
          }
        }
        if let issue = expected.knownIssue { withKnownIssue(issue) { check() } } else { check() }
      }
      try Self.expectSilence(client, "after the burst")
      try Self.expectWorks(client, "after the burst")
      Self.expectNoLeaks(server, device.mappedWindows, dmaRegions: mappedBySetup, "after the burst")
      for (name, var descriptors) in sent {
        let leaked = descriptors.leaked()
        descriptors.close()
        #expect(leaked.isEmpty, "\(name): the server kept the descriptors sent with it: \(leaked)")
      }
    }
  }

  // MARK: One entry

  static func drive(_ entry: SocketCorpusCase) throws {
    if entry.backend == .kernel {
      try FakeKernelServer.drive(entry)
    } else if entry.device == "xe" {
      let vf = try SimulatedXeVF(profile: .ptl)
      try withServer(vf, limits: entry.serverLimits) { server, _ in
        try drive(entry, server, mappedWindows: { nil })
      }
    } else if entry.device == "migrating" {
      try withServer(MigratingTestDevice(), limits: entry.serverLimits) { server, device in
        try drive(entry, server, mappedWindows: { device.mappedWindows })
      }
    } else {
      try withServer(TestDevice(), limits: entry.serverLimits) { server, device in
        try drive(entry, server, mappedWindows: { device.mappedWindows })
      }
    }
  }

  /// `mappedWindows`: the windows the device was told of, when it tells.
  static func drive(
    _ entry: SocketCorpusCase, _ server: RunningServer, mappedWindows device: () -> Int?
  ) throws {
    do {
      let name = entry.name
      let client = try VFIOUserClient.open(path: server.path)
      if entry.afterVersion { try handshake(client, sparse: entry.sparseMigration == true) }

      var mappedBySetup = 0
      for (i, hex) in (entry.setup ?? []).enumerated() {
        let bytes = try corpusBytes(hex: hex)
        var fds = try entry.setupMemory(for: bytes).map { [$0] } ?? []
        let eventFDs = i < (entry.setupFDs?.count ?? 0) ? entry.setupFDs![i] : 0
        fds += (0..<eventFDs).map { _ in cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC) }
        defer { for fd in fds { _ = close(fd) } }
        try client.sendRaw(bytes, fds: fds.map(FileDescriptor.init(rawValue:)))
        let reply = try requireMessage(
          client, timeoutMilliseconds: SocketCorpus.replyTimeout,
          "\(name): no reply to setup \(i)")
        let header = RawHeader(bytes)
        expectSuccessReply(reply, to: header, name: "\(name) setup \(i)")
        if header.command == Command.dmaMap.rawValue { mappedBySetup += 1 }
      }
      expectNoLeaks(server, device(), dmaRegions: mappedBySetup, "\(name): after setup")

      let bytes = try entry.message()
      let header = RawHeader(bytes)
      var descriptors = try entry.makeDescriptors()
      try client.sendRaw(bytes, fds: descriptors.lent)
      // Run last, after a round trip (or the hang-up) that follows the
      // server's handling of the message: every descriptor sent is closed.
      defer {
        let leaked = descriptors.leaked()
        descriptors.close()
        #expect(leaked.isEmpty, "\(name): the server kept the descriptors sent with it: \(leaked)")
      }

      switch entry.expectation {
      case "disconnect":
        let clientCloses = try entry.endsMidMessage()
        if clientCloses {
          // The client stops mid-message and closes its side; the server must
          // notice, send nothing, and close too.
          _ = shutdown(client.socket.rawValue, Int32(SHUT_WR))
        }
        expectHangUp(client, "\(name): expected a hang-up without a reply")
        #expect(
          server.waitFor { !$0.clientConnected }, "\(name): the server still holds the connection")
        let end = server.server.statistics.snapshot.lastEnd
        let refused: Bool = if case .protocolError = end { true } else { false }
        #expect(
          clientCloses ? end == .clientClosed : refused,
          "\(name): the connection ended \(String(describing: end)), expected \(clientCloses ? "the client's close" : "a protocol error")"
        )
        try expectServesNewClient(server, device, name)

      case "no-reply":
        try expectSilence(client, name)
        if !entry.afterVersion { try handshake(client) }
        try expectWorks(client, name)
        expectNoLeaks(server, device(), dmaRegions: mappedBySetup, name)

      case "ok":
        let reply = try requireMessage(
          client, timeoutMilliseconds: SocketCorpus.replyTimeout,
          "\(name): no reply within \(SocketCorpus.replyTimeout) ms")
        expectSuccessReply(reply, to: header, name: name)
        if !entry.afterVersion { try handshake(client) }
        try expectWorks(client, name)
        expectNoLeaks(server, device(), dmaRegions: mappedBySetup, name)

      default:
        let errno = try #require(
          entry.expectedErrno, "\(name): unknown expectation \(entry.expectation)")
        let reply = try requireMessage(
          client, timeoutMilliseconds: SocketCorpus.replyTimeout,
          "\(name): no reply within \(SocketCorpus.replyTimeout) ms")
        expectErrorReply(reply, to: header, errno: errno, name: name)
        if entry.disconnectsAfterError {
          expectHangUp(client, "\(name): expected the server to close after the error reply")
          #expect(
            server.waitFor { !$0.clientConnected }, "\(name): the server still holds the connection"
          )
          try expectServesNewClient(server, device, name)
        } else {
          // Exactly one reply: the round trip below fails on any stray message.
          if !entry.afterVersion { try handshake(client) }
          try expectWorks(client, name)
          expectNoLeaks(server, device(), dmaRegions: mappedBySetup, name)
        }
      }
    }
  }

  // MARK: Checks

  /// Sends QEMU's VERSION and checks the server's 0.0 reply.
  /// QEMU's VERSION, or (`sparse`) this project's client's offer of the sparse stream.
  static func handshake(_ client: VFIOUserClient, sparse: Bool = false) throws {
    var request = try SocketCorpus.qemuVersionRequest()
    if sparse {
      let payload = VersionPayload(
        major: 0, minor: 0, json: VFIOUserClient.sparseCapabilities.json()
      ).encoded()
      request = [UInt8](repeating: 0, count: 16) + payload
      request.withUnsafeMutableBytes {
        MessageHeader(messageID: 1, command: .version, size: UInt32($0.count)).encode(into: $0)
      }
    }
    try client.sendRaw(request)
    let reply = try requireMessage(
      client, timeoutMilliseconds: SocketCorpus.replyTimeout,
      "no reply to VERSION")
    expectSuccessReply(reply, to: RawHeader(request), name: "VERSION")
    let version = try VersionPayload(decoding: reply.payload)
    #expect(version.major == 0 && version.minor == 0)
  }

  static func expectSuccessReply(
    _ reply: borrowing ClientMessage, to request: RawHeader, name: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) {
    let h = reply.header
    #expect(
      h.messageID == request.messageID && h.command == request.command,
      "\(name): reply is id \(h.messageID) command \(h.command), expected id \(request.messageID) command \(request.command)",
      sourceLocation: sourceLocation)
    #expect(
      h.isReply && !h.isError,
      "\(name): expected success, got flags \(h.flags.rawValue) error \(h.error)",
      sourceLocation: sourceLocation)
  }

  static func expectErrorReply(
    _ reply: borrowing ClientMessage, to request: RawHeader, errno: Errno, name: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) {
    let h = reply.header
    let got = h.isError ? Errno(rawValue: Int32(bitPattern: h.error)).name : "success"
    #expect(
      h.messageID == request.messageID && h.command == request.command,
      "\(name): reply is id \(h.messageID) command \(h.command), expected id \(request.messageID) command \(request.command)",
      sourceLocation: sourceLocation)
    #expect(
      h.isReply, "\(name): not a reply (flags \(h.flags.rawValue))", sourceLocation: sourceLocation)
    #expect(
      h.isError && h.error == UInt32(bitPattern: errno.rawValue),
      "\(name): expected \(errno.name), got \(got)",
      sourceLocation: sourceLocation)
    #expect(
      h.size == UInt32(MessageHeader.size) && reply.payload.isEmpty && reply.fds.isEmpty,
      "\(name): an error reply is the header alone (size \(h.size), \(reply.fds.count) fds)",
      sourceLocation: sourceLocation)
  }

  /// The server closes the connection, and sends nothing before it does.
  static func expectHangUp(
    _ client: VFIOUserClient, _ what: String, sourceLocation: SourceLocation = #_sourceLocation
  ) {
    while true {
      do throws(VFIOUserClientError) {
        guard
          let message = try client.receiveMessage(timeoutMilliseconds: SocketCorpus.replyTimeout)
        else {
          Issue.record("\(what): the connection is still open", sourceLocation: sourceLocation)
          return
        }
        Issue.record(
          "\(what): got message id \(message.header.messageID) flags \(message.header.flags.rawValue) error \(message.header.error)",
          sourceLocation: sourceLocation)
      } catch .disconnected {
        return
      } catch {
        Issue.record("\(what): \(error)", sourceLocation: sourceLocation)
        return
      }
    }
  }

  /// Nothing arrives for `SocketCorpus.silenceTimeout` milliseconds.
  static func expectSilence(
    _ client: VFIOUserClient, _ name: String, sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    if let message = try client.receiveMessage(timeoutMilliseconds: SocketCorpus.silenceTimeout) {
      Issue.record(
        "\(name): expected no reply, got id \(message.header.messageID) command \(message.header.command) flags \(message.header.flags.rawValue) error \(message.header.error)",
        sourceLocation: sourceLocation)
    }
  }

  /// A DEVICE_GET_INFO round trip succeeds on `client`.
  static func expectWorks(
    _ client: VFIOUserClient, _ name: String, sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let info = try client.deviceInfo()
    #expect(
      info.numRegions == 9 && info.numIRQs == 5, "\(name): DEVICE_GET_INFO answered \(info)",
      sourceLocation: sourceLocation)
  }

  /// After a hang-up, a new client connects, negotiates and is served.
  static func expectServesNewClient(
    _ server: RunningServer, _ device: () -> Int?, _ name: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let served = server.server.statistics.snapshot.connectionsServed
    let next = try server.connect()
    try expectWorks(next, "\(name): new client", sourceLocation: sourceLocation)
    #expect(
      server.server.statistics.snapshot.connectionsServed == served + 1,
      "\(name): the new client was not served",
      sourceLocation: sourceLocation)
    expectNoLeaks(
      server, device(), dmaRegions: 0, "\(name): new client", sourceLocation: sourceLocation)
  }

  /// The server holds exactly the DMA windows the setup created, and no eventfds.
  static func expectNoLeaks(
    _ server: RunningServer, _ deviceWindows: Int?, dmaRegions: Int, _ name: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) {
    let snapshot = server.server.statistics.snapshot
    #expect(
      snapshot.dmaRegions == dmaRegions,
      "\(name): \(snapshot.dmaRegions) DMA windows, expected \(dmaRegions)",
      sourceLocation: sourceLocation)
    #expect(
      snapshot.irqFDs == 0, "\(name): \(snapshot.irqFDs) eventfds held",
      sourceLocation: sourceLocation)
    if let deviceWindows {
      #expect(
        deviceWindows == dmaRegions, "\(name): the device saw \(deviceWindows) windows",
        sourceLocation: sourceLocation)
    }
  }
}
