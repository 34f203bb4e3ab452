import Synchronization
import VFIOUser

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

  /// Indexes of the counters that are not per command.
  private enum Single: Int, CaseIterable {
    case dmaMaps, dmaUnmaps, migrationRead, migrationWritten
  }

  public init() {
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

  /// A request of `bytes` bytes (header included) arrived.
  @inline(__always)
  func received(_ command: UInt16, bytes: UInt32) {
    let base = Self.slot(command) * Field.allCases.count
    add(base + Field.count.rawValue, 1)
    add(base + Field.bytes.rawValue, UInt64(bytes))
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

  /// What one message type has seen.
  public struct Message: Sendable, Equatable {
    /// nil for messages of no known command.
    public var command: Command?
    public var count: UInt64
    public var errors: UInt64
    public var bytes: UInt64
  }

  /// Every known command (in wire order) and then the unknown ones.
  public var messages: [Message] {
    (Command.allCases.map { Int($0.rawValue) } + [0]).map { slot in
      let base = slot * Field.allCases.count
      return Message(
        command: slot == 0 ? nil : Command(rawValue: UInt16(slot)),
        count: value(base + Field.count.rawValue), errors: value(base + Field.errors.rawValue),
        bytes: value(base + Field.bytes.rawValue))
    }
  }

  /// Successful DMA_MAP and DMA_UNMAP requests.
  public var dmaMaps: UInt64 { value(single(.dmaMaps)) }
  public var dmaUnmaps: UInt64 { value(single(.dmaUnmaps)) }
  /// Migration data sent in MIG_DATA_READ replies, and taken from MIG_DATA_WRITE requests.
  public var migrationBytesRead: UInt64 { value(single(.migrationRead)) }
  public var migrationBytesWritten: UInt64 { value(single(.migrationWritten)) }
}
