import CVFIOUser
import LiveUpdate
import SystemPackage
import TestSupport
import Testing
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// The live-update record and the handover socket on their own: what a
/// successor does with a damaged, truncated or foreign record (refuses it with
/// a reason, never traps), and the framing of descriptors beyond one
/// SCM_RIGHTS message.
@Suite struct HandoverRecordTests {
  static func sample() -> HandoverRecord {
    var record = HandoverRecord()
    var process = HandoverEncoder()
    process.string("serve")
    process.int(3)
    process.optional(Optional("/tmp/vf.sock.control")) { $0.string($1) }
    record.sections.append((.process, process.bytes))
    var listeners = HandoverEncoder(descriptors: process.descriptors)
    listeners.descriptor(FileDescriptor(rawValue: 0))
    listeners.bool(true)
    listeners.u16(0xBEEF)
    record.sections.append((.listeners, listeners.bytes))
    return record
  }

  @Test func aRecordReadsBackAsWritten() throws {
    let record = Self.sample()
    let decoded = try HandoverRecord(decoding: record.encoded())
    #expect(decoded.sections.map(\.0) == [.process, .listeners])
    var process = HandoverDecoder(try #require(decoded.section(.process)), what: "process")
    #expect(try process.string() == "serve")
    #expect(try process.int() == 3)
    #expect(
      try process.optional { d throws(HandoverRefusal) in try d.string() } == "/tmp/vf.sock.control"
    )
    try process.finish()
    var listeners = HandoverDecoder(try #require(decoded.section(.listeners)), what: "listeners")
    #expect(try listeners.descriptor(count: 1) == 0)
    #expect(try listeners.bool())
    #expect(try listeners.u16() == 0xBEEF)
    try listeners.finish()
    #expect(decoded.section(.device) == nil)
  }

  @Test func everyTruncationIsRefused() {
    let bytes = Self.sample().encoded()
    for length in 0..<bytes.count {
      #expect(throws: HandoverRefusal.self, "cut at \(length)") {
        _ = try HandoverRecord(decoding: Array(bytes[..<length]))
      }
    }
  }

  @Test func foreignRecordsAreRefusedWithTheReason() throws {
    let bytes = Self.sample().encoded()
    func refusal(_ damaged: [UInt8]) -> String {
      do {
        _ = try HandoverRecord(decoding: damaged)
        return "accepted"
      } catch { return error.reason }
    }
    var magic = bytes
    magic[0] ^= 0xFF
    #expect(refusal(magic).contains("bad magic"))
    var version = bytes
    version[8] = 2
    #expect(refusal(version).contains("version 2; this binary reads version 1"))
    var tag = bytes
    tag[16] = 99  // the first section's tag
    #expect(refusal(tag).contains("does not know (99)"))
    var twice = bytes
    twice[16 + 4 + 8 + Int(bytes[20])] = 1  // the second section says it is the first again
    #expect(refusal(twice).contains("truncated or corrupt"))
    #expect(refusal(bytes + [0]).contains("truncated or corrupt"))
  }

