import Testing
import VFIODevice
import VFIOUser
import VFIOUserServer

/// `vfio_mig_get_next_state` against the table of protocol/xe-kernel-facts.md §11, transcribed here as text.
@Suite("Migration state machine table")
struct MigrationTableTests {
  static let columns: [MigrationState] = [
    .stop, .running, .stopCopy, .resuming, .runningP2P, .preCopy, .preCopyP2P, .error,
  ]
  static let reference = """
    STOP         | STOP | RUNNING_P2P | STOP_COPY | RESUMING | RUNNING_P2P | RUNNING_P2P | RUNNING_P2P | ERROR
    RUNNING      | RUNNING_P2P | RUNNING | RUNNING_P2P | RUNNING_P2P | RUNNING_P2P | PRE_COPY | RUNNING_P2P | ERROR
    STOP_COPY    | STOP | STOP | STOP_COPY | STOP | STOP | ERROR | ERROR | ERROR
    RESUMING     | STOP | STOP | STOP | RESUMING | STOP | STOP | STOP | ERROR
    RUNNING_P2P  | STOP | RUNNING | STOP | STOP | RUNNING_P2P | RUNNING | PRE_COPY_P2P | ERROR
    PRE_COPY     | RUNNING | RUNNING | PRE_COPY_P2P | RUNNING | RUNNING | PRE_COPY | PRE_COPY_P2P | ERROR
    PRE_COPY_P2P | RUNNING_P2P | RUNNING_P2P | STOP_COPY | RUNNING_P2P | RUNNING_P2P | PRE_COPY | PRE_COPY_P2P | ERROR
    ERROR        | ERROR | ERROR | ERROR | ERROR | ERROR | ERROR | ERROR | ERROR
    """

  static func state(_ name: Substring) -> MigrationState {
    MigrationState.allCases.first { $0.description == name.trimmingCharacters(in: .whitespaces) }!
  }

  static var table: [MigrationState: [MigrationState: MigrationState]] {
    var result: [MigrationState: [MigrationState: MigrationState]] = [:]
    for line in reference.split(separator: "\n") {
      let cells = line.split(separator: "|").map(state)
      for (column, next) in zip(columns, cells.dropFirst()) {
        result[cells[0], default: [:]][column] = next
      }
    }
    return result
  }

  /// The path the server walks from `a` to `b`, arc by arc (nil if refused).
  static func path(_ a: MigrationState, _ b: MigrationState, _ flags: MigrationFlags)
    -> [MigrationState]?
  {
    var path: [MigrationState] = []
    var current = a
    while current != b {
      guard let next = MigrationTransitions.nextState(from: current, to: b, flags: flags) else {
        return nil
      }
      path.append(next)
      current = next
      if path.count > 8 { return nil }
    }
    return path
  }

  @Test func withEveryFlagEachEntryIsTheTable() {
    let all: MigrationFlags = [.stopCopy, .p2p, .preCopy]
    let table = Self.table
    for from in Self.columns where from != .error {
      for to in Self.columns {
        let expected = table[from]![to]!
        let next = MigrationTransitions.nextState(from: from, to: to, flags: all)
        #expect(next == (expected == .error || to == .error ? nil : expected), "\(from) → \(to)")
      }
    }
  }

  @Test func xeFlagsGiveTheDriverPaths() {
    let xe: MigrationFlags = [.stopCopy, .p2p]
    #expect(Self.path(.running, .stopCopy, xe) == [.runningP2P, .stop, .stopCopy])
    #expect(Self.path(.stopCopy, .running, xe) == [.stop, .runningP2P, .running])
    #expect(Self.path(.running, .resuming, xe) == [.runningP2P, .stop, .resuming])
    #expect(Self.path(.resuming, .running, xe) == [.stop, .runningP2P, .running])
    #expect(Self.path(.running, .stop, xe) == [.runningP2P, .stop])
    #expect(Self.path(.stopCopy, .resuming, xe) == [.stop, .resuming])
    for unsupported: MigrationState in [.preCopy, .preCopyP2P, .error] {
      for from: MigrationState in [.running, .stop, .stopCopy, .resuming, .runningP2P] {
        #expect(Self.path(from, unsupported, xe) == nil)
      }
    }
  }

  @Test func withoutP2PTheP2PStatesAreSkipped() {
    let flags: MigrationFlags = [.stopCopy]
    #expect(Self.path(.running, .stopCopy, flags) == [.stop, .stopCopy])
    #expect(Self.path(.resuming, .running, flags) == [.stop, .running])
    #expect(Self.path(.running, .runningP2P, flags) == nil)
    // From a state the flags do not support, nothing is reachable.
    #expect(MigrationTransitions.nextState(from: .runningP2P, to: .running, flags: flags) == nil)
  }

  /// Every pair under every flag combination: a path never passes through an
  /// unsupported state or ERROR, never opens a stream midway (STOP_COPY or
  /// RESUMING inside it), and enters the pre-copy states only from one of them.
  @Test func pathsRespectTheFlagsEverywhere() {
    let combos: [MigrationFlags] = [
      [.stopCopy], [.stopCopy, .p2p], [.stopCopy, .preCopy], [.stopCopy, .p2p, .preCopy],
    ]
    for flags in combos {
      for from in Self.columns where MigrationTransitions.supported(from, flags) {
        for to in Self.columns {
          guard let path = Self.path(from, to, flags) else {
            #expect(
              !MigrationTransitions.supported(to, flags)
                || (from == .stopCopy && (to == .preCopy || to == .preCopyP2P)),
              "\(flags) \(from) → \(to)")
            continue
          }
          #expect(path.allSatisfy { MigrationTransitions.supported($0, flags) })
          let inside = path.dropLast()
          #expect(
            inside.allSatisfy { $0 != .stopCopy && $0 != .resuming && $0 != .error },
            "\(from) → \(to)")
          if from != .preCopy && from != .preCopyP2P {
            #expect(inside.allSatisfy { $0 != .preCopy && $0 != .preCopyP2P }, "\(from) → \(to)")
          }
        }
      }
    }
  }
}
