import CVFIOUser
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// A file descriptor with exactly one owner, who closes it: with `close()`,
/// or by letting the value go (its `deinit` closes it). `release()` hands the
/// bare descriptor over, and with it the duty to close it.
///
/// The type says who owns what: the server passes the client's descriptors
/// to a backend `consuming`, and from then on they are the backend's. A
/// backend that needs a descriptor after the call (an iommufd map of the
/// client's file) keeps it with `release()`; one that does not simply lets it
/// go, and it is closed.
public struct OwnedFileDescriptor: ~Copyable {
  /// The descriptor, lent for as long as this value lives.
  public let descriptor: FileDescriptor

  /// Takes ownership of `descriptor`.
  public init(taking descriptor: FileDescriptor) { self.descriptor = descriptor }

  /// Hands the descriptor over without closing it: the caller owns it now.
  public consuming func release() -> FileDescriptor {
    let descriptor = descriptor
    discard self
    return descriptor
  }

  /// Closes the descriptor now.
  public consuming func close() {
    _ = Glibc.close(descriptor.rawValue)
    discard self
  }

  deinit { _ = Glibc.close(descriptor.rawValue) }
}

/// The descriptors one message brought, owned as a group: those still here
/// when the value goes away are closed. `take(_:)` moves one out, with its
/// ownership. SET_IRQS hands its eventfds to the backend this way: the
/// simulated VF takes the ones it signals, a kernel backend passes them to
/// VFIO_DEVICE_SET_IRQS (which holds its own reference) and lets them go.
public struct OwnedFileDescriptors: ~Copyable {
  /// -1 where a descriptor was taken.
  private var raw: [Int32]

  /// None.
  public init() { raw = [] }

  /// Takes ownership of every descriptor in `descriptors`.
  public init(taking descriptors: [FileDescriptor]) { raw = descriptors.map { $0.rawValue } }

  /// How many came, taken ones included.
  public var count: Int { raw.count }
  public var isEmpty: Bool { raw.isEmpty }

  /// Descriptor `i`, lent for as long as this value holds it; nil once taken.
  public subscript(i: Int) -> FileDescriptor? {
    raw[i] >= 0 ? FileDescriptor(rawValue: raw[i]) : nil
  }

  /// Moves descriptor `i` out, with its ownership (nil if it was taken before).
  public mutating func take(_ i: Int) -> OwnedFileDescriptor? {
    guard raw[i] >= 0 else { return nil }
    defer { raw[i] = -1 }
    return OwnedFileDescriptor(taking: FileDescriptor(rawValue: raw[i]))
  }

  deinit { for fd in raw where fd >= 0 { _ = Glibc.close(fd) } }
}

/// What a descriptor a client sent refers to. The server uses one only for
/// what its kind can do: an eventfd to signal an interrupt, a regular file
/// (memfd, tmpfs, hugetlbfs, /dev/shm, disk) to map as DMA memory. Anything
/// else (a socket, pipe, directory, device or other anonymous inode) is
/// refused with EBADF before it is used (protocol/README.md, "Descriptors").
public enum DescriptorKind: Sendable, Equatable {
  case regularFile(size: Int64)
  case eventFD
  case socket, pipe, directory, device, other

  /// The kind of `fd`; EBADF when it is not open.
  public init(of fd: FileDescriptor) throws(Errno) {
    var size: Int64 = 0
    let kind = cvfu_fd_kind(fd.rawValue, &size)
    guard kind >= 0 else { throw Errno(rawValue: -kind) }
    switch UInt32(kind) {
    case CVFU_FD_REGULAR.rawValue: self = .regularFile(size: size)
    case CVFU_FD_EVENTFD.rawValue: self = .eventFD
    case CVFU_FD_SOCKET.rawValue: self = .socket
    case CVFU_FD_PIPE.rawValue: self = .pipe
    case CVFU_FD_DIRECTORY.rawValue: self = .directory
    case CVFU_FD_DEVICE.rawValue: self = .device
    default: self = .other
    }
  }
}
