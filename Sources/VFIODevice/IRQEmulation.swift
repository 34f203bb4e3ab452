import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// Interrupts done in software with vfio-pci's SET_IRQS semantics, for a
/// device that signals the client's eventfds itself (the simulated VF, test
/// devices): a trigger eventfd per vector, mask and unmask with pending
/// latches, automasking (INTx) with its resample eventfd, and loopback
/// triggers from the client (DATA_NONE and DATA_BOOL triggers).
///
/// A kernel backend needs none of this: it forwards each request to
/// VFIO_DEVICE_SET_IRQS, and the hardware's interrupts reach the eventfds
/// through the kernel.
///
/// Owns every eventfd it was given and closes them when replaced, when the
/// index is disabled, and when it goes away.
public struct IRQEmulation: ~Copyable {
  private struct Index {
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

    var hasDescriptors: Bool { triggerFDs.contains { $0 >= 0 } || unmaskFD >= 0 }
  }

  private var indexes: [Index]

  /// One entry per index, in index order, as the device describes them
  /// (`VFIODeviceBackend.irq`; an index without vectors has count 0).
  public init(_ descriptions: [IRQDescription]) {
    indexes = descriptions.map(Index.init)
  }

  deinit {
    for index in indexes {
      for fd in index.triggerFDs where fd >= 0 { _ = close(fd) }
      if index.unmaskFD >= 0 { _ = close(index.unmaskFD) }
    }
  }

  /// Eventfds currently held (for accounting and leak checks).
  public var descriptorCount: Int {
    indexes.reduce(0) { $0 + $1.triggerFDs.filter { $0 >= 0 }.count + ($1.unmaskFD >= 0 ? 1 : 0) }
  }

  /// The state of index `index`, or nil when there is no such index.
  public func configuration(_ index: UInt32) -> IRQConfiguration? {
    guard Int(index) < indexes.count else { return nil }
    let i = indexes[Int(index)]
    func lent(_ fd: Int32) -> FileDescriptor? { fd >= 0 ? FileDescriptor(rawValue: fd) : nil }
    return IRQConfiguration(
      index: index, triggerFDs: i.triggerFDs.map(lent), unmaskFD: lent(i.unmaskFD),
      masked: i.masked, pending: i.pending)
  }

  /// Applies one SET_IRQS, all or nothing: every rule is checked before
  /// anything changes, so a refused request (EINVAL) leaves eventfds, masks
  /// and pending bits as they were, and closes the descriptors it brought.
  ///
  /// The rules vfio-pci adds to the checks `IRQSetRequest` made: ERR and REQ
  /// take TRIGGER only; MASK and UNMASK need a maskable index; only UNMASK
  /// of INTx's one vector takes an eventfd (the resample fd).
  public mutating func apply(_ request: consuming IRQSetRequest) throws(Errno) {
    let i = Int(request.index)
    guard i < indexes.count, indexes[i].description.count > 0 else { throw .invalidArgument }
    if request.disablesIndex {
      disable(i)
      return
    }
    let description = indexes[i].description
    if request.index == VFIOPCIIRQ.err || request.index == VFIOPCIIRQ.req {
      guard request.action == .trigger else { throw .invalidArgument }
    }
    if request.action != .trigger {
      guard description.maskable else { throw .invalidArgument }
      if request.dataType == .eventFD {
        guard request.action == .unmask, request.index == VFIOPCIIRQ.intx, request.count == 1
        else { throw .invalidArgument }
      }
    }
    // Checked: from here on nothing fails.
    let range = request.vectors
    switch (request.action, request.dataType) {
    case (.trigger, .eventFD):
      // One descriptor per vector, or none at all, which de-assigns the range.
      let assigns = !request.eventFDs.isEmpty
      for (k, v) in range.enumerated() {
        let new = assigns ? request.eventFDs.take(k)?.release().rawValue ?? -1 : -1
        if indexes[i].triggerFDs[v] >= 0 { _ = close(indexes[i].triggerFDs[v]) }
        indexes[i].triggerFDs[v] = new
      }
    case (.trigger, _):
      for (k, v) in range.enumerated() where request.selects(k) { fire(i, v) }
    case (.unmask, .eventFD):
      let new = request.eventFDs.isEmpty ? -1 : request.eventFDs.take(0)?.release().rawValue ?? -1
      if indexes[i].unmaskFD >= 0 { _ = close(indexes[i].unmaskFD) }
      indexes[i].unmaskFD = new
    case (.mask, _):
      for (k, v) in range.enumerated() where request.selects(k) { indexes[i].masked[v] = true }
    case (.unmask, _):
      for (k, v) in range.enumerated() where request.selects(k) { unmask(i, v) }
    }
  }

  /// Raises `vector` of `index`: latched while masked, otherwise signalled on
  /// its eventfd (and masked again if the index automasks). Nothing happens
  /// for a vector the device does not have.
  public mutating func trigger(index: UInt32, vector: UInt32) {
    fire(Int(index), Int(vector))
  }

  /// Closes every eventfd and clears masks and pending bits (the client left).
  public mutating func disableAll() {
    for i in indexes.indices { disable(i) }
  }

