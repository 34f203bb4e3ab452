import Foundation
import SystemPackage
import Testing
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

/// `relayMigrationData` (what `migrate` runs) when the destination goes away
/// while a reply's payload is still arriving from the source: the part not
/// yet taken from the source's socket must be dropped, so the source is in
/// step for the rollback. The relay once counted that rest as gone, read
/// payload bytes as the next reply's header, and left the source unframeable
/// ("the source could not return to RUNNING": seen when `migrate`'s
/// destination was killed as the stream started).
@Suite("MIG_DATA relay when the destination dies mid-payload")
struct MigrationRelayTests {
  static func socketPair() -> (Int32, Int32) {
    var pair: [Int32] = [-1, -1]
    let made = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, &pair)
    precondition(made == 0)
    return (pair[0], pair[1])
  }

  static func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var done = 0
    while done < bytes.count {
      let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, $0.count - done, 0) }
      if n <= 0 { return }
      done += n
    }
  }

  /// Fills `buffer` from `fd`; returns how much arrived before the peer closed.
  static func readFully(_ fd: Int32, _ buffer: inout [UInt8]) -> Int {
    var taken = 0
    while taken < buffer.count {
      let n = buffer.withUnsafeMutableBytes {
        recv(fd, $0.baseAddress! + taken, $0.count - taken, 0)
      }
      if n <= 0 { break }
      taken += n
    }
    return taken
  }

  /// The head of a MIG_DATA_READ reply carrying `count` bytes.
  static func replyHead(id: UInt16, count: Int) -> [UInt8] {
    var head = [UInt8](repeating: 0, count: 24)
    head.withUnsafeMutableBytes {
      MessageHeader(
        messageID: id, command: .migDataRead, size: UInt32(24 + count),
        flags: .reply
      ).encode(into: $0)
      MigDataHeader(argsz: UInt32(8 + count), size: UInt32(count)).encode(
        into: UnsafeMutableRawBufferPointer(rebasing: $0[16...]))
    }
    return head
  }

  @Test func theSourceStaysInStepWhenTheDestinationDies() throws {
    signal(SIGPIPE, SIG_IGN)
    let chunk = 1 << 20
    let (sourceEnd, fakeSource) = Self.socketPair()
    let (destinationEnd, fakeDestination) = Self.socketPair()
    defer { [fakeSource, fakeDestination].forEach { close($0) } }
    // The fake source answers the relay's four reads: the first with 1 MiB
    // of which only 128 KiB comes at once and the rest after the destination
    // has gone, then three empty replies (the end of the stream).
    let source = Thread {
      var requests = [UInt8](repeating: 0, count: 4 * 24)
      guard Self.readFully(fakeSource, &requests) == requests.count else { return }
      let ids = (0..<4).map { UInt16(requests[$0 * 24]) | UInt16(requests[$0 * 24 + 1]) << 8 }
      let payload = [UInt8](repeating: 0xA5, count: chunk)
      Self.writeAll(fakeSource, Self.replyHead(id: ids[0], count: chunk) + payload[0..<(128 << 10)])
      usleep(300_000)
      Self.writeAll(fakeSource, Array(payload[(128 << 10)...]))
      for id in ids.dropFirst() { Self.writeAll(fakeSource, Self.replyHead(id: id, count: 0)) }
    }
    // The fake destination takes 64 KiB of the first MIG_DATA_WRITE and hangs up.
    let destination = Thread {
      var scratch = [UInt8](repeating: 0, count: 64 << 10)
      _ = Self.readFully(fakeDestination, &scratch)
      shutdown(fakeDestination, Int32(SHUT_RDWR))
    }
    source.start()
    destination.start()
    let sourceClient = VFIOUserClient(
      socket: OwnedFileDescriptor(taking: FileDescriptor(rawValue: sourceEnd)))
    let destinationClient = VFIOUserClient(
      socket: OwnedFileDescriptor(taking: FileDescriptor(rawValue: destinationEnd)))
    do throws(RelayError) {
      _ = try VFIOUserClient.relayMigrationData(
        from: sourceClient, to: destinationClient, chunk: chunk)
      Issue.record("the relay finished into a closed destination")
    } catch {
      guard case .destination = error else {
        Issue.record("the failure was not the destination's: \(error)")
        return
      }
    }
    // Everything the source sent was consumed as what it was, and nothing is left.
    var probe: UInt8 = 0
    let left = recv(sourceEnd, &probe, 1, Int32(MSG_DONTWAIT))
    #expect(left < 0 && errno == EAGAIN, "bytes left in the source's socket after the relay")
    #expect(sourceClient.channel.bufferedByteCount == 0)
  }
}
