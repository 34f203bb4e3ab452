import CVFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// The calls `KernelVFIODevice` makes on its device fd: ioctl, pread and
/// pwrite. The seam (as `PFControlFileSystem` is for the PF's debugfs files)
/// lets the tests put a fake vfio-pci device behind the real adapter and the
/// real server; production uses `POSIXDeviceFile`. Region accesses make one
/// call through it per pread or pwrite.
public protocol VFIODeviceFile: AnyObject {
  /// The descriptor a client maps the device's mmap-able areas through.
  var fd: Int32 { get }
  /// ioctl(2) with a pointer argument (or an integer in the pointer): the result (≥ 0) or -errno.
  func ioctl(_ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32
  /// pread(2) at device offset `offset`: the bytes read, or -errno.
  func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Int
  /// pwrite(2) at device offset `offset`: the bytes written, or -errno.
  func pwrite(from buffer: UnsafeRawBufferPointer, at offset: Int64) -> Int
}

/// A device fd the kernel gave: the system calls themselves. Owns the fd.
public final class POSIXDeviceFile: VFIODeviceFile {
  public let fd: Int32

  public init(adopting fd: Int32) { self.fd = fd }

  deinit { close(fd) }

  @inline(__always)
  public func ioctl(_ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
    cvfu_ioctl(fd, request, argument)
  }

  @inline(__always)
  public func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Int {
    let n = Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset))
    return n < 0 ? -Int(errno) : n
  }

  @inline(__always)
  public func pwrite(from buffer: UnsafeRawBufferPointer, at offset: Int64) -> Int {
    let n = Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(offset))
    return n < 0 ? -Int(errno) : n
  }
}
