import VFIOUser
import VFIOUserServer

/// The control protocol's messages (protocol/control.md), built and read
/// with `JSON`: no I/O here.
public enum ControlProtocol {
  /// QMP's error classes, those this server answers with.
  public enum ErrorClass: String, Sendable {
    case genericError = "GenericError"
    case commandNotFound = "CommandNotFound"
  }

  /// The commands a server answers, as `query-commands` lists them.
  public static let commands = [
    "qmp_capabilities", "query-commands", "query-status", "query-stats",
  ]

  /// The first line a control client reads.
  public static func greeting(version: String) -> JSON {
    .object([
      (
        "xe-vfio-user",
        .object([
          ("version", .string(version)), ("protocol", .int(Int64(ControlServer.protocolVersion))),
          ("capabilities", .array([])),
        ])
      )
    ])
  }

  public static func error(_ errorClass: ErrorClass, _ description: String, id: JSON?) -> JSON {
    var members: [(String, JSON)] = [
      ("error", .object([("class", .string(errorClass.rawValue)), ("desc", .string(description))]))
    ]
    if let id { members.append(("id", id)) }
    return .object(members)
  }

  /// The reply to one request line: `answer` gives a command's return
  /// value, or nil when there is no such command.
  public static func reply(to line: some Collection<UInt8>, answer: (String) -> JSON?) -> JSON {
    let request: JSON
    do throws(JSON.ParseError) {
      request = try JSON.parse(line)
    } catch {
      return Self.error(.genericError, "malformed JSON: \(error)", id: nil)
    }
    guard case .object(let members) = request else {
      return Self.error(.genericError, "a request is a JSON object", id: nil)
    }
    let id = request["id"]
    if let unexpected = members.first(where: { !["execute", "arguments", "id"].contains($0.0) }) {
      return Self.error(.genericError, "request member '\(unexpected.0)' is unexpected", id: id)
    }
    guard let command = request["execute"]?.string else {
      return Self.error(
        .genericError, "a request names its command in 'execute' (a string)", id: id)
    }
    if let arguments = request["arguments"] {
      guard case .object(let given) = arguments else {
        return Self.error(.genericError, "'arguments' must be an object", id: id)
      }
      // No command of this version takes arguments.
      if let first = given.first, commands.contains(command) {
        return Self.error(.genericError, "parameter '\(first.0)' is unexpected", id: id)
      }
    }
    guard let value = answer(command) else {
      return Self.error(.commandNotFound, "the command \(command) has not been found", id: id)
    }
    var reply: [(String, JSON)] = [("return", value)]
    if let id { reply.append(("id", id)) }
    return .object(reply)
  }

  /// The control channel itself, for `query-status`.
  public struct ControlState: Sendable {
    public var socket: String?
    public var clients: Int
    public var served: Int
    public var refused: Int
  }

  /// `query-status`'s return value.
  public static func status(
    _ s: ServerSnapshot, identity: ControlIdentity, serverPID: Int32, now: Int64,
    control: ControlState
  ) -> JSON {
    let client: JSON =
      s.client.map { c in
        .object([
          ("pid", .int(Int64(c.pid))), ("uid", .int(Int64(c.uid))), ("gid", .int(Int64(c.gid))),
          ("since", .int(c.since)),
          ("connected-seconds", .int(max(0, now - c.sinceMonotonicMilliseconds) / 1000)),
          ("negotiated", .bool(c.negotiated)),
        ])
      } ?? .null
    let lastEnd: JSON =
      s.lastEnd.map { end in
        .object([
          ("reason", .string(reason(end))), ("detail", detail(end).map(JSON.string) ?? .null),
          ("at", s.lastEndAt.map(JSON.int) ?? .null),
        ])
      } ?? .null
    let lastError: JSON =
      s.lastError.map {
        .object([("desc", .string($0.description)), ("at", .int($0.at))])
      } ?? .null
    let wired: [JSON] = s.irqVectorsWired.enumerated().map { index, vectors in
      .object([
        ("index", .int(Int64(index))), ("name", .string(VFIOPCIIRQ.name(UInt32(index)))),
        ("vectors-wired", .int(Int64(vectors))),
      ])
    }
    let migrationState: JSON =
      s.migratable ? (s.migrationState.map { .string("\($0)") } ?? .string("unknown")) : .null
    return .object([
      (
        "device",
        .object([
          ("description", .string(identity.device)), ("backend", .string(identity.backend)),
          ("socket", .string(identity.socket)),
        ])
      ),
      (
        "server",
        .object([
          ("pid", .int(Int64(serverPID))), ("version", .string(identity.version)),
          ("stopping", .bool(s.stopping)),
          ("connections-served", .int(Int64(s.connectionsServed))),
          ("clients-refused", .int(Int64(s.clientsRefused))),
        ])
      ),
      ("migration", .object([("supported", .bool(s.migratable)), ("state", migrationState)])),
      ("client-attached", .bool(s.clientConnected)),
      ("client", client),
      (
        "dma",
        .object([
          ("windows", .int(Int64(s.dmaRegions))), ("bytes", .uint(s.dmaBytes)),
          ("dirty-logging", .bool(s.dirtyLogging)),
        ])
      ),
      ("interrupts", .object([("eventfds", .int(Int64(s.irqFDs))), ("indexes", .array(wired))])),
      ("last-end", lastEnd),
      ("last-error", lastError),
      (
        "control",
        .object([
          ("socket", control.socket.map(JSON.string) ?? .null),
          ("clients", .int(Int64(control.clients))),
          ("clients-served", .int(Int64(control.served))),
          ("clients-refused", .int(Int64(control.refused))),
        ])
      ),
    ])
  }

  /// `query-stats`'s return value.
  public static func stats(_ counters: ServerCounters, _ s: ServerSnapshot) -> JSON {
    let messages: [JSON] = counters.messages.map { m in
      .object([
        ("command", .string(m.command?.description ?? "unknown")), ("count", .uint(m.count)),
        ("errors", .uint(m.errors)), ("bytes", .uint(m.bytes)),
      ])
    }
    return .object([
      ("messages", .array(messages)),
      ("dma", .object([("maps", .uint(counters.dmaMaps)), ("unmaps", .uint(counters.dmaUnmaps))])),
      (
        "migration",
        .object([
          ("bytes-read", .uint(counters.migrationBytesRead)),
          ("bytes-written", .uint(counters.migrationBytesWritten)),
          ("bytes-placed", .uint(s.migrationBytesPlaced)),
        ])
      ),
    ])
  }

  static func reason(_ end: ConnectionEnd) -> String {
    switch end {
    case .clientClosed: "client-closed"
    case .protocolError: "protocol-error"
    case .timedOut: "timed-out"
    case .shutdown: "shutdown"
    }
  }

  static func detail(_ end: ConnectionEnd) -> String? {
    switch end {
    case .protocolError(let why), .timedOut(let why): why
    case .clientClosed, .shutdown: nil
    }
  }
}
