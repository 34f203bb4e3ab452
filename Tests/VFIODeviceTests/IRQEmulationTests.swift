import CVFIOUser
import Glibc
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser

/// The indexes of a PCI function with every feature the emulation has:
/// INTx (1 vector, maskable, automasked), MSI (4, not maskable), MSI-X (8,
/// maskable), ERR and REQ (1 each).
let pciIRQs: [IRQDescription] = [
  IRQDescription(
    index: 0, count: 1,
    flags: [.eventfd, .maskable, .automasked]),
  IRQDescription(index: 1, count: 4, flags: [.eventfd, .noresize]),
  IRQDescription(index: 2, count: 8, flags: [.eventfd, .maskable]),
  IRQDescription(index: 3, count: 1, flags: .eventfd),
  IRQDescription(index: 4, count: 1, flags: .eventfd),
]

/// An eventfd handed over as the only copy (`descriptor`): whether its new
/// owner closed it is known without racing other tests for descriptor
/// numbers. The probe keeps a duplicate, so the eventfd's `eventfd-id` stays
/// unique while it lives, and looks for any other descriptor with that id.
final class ClosureProbe {
  let descriptor: FileDescriptor
  private let witness: Int32
  private let id: String

  init() {
    let fd = cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC)
    precondition(fd >= 0)
    descriptor = FileDescriptor(rawValue: fd)
    witness = dup(fd)
    let id = eventFDIdentity(witness)
    precondition(id != nil, "no eventfd-id in /proc/self/fdinfo (Linux 6.3 or later)")
    self.id = id!
  }
  deinit { close(witness) }

  /// True once no descriptor but the probe's own duplicate refers to the eventfd.
  var closedEverywhere: Bool {
    guard let directory = opendir("/proc/self/fd") else { return false }
    defer { closedir(directory) }
    let listing = dirfd(directory)
    while let entry = readdir(directory) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) {
        String(cString: $0.bindMemory(to: CChar.self).baseAddress!)
      }
      guard let fd = Int32(name), fd != witness, fd != listing else { continue }
      if eventFDIdentity(fd) == id { return false }
    }
    return true
  }
}

func request(
  _ flags: VFIOIRQSetFlags, index: UInt32, start: UInt32 = 0, count: UInt32, bools: [UInt8] = [],
  fds: [FileDescriptor] = []
) throws(Errno) -> IRQSetRequest {
  try IRQSetRequest(
    IRQSetPayload(flags: flags, index: index, start: start, count: count, bools: bools),
    descriptors: OwnedFileDescriptors(taking: fds),
    irq: index < UInt32(pciIRQs.count) ? pciIRQs[Int(index)] : nil)
}

let triggerFD: VFIOIRQSetFlags = [.dataEventfd, .actionTrigger]
let triggerNone: VFIOIRQSetFlags = [.dataNone, .actionTrigger]
let triggerBool: VFIOIRQSetFlags = [.dataBool, .actionTrigger]
let maskNone: VFIOIRQSetFlags = [.dataNone, .actionMask]
let unmaskNone: VFIOIRQSetFlags = [.dataNone, .actionUnmask]
let unmaskFD: VFIOIRQSetFlags = [.dataEventfd, .actionUnmask]

@Suite("IRQEmulation: SET_IRQS in software")
struct IRQEmulationTests {
  @Test func triggersReachTheirEventfdsAndDeassignedVectorsNothing() throws {
    var irqs = IRQEmulation(pciIRQs)
    let fds = (0..<8).map { _ in TestEventFD() }
    try irqs.apply(request(triggerFD, index: 2, count: 8, fds: fds.map { $0.lend() }))
    #expect(irqs.descriptorCount == 8)
    for v: UInt32 in [0, 3, 7] { irqs.trigger(index: 2, vector: v) }
    #expect(fds.map { $0.count() } == [1, 0, 0, 1, 0, 0, 0, 1])
    // DATA_EVENTFD without descriptors de-assigns the range.
    try irqs.apply(request(triggerFD, index: 2, start: 3, count: 2))
    #expect(irqs.descriptorCount == 6)
    let deassigned = irqs.configuration(2)
    #expect(deassigned?.triggerFDs[3] == nil)
    irqs.trigger(index: 2, vector: 3)
    #expect(fds[3].count() == 0)
    // Loopback from the client: DATA_NONE fires the range, DATA_BOOL the vectors it selects.
    try irqs.apply(request(triggerNone, index: 2, start: 0, count: 2))
    try irqs.apply(request(triggerBool, index: 2, start: 5, count: 3, bools: [1, 0, 1]))
    #expect(fds.map { $0.count() } == [1, 1, 0, 0, 0, 1, 0, 1])
    // Vectors the device does not have are ignored.
    irqs.trigger(index: 2, vector: 8)
    irqs.trigger(index: 9, vector: 0)
  }

