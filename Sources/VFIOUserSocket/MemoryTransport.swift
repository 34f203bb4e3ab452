import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// A connection held in memory, for running the engine in a test without
/// sockets or threads, as SwiftNIO's `EmbeddedChannel` does: the test queues
/// what the client sends (`deliver`), the channel reads it as it would read a
/// Unix stream socket, and what the channel sends collects in `sent`. When
/// the channel would wait for input, `whenIdle` runs first on the same
/// thread (a scripted client answering what was sent); a wait it leaves
/// unanswered is over at once (a read sees the end of the stream, a bounded
/// wait times out), so a test never hangs.
///
/// Reads follow Linux's `unix_stream_read_generic`: one read joins queued
/// sends, and stops right after a send that carried descriptors, handing
/// them over with its first byte read.
public final class MemoryTransport {
  /// One send of the client's: bytes, and the descriptors it carried (owned here until read).
  private struct Segment {
    var bytes: [UInt8]
    var offset = 0
    var descriptors: [Int32]
  }

  private var inbound: [Segment] = []
  private var inboundHead = 0
  /// The client closed its end: reads see the end of the stream after what is queued.
  public private(set) var peerHasHungUp = false
  /// The channel shut the connection down or closed it.
  public private(set) var isShutDown = false
  public private(set) var isClosed = false
  /// Everything the channel sent, in order.
  public private(set) var sent: [UInt8] = []
  /// Copies of the descriptors the channel sent (as the kernel passes
  /// them), with the offset in `sent` of the byte they came with; closed
  /// with the transport.
  public private(set) var sentDescriptors: [(offset: Int, descriptors: [Int32])] = []
  /// Runs when the channel would wait for input, before it does.
  public var whenIdle: ((MemoryTransport) -> Void)?

  public init() {}

  deinit {
    for segment in inbound[inboundHead...] { for fd in segment.descriptors { _ = Glibc.close(fd) } }
    for (_, descriptors) in sentDescriptors { for fd in descriptors { _ = Glibc.close(fd) } }
  }

  /// Queues one send of the client's: `bytes` with `descriptors` (which the
  /// transport owns until the channel reads them).
  public func deliver(_ bytes: [UInt8], descriptors: consuming OwnedFileDescriptors = .init()) {
    inbound.append(Segment(bytes: bytes, descriptors: descriptors.release().map(\.rawValue)))
  }

  /// The client closes its end.
  public func hangUp() { peerHasHungUp = true }

  private var hasInput: Bool { inboundHead < inbound.count }

  /// Gives `whenIdle` its turn when there is nothing to read.
  private func idle() {
    guard !hasInput, !peerHasHungUp, !isShutDown else { return }
    whenIdle?(self)
  }

  func receive(
    into space: UnsafeMutableRawBufferPointer, descriptors: UnsafeMutableBufferPointer<Int32>,
    descriptorCount: inout Int32, dontWait: Bool, waitAll: Bool
  ) -> Int {
    descriptorCount = 0
    if !dontWait { idle() }
    guard !isShutDown else { return 0 }
    guard hasInput else { return dontWait && !peerHasHungUp ? -Int(EAGAIN) : 0 }
    var got = 0
    while got < space.count, hasInput {
      var segment = inbound[inboundHead]
      let n = min(segment.bytes.count - segment.offset, space.count - got)
      segment.bytes.withUnsafeBytes {
        (space.baseAddress! + got).copyMemory(from: $0.baseAddress! + segment.offset, byteCount: n)
      }
      got += n
      segment.offset += n
      let carried = !segment.descriptors.isEmpty
      for fd in segment.descriptors {
        if Int(descriptorCount) < descriptors.count {
          descriptors[Int(descriptorCount)] = fd
          descriptorCount += 1
        } else {
          _ = Glibc.close(fd)  // no room, or a read without any: the kernel closes them
        }
      }
      segment.descriptors = []
      if segment.offset == segment.bytes.count {
        inboundHead += 1
      } else {
        inbound[inboundHead] = segment
      }
      if carried && !waitAll { break }
      if waitAll, got < space.count, !hasInput { idle() }
    }
    return got
  }

  func waitReadable() -> Int32 {
    idle()
    return hasInput || peerHasHungUp || isShutDown ? 1 : 0
  }

  func send(_ vectors: UnsafeBufferPointer<iovec>, descriptors: UnsafeBufferPointer<Int32>) -> Int {
    guard !isShutDown, !isClosed else { return -Int(EPIPE) }
    if !descriptors.isEmpty {
      sentDescriptors.append((sent.count, descriptors.map { dup($0) }))
    }
    var total = 0
    for vector in vectors where vector.iov_len > 0 {
      sent.append(
        contentsOf: UnsafeRawBufferPointer(start: vector.iov_base, count: vector.iov_len))
      total += vector.iov_len
    }
    return total
  }

  func shutdown() { isShutDown = true }

  func close() {
    isShutDown = true
    isClosed = true
  }
}
