import Synchronization
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// Per message type counters the connection thread keeps and anyone reads.
///
/// Only one connection thread runs at a time (the accept loop joins one
/// before starting the next), so each counter has a single writer: it is
/// bumped with a relaxed load and store, no locked instruction, no lock, no
/// syscall. Readers (the control channel) load it relaxed and may see a
/// count one message behind the bytes beside it, never a torn value.
public final class ServerCounters: @unchecked Sendable {
  /// Slot 0 counts messages of no known command; slot n counts command n.
  public static let slots = Int(Command.allCases.map(\.rawValue).max()!) + 1
  private enum Field: Int, CaseIterable { case count, errors, bytes }
  private let cells: UnsafeMutablePointer<Atomic<UInt64>>
  private let cellCount: Int
  /// Per message type service time (`received` to `served`).
  public let latency = LatencyHistograms(slots: slots)
  /// False: messages are neither counted nor timed (`bench`'s baseline).
  public let counting: Bool
  /// The message being served: its slot and arrival (CLOCK_MONOTONIC ns).
  /// Touched by the connection thread alone.
  private var currentSlot = -1
  private var currentStart: UInt64 = 0

  /// Indexes of the counters that are not per command.
  private enum Single: Int, CaseIterable {
    case dmaMaps, dmaUnmaps, migrationRead, migrationWritten, interrupts, resets
    case usedWithoutEnable
  }

  public init(counting: Bool = true) {
    self.counting = counting
    cellCount = Self.slots * Field.allCases.count + Single.allCases.count
    cells = .allocate(capacity: cellCount)
    for i in 0..<cellCount { (cells + i).initialize(to: Atomic(0)) }
  }

  deinit {
    cells.deinitialize(count: cellCount)
    cells.deallocate()
  }

  @inline(__always)
  private func add(_ index: Int, _ amount: UInt64) {
    let cell = cells + index
    cell.pointee.store(cell.pointee.load(ordering: .relaxed) &+ amount, ordering: .relaxed)
  }

  private func value(_ index: Int) -> UInt64 { (cells + index).pointee.load(ordering: .relaxed) }

  @inline(__always)
  private static func slot(_ command: UInt16) -> Int {
    Int(command) < slots && Command(rawValue: command) != nil ? Int(command) : 0
  }

  /// A request of `bytes` bytes (header included) arrived; its time runs until `served()`.
  @inline(__always)
  func received(_ command: UInt16, bytes: UInt32) {
    guard counting else { return }
    let slot = Self.slot(command)
    let base = slot * Field.allCases.count
    add(base + Field.count.rawValue, 1)
    add(base + Field.bytes.rawValue, UInt64(bytes))
    currentSlot = slot
    currentStart = Self.now()
  }

  /// The message `received` last announced has been answered (its reply queued or sent).
  @inline(__always)
  func served() {
    guard counting, currentSlot >= 0 else { return }
    latency.record(slot: currentSlot, nanoseconds: Self.now() &- currentStart)
    currentSlot = -1
  }

  /// CLOCK_MONOTONIC in nanoseconds: through the vDSO, no system call.
  @inline(__always)
  static func now() -> UInt64 {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_nsec)
  }

  /// A request was answered with an error (or refused before dispatch).
  func failed(_ command: UInt16) {
    add(Self.slot(command) * Field.allCases.count + Field.errors.rawValue, 1)
  }

  private func single(_ which: Single) -> Int {
    Self.slots * Field.allCases.count + which.rawValue
  }

  func dmaMapped() { add(single(.dmaMaps), 1) }
  func dmaUnmapped() { add(single(.dmaUnmaps), 1) }
  func migrationRead(_ bytes: Int) { add(single(.migrationRead), UInt64(bytes)) }
  func migrationWritten(_ bytes: Int) { add(single(.migrationWritten), UInt64(bytes)) }
  func interruptSignalled() { add(single(.interrupts), 1) }
  func deviceReset() { add(single(.resets), 1) }
  func deviceUsedWithoutEnable() { add(single(.usedWithoutEnable), 1) }

  /// What one message type has seen.
  public struct Message: Sendable, Equatable {
    /// nil for messages of no known command.
    public var command: Command?
    public var count: UInt64
    public var errors: UInt64
    public var bytes: UInt64
    /// Service time, nil before the first sample.
    public var latency: LatencyHistograms.Summary?
  }

  /// Every known command (in wire order) and then the unknown ones.
  public var messages: [Message] {
    (Command.allCases.map { Int($0.rawValue) } + [0]).map { slot in
      let base = slot * Field.allCases.count
      return Message(
        command: slot == 0 ? nil : Command(rawValue: UInt16(slot)),
        count: value(base + Field.count.rawValue), errors: value(base + Field.errors.rawValue),
        bytes: value(base + Field.bytes.rawValue), latency: latency.summary(slot: slot))
    }
  }

  /// Successful DMA_MAP and DMA_UNMAP requests.
  public var dmaMaps: UInt64 { value(single(.dmaMaps)) }
  public var dmaUnmaps: UInt64 { value(single(.dmaUnmaps)) }
  /// Migration data sent in MIG_DATA_READ replies, and taken from MIG_DATA_WRITE requests.
  public var migrationBytesRead: UInt64 { value(single(.migrationRead)) }
  public var migrationBytesWritten: UInt64 { value(single(.migrationWritten)) }
  /// Interrupts the device signalled through the server's host (the simulated VF's).
  public var interruptsSignalled: UInt64 { value(single(.interrupts)) }
  /// Device resets: the client's DEVICE_RESET and the reset after a client left.
  public var deviceResets: UInt64 { value(single(.resets)) }
  /// Resets after which the guest used the device without enabling it again.
  public var usesWithoutEnable: UInt64 { value(single(.usedWithoutEnable)) }
}
