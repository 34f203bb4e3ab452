import Control

/// Every server on the host, from its record (`ServedRecord`), with what its
/// control socket says: `list`, `top` and `metrics` read them the same way.
struct LiveServer {
  var record: ServedRecord
  /// query-status and query-stats, nil when the control socket did not answer.
  var status: JSON?
  var stats: JSON?
  /// Why the control socket did not answer.
  var unreachable: String?

  /// A name for the server in a table or a label: the record's name.
  var name: String { record.device }

  /// Asks each live server's control socket, each bounded by `timeoutMilliseconds`.
  static func gather(timeoutMilliseconds: Int32 = 500, stats: Bool = true) -> [LiveServer] {
    ServedRecord.all().map { record in
      var server = LiveServer(record: record)
      guard let control = record.control else {
        server.unreachable = "no control socket (--control-socket none)"
        return server
      }
      do throws(ControlClientError) {
        let client = try ControlClient(path: control, timeoutMilliseconds: timeoutMilliseconds)
        server.status = try client.execute("query-status")
        if stats { server.stats = try client.execute("query-stats") }
      } catch {
        server.unreachable = "control socket \(control): \(Info.describeControl(error))"
      }
      return server
    }
  }

  /// The attached client's pid, if any.
  var clientPID: Int64? { status?["client"]?["pid"]?.integer }
  /// The device's migration state ("RUNNING", ...), or nil.
  var state: String? { status?["migration"]?["state"]?.string }
  /// Live updates since the server was first started, and when the last was
  /// (seconds since the epoch); nil for a server never updated.
  var liveUpdates: (count: Int64, at: Int64)? {
    guard let update = status?["server"]?["live-update"], let count = update["count"]?.integer
    else { return nil }
    return (count, update["at"]?.integer ?? 0)
  }

  /// One message type's count, or 0.
  func messages(_ command: String) -> UInt64 {
    UInt64(
      stats?["messages"]?.array?.first { $0["command"]?.string == command }?["count"]?.integer ?? 0)
  }

  /// Every message type's count summed.
  var totalMessages: UInt64 {
    (stats?["messages"]?.array ?? []).reduce(0) { $0 + UInt64($1["count"]?.integer ?? 0) }
  }

  func counter(_ path: String...) -> UInt64 {
    var value = stats
    for key in path { value = value?[key] }
    return UInt64(max(0, value?.integer ?? 0))
  }
}
