import CVFIOUser
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// Where a channel's bytes come from and go to: a connected Unix stream
/// socket, or memory (`MemoryTransport`, for tests of the engine without
/// sockets or threads). An enum rather than a protocol, so that each system
/// call costs a branch and never an existential call. Every call answers as
/// the system call does: a byte count, or minus an errno.
public enum MessageTransport {
  /// Lent: the channel owns the socket (`MessageChannel.close()`).
  case socket(FileDescriptor)
  case memory(MemoryTransport)

  /// One recvmsg of up to `space.count` bytes, with SCM_RIGHTS descriptors
  /// into `descriptors` (their number in `descriptorCount`); each is owned
  /// by the caller. `wakeable`: an interrupted wait returns -EINTR (`ThreadWake`).
  @inline(__always)
  func receive(
    into space: UnsafeMutableRawBufferPointer, descriptors: UnsafeMutableBufferPointer<Int32>,
    descriptorCount: inout Int32, dontWait: Bool, wakeable: Bool = false
  ) -> Int {
    switch self {
    case .socket(let socket):
      return cvfu_recvmsg_wakeable(
        socket.rawValue, space.baseAddress, space.count, descriptors.baseAddress,
        Int32(descriptors.count), &descriptorCount, dontWait ? Int32(MSG_DONTWAIT) : 0,
        wakeable ? 1 : 0)
    case .memory(let memory):
      return memory.receive(
        into: space, descriptors: descriptors, descriptorCount: &descriptorCount,
        dontWait: dontWait, waitAll: false)
    }
  }

  /// One recv of up to `space.count` bytes without descriptors (the kernel
  /// closes any that would come); `waitAll` waits for all of them.
  func receiveBytes(into space: UnsafeMutableRawBufferPointer, dontWait: Bool, waitAll: Bool)
    -> Int
  {
    switch self {
    case .socket(let socket):
      let flags = (dontWait ? Int32(MSG_DONTWAIT) : 0) | (waitAll ? Int32(MSG_WAITALL) : 0)
      let n = recv(socket.rawValue, space.baseAddress, space.count, flags)
      return n >= 0 ? n : -Int(errno)
    case .memory(let memory):
      var none: Int32 = 0
      return memory.receive(
        into: space, descriptors: UnsafeMutableBufferPointer(start: nil, count: 0),
        descriptorCount: &none, dontWait: dontWait, waitAll: waitAll)
    }
  }

  /// Waits up to `milliseconds` for something to read: > 0 ready, 0 not, < 0 minus an errno.
  func waitReadable(milliseconds: Int32) -> Int32 {
    switch self {
    case .socket(let socket): return cvfu_wait_readable(socket.rawValue, milliseconds)
    case .memory(let memory): return memory.waitReadable()
    }
  }

  /// One sendmsg of `vectors`, with `descriptors` (lent) attached to its first byte.
  @inline(__always)
  func send(_ vectors: UnsafeBufferPointer<iovec>, descriptors: UnsafeBufferPointer<Int32>) -> Int {
    switch self {
    case .socket(let socket):
      return cvfu_sendmsg(
        socket.rawValue, vectors.baseAddress, Int32(vectors.count), descriptors.baseAddress,
        Int32(descriptors.count))
    case .memory(let memory):
      return memory.send(vectors, descriptors: descriptors)
    }
  }

  /// Whether the peer has closed its end (POLLHUP), without reading or waiting.
  var peerHasHungUp: Bool {
    switch self {
    case .socket(let socket):
      var entry = pollfd(fd: socket.rawValue, events: 0, revents: 0)
      return poll(&entry, 1, 0) > 0 && entry.revents & Int16(POLLHUP) != 0
    case .memory(let memory): return memory.peerHasHungUp
    }
  }

  /// Both directions shut: a blocked read returns the end of the stream.
  func shutdown() {
    switch self {
    case .socket(let socket): _ = Glibc.shutdown(socket.rawValue, Int32(SHUT_RDWR))
    case .memory(let memory): memory.shutdown()
    }
  }
}
