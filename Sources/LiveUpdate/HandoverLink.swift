import CVFIOUser
import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// The messages of a live update's handover, in the order they pass
/// (protocol/live-update.md). The old server is O, its successor N.
public enum HandoverMessage: UInt32, Sendable {
  /// N → O: the state versions N reads, its pid and version.
  case hello = 1
  /// O → N: the state record, with every descriptor it names.
  case state = 2
  /// N → O: every piece checked and rebuilt; N waits for the commit.
  case ready = 3
  /// N → O: N cannot take the state (a reason follows); N exits.
  case refused = 4
  /// O → N: N owns everything from now; O exits without touching anything.
  case commit = 5
  /// O → N: the update is called off (a reason follows); O carries on, N exits.
  case abort = 6
}

/// A message as it arrived, its descriptors owned.
public struct HandoverReceived: ~Copyable {
  public var kind: HandoverMessage
  public var payload: [UInt8]
  public var descriptors: OwnedFileDescriptors
}

/// One end of the private socket between an old server and its successor.
/// A frame is a 16-byte header (`kind` u32, descriptor count u32, payload
/// length u64, little-endian) sent with up to `descriptorsPerFrame`
/// descriptors as SCM_RIGHTS, then the payload. A message with more
/// descriptors is followed by header-only continuation frames of kind 0
/// carrying the rest.
public final class HandoverLink: @unchecked Sendable {
  public static let descriptorsPerFrame = 250
  /// A state record larger than this is refused (60,000 DMA windows take 3 MB).
  public static let maxPayload = 256 << 20
  private var socket: OwnedFileDescriptor?
  private let raw: FileDescriptor
  /// The socket (lent), or -1 once closed: nothing is ever sent to a number reused since.
  public var descriptor: FileDescriptor {
    socket != nil ? raw : FileDescriptor(rawValue: -1)
  }

  /// Takes `socket`, a connected stream socket.
  public init(_ socket: consuming OwnedFileDescriptor) {
    raw = socket.descriptor
    self.socket = consume socket
  }

