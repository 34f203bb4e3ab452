import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// The client's DMA windows. Windows sent with an fd are mmapped here; the fd
/// itself goes to the device (which keeps it or lets it go, so 65535 windows
/// need not cost 65535 descriptors). Windows without one are reached by
/// messages.
///
/// Changes are in two steps so the device can refuse: `prepare` checks and
/// maps a window before the device hears of it, and `windows(inside:size:)`
/// finds what an unmap would remove before the device agrees and `remove`
/// releases it.
struct DMATable {
  private var map = IntervalMap<DMAWindow>()
  /// The smallest page of the negotiated pgsizes: the alignment of every window.
  let pageSize: UInt64
  let limit: Int
  /// The device's IOVA ranges: every window lies inside one.
  let limits: DMALimits

  init(pageSize: UInt64, limit: Int, limits: DMALimits = .unrestricted) {
    self.pageSize = pageSize
    self.limit = limit
    self.limits = limits
  }

  var count: Int { map.count }
  var windows: [DMAWindow] { map.entries.map { $0.value } }

  /// Checks a new window, in the order the kernel's type1 does: alignment
  /// (EINVAL), a free slot (ENOSPC), overlap (EEXIST), then the device's IOVA
  /// ranges (ERANGE); then maps the client's `file` (lent, not closed here).
  /// The window is not in the table yet: `insert` adds it.
  func prepare(_ request: DMAMapRequest, file: FileDescriptor?) throws(Errno) -> DMAWindow {
    let mask = pageSize - 1
    guard request.address & mask == 0, request.size & mask == 0 else { throw .invalidArgument }
    if file != nil { guard request.offset & mask == 0 else { throw .invalidArgument } }
    guard map.count < limit else { throw .noSpace }
    if map.lookup(request.address) != nil { throw .fileExists }
    guard limits.allows(address: request.address, size: request.size) else {
      throw .outOfRange
    }
    var window = DMAWindow(
      address: request.address, size: request.size,
      readable: request.flags & VFIODMAMapFlags.read != 0,
      writable: request.flags & VFIODMAMapFlags.write != 0,
      fileOffset: file == nil ? 0 : request.offset)
    if let file {
      var prot: Int32 = 0
      if window.readable { prot |= PROT_READ }
      if window.writable { prot |= PROT_WRITE }
      if prot == 0 { prot = PROT_NONE }
      let p = mmap(
        nil, Int(request.size), prot, MAP_SHARED, file.rawValue,
        off_t(Int64(bitPattern: request.offset)))
      guard let p, p != MAP_FAILED else { throw Errno(rawValue: errno) }
      window.mapping = p
    }
    return window
  }

  /// Adds a window `prepare` made. On overlap (EEXIST) its mapping is released.
  mutating func insert(_ window: DMAWindow) throws(Errno) {
    guard map.insert(start: window.address, end: window.end, value: window) else {
      Self.release(window)
      throw .fileExists
    }
  }

  /// The windows lying inside [address, address + size), with the kernel's
  /// type1v2 rules: a range holding no window gives none, and a range that
  /// cuts through a window (or is not page-aligned) is refused with EINVAL.
  /// A vIOMMU client unmaps whatever its guest invalidates, so one range may
  /// cover many windows or none. Nothing is removed.
  func windows(inside address: UInt64, size: UInt64) throws(Errno) -> [DMAWindow] {
    let mask = pageSize - 1
    guard address & mask == 0, size & mask == 0 else { throw .invalidArgument }
    guard let found = map.values(inside: address, through: address + (size - 1)) else {
      throw .invalidArgument
    }
    return found
  }

  /// Removes and releases the windows inside the range (checked by `windows(inside:size:)`).
  mutating func remove(inside address: UInt64, size: UInt64) {
    for window in map.remove(inside: address, through: address + (size - 1)) ?? [] {
      Self.release(window)
    }
  }

  /// Removes and releases every window.
  mutating func removeAll() {
    for entry in map.removeAll() { Self.release(entry.value) }
  }

  /// Unmaps a window the table no longer holds (or never held).
  static func release(_ window: DMAWindow) {
    if let p = window.mapping { munmap(p, Int(window.size)) }
  }

  /// The window holding `address`.
  func lookup(_ address: UInt64) -> DMAWindow? { map.lookup(address)?.value }
}
