import Synchronization
import VFIODevice

#if canImport(Glibc)
  import Glibc
#endif

/// SIGINT, SIGTERM and SIGHUP for a command that must not be cut off
/// halfway (`save`): the signals are blocked in every thread and one thread
/// takes them with sigwait. The first asks the command to stop at its next
/// chunk (`check` throws `Interrupted`), so it leaves through its failure
/// path: the partial file removed, the device back in the state it was found
/// in. A second signal, for a command stuck on a server that no longer
/// answers, runs `lastResort` (remove the partial file) and exits at once.
///
/// Made before any other thread starts, so every thread inherits the mask.
public final class Interruption: Sendable {
  public static let signals = [SIGINT, SIGTERM, SIGHUP]
  /// The first signal taken, or 0.
  private let received = Atomic<Int32>(0)
  private let lastResort = Locked<(@Sendable () -> Void)?>(nil)

  public init() throws {
    try takeSignals(Self.signals) { [self] number in
      let (first, _) = received.compareExchange(
        expected: 0, desired: number, ordering: .sequentiallyConsistent)
      guard first else {
        lastResort.withLock { $0 }?()
        printError("\(signalName(number)) again: stopping now")
        _exit(128 + number)
      }
      printError(
        "\(signalName(number)): stopping after the current chunk (again to stop at once)")
    }
  }

  /// What a second signal does before the process exits: it must be safe
  /// to run while the command's threads are anywhere (an unlink, not a close).
  public func setLastResort(_ action: @escaping @Sendable () -> Void) {
    lastResort.withLock { $0 = action }
  }

  /// Throws `Interrupted` once a signal came.
  public func check() throws {
    let number = received.load(ordering: .relaxed)
    if number != 0 { throw Interrupted(signal: number) }
  }

  /// The exit status for a command a signal ended: 128 + its number, as a shell reports it.
  public var exitCode: Int32? {
    let number = received.load(ordering: .relaxed)
    return number == 0 ? nil : 128 + number
  }
}

/// Blocks `signals` in the calling thread, and so in every thread started
/// after it, and takes them on a thread of their own with sigwait, calling
/// `handle` with each: a signal sent at any moment waits pending for it,
/// never killing the process or getting lost. Call it before starting threads.
public func takeSignals(_ signals: [Int32], _ handle: @escaping @Sendable (Int32) -> Void) throws {
  var set = sigset_t()
  sigemptyset(&set)
  for number in signals { sigaddset(&set, number) }
  pthread_sigmask(SIG_BLOCK, &set, nil)
  let failed = startThread(name: "signals") { [set] in
    var waitSet = set
    var number: Int32 = 0
    while true {
      guard sigwait(&waitSet, &number) == 0 else { continue }
      handle(number)
    }
  }
  if let failed { throw CLIError("cannot start the signal thread: \(failed)") }
}

/// The command was asked to stop by a signal.
public struct Interrupted: Error, CustomStringConvertible {
  public var signal: Int32
  public var description: String { "interrupted by \(signalName(signal))" }
}

public func signalName(_ number: Int32) -> String {
  switch number {
  case SIGINT: "SIGINT"
  case SIGTERM: "SIGTERM"
  case SIGHUP: "SIGHUP"
  default: "signal \(number)"
  }
}

/// Writes to a closed pipe fail with EPIPE (reported, then rolled back)
/// instead of killing the command with SIGPIPE halfway through.
public func ignoreSIGPIPE() { signal(SIGPIPE, SIG_IGN) }