  @Test func maskLatchesAndUnmaskDelivers() throws {
    var irqs = IRQEmulation(pciIRQs)
    let fd = TestEventFD()
    try irqs.apply(request(triggerFD, index: 2, start: 5, count: 1, fds: [fd.lend()]))
    try irqs.apply(request(maskNone, index: 2, start: 5, count: 1))
    irqs.trigger(index: 2, vector: 5)
    irqs.trigger(index: 2, vector: 5)
    #expect(fd.count() == 0)
    let latched = irqs.configuration(2)
    #expect(latched?.pending[5] == true)
    try irqs.apply(request(unmaskNone, index: 2, start: 5, count: 1))
    #expect(fd.count() == 1)  // one latch, however many were raised
    let delivered = irqs.configuration(2)
    #expect(delivered?.pending[5] == false)
  }

  @Test func intxAutomasksUntilUnmaskedOrResampled() throws {
    var irqs = IRQEmulation(pciIRQs)
    let fd = TestEventFD()
    let resample = TestEventFD()
    try irqs.apply(request(triggerFD, index: 0, count: 1, fds: [fd.lend()]))
    irqs.trigger(index: 0, vector: 0)
    irqs.trigger(index: 0, vector: 0)
    #expect(fd.count() == 1)
    try irqs.apply(request(unmaskNone, index: 0, count: 1))
    #expect(fd.count() == 1)  // the latched one
    try irqs.apply(request(unmaskFD, index: 0, count: 1, fds: [resample.lend()]))
    #expect(irqs.descriptorCount == 2)
    resample.signal()  // the guest's EOI
    irqs.trigger(index: 0, vector: 0)
    #expect(fd.count() == 1)
  }

  @Test func disablingAnIndexClosesItsEventfdsAndClearsItsMasks() throws {
    var irqs = IRQEmulation(pciIRQs)
    let probe = ClosureProbe()
    let other = TestEventFD()
    try irqs.apply(request(triggerFD, index: 2, count: 1, fds: [probe.descriptor]))
    try irqs.apply(request(triggerFD, index: 3, count: 1, fds: [other.lend()]))
    try irqs.apply(request(maskNone, index: 2, start: 1, count: 1))
    irqs.trigger(index: 2, vector: 1)
    #expect(!probe.closedEverywhere)
    try irqs.apply(IRQSetRequest.disable(2))
    #expect(probe.closedEverywhere)
    let disabled = irqs.configuration(2)
    let state = try #require(disabled)
    #expect(state.triggerFDs.allSatisfy { $0 == nil })
    #expect(!state.masked.contains(true) && !state.pending.contains(true))
    #expect(irqs.descriptorCount == 1)  // index 3 is untouched
    irqs.disableAll()
    #expect(irqs.descriptorCount == 0)
  }

  @Test func theEmulationClosesWhatItHoldsWhenItGoes() throws {
    let probe = ClosureProbe()
    do {
      var irqs = IRQEmulation(pciIRQs)
      try irqs.apply(request(triggerFD, index: 1, count: 1, fds: [probe.descriptor]))
      #expect(!probe.closedEverywhere)
    }
    #expect(probe.closedEverywhere)
  }