  /// A connected pair: one end for each process.
  public static func pair() throws(Errno) -> (HandoverLink, HandoverLink) {
    var fds: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, &fds) == 0
    else { throw Errno(rawValue: errno) }
    return (
      HandoverLink(OwnedFileDescriptor(taking: FileDescriptor(rawValue: fds[0]))),
      HandoverLink(OwnedFileDescriptor(taking: FileDescriptor(rawValue: fds[1])))
    )
  }

  public func close() { socket.take()?.close() }

  deinit { close() }

  /// Sends `kind` with `payload` and `descriptors` (lent).
  public func send(
    _ kind: HandoverMessage, _ payload: [UInt8] = [], descriptors: [FileDescriptor] = []
  ) throws(HandoverRefusal) {
    var first = true
    var rest = descriptors[...]
    repeat {
      let batch = Array(rest.prefix(Self.descriptorsPerFrame))
      rest = rest.dropFirst(batch.count)
      var header = ByteWriter(capacity: 16)
      header.append(first ? kind.rawValue : 0)
      header.append(UInt32(first ? descriptors.count : batch.count))
      header.append(UInt64(first ? payload.count : 0))
      try sendFrame(header.bytes, batch.map(\.rawValue))
      if first, !payload.isEmpty { try sendFrame(payload, []) }
      first = false
    } while !rest.isEmpty
  }

  private func sendFrame(_ bytes: [UInt8], _ fds: [Int32]) throws(HandoverRefusal) {
    var sent = 0
    var pending = fds
    while sent < bytes.count {
      let n = bytes.withUnsafeBytes { raw in
        var vector = iovec(
          iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress! + sent),
          iov_len: raw.count - sent)
        return pending.withUnsafeBufferPointer { f in
          cvfu_sendmsg(descriptor.rawValue, &vector, 1, f.baseAddress, Int32(f.count))
        }
      }
      guard n > 0 else {
        throw HandoverRefusal(
          "the handover socket failed while sending: \(Errno(rawValue: Int32(-n)))")
      }
      pending = []
      sent += n
    }
  }

  /// The next message: its kind, payload and descriptors (owned). Waits up
  /// to `timeoutMilliseconds` for each frame.
  public func receive(timeoutMilliseconds: Int32) throws(HandoverRefusal) -> HandoverReceived {
    var descriptors = OwnedFileDescriptors()
    let (rawKind, total, length) = try receiveHeader(
      into: &descriptors, timeoutMilliseconds: timeoutMilliseconds)
    guard let kind = HandoverMessage(rawValue: rawKind) else {
      throw HandoverRefusal("the handover socket brought an unknown message (\(rawKind))")
    }
    guard length <= UInt64(Self.maxPayload) else {
      throw HandoverRefusal("a handover message of \(length) bytes is larger than allowed")
    }
    var payload = [UInt8](repeating: 0, count: Int(length))
    try receiveExactly(&payload, timeoutMilliseconds: timeoutMilliseconds)
    while descriptors.count < total {
      let (continuation, _, extra) = try receiveHeader(
        into: &descriptors, timeoutMilliseconds: timeoutMilliseconds)
      guard continuation == 0, extra == 0 else {
        throw HandoverRefusal("the handover socket broke its framing (descriptors missing)")
      }
    }
    guard descriptors.count == total else {
      throw HandoverRefusal(
        "the handover message carried \(descriptors.count) descriptors, not \(total)")
    }
    return HandoverReceived(kind: kind, payload: payload, descriptors: descriptors)
  }

  /// Waits for the peer to close its end (it exited): true when it did within the time.
  public func waitForClose(timeoutMilliseconds: Int32) -> Bool {
    var byte: UInt8 = 0
    guard cvfu_wait_readable(descriptor.rawValue, timeoutMilliseconds) > 0 else { return false }
    return recv(descriptor.rawValue, &byte, 1, Int32(MSG_DONTWAIT)) == 0
  }

  private func receiveHeader(
    into descriptors: inout OwnedFileDescriptors, timeoutMilliseconds: Int32
  ) throws(HandoverRefusal) -> (UInt32, UInt32, UInt64) {
    var header = [UInt8](repeating: 0, count: 16)
    var got = 0
    let scratch = UnsafeMutableBufferPointer<Int32>.allocate(capacity: Int(CVFU_SCM_MAX_FD))
    defer { scratch.deallocate() }
    while got < 16 {
      try waitReadable(timeoutMilliseconds)
      var count: Int32 = 0
      let n = header.withUnsafeMutableBytes { raw in
        cvfu_recvmsg(
          descriptor.rawValue, raw.baseAddress! + got, 16 - got, scratch.baseAddress,
          Int32(scratch.count), &count, 0)
      }
      for i in 0..<Int(min(count, CVFU_SCM_MAX_FD)) {
        descriptors.append(OwnedFileDescriptor(taking: FileDescriptor(rawValue: scratch[i])))
      }
      guard n > 0 else { throw closedOrFailed(n) }
      got += n
    }
    return header.withUnsafeBytes { raw in
      (
        UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)),
        UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
        UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
      )
    }
  }

  private func receiveExactly(_ bytes: inout [UInt8], timeoutMilliseconds: Int32)
    throws(HandoverRefusal)
  {
    var got = 0
    while got < bytes.count {
      try waitReadable(timeoutMilliseconds)
      let n = bytes.withUnsafeMutableBytes { raw in
        recv(descriptor.rawValue, raw.baseAddress! + got, raw.count - got, 0)
      }
      if n < 0, errno == EINTR { continue }
      guard n > 0 else { throw closedOrFailed(n < 0 ? -Int(errno) : 0) }
      got += n
    }
  }

  private func waitReadable(_ milliseconds: Int32) throws(HandoverRefusal) {
    let ready = cvfu_wait_readable(descriptor.rawValue, milliseconds)
    if ready == 0 {
      throw HandoverRefusal("the other process sent nothing for \(milliseconds) ms")
    }
    if ready < 0 {
      throw HandoverRefusal("the handover socket failed: \(Errno(rawValue: -ready))")
    }
  }

  private func closedOrFailed(_ n: Int) -> HandoverRefusal {
    n == 0
      ? HandoverRefusal("the other process closed the handover socket (it exited)")
      : HandoverRefusal("the handover socket failed: \(Errno(rawValue: Int32(-n)))")
  }
}
