import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// Progress on stderr: the bytes of state moved and the bytes on the wire
/// (the file or pipe a checkpoint goes through, the socket of a migration),
/// so a person sees what skipping empty VRAM saved. Redrawn in place on a
/// terminal, a line every 10% otherwise.
public final class ProgressReporter {
  let total: UInt64
  let label: String
  let tty = isatty(2) != 0
  let start = now()
  var lastDecile = -1
  var lastDraw: UInt64 = 0
  let enabled: Bool

  public init(label: String, total: UInt64, enabled: Bool) {
    self.label = label
    self.total = total
    self.enabled = enabled
  }

  /// `sparse`: the state bytes are not known (a relayed sparse stream), only the wire's.
  public func update(state: UInt64, wire: UInt64, final: Bool = false, sparse: Bool = false) {
    guard enabled else { return }
    let rate = gigabytesPerSecond(state, Double(now() - start) / 1e9)
    let fraction = final ? 1 : total > 0 ? min(1, Double(state) / Double(total)) : 0
    // Sparse: `state` is the wire's count, and so is the rate.
    let figures =
      sparse
      ? "\(formatRate(wire)) on the wire for ~\(formatRate(total)) of state (zero VRAM pages not sent), \(rate) on the wire"
      : "\(formatRate(state))\(total > 0 ? " of ~\(formatRate(total))" : "") of state, \(formatRate(wire)) on the wire (\(percent(wire, of: state))), \(rate)"
    if tty {
      guard final || now() - lastDraw > 100_000_000 else { return }
      lastDraw = now()
      // \r and clear-to-end-of-line: the line shrinks as well as grows.
      let line = "\r\(label): \(Int(fraction * 100))% \(figures)\u{1B}[K"
      _ = try? Array((line + (final ? "\n" : "")).utf8).withUnsafeBytes {
        try FileDescriptor.standardError.writeAll($0)
      }
    } else {
      let decile = Int(fraction * 10)
      guard final || decile > lastDecile else { return }
      lastDecile = decile
      printError("\(label): \(figures)")
    }
  }
}
