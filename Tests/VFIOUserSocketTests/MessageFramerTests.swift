import SystemPackage
import TestSupport
import Testing
import VFIOUser
import VFIOUserSocket

/// The framer on byte arrays, with no socket: however the stream is cut into
/// reads, the same messages come out, descriptors go to the message they
/// were sent with, and what cannot be framed whole is dropped in step.
@Suite("Message framer")
struct MessageFramerTests {
  static let first = request(1, payload: 16)
  static let second = request(2, 10, payload: 5)
  static let third = request(3, 4, payload: 0)
  static var stream: [UInt8] { first + second + third }
  static var expected: [Framed] {
    [
      .message(id: 1, command: 9, payload: payload(of: first), descriptors: 0),
      .message(id: 2, command: 10, payload: payload(of: second), descriptors: 0),
      .message(id: 3, command: 4, payload: [], descriptors: 0),
    ]
  }

  @Test func everySplitPointFramesTheSameMessages() throws {
    for cut in 1..<Self.stream.count {
      var framer = MessageFramer(capacity: 4096)
      var feeder = Feeder(bytes: Self.stream, cutAt: [cut])
      #expect(try feeder.run(&framer) == Self.expected, "cut at \(cut)")
      do {
        let view = framer.view
        #expect(view.bufferedByteCount == 0)
      }
    }
  }

  @Test func everyPairOfSplitPointsFramesTheSameMessages() throws {
    for a in 1..<Self.stream.count {
      for b in (a + 1)..<Self.stream.count {
        var framer = MessageFramer(capacity: 4096)
        var feeder = Feeder(bytes: Self.stream, cutAt: [a, b])
        #expect(try feeder.run(&framer) == Self.expected, "cuts at \(a), \(b)")
      }
    }
  }

  @Test func oneByteAtATimeAndHeadersSplitAcrossReads() throws {
    var framer = MessageFramer(capacity: 4096)
    var feeder = Feeder(bytes: Self.stream, cutAt: Array(1..<Self.stream.count))
    #expect(try feeder.run(&framer) == Self.expected)
  }

  /// Nothing is framed before its last byte has arrived, and the bytes read
  /// ahead stay buffered, inspectable, with the state saying where they sit.
  @Test func partOfAMessageStaysBufferedAndInspectable() throws {
    var framer = MessageFramer(capacity: 4096)
    let cut = Self.first.count + 7
    var feeder = Feeder([Chunk(bytes: Array(Self.stream[..<cut]))])
    #expect(try feeder.run(&framer) == [Self.expected[0]])
    do {
      let view = framer.view
      #expect(Array(view.bufferedBytes) == Array(Self.second[..<7]))
    }
    do {
      let view = framer.view
      #expect(view.state.start == Self.first.count)
    }
    do {
      let view = framer.view
      #expect(view.state.end == cut)
    }
    do {
      let view = framer.view
      #expect(view.state.streamBase == 0)
    }
    do {
      let view = framer.view
      #expect(!view.hasBufferedMessage)
    }
    guard case .read(let space, let partial) = try framer.next() else {
      Issue.record("a message was framed from 7 bytes")
      return
    }
    #expect(partial, "part of a message is here: the read is bounded")
    #expect(space.count == 4096 - cut)
  }