  @Test func fieldsAreChecked() {
    func refused(_ bytes: [UInt8], _ read: (inout HandoverDecoder) throws(HandoverRefusal) -> Void)
      -> Bool
    {
      var decoder = HandoverDecoder(bytes, what: "test")
      do throws(HandoverRefusal) {
        try read(&decoder)
        return false
      } catch { return error.reason.contains("test, byte") }
    }
    #expect(
      refused([2]) { (d: inout HandoverDecoder) throws(HandoverRefusal) in _ = try d.bool() },
      "a flag is 0 or 1")
    #expect(
      refused([1, 2, 3]) { (d: inout HandoverDecoder) throws(HandoverRefusal) in _ = try d.u32() },
      "short")
    // A count larger than the bytes left could hold is refused before anything is allocated.
    var huge = HandoverEncoder()
    huge.u64(1 << 40)
    #expect(
      refused(huge.bytes) { (d: inout HandoverDecoder) throws(HandoverRefusal) in
        _ = try d.count(itemBytes: 8)
      })
    var invalid = HandoverEncoder()
    invalid.bytes([0xFF, 0xFE])
    #expect(
      refused(invalid.bytes) { (d: inout HandoverDecoder) throws(HandoverRefusal) in
        _ = try d.string()
      }, "not UTF-8")
    var index = HandoverEncoder(descriptors: [FileDescriptor(rawValue: 0)])
    index.descriptor(FileDescriptor(rawValue: 1))
    #expect(
      refused(index.bytes) { (d: inout HandoverDecoder) throws(HandoverRefusal) in
        _ = try d.descriptor(count: 1)
      }, "index past what came")
    #expect(
      refused([0, 0]) { (d: inout HandoverDecoder) throws(HandoverRefusal) in try d.finish() },
      "bytes left over")
  }

  @Test func aHelloSaysWhichVersionsItReads() throws {
    let hello = HandoverHello(minimumVersion: 1, maximumVersion: 3, pid: 42, version: "9.9")
    #expect(try HandoverHello(decoding: hello.encoded()) == hello)
    #expect(hello.readsThisVersion)
    #expect(
      !HandoverHello(minimumVersion: 2, maximumVersion: 2, pid: 1, version: "").readsThisVersion)
    #expect(throws: HandoverRefusal.self) { _ = try HandoverHello(decoding: hello.encoded() + [0]) }
  }
}

@Suite struct HandoverLinkTests {
  /// 600 descriptors: the message and two continuation frames; every one
  /// arrives, in order, owned by the receiver.
  @Test func descriptorsBeyondOneMessageArriveInOrder() throws {
    let (a, b) = try HandoverLink.pair()
    let probes = (0..<600).map { _ in PipeProbe() }
    try a.send(.state, Array("payload".utf8), descriptors: probes.map(\.writer))
    // The sender's copies go: only the receiver's keep the pipes open.
    for probe in probes { _ = close(probe.writer.rawValue) }
    var message = try b.receive(timeoutMilliseconds: 5000)
    #expect(message.kind == .state)
    #expect(message.payload == Array("payload".utf8))
    #expect(message.descriptors.count == 600)
    #expect(probes.allSatisfy { !$0.writerClosed }, "each write end held by the receiver")
    // In order: descriptor i is probe i's write end.
    for i in [0, 249, 250, 599] {
      let fd = try #require(message.descriptors[i])
      #expect(write(fd.rawValue, [UInt8(i & 0xFF)], 1) == 1)
      var byte: UInt8 = 0
      #expect(read(probes[i].reader, &byte, 1) == 1 && byte == UInt8(i & 0xFF), "descriptor \(i)")
    }
    _ = message.descriptors.takeAll()
    #expect(probes.allSatisfy { $0.writerClosed }, "dropped, the received descriptors close")
  }

  @Test func aPeerThatDiesOrSaysNothingIsARefusal() throws {
    let (a, b) = try HandoverLink.pair()
    #expect(throws: HandoverRefusal.self) { _ = try b.receive(timeoutMilliseconds: 50) }
    // Half a header, then the peer is gone.
    _ = [UInt8](repeating: 1, count: 7).withUnsafeBytes {
      Glibc.send(a.descriptor.rawValue, $0.baseAddress, $0.count, 0)
    }
    a.close()
    do {
      _ = try b.receive(timeoutMilliseconds: 1000)
      Issue.record("a dead peer's half message was taken")
    } catch {
      #expect(error.reason.contains("closed the handover socket"), "\(error)")
    }
    // A closed link sends nothing (not even to a descriptor number reused since).
    #expect(a.descriptor.rawValue == -1)
    #expect(throws: HandoverRefusal.self) { try a.send(.abort) }
  }
}
