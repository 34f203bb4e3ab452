import CVFIOUser
import Glibc
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser

/// What crosses the process boundary: the bytes, and a duplicate of each lent
/// descriptor (as SCM_RIGHTS would make in the new process).
func duplicates(_ descriptors: [FileDescriptor]) -> [FileDescriptor] {
  descriptors.map { FileDescriptor(rawValue: dup($0.rawValue)) }
}

/// Reads a whole blob with `body`, refusing bytes it leaves unread.
func importing<T: ~Copyable>(
  _ bytes: [UInt8], _ body: (inout ByteReader) throws(HandoverRefusal) -> T
) throws(HandoverRefusal) -> T {
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
  defer { buffer.deallocate() }
  buffer.copyBytes(from: bytes)
  var reader = ByteReader(UnsafeRawBufferPointer(buffer))
  let value = try body(&reader)
  guard reader.remaining == 0 else { throw HandoverRefusal("\(reader.remaining) bytes unread") }
  return value
}

@Suite("IRQEmulation: live update")
struct IRQEmulationHandoverTests {
  /// INTx with its resample fd and a latched interrupt, MSI-X with eventfds
  /// on some vectors, one masked with an interrupt pending, ERR wired.
  func rich(_ fds: [TestEventFD]) throws -> IRQEmulation {
    var irqs = IRQEmulation(pciIRQs)
    try irqs.apply(request(triggerFD, index: 0, count: 1, fds: [fds[0].lend()]))
    try irqs.apply(request(unmaskFD, index: 0, count: 1, fds: [fds[1].lend()]))
    irqs.trigger(index: 0, vector: 0)
    irqs.trigger(index: 0, vector: 0)  // automasked: latched
    try irqs.apply(
      request(triggerFD, index: 2, start: 2, count: 3, fds: fds[2..<5].map { $0.lend() }))
    try irqs.apply(request(maskNone, index: 2, start: 3, count: 2))
    irqs.trigger(index: 2, vector: 3)
    try irqs.apply(request(triggerFD, index: 3, count: 1, fds: [fds[5].lend()]))
    for fd in fds { _ = fd.count() }
    return irqs
  }

  func export(_ irqs: borrowing IRQEmulation) -> HandoverState {
    var writer = ByteWriter()
    var descriptors: [FileDescriptor] = []
    irqs.exportHandover(into: &writer, descriptors: &descriptors)
    return HandoverState(bytes: writer.bytes, descriptors: descriptors)
  }

  func importState(_ state: HandoverState, descriptions: [IRQDescription] = pciIRQs)
    throws(HandoverRefusal) -> IRQEmulation
  {
    var owned = OwnedFileDescriptors(taking: duplicates(state.descriptors))
    return try importing(state.bytes) { (reader: inout ByteReader) throws(HandoverRefusal) in
      try IRQEmulation.importHandover(
        from: &reader, descriptors: &owned, describedAs: descriptions)
    }
  }

  @Test func aRoundTripKeepsEveryEventfdMaskAndLatch() throws {
    let fds = (0..<6).map { _ in TestEventFD() }
    let old = try rich(fds)
    let state = export(old)
    #expect(state.descriptors.count == 6)
    var new = try importState(state)
    #expect(new.descriptorCount == old.descriptorCount)
    for index in UInt32(0)..<5 {
      let before = old.configuration(index)
      let after = new.configuration(index)
      #expect(before?.masked == after?.masked, "index \(index)")
      #expect(before?.pending == after?.pending, "index \(index)")
      #expect(before?.triggerFDs.map { $0 == nil } == after?.triggerFDs.map { $0 == nil })
    }
    // The new emulation signals the same eventfds.
    new.trigger(index: 2, vector: 2)
    new.trigger(index: 3, vector: 0)
    #expect(fds.map { $0.count() } == [0, 0, 1, 0, 0, 1])
    try new.apply(request(unmaskNone, index: 2, start: 3, count: 1))  // the latched one
    #expect(fds[3].count() == 1)
    fds[1].signal()  // the guest's EOI through the resample fd unmasks INTx
    new.trigger(index: 0, vector: 0)
    #expect(fds[0].count() == 1)
  }

  @Test func nothingLeaksOnceBothAreGone() throws {
    let fds = (0..<6).map { _ in TestEventFD() }
    do {
      let old = try rich(fds)
      let new = try importState(export(old))
      #expect(fds.map { eventFDReferences($0.fd) } == [3, 3, 3, 3, 3, 3])
      #expect(old.descriptorCount == 6 && new.descriptorCount == 6)
    }
    #expect(fds.map { eventFDReferences($0.fd) } == [1, 1, 1, 1, 1, 1])
  }

  @Test func anotherLayoutIsRefused() throws {
    let fds = (0..<6).map { _ in TestEventFD() }
    let old = try rich(fds)
    let state = export(old)
    var other = pciIRQs
    other[2].count = 16
    #expect(throws: HandoverRefusal.self) { _ = try importState(state, descriptions: other) }
    #expect(fds.map { eventFDReferences($0.fd) } == [2, 2, 2, 2, 2, 2])
    #expect(old.descriptorCount == 6)
  }

