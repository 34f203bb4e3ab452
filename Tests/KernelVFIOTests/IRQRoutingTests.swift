import KernelVFIO
import SystemPackage
import Testing
import VFIOUser

/// What reaches VFIO_DEVICE_SET_IRQS as the client rewires interrupts, with
/// the counts and flags vfio-pci reports.
@Suite("Kernel VFIO: interrupt routing")
struct IRQRoutingTests {
  let eventfd = VFIOIRQInfoFlags.eventfd
  var infos: [KernelIRQInfo] {
    [
      KernelIRQInfo(
        index: 0, flags: eventfd | VFIOIRQInfoFlags.maskable | VFIOIRQInfoFlags.automasked,
        count: 1),
      KernelIRQInfo(index: 1, flags: eventfd | VFIOIRQInfoFlags.noresize, count: 4),
      KernelIRQInfo(index: 2, flags: eventfd, count: 8),  // dynamic MSI-X: no NORESIZE
      KernelIRQInfo(index: 3, flags: eventfd | VFIOIRQInfoFlags.noresize, count: 1),
      KernelIRQInfo(index: 4, flags: eventfd | VFIOIRQInfoFlags.noresize, count: 1),
    ]
  }
  let trigger = VFIOIRQSetFlags.dataEventfd | VFIOIRQSetFlags.actionTrigger

  func run(
    _ routing: inout KernelIRQRouting, _ index: UInt32, _ triggers: [Int32], unmask: Int32 = -1,
    masked: [Bool]? = nil
  ) throws -> [KernelIRQSet] {
    var calls: [KernelIRQSet] = []
    try routing.apply(
      index: index, triggers: triggers, unmaskFD: unmask,
      masked: masked ?? Array(repeating: false, count: triggers.count)
    ) { (set) throws(Errno) in calls.append(set) }
    return calls
  }

  @Test func msixEnablesWithTheVectorsInUseThenChangesOnlyWhatChanged() throws {
    var routing = KernelIRQRouting(infos)
    let none: [Int32] = Array(repeating: -1, count: 8)
    var wanted = none
    wanted[0] = 10
    wanted[2] = 12
    #expect(try run(&routing, 2, wanted) == [.triggers(2, start: 0, [10, -1, 12])])
    #expect(routing.enabledVectors(2) == 3)
    // QEMU adds a vector later: dynamic MSI-X grows in place, nothing else is touched.
    wanted[5] = 15
    #expect(try run(&routing, 2, wanted) == [.triggers(2, start: 5, [15])])
    #expect(routing.enabledVectors(2) == 6)
    // Replacing two neighbours is one call; de-assigning sends -1.
    wanted[0] = 20
    wanted[1] = 21
    wanted[5] = -1
    #expect(
      try run(&routing, 2, wanted) == [
        .triggers(2, start: 0, [20, 21]), .triggers(2, start: 5, [-1]),
      ])
    // All gone: the index is disabled.
    #expect(try run(&routing, 2, none) == [.disable(2)])
    #expect(routing.enabledVectors(2) == 0)
    #expect(try run(&routing, 2, none) == [], "nothing to do")
  }

  @Test func msiMustBeReenabledToGrow() throws {
    var routing = KernelIRQRouting(infos)
    #expect(try run(&routing, 1, [7, -1, -1, -1]) == [.triggers(1, start: 0, [7])])
    #expect(
      try run(&routing, 1, [7, 8, -1, -1]) == [.disable(1), .triggers(1, start: 0, [7, 8])],
      "NORESIZE: disable, then enable with both")
    #expect(
      try run(&routing, 1, [9, 8, -1, -1]) == [.triggers(1, start: 0, [9])],
      "within the enabled count")
  }

  @Test func intxTriggerResampleAndMasking() throws {
    var routing = KernelIRQRouting(infos)
    let unmaskFlags = VFIOIRQSetFlags.dataEventfd | VFIOIRQSetFlags.actionUnmask
    // A resample fd before INTx is on waits for it (the kernel refuses it then).
    #expect(try run(&routing, 0, [-1], unmask: 31) == [])
    #expect(
      try run(&routing, 0, [30], unmask: 31) == [
        .triggers(0, start: 0, [30]),
        KernelIRQSet(index: 0, start: 0, count: 1, flags: unmaskFlags, fds: [31]),
      ])
    // Mask and unmask go through as asked (the kernel automasks by itself).
    #expect(
      try run(&routing, 0, [30], unmask: 31, masked: [true]) == [
        KernelIRQSet(
          index: 0, start: 0, count: 1, flags: VFIOIRQSetFlags.dataNone | VFIOIRQSetFlags.actionMask
        )
      ])
    let unmask = KernelIRQSet(
      index: 0, start: 0, count: 1, flags: VFIOIRQSetFlags.dataNone | VFIOIRQSetFlags.actionUnmask)
    #expect(try run(&routing, 0, [30], unmask: 31, masked: [false]) == [unmask])
    #expect(
      try run(&routing, 0, [30], unmask: 31, masked: [false]) == [unmask], "again: still forwarded")
    // Off: one disable drops trigger, resample fd and mask.
    #expect(try run(&routing, 0, [-1]) == [.disable(0)])
    #expect(try run(&routing, 0, [-1], masked: [true]) == [], "no mask while INTx is off")
  }

  @Test func errAndReqTakeOneEventfd() throws {
    var routing = KernelIRQRouting(infos)
    #expect(try run(&routing, 3, [40]) == [.triggers(3, start: 0, [40])])
    #expect(try run(&routing, 3, [-1]) == [.triggers(3, start: 0, [-1])])
    #expect(try run(&routing, 4, [41]) == [.triggers(4, start: 0, [41])])
  }

  @Test func aFailedCallLeavesTheRestForNextTime() throws {
    var routing = KernelIRQRouting(infos)
    var wanted: [Int32] = Array(repeating: -1, count: 8)
    wanted[0] = 10
    #expect(throws: Errno.self) {
      try routing.apply(
        index: 2, triggers: wanted, unmaskFD: -1, masked: Array(repeating: false, count: 8)
      ) {
        (_) throws(Errno) in throw .invalidArgument
      }
    }
    #expect(routing.kernelTriggers(2)[0] == -1, "the kernel took nothing")
    #expect(try run(&routing, 2, wanted) == [.triggers(2, start: 0, [10])], "retried in full")
  }

  @Test func setIRQsEncodingIsTheKernelStruct() {
    let set = KernelIRQSet.triggers(2, start: 3, [7, -1])
    #expect(set.description == "MSI-X TRIGGER [3, +2) eventfds [7, -1]")
    #expect(KernelIRQSet.disable(1).description == "MSI TRIGGER [0, +0)")
  }
}
