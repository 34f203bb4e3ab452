// The VFIO migration vocabulary, shared by the wire (DEVICE_FEATURE payloads),
// the server and the client.

/// `enum vfio_device_mig_state`.
public enum MigrationState: UInt32, Sendable, CaseIterable, CustomStringConvertible {
  case error = 0
  case stop = 1
  case running = 2
  case stopCopy = 3
  case resuming = 4
  case runningP2P = 5
  case preCopy = 6
  case preCopyP2P = 7

  public var description: String {
    switch self {
    case .error: "ERROR"
    case .stop: "STOP"
    case .running: "RUNNING"
    case .stopCopy: "STOP_COPY"
    case .resuming: "RESUMING"
    case .runningP2P: "RUNNING_P2P"
    case .preCopy: "PRE_COPY"
    case .preCopyP2P: "PRE_COPY_P2P"
    }
  }
}

/// VFIO_MIGRATION_* flags a device advertises.
public struct MigrationFlags: OptionSet, Sendable, Hashable {
  public let rawValue: UInt64
  public init(rawValue: UInt64) { self.rawValue = rawValue }
  public static let stopCopy = MigrationFlags(rawValue: 1 << 0)
  public static let p2p = MigrationFlags(rawValue: 1 << 1)
  public static let preCopy = MigrationFlags(rawValue: 1 << 2)
}
