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
    "qmp_capabilities", "query-commands", "query-status", "query-stats", "resume",
    "set-log-level", "live-update",
  ]

  /// The arguments each command requires; none for the others.
  public static let parameters: [String: [String]] = ["set-log-level": ["level"]]
  /// The arguments a command may be given.
  public static let optionalParameters: [String: [String]] = ["live-update": ["binary"]]

  /// What a command's execution gave: a return value or an error.
  public enum Answer {
    case value(JSON)
    case failure(ErrorClass, String)
  }

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

  /// The reply to one request line: `answer` executes a command with its
  /// (checked) arguments, or gives nil when there is no such command.
  public static func reply(
    to line: some Collection<UInt8>, answer: (String, JSON) -> Answer?
  ) -> JSON {
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
    let arguments = request["arguments"] ?? .object([])
    guard case .object(let given) = arguments else {
      return Self.error(.genericError, "'arguments' must be an object", id: id)
    }
    if commands.contains(command) {
      let taken = parameters[command] ?? []
      let allowed = taken + (optionalParameters[command] ?? [])
      if let first = given.first(where: { !allowed.contains($0.0) }) {
        return Self.error(.genericError, "parameter '\(first.0)' is unexpected", id: id)
      }
      if let missing = taken.first(where: { arguments[$0] == nil }) {
        return Self.error(.genericError, "parameter '\(missing)' is missing", id: id)
      }
    }
    let value: JSON
    switch answer(command, arguments) {
    case nil:
      return Self.error(.commandNotFound, "the command \(command) has not been found", id: id)
    case .failure(let errorClass, let why)?:
      return Self.error(errorClass, why, id: id)
    case .value(let returned)?:
      value = returned
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
          (
            "live-update",
            s.liveUpdate.map { u in
              .object([
                ("count", .int(Int64(u.count))), ("at", .int(u.at)),
                ("first-started", .int(u.firstStarted)),
                ("previous-pid", .int(Int64(u.previousPID))),
                ("pause-ms", .int(u.pauseMilliseconds)),
              ])
            } ?? .null
          ),
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
  public static func stats(_ statistics: ServerStatistics) -> JSON {
    let counters = statistics.counters
    let messages: [JSON] = counters.messages.map { m in
      let latency: JSON =
        m.latency.map {
          .object([
            ("samples", .uint($0.samples)), ("p50", .uint($0.p50)), ("p99", .uint($0.p99)),
            ("max", .uint($0.max)),
          ])
        } ?? .null
      return .object([
        ("command", .string(m.command?.description ?? "unknown")), ("count", .uint(m.count)),
        ("errors", .uint(m.errors)), ("bytes", .uint(m.bytes)), ("latency-ns", latency),
      ])
    }
    let events = statistics.events
    let listeners: [JSON] = events.subscriptions.map {
      .object([
        ("pid", .int(Int64($0.pid))), ("queued", .int(Int64($0.queued))),
        ("dropped", .uint($0.dropped)),
      ])
    }
    return .object([
      ("counting", .bool(counters.counting)),
      ("messages", .array(messages)),
      ("dma", .object([("maps", .uint(counters.dmaMaps)), ("unmaps", .uint(counters.dmaUnmaps))])),
      ("interrupts", .object([("signalled", .uint(counters.interruptsSignalled))])),
      (
        "migration",
        .object([
          ("bytes-read", .uint(counters.migrationBytesRead)),
          ("bytes-written", .uint(counters.migrationBytesWritten)),
          ("bytes-placed", .uint(statistics.snapshot.migrationBytesPlaced)),
        ])
      ),
      (
        "device",
        .object([
          ("resets", .uint(counters.deviceResets)),
          ("used-without-enable", .uint(counters.usesWithoutEnable)),
        ])
      ),
      (
        "events",
        .object([
          ("posted", .uint(events.posted)), ("dropped", .uint(events.dropped)),
          ("listeners", .array(listeners)),
        ])
      ),
    ])
  }

  /// An event line (QMP's form): its name, data and when it was posted.
  public static func event(_ stamped: StampedEvent) -> JSON {
    let (name, data) = describe(stamped.event)
    return event(name, data, seconds: stamped.seconds, microseconds: stamped.microseconds)
  }

  public static func event(_ name: String, _ data: JSON, seconds: Int64, microseconds: Int64)
    -> JSON
  {
    .object([
      ("event", .string(name)), ("data", data),
      ("timestamp", .object([("seconds", .int(seconds)), ("microseconds", .int(microseconds))])),
    ])
  }

  /// What the two lost-state events name as the likely cause.
  static let lostStateCause =
    "the VM was restored or migrated by a VMM that does not carry vfio-user device state, so the guest's driver thinks the VF is still programmed"

  /// Every event's name and data (protocol/control.md, "Events").
  static func describe(_ event: ServerEvent) -> (String, JSON) {
    func state(_ s: MigrationState?) -> JSON { s.map { .string("\($0)") } ?? .string("unknown") }
    switch event {
    case .clientConnected(let pid, let uid, let gid):
      return (
        "CLIENT_CONNECTED",
        .object([("pid", .int(Int64(pid))), ("uid", .int(Int64(uid))), ("gid", .int(Int64(gid)))])
      )
    case .clientDisconnected(let pid, let end):
      return (
        "CLIENT_DISCONNECTED",
        .object([
          ("pid", .int(Int64(pid))), ("reason", .string(reason(end))),
          ("detail", detail(end).map(JSON.string) ?? .null),
        ])
      )
    case .deviceStateChanged(let from, let to):
      return ("DEVICE_STATE_CHANGED", .object([("from", state(from)), ("to", state(to))]))
    case .migrationStarted(let direction):
      return ("MIGRATION_STARTED", .object([("direction", .string(direction.rawValue))]))
    case .migrationFinished(let direction, let bytes):
      return (
        "MIGRATION_FINISHED",
        .object([("direction", .string(direction.rawValue)), ("bytes", .uint(bytes))])
      )
    case .migrationFailed(let direction, let s, let why):
      return (
        "MIGRATION_FAILED",
        .object([
          ("direction", .string(direction.rawValue)), ("state", state(s)),
          ("reason", .string(why)),
        ])
      )
    case .deviceReset(let cause):
      return ("DEVICE_RESET", .object([("cause", .string(cause.rawValue))]))
    case .usedWithoutEnable(let access):
      return (
        "DEVICE_USED_WITHOUT_ENABLE",
        .object([("access", .string(access)), ("likely-cause", .string(Self.lostStateCause))])
      )
    case .leftDisabled(let seconds):
      return (
        "DEVICE_LEFT_DISABLED",
        .object([("seconds", .int(Int64(seconds))), ("likely-cause", .string(Self.lostStateCause))])
      )
    }
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
