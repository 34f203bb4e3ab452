import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

// Output on stderr, and figures without Foundation's formatters.

/// One line on stderr.
public func printError(_ line: String) {
  let bytes = Array((line + "\n").utf8)
  _ = try? bytes.withUnsafeBytes { try FileDescriptor.standardError.writeAll($0) }
}

/// `value` with `digits` decimals, without Foundation's formatters.
public func fixed(_ value: Double, _ digits: Int) -> String {
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

public func formatRate(_ bytes: UInt64) -> String {
  if bytes >= 1 << 30 { return fixed(Double(bytes) / Double(1 << 30), 2) + " GiB" }
  if bytes >= 1 << 20 { return fixed(Double(bytes) / Double(1 << 20), 1) + " MiB" }
  if bytes >= 1 << 10 { return fixed(Double(bytes) / Double(1 << 10), 1) + " KiB" }
  return "\(bytes) B"
}

public func gigabytesPerSecond(_ bytes: UInt64, _ seconds: Double) -> String {
  fixed(seconds > 0 ? Double(bytes) / seconds / 1e9 : 0, 2) + " GB/s"
}

/// `part` as a percentage of `whole`, for "1.2 GiB as 150 MiB (12%)".
public func percent(_ part: UInt64, of whole: UInt64) -> String {
  whole > 0 ? fixed(Double(part) * 100 / Double(whole), 1) + "%" : "-"
}

/// What `migrate` moved: the bytes on the wire (read from the source), and
/// the state they carry, counted where the stream passes through this process
/// and otherwise (a sparse stream spliced through unread) the source's
/// estimate (MIG_DATA_SIZE, taken before STOP_COPY), said to be one.
public struct MigrationVolume {
  public var wire: UInt64
  /// The stream's length with its zero runs written out; nil when not seen.
  public var state: UInt64?
  public var estimate: UInt64
  /// The source sent the sparse stream: zero VRAM pages not on the wire.
  public var sparse: Bool

  public init(wire: UInt64, state: UInt64?, estimate: UInt64, sparse: Bool) {
    self.wire = wire
    self.state = state
    self.estimate = estimate
    self.sparse = sparse
  }

  /// "256.1 MiB of state in 0.358 s (0.75 GB/s), 256.1 MiB on the wire"; the
  /// rate is the state's, which is what the workload sees move.
  public func summary(seconds: Double) -> String {
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

/// Monotonic nanoseconds; inlinable, as benchmarks time single round trips with it.
@inlinable @inline(__always)
public func now() -> UInt64 {
  var ts = timespec()
  clock_gettime(CLOCK_MONOTONIC, &ts)
  return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// `value` in hexadecimal, zero-padded to `width` digits.
public func hex<T: BinaryInteger>(_ value: T, _ width: Int) -> String {
  let s = String(value, radix: 16)
  return String(repeating: "0", count: max(0, width - s.count)) + s
}

/// 256 MiB, 4 GiB: a size in the largest unit that divides it.
public func formatBytes(_ bytes: UInt64) -> String {
  if bytes >= 1 << 30, bytes % (1 << 30) == 0 { return "\(bytes >> 30) GiB" }
  if bytes >= 1 << 20, bytes % (1 << 20) == 0 { return "\(bytes >> 20) MiB" }
  if bytes >= 1 << 10, bytes % (1 << 10) == 0 { return "\(bytes >> 10) KiB" }
  return "\(bytes) bytes"
}
