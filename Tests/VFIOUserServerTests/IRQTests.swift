import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

@Suite("SET_IRQS semantics")
struct IRQTests {
  let trigger: VFIOIRQSetFlags = [.dataEventfd, .actionTrigger]

  /// Asks the device to raise (index, vector), then reads a register so the write has been handled.
  func fire(_ client: VFIOUserClient, index: UInt32, vector: UInt32) throws {
    try client.write32(region: 0, offset: 4, index << 16 | vector)
  }

  @Test func msixEventfdsInChunksAndTeardown() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let fds = (0..<8).map { _ in makeEventFD() }
      defer { fds.forEach { close($0) } }
      try client.setIRQEventfds(
        index: VFIOPCIIRQ.msix, start: 0, fds: fds.map(FileDescriptor.init(rawValue:)), chunk: 3)
      #expect(server.server.statistics.snapshot.irqFDs == 8)
      #expect(
        device.lastIRQConfiguration[VFIOPCIIRQ.msix]?.triggerFDs.allSatisfy { $0 != nil } == true)
      for v in [0, 3, 7] { try fire(client, index: VFIOPCIIRQ.msix, vector: UInt32(v)) }
      #expect(fds.map(eventCount) == [1, 0, 0, 1, 0, 0, 0, 1])
      // De-assign vector 3 (DATA_EVENTFD with no descriptors).
      try client.setIRQs(IRQSetPayload(flags: trigger, index: VFIOPCIIRQ.msix, start: 3, count: 1))
      try fire(client, index: VFIOPCIIRQ.msix, vector: 3)
      #expect(eventCount(fds[3]) == 0)
      #expect(server.server.statistics.snapshot.irqFDs == 7)
      // Loopback trigger from the client: DATA_NONE and DATA_BOOL.
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataNone, .actionTrigger], index: 2, start: 0,
          count: 2))
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataBool, .actionTrigger], index: 2, start: 4,
          count: 3, bools: [1, 0, 1]))
      #expect(fds.map(eventCount) == [1, 1, 0, 0, 1, 0, 1, 0])
      // count 0 + DATA_NONE tears the index down.
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataNone, .actionTrigger], index: 2, start: 0,
          count: 0))
      #expect(server.server.statistics.snapshot.irqFDs == 0)
      try fire(client, index: VFIOPCIIRQ.msix, vector: 0)
      #expect(eventCount(fds[0]) == 0)
    }
  }

  @Test func maskUnmaskLatchesPending() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let fd = makeEventFD()
      defer { close(fd) }
      try client.setIRQs(
        IRQSetPayload(flags: trigger, index: 2, start: 5, count: 1),
        fds: [FileDescriptor(rawValue: fd)])
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataNone, .actionMask], index: 2, start: 5, count: 1
        ))
      try fire(client, index: 2, vector: 5)
      #expect(eventCount(fd) == 0)
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataBool, .actionUnmask], index: 2, start: 5,
          count: 1, bools: [1]))
      #expect(eventCount(fd) == 1)  // the pending interrupt is delivered on unmask
    }
  }

  @Test func intxAutomasksUntilUnmasked() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let fd = makeEventFD()
      defer { close(fd) }
      try client.setIRQs(
        IRQSetPayload(flags: trigger, index: 0, start: 0, count: 1),
        fds: [FileDescriptor(rawValue: fd)])
      try fire(client, index: 0, vector: 0)
      try fire(client, index: 0, vector: 0)
      #expect(eventCount(fd) == 1)  // masked by the first
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataNone, .actionUnmask], index: 0, start: 0,
          count: 1))
      #expect(eventCount(fd) == 1)  // the latched one
      // The resample (unmask) eventfd: signalled by the "guest", it unmasks before the next interrupt.
      let resample = makeEventFD()
      defer { close(resample) }
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataEventfd, .actionUnmask], index: 0, start: 0,
          count: 1),
        fds: [FileDescriptor(rawValue: resample)])
      #expect(server.server.statistics.snapshot.irqFDs == 2)
      _ = cvfuSignal(resample)
      try fire(client, index: 0, vector: 0)
      #expect(eventCount(fd) == 1)
    }
  }

  @Test func invalidRequests() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let fd = makeEventFD()
      defer { close(fd) }
      // Index out of range, vectors out of range.
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(flags: [.dataNone, .actionTrigger], index: 5, start: 0, count: 1))
      }
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(flags: trigger, index: 2, start: 7, count: 2),
          fds: [FileDescriptor(rawValue: fd), FileDescriptor(rawValue: fd)])
      }
      // Fds count must match count.
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(flags: trigger, index: 2, start: 0, count: 2),
          fds: [FileDescriptor(rawValue: fd)])
      }
      // MSI (not maskable) refuses MASK; ERR refuses MASK.
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(flags: [.dataNone, .actionMask], index: 1, start: 0, count: 1))
      }
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(flags: [.dataNone, .actionMask], index: 3, start: 0, count: 1))
      }
      // MASK with an eventfd; two data types; no action (codec); count 0 with eventfd.
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(
            flags: [.dataEventfd, .actionMask], index: 0, start: 0,
            count: 1), fds: [FileDescriptor(rawValue: fd)])
      }
      expectServerError(.invalidArgument) {
        try client.setIRQs(
          IRQSetPayload(
            flags: [.dataNone, .dataBool, .actionTrigger], index: 2, start: 0, count: 1))
      }
      expectServerError(.invalidArgument) {
        try client.setIRQs(IRQSetPayload(flags: .dataNone, index: 2, start: 0, count: 1))
      }
      expectServerError(.invalidArgument) {
        try client.setIRQs(IRQSetPayload(flags: trigger, index: 2, start: 0, count: 0))
      }
      // DATA_BOOL whose array is short.
      expectServerError(.invalidArgument) {
        try client.request(
          .deviceSetIRQs,
          payload: IRQSetPayload(
            flags: [.dataBool, .actionTrigger], index: 2, start: 0, count: 3, bools: [1, 1, 1]
          ).encoded().dropLast(1).map { $0 })
      }
      #expect(server.server.statistics.snapshot.irqFDs == 0)
      // ERR and REQ take one eventfd each.
      try client.setIRQs(
        IRQSetPayload(flags: trigger, index: VFIOPCIIRQ.err, start: 0, count: 1),
        fds: [FileDescriptor(rawValue: fd)])
      try client.setIRQs(
        IRQSetPayload(flags: trigger, index: VFIOPCIIRQ.req, start: 0, count: 1),
        fds: [FileDescriptor(rawValue: fd)])
      #expect(server.server.statistics.snapshot.irqFDs == 2)
    }
  }
}

func cvfuSignal(_ fd: Int32) -> Int32 { cvfu_eventfd_signal(fd) }
