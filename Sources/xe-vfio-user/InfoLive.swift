import Control
import MigrationTools
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// `info` on a server busy with a client: the live state from its control
/// socket (protocol/control.md), since the device socket serves one client.
extension Info {
  func showLive(_ busy: BusyServerError) throws {
    let path = controlSocket ?? socketPath + ".control"
    let control: ControlClient
    do {
      control = try ControlClient(path: path)
    } catch {
      throw CLIError(
        "\(busy); its control socket \(path) cannot tell more: \(Self.describeControl(error))")
    }
    let status = try Self.liveStatus(control, path: path)
    if json {
      let out = JSON.object([
        ("socket", .string(socketPath)), ("controlSocket", .string(path)),
        ("clientAttached", status["client-attached"] ?? .bool(false)), ("live", status),
      ])
      print(out.serialized(pretty: true))
    } else {
      print(Self.renderLive(status, socket: socketPath, control: path), terminator: "")
    }
  }

  static func liveStatus(_ control: ControlClient, path: String) throws -> JSON {
    do {
      return try control.execute("query-status")
    } catch {
      throw CLIError("control socket \(path): query-status failed: \(error)")
    }
  }

  static func describeControl(_ error: ControlClientError) -> String {
    switch error {
    case .system(.noSuchFileOrDirectory):
      "no such socket (ENOENT); the server may run with --control-socket none or another path (info's --control-socket)"
    case .system(.permissionDenied):
      "no permission to connect to it (EACCES); see its mode and group"
    default: "\(error)"
    }
  }

  /// The live state as text, one line per subject.
  static func renderLive(_ s: JSON, socket: String, control: String) -> String {
    func int(_ value: JSON?) -> Int64 { value?.integer ?? 0 }
    func plural(_ n: Int64, _ word: String) -> String { "\(n) \(word)\(n == 1 ? "" : "s")" }
    var out =
      "vfio-user device at \(socket): a client is attached; live state from the control socket \(control)\n"
    let device = s["device"]
    out +=
      "\tDevice: \(device?["description"]?.string ?? "?") (\(device?["backend"]?.string ?? "?") backend)\n"
    let server = s["server"]
    out +=
      "\tServer: pid \(int(server?["pid"])), version \(server?["version"]?.string ?? "?"), \(plural(int(server?["connections-served"]), "connection")) served, \(plural(int(server?["clients-refused"]), "client")) refused\n"
    if let update = server?["live-update"], update != .null {
      out +=
        "\tLive update: \(plural(int(update["count"]), "update")) since the first start at \(utcTime(int(update["first-started"]))); the last at \(utcTime(int(update["at"]))) from pid \(int(update["previous-pid"])), requests paused \(int(update["pause-ms"])) ms\n"
    }
    if let client = s["client"], client != .null {
      let since = int(client["since"])
      out +=
        "\tClient: pid \(int(client["pid"])), uid \(int(client["uid"])), gid \(int(client["gid"])), connected since \(utcTime(since)) (\(int(client["connected-seconds"])) s)\(client["negotiated"]?.bool == true ? "" : ", VERSION not yet negotiated")\n"
    } else {
      out += "\tClient: none (it left as this was asked)\n"
    }
    let migration = s["migration"]
    out +=
      migration?["supported"]?.bool == true
      ? "\tMigration: state \(migration?["state"]?.string ?? "?")\n"
      : "\tMigration: not supported\n"
    let dma = s["dma"]
    out +=
      "\tDMA: \(plural(int(dma?["windows"]), "window")), \(formatBytes(UInt64(max(0, int(dma?["bytes"]))))), dirty logging \(dma?["dirty-logging"]?.bool == true ? "on" : "off")\n"
    let interrupts = s["interrupts"]
    let wired = (interrupts?["indexes"]?.array ?? []).compactMap { index -> String? in
      let vectors = int(index["vectors-wired"])
      return vectors > 0 ? "\(index["name"]?.string ?? "?") \(vectors)" : nil
    }
    out +=
      "\tInterrupts: \(plural(int(interrupts?["eventfds"]), "eventfd")) held; vectors wired: \(wired.isEmpty ? "none" : wired.joined(separator: ", "))\n"
    if let end = s["last-end"], end != .null {
      let detail = end["detail"]?.string.map { ": \($0)" } ?? ""
      out +=
        "\tLast client end: \(end["reason"]?.string ?? "?")\(detail) at \(utcTime(int(end["at"])))\n"
    }
    if let error = s["last-error"], error != .null {
      out += "\tLast error: \(error["desc"]?.string ?? "?") at \(utcTime(int(error["at"])))\n"
    }
    out +=
      "\t(The device's registers and config space are read through the device socket: run info again with no client attached.)\n"
    return out
  }

  /// Seconds since the epoch as UTC, "2026-12-07 20:21:05 UTC".
  static func utcTime(_ seconds: Int64) -> String {
    var time = time_t(seconds)
    var parts = tm()
    guard gmtime_r(&time, &parts) != nil else { return "\(seconds)" }
    var buffer = [CChar](repeating: 0, count: 32)
    let n = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S UTC", &parts)
    return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }
}
