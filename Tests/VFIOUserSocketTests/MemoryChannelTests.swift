import SystemPackage
import TestSupport
import Testing
import VFIOUser
import VFIOUserSocket

/// `MessageChannel` over `MemoryTransport`: the channel's reads, waits and
/// sends as over a socket, with no socket and no thread.
@Suite("Channel over memory")
struct MemoryChannelTests {
  /// A read joins sends and stops right after one that carried descriptors,
  /// as Linux does; the descriptors go to the message that began in it.
  @Test func descriptorsComeWithTheSendThatCarriedThem() throws {
    let memory = MemoryTransport()
    let probe = PipeProbe()
    let channel = MessageChannel(memory: memory, capacity: 4096)
    let first = request(1, payload: 4)
    let second = request(2, payload: 4)
    memory.deliver(first)
    memory.deliver(second, descriptors: OwnedFileDescriptors(taking: [probe.writer]))
    memory.deliver(request(3, payload: 4))
    memory.hangUp()
    var seen: [String] = []
    receiving: while true {
      switch try channel.receive() {
      case .message(let message): seen.append("\(message.header.messageID):\(message.fds.count)")
      case .closed: break receiving
      default: Issue.record("neither a message nor the end")
      }
    }
    #expect(seen == ["1:0", "2:1", "3:0"])
    #expect(probe.writerClosed)
  }

  /// Half a message and then silence ends in ETIMEDOUT once the bound has
  /// passed; in memory the wait is over at once, with the idle hook asked first.
  @Test func halfAMessageThenSilenceTimesOut() throws {
    let memory = MemoryTransport()
    let channel = MessageChannel(memory: memory, capacity: 4096)
    channel.partialMessageTimeoutMilliseconds = 50
    memory.deliver(Array(request(1, payload: 40)[..<20]))
    var asked = 0
    memory.whenIdle = { _ in asked += 1 }
    #expect(throws: Errno.timedOut) { _ = try channel.receive() }
    #expect(asked > 0)
  }

  /// What the idle hook sends is read as if it had arrived while the channel waited.
  @Test func theIdleHookAnswersAWait() throws {
    let memory = MemoryTransport()
    let channel = MessageChannel(memory: memory, capacity: 4096)
    memory.whenIdle = { $0.deliver(request(9, payload: 2)) }
    guard case .message(let message) = try channel.receive() else {
      Issue.record("no message")
      return
    }
    #expect(message.header.messageID == 9)
  }

  @Test func sendsCollectWithTheDescriptorsLent() throws {
    let memory = MemoryTransport()
    let probe = PipeProbe()
    let channel = MessageChannel(memory: memory, capacity: 4096)
    let reply = request(1, payload: 8)
    try reply.withUnsafeBytes {
      try channel.send(
        UnsafeRawBufferPointer(rebasing: $0[..<10]), UnsafeRawBufferPointer(rebasing: $0[10...]),
        fd: probe.writer)
    }
    #expect(memory.sent == reply)
    #expect(memory.sentDescriptors.count == 1 && memory.sentDescriptors[0].offset == 0)
    channel.close()
    #expect(throws: Errno.brokenPipe) { try channel.send(bytes: reply) }
    try probe.writer.close()
  }
}
