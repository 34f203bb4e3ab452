import CVFIOUser
import Control
import Foundation
import Synchronization
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

@Suite("The control protocol's JSON codec")
struct ControlJSONTests {
  @Test func roundTripsEveryKindOfValue() throws {
    let value = JSON.object([
      ("null", .null), ("yes", .bool(true)), ("n", .int(-42)), ("big", .uint(UInt64.max)),
      ("pi", .double(2.5)), ("text", .string("line\nbreak \"quoted\" é")),
      ("list", .array([.int(1), .object([])])),
    ])
    let text = value.serialized()
    #expect(!text.contains("\n"), "one line: a newline in a string is escaped")
    #expect(try JSON.parse(Array(text.utf8)) == value)
    #expect(try JSON.parse(Array(value.serialized(pretty: true).utf8)) == value)
  }

  @Test func refusesWhatIsNotOneStrictJSONValue() {
    for bad in ["{", "{\"a\":1,}", "{\"a\":1} x", "// c\n{}", "{a:1}", ""] {
      #expect(throws: JSON.ParseError.self, "\(bad)") { try JSON.parse(Array(bad.utf8)) }
    }
    #expect((try? JSON.parse(Array("{\"a\":1}  \r\n".utf8))) == .object([("a", .int(1))]))
    // json-c takes single-quoted strings even when strict, as QMP's parser does.
    #expect((try? JSON.parse(Array("{'a':1}".utf8))) == .object([("a", .int(1))]))
  }
}

