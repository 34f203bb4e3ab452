import SystemPackage
import TestSupport
import Testing
import VFIOUser
import VFIOUserSocket

/// Messages offered before their payload (`partedReceive`, how the engine
/// receives a large MIG_DATA_WRITE in place): which are offered, how far a
/// read may run ahead of them, and that one declined is framed whole.
@Suite("Parted receive")
struct PartedReceiveTests {
  static let command: UInt16 = 18
  static func framer() -> MessageFramer {
    var framer = MessageFramer(capacity: 64 * 1024)
    framer.partedReceive = (command, 8, 64)
    return framer
  }
  static let small = request(1, payload: 10)
  static let large = request(2, command, payload: 8 + 20_000)
  static let after = request(3, payload: 4)

  @Test func aLargeCommandIsOfferedAfterItsHeadAndTakenInParts() throws {
    var framer = Self.framer()
    var feeder = Feeder(
      [Chunk(bytes: Self.small + Self.large + Self.after)], takeParted: true)
    let framed = try feeder.run(&framer)
    #expect(
      framed.map(\.description) == [
        "message 1 cmd 9 10 bytes, 0 fds", "parted 2 head 8", "message 2 cmd 18 20008 bytes, 0 fds",
        "message 3 cmd 9 4 bytes, 0 fds",
      ])
    #expect(
      framed[2] == .message(id: 2, command: 18, payload: payload(of: Self.large), descriptors: 0))
  }

  /// While parted receive is on, a read takes what completes the message
  /// being assembled and `readAhead` bytes more, never the parted payload's bulk.
  @Test func readsStopShortOfThePartedPayload() throws {
    var framer = Self.framer()
    var feeder = Feeder([Chunk(bytes: Self.small + Self.large)])
    guard case .read(let space, _) = try framer.next() else { return }
    #expect(space.count == MessageFramer.readAhead)
    #expect(feeder.feed(&framer, space))
    #expect(
      try step(&framer)
        == .message(id: 1, command: 9, payload: payload(of: Self.small), descriptors: 0))
    #expect(try step(&framer) == .parted(id: 2, head: Array(Self.large[16..<24])))
    do {
      let view = framer.view
      #expect(view.bufferedByteCount == MessageFramer.readAhead - Self.small.count)
    }
  }

  @Test func aDeclinedOfferIsFramedWholeNext() throws {
    var framer = Self.framer()
    var feeder = Feeder([Chunk(bytes: Self.large + Self.after)])
    let framed = try feeder.run(&framer)
    #expect(
      framed == [
        .parted(id: 2, head: Array(Self.large[16..<24])),
        .message(id: 2, command: 18, payload: payload(of: Self.large), descriptors: 0),
        .message(id: 3, command: 9, payload: payload(of: Self.after), descriptors: 0),
      ])
  }

  /// Replies, small payloads and messages that brought descriptors are framed whole.
  @Test func onlyLargeCommandsWithoutDescriptorsAreOffered() throws {
    let reply = request(4, Self.command, payload: 8 + 20_000, flags: .reply)
    let short = request(5, Self.command, payload: 8 + 63)
    let probe = PipeProbe()
    var framer = Self.framer()
    var feeder = Feeder([
      Chunk(bytes: reply), Chunk(bytes: short),
      Chunk(bytes: Self.large, descriptors: [probe.writer]),
    ])
    #expect(
      try feeder.run(&framer).map(\.description) == [
        "message 4 cmd 18 20008 bytes, 0 fds", "message 5 cmd 18 71 bytes, 0 fds",
        "message 2 cmd 18 20008 bytes, 1 fds",
      ])
  }

  /// A payload left untaken is dropped by the next step, in step with the stream.
  @Test func theRestOfATakenPayloadIsDroppedByTheNextStep() throws {
    var framer = Self.framer()
    var feeder = Feeder(bytes: Self.large + Self.after, cutAt: [30, 5000])
    guard case .read(let space, _) = try framer.next() else { return }
    #expect(feeder.feed(&framer, space))
    guard case .parted = try framer.next() else {
      Issue.record("not offered")
      return
    }
    framer.takeParted()
    do {
      let view = framer.view
      #expect(view.payloadLeft == 20_000)
    }
    var some = [UInt8](repeating: 0, count: 100)
    let n = some.withUnsafeMutableBytes { framer.takeBufferedPayload(into: $0) }
    #expect(n == 6 && some[..<6] == Self.large[24..<30])
    framer.discardPayload()
    do {
      let view = framer.view
      #expect(view.payloadLeft == 0)
    }
    do {
      let view = framer.view
      #expect(view.state.discardRemaining == 20_000 - 6)
    }
    #expect(
      try feeder.run(&framer) == [
        .message(id: 3, command: 9, payload: payload(of: Self.after), descriptors: 0)
      ])
  }
}
