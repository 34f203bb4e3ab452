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

/// A descriptor on its way to another thread (a client accepted here and
/// served there): the handoff owns it until the receiving thread takes it,
/// once, and closes it if nobody does (the thread never started).
public final class DescriptorHandoff: @unchecked Sendable {
  // Taken once, by the one thread the handoff was given to.
  private var owned: OwnedFileDescriptor?
  /// The descriptor, lent while the handoff or its taker holds it.
  public let descriptor: FileDescriptor

  public init(_ descriptor: consuming OwnedFileDescriptor) {
    self.descriptor = descriptor.descriptor
    owned = consume descriptor
  }

  /// The descriptor, with its ownership (nil after the first call).
  public func take() -> OwnedFileDescriptor? { owned.take() }
}

/// The descriptors one message brought, owned as a group: those still here
/// when the value goes away are closed. `take(_:)` moves one out, with its
/// ownership. SET_IRQS hands its eventfds to the backend this way: the
/// simulated VF takes the ones it signals, a kernel backend passes them to
/// VFIO_DEVICE_SET_IRQS (which holds its own reference) and lets them go.
///
/// The first four are held inline, so receiving a message with a few
/// descriptors (a DMA_MAP's file) allocates nothing; more go to memory this
/// value allocates and frees itself. No stored property is reference-counted
/// and the whole value is 32 bytes, so making, moving and dropping one (every
/// message the server receives carries one, most of them empty, through the
/// framer's step, the channel's result and the handler) is a few plain
/// register moves: a larger inline array, or an Array for the rest, cost
/// each message a memcpy or a release per move.
public struct OwnedFileDescriptors: ~Copyable {
  /// How many came, taken ones included.
  private var held: Int32 = 0
  /// Places at `overflow`.
  private var overflowCapacity: Int32 = 0
  /// -1 where a descriptor was taken.
  private var inline: (Int32, Int32, Int32, Int32) = (-1, -1, -1, -1)
  /// Descriptors past the inline ones (-1 where taken); allocated for the
  /// first of them, freed with the value.
  private var overflow: UnsafeMutablePointer<Int32>? = nil
  private static let inlineCount = 4

  /// None.
  public init() {}

  /// Takes ownership of every descriptor in `descriptors`.
  public init(taking descriptors: [FileDescriptor]) {
    for descriptor in descriptors { append(OwnedFileDescriptor(taking: descriptor)) }
  }

  /// How many came, taken ones included.
  public var count: Int { Int(held) }

  public var isEmpty: Bool { held == 0 }

  /// Adds `descriptor` at the end, with its ownership.
  public mutating func append(_ descriptor: consuming OwnedFileDescriptor) {
    store(descriptor.release().rawValue, at: count)
    held += 1
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

  /// Keeps the descriptors of the first `limit` places, in order and without
  /// the places taken before, and closes those after them: what a receiver
  /// that accepts at most `limit` per message keeps, in place.
  public mutating func keepFirst(_ limit: Int) {
    var kept = 0
    for i in 0..<count {
      let raw = load(i)
      guard raw >= 0 else { continue }
      if i < limit {
        if kept != i { store(raw, at: kept) }
        kept += 1
      } else {
        _ = Glibc.close(raw)
      }
    }
    held = Int32(kept)
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
    return overflow![i - Self.inlineCount]
  }

  /// Stores at a place up to `count` (one past the end appends).
  private mutating func store(_ raw: Int32, at i: Int) {
    if i < Self.inlineCount {
      withUnsafeMutableBytes(of: &inline) {
        $0.storeBytes(of: raw, toByteOffset: i * 4, as: Int32.self)
      }
      return
    }
    let place = i - Self.inlineCount
    if place == Int(overflowCapacity) {
      let capacity = max(16, Int(overflowCapacity) * 2)
      let grown = UnsafeMutablePointer<Int32>.allocate(capacity: capacity)
      if let overflow {
        grown.initialize(from: overflow, count: Int(overflowCapacity))
        overflow.deallocate()
      }
      overflow = grown
      overflowCapacity = Int32(capacity)
    }
    overflow![place] = raw
  }

  deinit {
    for i in 0..<count {
      let raw = load(i)
      if raw >= 0 { _ = Glibc.close(raw) }
    }
    overflow?.deallocate()
  }
}
