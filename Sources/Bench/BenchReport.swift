import MigrationTools

// The table every figure is printed in, and the buffer reads land in.

/// One reusable receive area for the benchmark's reads.
final class BenchBuffer: @unchecked Sendable {
  static let shared = BenchBuffer()
  let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 << 20, alignment: 64)
  func prefix(_ n: Int) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(rebasing: bytes[0..<n])
  }
}

struct ReportTable {
  var rows: [[String]] = [["figure", "xe-vfio-user", "raw socket", "ratio", "target"]]

  init(rows: [[String]]? = nil) { if let rows { self.rows = rows } }

  mutating func latency(_ name: String, _ ours: LatencySummary, _ floor: LatencySummary) {
    rows.append([
      "\(name) p50", String(printf: "%.2f µs", ours.p50), String(printf: "%.2f µs", floor.p50),
      String(printf: "%.3f×", ours.p50 / floor.p50), name.hasSuffix("READ") ? "≤ 1.06×" : "",
    ])
    rows.append([
      "\(name) p99", String(printf: "%.2f µs", ours.p99), String(printf: "%.2f µs", floor.p99),
      String(printf: "%.3f×", ours.p99 / floor.p99), "",
    ])
    rows.append([
      "\(name) ops/s", String(printf: "%.0f", ours.opsPerSecond),
      String(printf: "%.0f", floor.opsPerSecond),
      String(printf: "%.3f×", ours.opsPerSecond / floor.opsPerSecond), "",
    ])
  }

  mutating func rate(
    _ name: String, _ ours: Double, _ floor: Double?, unit: String, target: String,
    extra: String? = nil
  ) {
    func fmt(_ v: Double) -> String {
      unit == "B/s" ? String(printf: "%.2f GB/s", v / 1e9) : String(printf: "%.0f", v) + " " + unit
    }
    rows.append([
      name, fmt(ours), floor.map(fmt) ?? (extra ?? "-"),
      floor.map { String(printf: "%.3f×", ours / $0) } ?? "-", target,
    ])
    if let extra, floor != nil { rows.append(["", "", extra, "", ""]) }
  }

  /// A resident-memory figure (KiB) next to the idle floor program's.
  mutating func memory(
    _ name: String, _ kib: Int, floor: Int?, missingFloor: String = "-", target: String
  ) {
    func mib(_ kib: Int) -> String { String(printf: "%.1f MiB", Double(kib) / 1024) }
    rows.append([
      name, mib(kib), floor.map { "\(mib($0)) (idle floor)" } ?? missingFloor,
      floor.map { String(printf: "%.2f×", Double(kib) / Double($0)) } ?? "-", target,
    ])
  }

  mutating func plain(_ name: String, _ value: String, target: String) {
    rows.append([name, value, "-", "-", target])
  }

  func render() -> String {
    let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max() ?? 0 }
    return rows.map { row in
      row.enumerated().map { $1 + String(repeating: " ", count: widths[$0] + 2 - $1.count) }
        .joined()
    }.joined(separator: "\n")
  }
}