  private mutating func fire(_ i: Int, _ v: Int) {
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

  private mutating func unmask(_ i: Int, _ v: Int) {
    indexes[i].masked[v] = false
    if indexes[i].pending[v] {
      indexes[i].pending[v] = false
      fire(i, v)
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
}

// MARK: Live update

/// The interrupt section of a live update's handover state
/// (protocol/live-update-device.md, "Interrupts"): a software device that
/// signals its client's eventfds with `IRQEmulation` embeds it in its own
/// state, and the new process carries on signalling the same eventfds.
extension IRQEmulation {
  /// The section's format version.
  public static let handoverVersion: UInt32 = 1

  /// Appends the state to `writer`: each index's description, then per
  /// vector its trigger eventfd, mask and pending bit, then the index's
  /// unmask eventfd. Each eventfd is appended to `descriptors` (lent: this
  /// emulation still owns it) and named by its position there.
  public func exportHandover(into writer: inout ByteWriter, descriptors: inout [FileDescriptor]) {
    func lend(_ fd: Int32) -> UInt32 {
      guard fd >= 0 else { return HandoverState.noDescriptor }
      descriptors.append(FileDescriptor(rawValue: fd))
      return UInt32(descriptors.count - 1)
    }
    writer.append(Self.handoverVersion)
    writer.append(UInt32(indexes.count))
    for index in indexes {
      writer.append(index.description.index)
      writer.append(index.description.count)
      writer.append(index.description.flags.rawValue)
      for v in index.triggerFDs.indices {
        writer.append(lend(index.triggerFDs[v]))
        writer.append(UInt8((index.masked[v] ? 1 : 0) | (index.pending[v] ? 2 : 0)))
      }
      writer.append(lend(index.unmaskFD))
    }
  }

  /// Reads the section `exportHandover` wrote into an emulation of the
  /// indexes `descriptions` describes (the importing device's own: they must
  /// be the ones exported, or the client's view of the device would be
  /// wrong). Takes the eventfds it names from `descriptors`, each checked to
  /// be an eventfd. On a refusal everything it took is closed.
  public static func importHandover(
    from reader: inout ByteReader, descriptors: inout OwnedFileDescriptors,
    describedAs descriptions: [IRQDescription]
  ) throws(HandoverRefusal) -> IRQEmulation {
    var irqs = IRQEmulation(descriptions)
    let version: UInt32 = try reader.handoverField("the interrupt state's format version")
    guard version == handoverVersion else {
      throw HandoverRefusal(
        "the interrupt state is format version \(version); this server reads version \(handoverVersion)"
      )
    }
    let countAt = reader.offset
    let count: UInt32 = try reader.handoverField("the interrupt index count")
    guard count == descriptions.count else {
      throw HandoverRefusal.corrupt(
        "the interrupt index count", at: countAt,
        "\(count) indexes, where this device has \(descriptions.count)")
    }
    for i in descriptions.indices {
      let field = "interrupt index \(i)"
      let exported = IRQDescription(
        index: try reader.handoverField("\(field)'s number"),
        count: try reader.handoverField("\(field)'s vector count"),
        flags: VFIOIRQInfoFlags(rawValue: try reader.handoverField("\(field)'s flags")))
      guard exported == descriptions[i] else {
        throw HandoverRefusal(
          "\(field) was \(exported) in the exporting server, and is \(descriptions[i]) here: the client's view of the device would be wrong"
        )
      }
      for v in 0..<Int(exported.count) {
        let fd: UInt32 = try reader.handoverField("\(field) vector \(v)'s eventfd")
        let bitsAt = reader.offset
        let bits: UInt8 = try reader.handoverField("\(field) vector \(v)'s mask and pending bits")
        guard bits & ~3 == 0 else {
          throw HandoverRefusal.corrupt(
            "\(field) vector \(v)'s mask and pending bits", at: bitsAt, "unknown bits \(bits)")
        }
        if fd != HandoverState.noDescriptor {
          irqs.indexes[i].triggerFDs[v] = try takeEventFD(
            fd, &descriptors, "\(field) vector \(v)'s trigger")
        }
        irqs.indexes[i].masked[v] = bits & 1 != 0
        irqs.indexes[i].pending[v] = bits & 2 != 0
      }
      let unmask: UInt32 = try reader.handoverField("\(field)'s unmask eventfd")
      if unmask != HandoverState.noDescriptor {
        irqs.indexes[i].unmaskFD = try takeEventFD(unmask, &descriptors, "\(field)'s unmask")
      }
    }
    return irqs
  }

  /// Takes descriptor `index` as the eventfd `field` names, with its ownership.
  private static func takeEventFD(
    _ index: UInt32, _ descriptors: inout OwnedFileDescriptors, _ field: String
  ) throws(HandoverRefusal) -> Int32 {
    let owned = try descriptors.takeHandover(index, for: field)
    let kind = try? DescriptorKind(of: owned.descriptor)
    guard kind == .eventFD else {
      throw HandoverRefusal(
        "descriptor \(index), the handover's \(field) eventfd, is \(kind.map { "\($0)" } ?? "not open"), not an eventfd"
      )
    }
    return owned.release().rawValue
  }
}
