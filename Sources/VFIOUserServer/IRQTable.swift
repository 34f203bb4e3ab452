import CVFIOUser
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// Interrupt state per index with the VFIO SET_IRQS semantics: trigger
/// eventfds per vector, mask/unmask with pending latches, automasking (INTx),
/// and loopback triggers from the client. The table owns every eventfd.
struct IRQTable {
  struct Index {
    var description: IRQDescription
    var triggerFDs: [Int32]
    var masked: [Bool]
    var pending: [Bool]
    /// INTx: eventfd whose signal unmasks (the irqfd "resample" fd), or -1.
    var unmaskFD: Int32 = -1

    init(_ description: IRQDescription) {
      self.description = description
      let n = Int(description.count)
      triggerFDs = Array(repeating: -1, count: n)
      masked = Array(repeating: false, count: n)
      pending = Array(repeating: false, count: n)
    }

    var configuration: IRQConfiguration {
      IRQConfiguration(
        index: description.index, triggerFDs: triggerFDs, unmaskFD: unmaskFD, masked: masked)
    }
  }

  private(set) var indexes: [Index]

  init(_ descriptions: [IRQDescription]) {
    indexes = descriptions.map(Index.init)
  }

  /// Eventfds currently held (for accounting and leak checks).
  var openFDCount: Int {
    indexes.reduce(0) { $0 + $1.triggerFDs.filter { $0 >= 0 }.count + ($1.unmaskFD >= 0 ? 1 : 0) }
  }

  /// Applies one DEVICE_SET_IRQS. Consumes `fds` on every path (kept or closed).
  /// Returns the new configuration of the index when it changed.
  mutating func apply(_ request: IRQSetPayload, fds: inout FDList) throws(Errno)
    -> IRQConfiguration?
  {
    var received = fds.take()
    defer { for fd in received { _ = close(fd) } }
    let i = Int(request.index)
    guard i < indexes.count else { throw .invalidArgument }
    let desc = indexes[i].description
    guard desc.count > 0 else { throw .invalidArgument }
    let data = request.dataType
    let action = request.action

    if data != VFIOIRQSetFlags.dataEventfd, !received.isEmpty { throw .invalidArgument }

    // count 0 with DATA_NONE tears the whole index down (for any action, as the kernel does for TRIGGER).
    if request.count == 0 {
      guard data == VFIOIRQSetFlags.dataNone, action == VFIOIRQSetFlags.actionTrigger,
        request.start == 0
      else {
        throw .invalidArgument
      }
      disable(i)
      return indexes[i].configuration
    }
    guard UInt64(request.start) + UInt64(request.count) <= UInt64(desc.count) else {
      throw .invalidArgument
    }
    let range = Int(request.start)..<Int(request.start + request.count)
    if request.index == VFIOPCIIRQ.err || request.index == VFIOPCIIRQ.req {
      guard action == VFIOIRQSetFlags.actionTrigger else { throw .invalidArgument }
    }

    switch action {
    case VFIOIRQSetFlags.actionTrigger:
      switch data {
      case VFIOIRQSetFlags.dataEventfd:
        // No descriptors de-assigns the range; otherwise one per vector.
        guard received.isEmpty || received.count == range.count else { throw .invalidArgument }
        for (k, v) in range.enumerated() {
          if indexes[i].triggerFDs[v] >= 0 { _ = close(indexes[i].triggerFDs[v]) }
          indexes[i].triggerFDs[v] = received.isEmpty ? -1 : received[k]
        }
        received = []
        return indexes[i].configuration
      case VFIOIRQSetFlags.dataNone:
        for v in range { fire(index: i, vector: v) }
        return nil
      default:
        for (k, v) in range.enumerated() where request.bools[k] != 0 { fire(index: i, vector: v) }
        return nil
      }
    case VFIOIRQSetFlags.actionMask, VFIOIRQSetFlags.actionUnmask:
      guard desc.maskable else { throw .invalidArgument }
      let mask = action == VFIOIRQSetFlags.actionMask
      if data == VFIOIRQSetFlags.dataEventfd {
        // Only INTx unmask takes an eventfd (the resample fd), one vector.
        guard !mask, request.index == VFIOPCIIRQ.intx, range.count == 1, received.count <= 1 else {
          throw .invalidArgument
        }
        if indexes[i].unmaskFD >= 0 { _ = close(indexes[i].unmaskFD) }
        indexes[i].unmaskFD = received.first ?? -1
        received = []
        return indexes[i].configuration
      }
      for (k, v) in range.enumerated()
      where data == VFIOIRQSetFlags.dataNone || request.bools[k] != 0 {
        if mask { indexes[i].masked[v] = true } else { unmask(index: i, vector: v) }
      }
      return indexes[i].configuration
    default:
      throw .invalidArgument
    }
  }

  /// Raises a vector: latched while masked, otherwise signalled on its eventfd.
  mutating func fire(index i: Int, vector v: Int) {
    guard i < indexes.count, v < indexes[i].triggerFDs.count else { return }
    if indexes[i].masked[v], indexes[i].unmaskFD >= 0, cvfu_eventfd_drain(indexes[i].unmaskFD) > 0 {
      // The guest EOI'd through the resample fd since the last interrupt.
      indexes[i].masked[v] = false
    }
    if indexes[i].masked[v] {
      indexes[i].pending[v] = true
      return
    }
    if indexes[i].triggerFDs[v] >= 0 { _ = cvfu_eventfd_signal(indexes[i].triggerFDs[v]) }
    if indexes[i].description.automasked { indexes[i].masked[v] = true }
  }

  private mutating func unmask(index i: Int, vector v: Int) {
    indexes[i].masked[v] = false
    if indexes[i].pending[v] {
      indexes[i].pending[v] = false
      fire(index: i, vector: v)
    }
  }

  private mutating func disable(_ i: Int) {
    for v in indexes[i].triggerFDs.indices where indexes[i].triggerFDs[v] >= 0 {
      _ = close(indexes[i].triggerFDs[v])
      indexes[i].triggerFDs[v] = -1
    }
    if indexes[i].unmaskFD >= 0 {
      _ = close(indexes[i].unmaskFD)
      indexes[i].unmaskFD = -1
    }
    for v in indexes[i].masked.indices {
      indexes[i].masked[v] = false
      indexes[i].pending[v] = false
    }
  }

  /// Closes every eventfd (client hang-up); returns the indexes that had any.
  mutating func removeAll() -> [IRQConfiguration] {
    var changed: [IRQConfiguration] = []
    for i in indexes.indices {
      let had = indexes[i].triggerFDs.contains { $0 >= 0 } || indexes[i].unmaskFD >= 0
      disable(i)
      if had { changed.append(indexes[i].configuration) }
    }
    return changed
  }
}
