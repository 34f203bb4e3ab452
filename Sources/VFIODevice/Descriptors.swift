import CVFIOUser
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

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