@Suite("The control channel over real sockets", .serialized)
struct ControlChannelTests {
  @Test func greetingAndEveryCommandOnAnIdleServer() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let control = try running.controlClient()
    #expect(control.greeting["version"] == .string("test"))
    #expect(control.greeting["protocol"] == .int(2))
    #expect(control.greeting["capabilities"] == .array([]))
    #expect(try control.execute("qmp_capabilities") == .object([]))
    let commands = try control.execute("query-commands").array?.compactMap { $0["name"]?.string }
    #expect(
      commands == [
        "qmp_capabilities", "query-commands", "query-status", "query-stats", "resume",
        "set-log-level", "live-update",
      ])
    // This server was built without a live-update handler: refused, with the reason.
    #expect(throws: ControlClientError.self) { _ = try control.execute("live-update") }
    #expect(
      throws: ControlClientError.self,
      "an unknown argument is refused before the handler runs"
    ) { _ = try control.execute("live-update", arguments: .object([("bin", .string("/x"))])) }

    let status = try control.execute("query-status")
    #expect(status["device"]?["description"] == .string("simulated Xe VF bmg (test)"))
    #expect(status["device"]?["backend"] == .string("simulated"))
    #expect(status["device"]?["socket"] == .string(running.path))
    #expect(status["server"]?["pid"] == .int(Int64(getpid())))
    #expect(status["server"]?["live-update"] == .null, "never updated")
    #expect(status["client-attached"] == .bool(false) && status["client"] == .null)
    #expect(status["migration"]?["supported"] == .bool(true))
    #expect(status["migration"]?["state"] == .string("RUNNING"))
    #expect(status["dma"]?["windows"] == .int(0) && status["dma"]?["dirty-logging"] == .bool(false))
    #expect(status["interrupts"]?["indexes"]?.array?.count == 5)
    #expect(status["last-end"] == .null && status["last-error"] == .null)
    #expect(status["control"]?["socket"] == .string(running.controlPath))
    #expect(status["control"]?["clients"] == .int(1))

    let stats = try control.execute("query-stats")
    let messages = try #require(stats["messages"]?.array)
    #expect(messages.count == Command.allCases.count + 1)
    #expect(messages.allSatisfy { $0["count"] == .int(0) && $0["errors"] == .int(0) })
    #expect(stats["dma"] == .object([("maps", .int(0)), ("unmaps", .int(0))]))
    #expect(stats["migration"]?["bytes-read"] == .int(0))
    #expect(messages.allSatisfy { $0["latency-ns"] == .null }, "no sample yet")
    #expect(stats["interrupts"]?["signalled"] == .int(0))
    #expect(stats["events"]?["posted"] == .int(0) && stats["events"]?["dropped"] == .int(0))
    #expect(stats["counting"] == .bool(true))
  }

  /// Everything query-status reports follows the data client: who it is,
  /// its DMA windows, interrupts, dirty logging, the migration state it set,
  /// its last error; and how it left.
  @Test func statusAndStatsFollowTheClient() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let client = try running.connect()
    let memfd = cvfu_memfd_create("guest", 0)
    defer { close(memfd) }
    ftruncate(memfd, 1 << 20)
    try client.dmaMap(
      address: 1 << 30, size: 1 << 20, flags: [.read, .write], fd: FileDescriptor(rawValue: memfd))
    try client.dmaMap(address: 2 << 30, size: 2 << 20, flags: [.read, .write])
    try client.dmaMap(address: 3 << 30, size: 1 << 20, flags: [.read, .write])
    try client.dmaUnmap(address: 3 << 30, size: 1 << 20)
    let eventfds = (0..<4).map { _ in cvfu_eventfd(0, 0) }
    defer { eventfds.forEach { close($0) } }
    try client.setIRQEventfds(
      index: VFIOPCIIRQ.msix, start: 0, fds: eventfds.map(FileDescriptor.init(rawValue:)), chunk: 4)
    try client.startDMALogging(
      pageSize: 4096, ranges: [DMALoggingRange(iova: 1 << 30, length: 1 << 20)])
    try client.setMigrationState(.stop)
    #expect(throws: VFIOUserClientError.self) {
      _ = try client.read(region: VFIOPCIRegion.config, offset: 1 << 20, count: 4)
    }
    for _ in 0..<10 { _ = try client.read32(region: VFIOPCIRegion.config, offset: 0) }

    let control = try running.controlClient()
    let status = try control.execute("query-status")
    let peer = try #require(status["client"])
    #expect(status["client-attached"] == .bool(true))
    #expect(peer["pid"] == .int(Int64(getpid())), "the test process is the client")
    #expect(peer["uid"] == .int(Int64(getuid())) && peer["gid"] == .int(Int64(getgid())))
    #expect(peer["negotiated"] == .bool(true))
    #expect(abs((peer["since"]?.integer ?? 0) - Int64(time(nil))) < 60)
    #expect(status["dma"]?["windows"] == .int(2))
    #expect(status["dma"]?["bytes"] == .int(3 << 20))
    #expect(status["dma"]?["dirty-logging"] == .bool(true))
    let msix = status["interrupts"]?["indexes"]?.array?.first { $0["name"] == .string("MSI-X") }
    #expect(msix?["vectors-wired"] == .int(4))
    #expect((status["interrupts"]?["eventfds"]?.integer ?? 0) >= 4)
    #expect(status["migration"]?["state"] == .string("STOP"))
    #expect(status["last-error"]?["desc"]?.string?.contains("REGION_READ") == true)
    #expect(status["server"]?["connections-served"] == .int(1))

    let stats = try control.execute("query-stats")
    let read = stats["messages"]?.array?.first { $0["command"] == .string("REGION_READ") }
    #expect(read?["count"] == .int(11) && read?["errors"] == .int(1))
    #expect(read?["bytes"] == .int(11 * (16 + 16)), "header and region access header each")
    #expect(stats["dma"] == .object([("maps", .int(3)), ("unmaps", .int(1))]))

    try client.setIRQs(
      IRQSetPayload(
        flags: [.dataNone, .actionTrigger], index: VFIOPCIIRQ.msix,
        start: 0, count: 0))
    try client.stopDMALogging()
    try client.reset()
    let after = try control.execute("query-status")
    #expect(after["migration"]?["state"] == .string("RUNNING"), "a reset returns to RUNNING")
    #expect(after["dma"]?["dirty-logging"] == .bool(false))
    #expect(
      after["interrupts"]?["indexes"]?.array?.allSatisfy { $0["vectors-wired"] == .int(0) }
        == true)

    _ = consume client
    let gone = try running.waitForStatus { $0["client"] == .null }
    #expect(gone["client-attached"] == .bool(false))
    #expect(gone["last-end"]?["reason"] == .string("client-closed"))
    #expect(gone["dma"]?["windows"] == .int(0) && gone["dma"]?["bytes"] == .int(0))
  }

  /// A server busy with a client refuses another (EBUSY), and says so in clients-refused.
  @Test func refusedClientsAreCounted() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let holder = try running.connect()
    #expect(throws: VFIOUserClientError.self) { _ = try running.connect() }
    let status = try running.waitForStatus { $0["server"]?["clients-refused"] == .int(1) }
    #expect(status["server"]?["clients-refused"] == .int(1))
    _ = holder
  }

  @Test func badRequestsGetAClearErrorAndTheConnectionGoesOn() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let control = try running.controlClient()
    let cases: [(String, String, String)] = [
      ("{\"execute\": ", "GenericError", "malformed JSON"),
      ("not json", "GenericError", "malformed JSON"),
      ("[1, 2]", "GenericError", "a request is a JSON object"),
      ("{\"id\": 7}", "GenericError", "'execute'"),
      ("{\"execute\": 5}", "GenericError", "'execute'"),
      ("{\"execute\": \"query-status\", \"extra\": 1}", "GenericError", "'extra' is unexpected"),
      ("{\"execute\": \"query-status\", \"arguments\": []}", "GenericError", "must be an object"),
      ("{\"execute\": \"query-status\", \"arguments\": {\"x\": 1}}", "GenericError", "'x'"),
      ("{\"execute\": \"no-such-command\", \"id\": \"a\"}", "CommandNotFound", "no-such-command"),
    ]
    for (request, errorClass, words) in cases {
      try control.send(line: Array(request.utf8))
      let reply = try control.readMessage()
      #expect(reply["error"]?["class"] == .string(errorClass), "\(request) → \(reply)")
      #expect(
        reply["error"]?["desc"]?.string?.contains(words) == true, "\(request) → \(reply)")
    }
    try control.send(line: Array("{\"execute\": \"nope\", \"id\": {\"n\": [1]}}".utf8))
    #expect(try control.readMessage()["id"] == .object([("n", .array([.int(1)]))]))
    // Blank lines are skipped; the connection still answers.
    try control.send(line: [])
    #expect(try control.execute("query-status")["client-attached"] == .bool(false))
  }

  @Test func aLineOfTheLimitIsServedAndALongerOneDisconnects() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let request = Array("{\"execute\":\"query-stats\",\"id\":1}".utf8)
    let exact = try RawControl(running.controlPath)
    let padded =
      request + [UInt8](repeating: 0x20, count: ControlServer.maxLineBytes - request.count)
    #expect(exact.send(padded + [0x0A]))
    shutdown(exact.fd, Int32(SHUT_WR))
    let answered = exact.readToEnd()
    #expect(answered.count == 2 && answered[1].hasPrefix("{\"return\""), "\(answered.last ?? "")")

    let long = try RawControl(running.controlPath)
    _ = long.send([UInt8](repeating: 0x78, count: ControlServer.maxLineBytes + 1))
    let lines = long.readToEnd()
    #expect(lines.count == 2, "the greeting, the error, then the hang-up")
    let error = try JSON.parse(Array(lines.last!.utf8))
    #expect(error["error"]?["class"] == .string("GenericError"))
    #expect(error["error"]?["desc"]?.string?.contains("longer than 65536 bytes") == true)
  }

  @Test func manyControlClientsAtOnce() throws {
    let running = try ControlledServer()
    defer { running.close() }
    let holder = try running.connect()
    let failures = Locked<[String]>([])
    let clients = 40
    let connected = Atomic<Int>(0)
    let checked = Atomic<Int>(0)
    let done = DispatchSemaphore(value: 0)
    // A thread each (concurrentPerform runs only as many at once as there are CPUs).
    for _ in 0..<clients {
      Thread {
        defer { done.signal() }
        do {
          let control = try running.controlClient()
          connected.add(1, ordering: .relaxed)
          // Every client holds its connection until all are in (bounded: a failure never hangs).
          for _ in 0..<10_000 where connected.load(ordering: .relaxed) < clients { usleep(1000) }
          let seen = try control.execute("query-status")["control"]?["clients"]?.integer ?? 0
          if seen < Int64(clients) { throw ControlClientError.malformed("\(seen) clients seen") }
          checked.add(1, ordering: .relaxed)
          for _ in 0..<10_000 where checked.load(ordering: .relaxed) < clients { usleep(1000) }
          for _ in 0..<5 {
            let status = try control.execute("query-status")
            guard status["client"]?["pid"] == .int(Int64(getpid())) else {
              throw ControlClientError.malformed("\(status)")
            }
            _ = try control.execute("query-stats")
          }
        } catch {
          failures.withLock { $0.append("\(error)") }
        }
      }.start()
    }
    for _ in 0..<clients { done.wait() }
    #expect(failures.withLock { $0 } == [])
    _ = holder
  }

  @Test func clientsBeyondTheCapAreRefusedWithAnError() throws {
    let running = try ControlledServer(maxControlClients: 3)
    defer { running.close() }
    let held = try (0..<3).map { _ in try running.controlClient() }
    #expect(throws: ControlClientError.self) { _ = try running.controlClient() }
    do {
      _ = try running.controlClient()
    } catch {
      #expect("\(error)".contains("too many control clients"))
    }
    _ = held
    let status = try held[0].execute("query-status")
    #expect(status["control"]?["clients-refused"] == .int(2))
  }

  /// A control client that sends requests and never reads a reply holds
  /// its own thread only: the data client's REGION_READs keep being
  /// answered, and the reader is disconnected after the send timeout.
  @Test func aControlClientThatNeverReadsNeverStallsTheDevice() throws {
    let running = try ControlledServer(sendTimeoutMilliseconds: 500)
    defer { running.close() }
    let client = try running.connect()
    let stalled = try RawControl(running.controlPath)
    _ = fcntl(stalled.fd, F_SETFL, fcntl(stalled.fd, F_GETFL) | O_NONBLOCK)
    let request = Array("{\"execute\":\"query-stats\"}\n".utf8)
    // Fill both directions: the server stops reading once its replies have nowhere to go.
    var queued = 0
    for _ in 0..<100_000 {
      let n = request.withUnsafeBytes {
        Glibc.send(stalled.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
      }
      if n <= 0 { break }
      queued += n
    }
    #expect(queued > 0)
    let start = Date()
    for i in 0..<20_000 {
      let value = try client.read32(region: VFIOPCIRegion.config, offset: 0)
      if value != 0xE211_8086 {
        Issue.record("read \(i): 0x\(String(value, radix: 16))")
        break
      }
    }
    let elapsed = Date().timeIntervalSince(start)
    #expect(elapsed < 20, "20000 REGION_READs took \(elapsed) s beside a stalled control client")
    let status = try running.waitForStatus(timeout: 10) {
      $0["control"]?["clients"] == .int(1)  // the one asking
    }
    #expect(status["control"]?["clients"] == .int(1), "the stalled client was disconnected")
    let stats = try running.controlClient().execute("query-stats")
    let read = stats["messages"]?.array?.first { $0["command"] == .string("REGION_READ") }
    #expect(read?["count"] == .int(20_000))
  }

  @Test func thePeerPolicyOfTheDeviceSocketAppliesToTheControlSocket() throws {
    var limits = ServerLimits()
    limits.allowedUIDs = [65534]  // nobody; the test runs as someone else
    let strict = try ControlledServer(limits: limits)
    defer { strict.close() }
    #expect(getuid() != 65534)
    do {
      _ = try strict.controlClient()
      Issue.record("a control client of a uid not allowed was served")
    } catch {
      #expect(
        error as? ControlClientError
          == .refused(
            errorClass: "GenericError",
            description:
              "permission denied: uid \(getuid()) gid \(getgid()) is not allowed (--allow-uid, --allow-gid)"
          ))
    }
    limits.allowedUIDs = [getuid()]
    let allowed = try ControlledServer(limits: limits)
    defer { allowed.close() }
    #expect(try allowed.controlClient().execute("query-status")["client"] == .null)
  }

  @Test func stopRemovesTheControlSocketAndDisconnectsItsClients() throws {
    let running = try ControlledServer()
    let control = try running.controlClient()
    let path = running.controlPath
    #expect(FileManager.default.fileExists(atPath: path))
    running.close()
    #expect(!FileManager.default.fileExists(atPath: path))
    #expect(throws: ControlClientError.self) { _ = try control.execute("query-status") }
  }
}