  @Test func aDescriptorThatIsNoEventfdIsRefused() throws {
    let fds = (0..<6).map { _ in TestEventFD() }
    let old = try rich(fds)
    var state = export(old)
    var pipeEnds: [Int32] = [-1, -1]
    #expect(pipe(&pipeEnds) == 0)
    defer { close(pipeEnds[1]) }
    state.descriptors[4] = FileDescriptor(rawValue: pipeEnds[0])
    #expect(throws: HandoverRefusal.self) { _ = try importState(state) }
    close(pipeEnds[0])
    #expect(fds.map { eventFDReferences($0.fd) } == [2, 2, 2, 2, 2, 2])
    #expect(old.descriptorCount == 6)
  }

  /// Every prefix of the blob, and every byte flipped: refused or imported,
  /// never a trap, and every descriptor a refusal got is closed.
  @Test func truncatedAndCorruptedBlobsAreRefusedCleanly() throws {
    let fds = (0..<6).map { _ in TestEventFD() }
    let old = try rich(fds)
    let state = export(old)
    for length in 0..<state.bytes.count {
      let cut = HandoverState(bytes: Array(state.bytes[..<length]), descriptors: state.descriptors)
      #expect(throws: HandoverRefusal.self, "\(length) bytes") { _ = try importState(cut) }
    }
    for at in state.bytes.indices {
      var flipped = state
      flipped.bytes[at] ^= 0xFF
      _ = try? importState(flipped)
    }
    #expect(fds.map { eventFDReferences($0.fd) } == [2, 2, 2, 2, 2, 2])
    #expect(old.descriptorCount == 6)
  }

  @Test func anotherVersionIsRefusedNamingBoth() throws {
    var state = export(IRQEmulation(pciIRQs))
    state.bytes[0] = 9
    let error = #expect(throws: HandoverRefusal.self) { _ = try importState(state) }
    #expect(error?.reason.contains("version 9") == true)
    #expect(error?.reason.contains("reads version 1") == true)
  }
}

@Suite("DirtyPageLog: live update")
struct DirtyPageLogHandoverTests {
  let ranges = [
    DMALoggingRange(iova: 0x10_0000, length: 0x40_0000),  // 1024 pages
    DMALoggingRange(iova: 0x1_0000_0000, length: 0x5000),  // 5 pages: a partial word
  ]

  func export(_ log: DirtyPageLog) -> [UInt8] {
    var writer = ByteWriter()
    log.exportHandover(into: &writer)
    return writer.bytes
  }

  func report(_ log: DirtyPageLog, _ range: DMALoggingRange) -> [UInt8] {
    var bitmap = [UInt8](
      repeating: 0,
      count: DMALoggingReportData.bitmapSize(length: range.length, pageSize: 4096)!)
    bitmap.withUnsafeMutableBytes {
      log.report(iova: range.iova, length: range.length, pageSize: 4096, into: $0)
    }
    return bitmap
  }

  @Test func aRoundTripReportsTheSamePages() throws {
    let log = try DirtyPageLog(pageSize: 4096, ranges: ranges)
    log.mark(address: 0x10_0000, length: 1)
    log.mark(address: 0x10_0000 + 70 * 4096, length: 3 * 4096)
    log.mark(address: 0x10_0000 + 1000 * 4096, length: 24 * 4096 + 1)  // to the end and past it
    log.mark(address: 0x1_0000_4000, length: 4096)
    let bytes = export(log)
    let new = try importing(bytes) { (r: inout ByteReader) throws(HandoverRefusal) in
      try DirtyPageLog.importHandover(from: &r)
    }
    #expect(new.pageSize == 4096)
    #expect(new.loggedRanges == ranges)
    for range in ranges { #expect(report(new, range) == report(log, range)) }
    #expect(new.isMarked(0x10_0000 + 70 * 4096) == false)  // reported, so cleared
  }

  @Test func anIdleLogIsSmall() throws {
    let log = try DirtyPageLog(pageSize: 4096, ranges: [DMALoggingRange(iova: 0, length: 1 << 40)])
    #expect(export(log).count < 64)
  }

  @Test func truncatedAndCorruptedLogsAreRefused() throws {
    let log = try DirtyPageLog(pageSize: 4096, ranges: ranges)
    log.mark(address: 0x10_0000 + 64 * 4096, length: 200 * 4096)
    log.mark(address: 0x1_0000_0000, length: 0x5000)
    let bytes = export(log)
    for length in 0..<bytes.count {
      #expect(throws: HandoverRefusal.self, "\(length) bytes") {
        _ = try importing(Array(bytes[..<length])) {
          (r: inout ByteReader) throws(HandoverRefusal) in
          try DirtyPageLog.importHandover(from: &r)
        }
      }
    }
    for at in bytes.indices {
      var flipped = bytes
      flipped[at] ^= 0xFF
      _ = try? importing(flipped) { (r: inout ByteReader) throws(HandoverRefusal) in
        try DirtyPageLog.importHandover(from: &r)
      }
    }
    // A bit past the last range's 5 pages is refused.
    var stray = bytes
    stray[stray.count - 8] |= 1 << 5
    #expect(throws: HandoverRefusal.self) {
      _ = try importing(stray) { (r: inout ByteReader) throws(HandoverRefusal) in
        try DirtyPageLog.importHandover(from: &r)
      }
    }
  }
}
