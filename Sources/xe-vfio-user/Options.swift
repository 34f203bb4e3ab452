import ArgumentParser
import Logging
import VFIOUser

/// A byte count written like 256M, 1G, 64KiB or 4096.
struct ByteSize: ExpressibleByArgument, CustomStringConvertible {
  var bytes: UInt64

  init(_ bytes: UInt64) { self.bytes = bytes }

  init?(argument: String) {
    // Blanks around it (spaces, tabs; not line breaks) are ignored.
    let blank: (Character) -> Bool = { $0.isWhitespace && !$0.isNewline }
    guard let first = argument.firstIndex(where: { !blank($0) }),
      let last = argument.lastIndex(where: { !blank($0) })
    else { return nil }
    let text = argument[first...last].uppercased()
    let units: [(String, UInt64)] = [
      ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("G", 1 << 30), ("M", 1 << 20),
      ("K", 1 << 10), ("B", 1),
    ]
    var number = Substring(text)
    var scale: UInt64 = 1
    for (suffix, value) in units where text.hasSuffix(suffix) {
      number = text.dropLast(suffix.count)
      scale = value
      break
    }
    guard let value = UInt64(number), value.multipliedReportingOverflow(by: scale).overflow == false
    else { return nil }
    bytes = value * scale
  }

  var description: String { formatBytes(bytes) }
}

func formatBytes(_ bytes: UInt64) -> String {
  if bytes >= 1 << 30, bytes % (1 << 30) == 0 { return "\(bytes >> 30) GiB" }
  if bytes >= 1 << 20, bytes % (1 << 20) == 0 { return "\(bytes >> 20) MiB" }
  if bytes >= 1 << 10, bytes % (1 << 10) == 0 { return "\(bytes >> 10) KiB" }
  return "\(bytes) bytes"
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension DMATransferLayout: ExpressibleByArgument {}

/// Logs go to standard error, one line each, at the chosen level.
func bootstrapLogging(level: Logger.Level) -> Logger {
  LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardError(label: label)
    handler.logLevel = level
    return handler
  }
  var logger = Logger(label: "xe-vfio-user")
  logger.logLevel = level
  return logger
}

/// Where the socket goes when none is given.
let defaultSocketPath = "/tmp/xe-vfio-user.sock"