  /// A refused request changes nothing: the eventfds, masks and pending bits
  /// stay as they were, and the descriptors the request brought are closed.
  @Test func aRefusedRequestLeavesTheStateAsItWas() throws {
    var irqs = IRQEmulation(pciIRQs)
    let fds = (0..<2).map { _ in TestEventFD() }
    try irqs.apply(request(triggerFD, index: 2, count: 2, fds: fds.map { $0.lend() }))
    try irqs.apply(request(maskNone, index: 2, start: 1, count: 1))
    irqs.trigger(index: 2, vector: 1)
    let before = irqs.configuration(2)
    let refused: [(VFIOIRQSetFlags, UInt32, UInt32)] = [
      (maskNone, 1, 1),  // MSI is not maskable
      (maskNone, 3, 1),  // ERR takes TRIGGER only
      (unmaskFD, 2, 1),  // only INTx's unmask takes an eventfd
      ([.dataEventfd, .actionMask], 0, 1),  // MASK with an eventfd
    ]
    for (flags, index, count) in refused {
      let probe = ClosureProbe()
      let fds = flags.contains(.dataEventfd) ? [probe.descriptor] : []
      #expect(throws: Errno.invalidArgument, "flags \(flags.rawValue) index \(index)") {
        try irqs.apply(request(flags, index: index, count: count, fds: fds))
      }
      if !fds.isEmpty {
        #expect(probe.closedEverywhere, "the refused request's eventfd is closed")
      } else {
        try probe.descriptor.close()
      }
      let after = irqs.configuration(2)
      #expect(after == before)
    }
    #expect(irqs.descriptorCount == 2)
    irqs.trigger(index: 2, vector: 0)
    #expect(fds[0].count() == 1)  // still wired
    try irqs.apply(request(unmaskNone, index: 2, start: 1, count: 1))
    #expect(fds[1].count() == 1)  // still pending, delivered now
  }
}

@Suite("IRQSetRequest: VFIO's checks")
struct IRQSetRequestTests {
  struct Refused {
    var name: String
    var flags: VFIOIRQSetFlags
    var index: UInt32
    var start: UInt32 = 0
    var count: UInt32
    var descriptors = 0
    /// The index's description, when not `pciIRQs`'s.
    var irq: IRQDescription? = nil
  }

  @Test func requestsTheDeviceCannotHaveAreRefusedAndTheirDescriptorsClosed() throws {
    let cases = [
      Refused(name: "no such index", flags: triggerNone, index: 7, count: 1),
      Refused(
        name: "index without vectors", flags: triggerNone, index: 1, count: 0,
        irq: IRQDescription(index: 1, count: 0, flags: .eventfd)),
      Refused(name: "vectors past the end", flags: triggerFD, index: 2, start: 7, count: 2),
      Refused(
        name: "descriptors without DATA_EVENTFD", flags: triggerNone, index: 2, count: 1,
        descriptors: 1),
      Refused(
        name: "fewer descriptors than vectors", flags: triggerFD, index: 2, count: 2,
        descriptors: 1),
      Refused(name: "count 0 with DATA_EVENTFD", flags: triggerFD, index: 2, count: 0),
      Refused(name: "count 0 with MASK", flags: maskNone, index: 2, count: 0),
      Refused(name: "count 0 from a later start", flags: triggerNone, index: 2, start: 1, count: 0),
    ]
    for c in cases {
      let probes = (0..<c.descriptors).map { _ in ClosureProbe() }
      let irq = c.irq ?? (c.index < UInt32(pciIRQs.count) ? pciIRQs[Int(c.index)] : nil)
      #expect(throws: Errno.invalidArgument, "\(c.name)") {
        _ = try IRQSetRequest(
          IRQSetPayload(flags: c.flags, index: c.index, start: c.start, count: c.count),
          descriptors: OwnedFileDescriptors(taking: probes.map(\.descriptor)), irq: irq)
      }
      #expect(probes.allSatisfy { $0.closedEverywhere }, "\(c.name): descriptors closed")
    }
  }

  @Test func aRequestCarriesWhatVFIODeviceSetIRQsNeeds() throws {
    let fd = TestEventFD()
    var made = try request(triggerFD, index: 2, start: 3, count: 1, fds: [fd.lend()])
    #expect(made.flags == triggerFD)
    #expect(made.vectors == 3..<4 && !made.disablesIndex)
    #expect(made.eventFDs.count == 1 && made.eventFDs[0] != nil)
    guard let taken = made.eventFDs.take(0) else {
      Issue.record("no descriptor to take")
      return
    }
    #expect(made.eventFDs[0] == nil)
    try taken.release().close()
    let disable = IRQSetRequest.disable(2)
    #expect(disable.disablesIndex && disable.flags == triggerNone && disable.eventFDs.isEmpty)
  }
}
