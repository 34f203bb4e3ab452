import ArgumentParser
import Control

/// `metrics`: every server on the host in Prometheus' text exposition
/// format (protocol/metrics.md), for node_exporter's textfile collector.
struct Metrics: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Print every server's counters in Prometheus text format.",
    discussion: """
      Reads each live server's record (\(ServedRecord.directory), or \
      XE_VFU_RUN_DIR) and asks its control socket for query-status and \
      query-stats. Every metric is described in protocol/metrics.md. For \
      node_exporter's textfile collector, write it whole then rename, so the \
      collector never reads half a file:
        xe-vfio-user metrics > DIR/xe-vfio-user.prom.tmp && mv DIR/xe-vfio-user.prom.tmp DIR/xe-vfio-user.prom
      """)

  @Option(help: "Milliseconds each control socket may take to answer.")
  var timeout: Int32 = 500

  func run() throws {
    print(Self.exposition(LiveServer.gather(timeoutMilliseconds: timeout)), terminator: "")
  }

  /// One metric family: its name, type, help, and samples (labels, value).
  struct Family {
    var name: String
    var type: String
    var help: String
    var samples: [(labels: [(String, String)], value: String)] = []
  }

  /// The exposition text: each family's HELP and TYPE, then its samples, server by server.
  static func exposition(_ servers: [LiveServer]) -> String {
    var families: [Family] = []
    func sample(
      _ name: String, _ type: String, _ help: String, _ server: LiveServer,
      _ labels: [(String, String)], _ value: String
    ) {
      if !families.contains(where: { $0.name == name }) {
        families.append(Family(name: name, type: type, help: help))
      }
      let index = families.firstIndex { $0.name == name }!
      families[index].samples.append(([("server", server.name)] + labels, value))
    }
    func add(
      _ name: String, _ type: String, _ help: String, _ server: LiveServer,
      _ labels: [(String, String)] = [], _ value: UInt64
    ) {
      sample(name, type, help, server, labels, "\(value)")
    }
    for server in servers {
      let up: UInt64 = server.status != nil && server.stats != nil ? 1 : 0
      add(
        "xe_vfio_user_up", "gauge", "1 when the server's control socket answered.", server, [], up)
      add(
        "xe_vfio_user_server_info", "gauge",
        "The server's pid, device socket and what it serves (always 1).", server,
        [
          ("pid", "\(server.record.pid)"), ("socket", server.record.socket),
          ("device", server.record.served ?? server.record.device),
        ], 1)
      guard up == 1, let status = server.status else { continue }
      add(
        "xe_vfio_user_client_attached", "gauge", "1 while a vfio-user client holds the device.",
        server, [], status["client-attached"]?.bool == true ? 1 : 0)
      add(
        "xe_vfio_user_client_pid", "gauge", "The attached client's pid (0: none).", server, [],
        UInt64(max(0, server.clientPID ?? 0)))
      if let state = server.state {
        add(
          "xe_vfio_user_migration_state", "gauge",
          "1 for the device's migration state (label state).", server, [("state", state)], 1)
      }
      add(
        "xe_vfio_user_connections_total", "counter", "vfio-user clients served since the start.",
        server, [], UInt64(status["server"]?["connections-served"]?.integer ?? 0))
      add(
        "xe_vfio_user_clients_refused_total", "counter",
        "vfio-user clients turned away (busy or not allowed).", server, [],
        UInt64(status["server"]?["clients-refused"]?.integer ?? 0))
      add(
        "xe_vfio_user_dma_windows", "gauge", "DMA windows the client has mapped.", server, [],
        UInt64(status["dma"]?["windows"]?.integer ?? 0))
      add(
        "xe_vfio_user_dma_mapped_bytes", "gauge", "Bytes of client memory the DMA windows cover.",
        server, [], UInt64(status["dma"]?["bytes"]?.integer ?? 0))
      add(
        "xe_vfio_user_control_clients", "gauge", "Control socket clients connected now.", server,
        [], UInt64(status["control"]?["clients"]?.integer ?? 0))
      for message in server.stats?["messages"]?.array ?? [] {
        let command = [("command", message["command"]?.string ?? "unknown")]
        func count(_ key: String) -> UInt64 { UInt64(max(0, message[key]?.integer ?? 0)) }
        add(
          "xe_vfio_user_messages_total", "counter", "vfio-user messages received, per command.",
          server, command, count("count"))
        add(
          "xe_vfio_user_message_errors_total", "counter",
          "Error replies sent, per command.", server, command, count("errors"))
        add(
          "xe_vfio_user_message_received_bytes_total", "counter",
          "Bytes of messages received, headers included, per command.", server, command,
          count("bytes"))
        guard let latency = message["latency-ns"], latency != .null else { continue }
        for (quantile, key) in [("0.5", "p50"), ("0.99", "p99")] {
          sample(
            "xe_vfio_user_message_latency_seconds", "gauge",
            "Service time per command, at a quantile since the start (log buckets of at most 12.5%).",
            server, command + [("quantile", quantile)],
            "\(Double(latency[key]?.integer ?? 0) / 1e9)")
        }
      }
      let counters: [(String, String, [String])] = [
        ("xe_vfio_user_dma_maps_total", "DMA_MAP requests that succeeded.", ["dma", "maps"]),
        ("xe_vfio_user_dma_unmaps_total", "DMA_UNMAP requests that succeeded.", ["dma", "unmaps"]),
        (
          "xe_vfio_user_interrupts_signalled_total",
          "Interrupts the device signalled through the server (simulated VF only).",
          ["interrupts", "signalled"]
        ),
        (
          "xe_vfio_user_migration_sent_bytes_total",
          "Migration data sent in MIG_DATA_READ replies.",
          ["migration", "bytes-read"]
        ),
        (
          "xe_vfio_user_migration_received_bytes_total",
          "Migration data received in MIG_DATA_WRITE requests.", ["migration", "bytes-written"]
        ),
        ("xe_vfio_user_device_resets_total", "Device resets.", ["device", "resets"]),
        (
          "xe_vfio_user_device_used_without_enable_total",
          "Resets after which the guest used the device without enabling it again.",
          ["device", "used-without-enable"]
        ),
        ("xe_vfio_user_events_posted_total", "Control events posted.", ["events", "posted"]),
        (
          "xe_vfio_user_events_dropped_total",
          "Control events dropped from a listener's full queue.", ["events", "dropped"]
        ),
      ]
      for (name, help, path) in counters {
        var value = server.stats
        for key in path { value = value?[key] }
        add(name, "counter", help, server, [], UInt64(max(0, value?.integer ?? 0)))
      }
    }
    var out = ""
    for family in families {
      out += "# HELP \(family.name) \(family.help)\n# TYPE \(family.name) \(family.type)\n"
      for (labels, value) in family.samples {
        let text = labels.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",")
        out += "\(family.name){\(text)} \(value)\n"
      }
    }
    return out
  }

  /// A label value as the exposition format quotes it.
  static func escape(_ value: String) -> String {
    var out = ""
    for c in value {
      switch c {
      case "\\": out += "\\\\"
      case "\"": out += "\\\""
      case "\n": out += "\\n"
      default: out.append(c)
      }
    }
    return out
  }
}
