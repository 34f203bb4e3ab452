import Logging
import Synchronization

/// The server's log level, changed while it runs (`set-log-level`): every
/// logger made through `handler(_:)` reads it on each log call, so a change
/// reaches loggers already handed out. A connection reads whether to trace
/// each message once, when its client arrives: `trace` reaches per-message
/// lines from the next client on.
public final class RuntimeLogLevel: Sendable {
  private let raw: Atomic<Int>

  public init(_ level: Logger.Level) {
    raw = Atomic(Self.index(level))
  }

  private static func index(_ level: Logger.Level) -> Int {
    Logger.Level.allCases.firstIndex(of: level)!
  }

  public var level: Logger.Level {
    get { Logger.Level.allCases[raw.load(ordering: .relaxed)] }
    set { raw.store(Self.index(newValue), ordering: .relaxed) }
  }

  /// `inner` with its level taken from here.
  public func handler<Inner: LogHandler>(_ inner: Inner) -> some LogHandler {
    Handler(inner: inner, level: self)
  }

  private struct Handler<Inner: LogHandler>: LogHandler {
    var inner: Inner
    let level: RuntimeLogLevel

    var logLevel: Logger.Level {
      get { level.level }
      set { level.level = newValue }
    }

    func log(event: LogEvent) { inner.log(event: event) }

    var metadata: Logger.Metadata {
      get { inner.metadata }
      set { inner.metadata = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
      get { inner[metadataKey: key] }
      set { inner[metadataKey: key] = newValue }
    }
  }
}
