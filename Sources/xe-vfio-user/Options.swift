import ArgumentParser
import Control
import KernelVFIO
import Logging
import MigrationTools
import Synchronization
import VFIOUser
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

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

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension DMATransferLayout: ExpressibleByArgument {}
extension MigrationChoice: ExpressibleByArgument {}

/// `serve --profile`: a profile by its name, in any case (`XeProfile.named`).
extension XeProfile: ExpressibleByArgument {
  public init?(argument: String) {
    guard let profile = XeProfile.named(argument) else { return nil }
    self = profile
  }

  public static var allValueStrings: [String] { allProfiles.map(\.name) }
  public var defaultValueDescription: String { name }
}

/// `serve --on-disconnect`: what a client's hang-up does to the device.
enum DisconnectPolicy: String, CaseIterable, ExpressibleByArgument {
  case reset, keep
}

/// Logs go to standard error, one line each, at the chosen level.
///
/// Nothing about the log can end the process: SIGPIPE is ignored (a log
/// reader that went away, `serve 2>&1 | head`, would otherwise kill the
/// server and with it the VM's device), and a line that cannot be written is
/// counted (`StandardErrorLog.failedWrites`) and dropped.
/// The level is `runtimeLogLevel`'s, which serve's `set-log-level` changes.
func bootstrapLogging(level: Logger.Level) -> Logger {
  ignoreSIGPIPE()
  runtimeLogLevel.level = level
  LoggingSystem.bootstrap { label in
    runtimeLogLevel.handler(StreamLogHandler(label: label, stream: StandardErrorLog()))
  }
  return Logger(label: "xe-vfio-user")
}

/// The level every logger of the process reads on each log call.
let runtimeLogLevel = RuntimeLogLevel(.info)

/// Where the socket goes when none is given.
let defaultSocketPath = "/tmp/xe-vfio-user.sock"

/// Log lines straight to descriptor 2 with write(2), one call a line where
/// the kernel takes it whole. Unlike stdio's stderr it never holds a line
/// back, and a failed write (EPIPE from a reader that left, EBADF, ENOSPC)
/// is counted instead of reported: there is nowhere left to report it.
struct StandardErrorLog: TextOutputStream, Sendable {
  /// Lines (or parts of lines) that could not be written.
  static let failedWrites = Atomic<UInt64>(0)

  mutating func write(_ string: String) {
    var line = string
    line.withUTF8 { bytes in
      var at = 0
      while at < bytes.count {
        let n = Glibc.write(2, bytes.baseAddress! + at, bytes.count - at)
        if n > 0 {
          at += n
        } else if n < 0, errno == EINTR {
          continue
        } else {
          Self.failedWrites.add(1, ordering: .relaxed)
          return
        }
      }
    }
  }
}

/// `--progress` and `--quiet`, the same for save, restore and migrate.
struct ProgressOptions: ParsableArguments {
  @Flag(help: "A progress line on stderr even when it is not a terminal.") var progress = false
  @Flag(help: "No progress output.") var quiet = false

  /// On a terminal unless `--quiet`; elsewhere only with `--progress`.
  var enabled: Bool { !quiet && (progress || isatty(2) != 0) }
}

extension ProgressReporter {
  convenience init(label: String, total: UInt64, options: ProgressOptions) {
    self.init(label: label, total: total, enabled: options.enabled)
  }
}
