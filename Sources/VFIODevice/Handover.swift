import SystemPackage
import VFIOUser

/// Why a live update cannot carry some state over to the new server
/// process. Said to the operator as it is; the old server keeps serving.
public struct HandoverRefusal: Error, Sendable, Equatable, CustomStringConvertible {
  public var reason: String
  public init(_ reason: String) { self.reason = reason }
  public var description: String { reason }
}

/// State one server process hands to the next in a live update: bytes in a
/// format their owner versions and checks, and the descriptors those bytes
/// refer to by their index in `descriptors`.
///
/// Exported, the descriptors are lent: the exporter still owns them, and
/// keeps them until its process exits (the handover is done) or it carries
/// on serving (the handover was called off). Imported, they arrive owned.
public struct HandoverState {
  public var bytes: [UInt8]
  public var descriptors: [FileDescriptor]
  public init(bytes: [UInt8] = [], descriptors: [FileDescriptor] = []) {
    self.bytes = bytes
    self.descriptors = descriptors
  }
}

/// A device a live update can hand to a new server process with all its
/// state. The old process's calls come on the connection thread (or with no
/// client attached, from the thread running the update), between two
/// messages; the new process's before it serves anything.
public protocol HandoverCapable: AnyObject {
  /// Why the device's state cannot be handed over now (a migration stream
  /// open, work in flight), or nil when it can.
  var handoverRefusal: String? { get }
  /// The device's whole state now. Until the process exits or the update is
  /// called off (`handoverAbandoned`), the device is not called again. A
  /// refusal thrown here leaves the device as it was.
  func exportHandover() throws(HandoverRefusal) -> HandoverState
  /// The update was called off after `exportHandover` succeeded (the new
  /// process refused, died or timed out, or the commit could not be sent),
  /// and the new process is gone: the device undoes what its export did to
  /// things the two processes share (a kernel device names its own
  /// addresses of the DMA windows again), then serves on. Called on the
  /// connection thread before it serves the next message.
  func handoverAbandoned()
  /// In the new process, once the connection is rebuilt and before ready:
  /// the client's DMA windows as this process's server mapped them again
  /// (`DMAWindow.mapping` is this process's address; none without a
  /// client). A refusal calls the update off.
  func adoptDMAWindows(_ windows: [DMAWindow]) throws(HandoverRefusal)
}

extension HandoverCapable {
  public func handoverAbandoned() {}
  public func adoptDMAWindows(_ windows: [DMAWindow]) throws(HandoverRefusal) {}
}