  /// A buffer that fills up moves the message begun at its end to the front.
  @Test func aMessageAtTheBufferEndIsMovedToTheFront() throws {
    let filler = request(1, payload: 4096 - 16 - 8)  // leaves 8 bytes of the buffer
    let next = request(2, payload: 100)
    var framer = MessageFramer(capacity: 4096)
    var feeder = Feeder(bytes: filler + next, cutAt: [filler.count + 8])
    guard case .read(let space, _) = try framer.next() else { return }
    #expect(feeder.feed(&framer, space))
    #expect(try step(&framer)?.description == "message 1 cmd 9 4072 bytes, 0 fds")
    #expect(try step(&framer) == nil)
    do {
      let view = framer.view
      #expect(view.state.start == 0 && view.state.end == 8)
      #expect(view.state.streamBase == UInt64(filler.count))
      #expect(view.bufferedBytes == Array(next[..<8]))
    }
    #expect(
      try feeder.run(&framer) == [
        .message(id: 2, command: 9, payload: payload(of: next), descriptors: 0)
      ])
  }

  @Test func descriptorsBelongToTheLastMessageBeginningInTheirRead() throws {
    let a = PipeProbe()
    let b = PipeProbe()
    var framer = MessageFramer(capacity: 4096)
    // One read: the first message and the second's header, descriptors with it.
    var feeder = Feeder([
      Chunk(bytes: Self.first + Array(Self.second[..<16]), descriptors: [a.writer, b.writer]),
      Chunk(bytes: Array(Self.second[16...]) + Self.third),
    ])
    let framed = try feeder.run(&framer)
    #expect(
      framed.map(\.description) == [
        "message 1 cmd 9 16 bytes, 0 fds", "message 2 cmd 10 5 bytes, 2 fds",
        "message 3 cmd 4 0 bytes, 0 fds",
      ])
    // The messages went, and the descriptors with them: closed, by their owner.
    #expect(a.writerClosed && b.writerClosed)
    do {
      let view = framer.view
      #expect(view.heldDescriptorCount == 0)
    }
  }

  @Test func descriptorsArrivingWithTheHeaderAreHeldUntilTheMessageIsWhole() throws {
    let probe = PipeProbe()
    var framer = MessageFramer(capacity: 4096)
    var feeder = Feeder([Chunk(bytes: Array(Self.first[..<16]), descriptors: [probe.writer])])
    #expect(try feeder.run(&framer) == [])
    do {
      let view = framer.view
      #expect(view.heldDescriptorCount == 1)
    }
    #expect(!probe.writerClosed)
    feeder = Feeder([Chunk(bytes: Array(Self.first[16...]))])
    var taken = OwnedFileDescriptors()
    while true {
      switch try framer.next() {
      case .read(let space, _):
        #expect(feeder.feed(&framer, space))
        continue
      case .message(var message):
        #expect(message.header.messageID == 1)
        taken = message.fds.takeAll()
      default: Issue.record("only a message expected")
      }
      break
    }
    #expect(taken.count == 1)
    #expect(!probe.writerClosed, "the message's owner holds it")
    _ = consume taken
    #expect(probe.writerClosed)
  }

  @Test func descriptorsBeyondTheLimitAreClosed() throws {
    let kept = PipeProbe()
    let surplus = PipeProbe()
    var framer = MessageFramer(capacity: 4096)
    framer.maxFDs = 1
    var feeder = Feeder([Chunk(bytes: Self.first, descriptors: [kept.writer, surplus.writer])])
    var counts: [Int] = []
    while true {
      switch try framer.next() {
      case .read(let space, _):
        if feeder.feed(&framer, space) { continue }
      case .message(let message):
        counts.append(message.fds.count)
        #expect(surplus.writerClosed)
        #expect(!kept.writerClosed)
        continue
      default: Issue.record("only a message expected")
      }
      break
    }
    #expect(counts == [1])
    #expect(kept.writerClosed)
  }

  /// A message over the limit is reported by its header, its body dropped
  /// as it arrives (the state counts what is still to drop), its
  /// descriptors closed; the message after it is framed as usual.
  @Test func oversizedMessagesAreDroppedInStep() throws {
    let probe = PipeProbe()
    let big = request(7, payload: 300)
    var framer = MessageFramer(capacity: 4096, maxMessageSize: 128)
    var feeder = Feeder([Chunk(bytes: Array(big[..<40]), descriptors: [probe.writer])])
    #expect(try feeder.run(&framer) == [.oversized(id: 7, size: UInt32(big.count))])
    do {
      let view = framer.view
      #expect(view.state.discardRemaining == UInt64(big.count - 40))
    }
    #expect(probe.writerClosed)
    feeder = Feeder(bytes: Array(big[40...]) + Self.first, cutAt: [100, 260, 270])
    #expect(try feeder.run(&framer) == [Self.expected[0]])
    do {
      let view = framer.view
      #expect(view.state.discardRemaining == 0)
    }
  }

  @Test func aSizeBelowTheHeaderCannotBeFramed() throws {
    for size: UInt32 in [0, 1, 15] {
      var bytes = Self.first
      withUnsafeBytes(of: size.littleEndian) { bytes.replaceSubrange(4..<8, with: $0) }
      var framer = MessageFramer(capacity: 4096)
      var feeder = Feeder([Chunk(bytes: bytes)])
      #expect(throws: Errno.invalidArgument) { try feeder.run(&framer) }
    }
  }

  /// The framer frames whatever the flags say: type bits, NO_REPLY and
  /// ERROR are the engine's to judge (`Connection.admission`).
  @Test func flagsAreNotTheFramersToJudge() throws {
    let odd = request(5, payload: 3, flags: MessageHeader.Flags(rawValue: 0xFFFF_FFFF))
    var framer = MessageFramer(capacity: 4096)
    var feeder = Feeder([Chunk(bytes: odd)])
    #expect(
      try feeder.run(&framer) == [
        .message(id: 5, command: 9, payload: payload(of: odd), descriptors: 0)
      ])
  }
}
