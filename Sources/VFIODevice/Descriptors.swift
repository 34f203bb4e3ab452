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
