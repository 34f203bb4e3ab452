import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

// Output on stderr, and figures without Foundation's formatters.

/// One line on stderr.
func printError(_ line: String) {
  let bytes = Array((line + "\n").utf8)
  _ = try? bytes.withUnsafeBytes { try FileDescriptor.standardError.writeAll($0) }
}

/// `value` with `digits` decimals, without Foundation's formatters.
func fixed(_ value: Double, _ digits: Int) -> String {
  guard value.isFinite else { return "\(value)" }
  var scale = 1.0
  for _ in 0..<digits { scale *= 10 }
  let scaled = (abs(value) * scale).rounded()
  let whole = UInt64(scaled / scale)
  var text = "\(value < 0 && scaled > 0 ? "-" : "")\(whole)"
  if digits > 0 {
    let fraction = String(UInt64(scaled - Double(whole) * scale))
    text += "." + String(repeating: "0", count: digits - fraction.count) + fraction
  }
  return text
}

func formatRate(_ bytes: UInt64) -> String {
  if bytes >= 1 << 30 { return fixed(Double(bytes) / Double(1 << 30), 2) + " GiB" }
  if bytes >= 1 << 20 { return fixed(Double(bytes) / Double(1 << 20), 1) + " MiB" }
  if bytes >= 1 << 10 { return fixed(Double(bytes) / Double(1 << 10), 1) + " KiB" }
  return "\(bytes) B"
}

func gigabytesPerSecond(_ bytes: UInt64, _ seconds: Double) -> String {
  fixed(seconds > 0 ? Double(bytes) / seconds / 1e9 : 0, 2) + " GB/s"
}

/// `part` as a percentage of `whole`, for "1.2 GiB as 150 MiB (12%)".
func percent(_ part: UInt64, of whole: UInt64) -> String {
  whole > 0 ? fixed(Double(part) * 100 / Double(whole), 1) + "%" : "-"
}

/// What `migrate` moved: the bytes on the wire (read from the source), and
/// the state they carry, counted where the stream passes through this process
/// and otherwise (a sparse stream spliced through unread) the source's
/// estimate (MIG_DATA_SIZE, taken before STOP_COPY), said to be one.
struct MigrationVolume {
  var wire: UInt64
  /// The stream's length with its zero runs written out; nil when not seen.
  var state: UInt64?
  var estimate: UInt64
  /// The source sent the sparse stream: zero VRAM pages not on the wire.
  var sparse: Bool

  /// "256.1 MiB of state in 0.358 s (0.75 GB/s), 256.1 MiB on the wire"; the
  /// rate is the state's, which is what the workload sees move.
  func summary(seconds: Double) -> String {
    let time = "in \(fixed(seconds, 3)) s"
    let onTheWire =
      "\(formatRate(wire)) on the wire\(sparse ? " (sparse stream: zero VRAM pages not sent)" : "")"
    if let state {
      return
        "\(formatRate(state)) of state \(time) (\(gigabytesPerSecond(state, seconds))), \(onTheWire)"
    }
    guard estimate > 0 else {
      return "state of unknown size (the source gave no estimate) \(time), \(onTheWire)"
    }
    return
      "~\(formatRate(estimate)) of state (the source's estimate) \(time) (~\(gigabytesPerSecond(estimate, seconds))), \(onTheWire)"
  }
}
