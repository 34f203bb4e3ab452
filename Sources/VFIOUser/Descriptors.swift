import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// A file descriptor with exactly one owner, who closes it: with `close()`,
/// or by letting the value go (its `deinit` closes it). `release()` hands the
/// bare descriptor over, and with it the duty to close it.
///
/// The type says who owns what: the socket layer hands the descriptors a
/// client sent up owned, the server passes them to a backend `consuming`,
/// and from then on they are the backend's. A backend that needs a
/// descriptor after the call (an iommufd map of the client's file) keeps it
/// with `release()`; one that does not simply lets it go, and it is closed.
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
///
/// Up to 16 are held inline, so receiving a message with a few descriptors
/// (a DMA_MAP's file, a SET_IRQS's eventfds) allocates nothing.
public struct OwnedFileDescriptors: ~Copyable {
  /// How many came, taken ones included.
  public private(set) var count = 0
  /// -1 where a descriptor was taken.
  private var inline:
    (
      Int32, Int32, Int32, Int32, Int32, Int32, Int32, Int32,
      Int32, Int32, Int32, Int32, Int32, Int32, Int32, Int32
    ) = (-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1)
  private var overflow: [Int32] = []
  private static let inlineCount = 16

  /// None.
  public init() {}

  /// Takes ownership of every descriptor in `descriptors`.
  public init(taking descriptors: [FileDescriptor]) {
    for descriptor in descriptors { append(OwnedFileDescriptor(taking: descriptor)) }
  }

  public var isEmpty: Bool { count == 0 }

  /// Adds `descriptor` at the end, with its ownership.
  public mutating func append(_ descriptor: consuming OwnedFileDescriptor) {
    store(descriptor.release().rawValue, at: count)
    count += 1
  }

  /// Descriptor `i`, lent for as long as this value holds it; nil once taken.
  public subscript(i: Int) -> FileDescriptor? {
    let raw = load(i)
    return raw >= 0 ? FileDescriptor(rawValue: raw) : nil
  }

  /// Moves descriptor `i` out, with its ownership (nil if it was taken before).
  public mutating func take(_ i: Int) -> OwnedFileDescriptor? {
    let raw = load(i)
    guard raw >= 0 else { return nil }
    store(-1, at: i)
    return OwnedFileDescriptor(taking: FileDescriptor(rawValue: raw))
  }

  /// Moves every descriptor out, with their ownership: this value is empty afterwards.
  public mutating func takeAll() -> OwnedFileDescriptors {
    var all = OwnedFileDescriptors()
    swap(&all, &self)
    return all
  }

  /// Hands every descriptor still here over, with the duty to close it.
  public consuming func release() -> [FileDescriptor] {
    var all: [FileDescriptor] = []
    for i in 0..<count { if let descriptor = take(i) { all.append(descriptor.release()) } }
    return all
  }

  private func load(_ i: Int) -> Int32 {
    precondition(i >= 0 && i < count, "descriptor \(i) of \(count)")
    if i < Self.inlineCount {
      return withUnsafeBytes(of: inline) { $0.load(fromByteOffset: i * 4, as: Int32.self) }
    }
    return overflow[i - Self.inlineCount]
  }

  private mutating func store(_ raw: Int32, at i: Int) {
    if i < Self.inlineCount {
      withUnsafeMutableBytes(of: &inline) {
        $0.storeBytes(of: raw, toByteOffset: i * 4, as: Int32.self)
      }
    } else if i - Self.inlineCount < overflow.count {
      overflow[i - Self.inlineCount] = raw
    } else {
      overflow.append(raw)
    }
  }

  deinit {
    guard count > 0 else { return }
    for i in 0..<count {
      let raw = load(i)
      if raw >= 0 { _ = Glibc.close(raw) }
    }
  }
}
