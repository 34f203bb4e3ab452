import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// The client's DMA windows. Windows sent with an fd are mmapped here (the fd
/// is closed right after: the mapping keeps the memory, and 65535 windows must
/// not cost 65535 descriptors); windows without one are reached by messages.
struct DMATable {
  private var map = IntervalMap<DMARegion>()
  let pageSize: UInt64
  var limit: Int

  init(pageSize: UInt64 = 4096, limit: Int) {
    self.pageSize = pageSize
    self.limit = limit
  }

  var count: Int { map.count }
  var regions: [DMARegion] { map.entries.map(\.value) }

  /// Adds a window. Takes ownership of `fd` (closed on every path).
  mutating func add(_ request: DMAMapRequest, fd: Int32?) throws(Errno) -> DMARegion {
    defer { if let fd { _ = close(fd) } }
    let mask = pageSize - 1
    guard request.address & mask == 0, request.size & mask == 0 else { throw .invalidArgument }
    if fd != nil { guard request.offset & mask == 0 else { throw .invalidArgument } }
    guard map.count < limit else { throw .noSpace }
    if map.lookup(request.address) != nil { throw .fileExists }
    var region = DMARegion(
      address: request.address, size: request.size,
      readable: request.flags & VFIODMAMapFlags.read != 0,
      writable: request.flags & VFIODMAMapFlags.write != 0,
      mapping: nil, fd: -1, fileOffset: request.offset)
    if let fd {
      var prot: Int32 = 0
      if region.readable { prot |= PROT_READ }
      if region.writable { prot |= PROT_WRITE }
      if prot == 0 { prot = PROT_NONE }
      let p = mmap(
        nil, Int(request.size), prot, MAP_SHARED, fd, off_t(Int64(bitPattern: request.offset)))
      guard let p, p != MAP_FAILED else { throw Errno(rawValue: errno) }
      region.mapping = p
    }
    guard map.insert(start: region.address, end: region.end, value: region) else {
      if let p = region.mapping { munmap(p, Int(region.size)) }
      throw .fileExists
    }
    return region
  }

  /// Removes every window lying inside [address, address + size), with the
  /// kernel's type1v2 rules: a range holding no window succeeds, and a range
  /// that cuts through a window (or is not page-aligned) is refused with EINVAL
  /// and removes nothing. A vIOMMU client unmaps whatever its guest
  /// invalidates, so one range may cover many windows or none.
  mutating func remove(address: UInt64, size: UInt64) throws(Errno) -> [DMARegion] {
    let mask = pageSize - 1
    guard address & mask == 0, size & mask == 0 else { throw .invalidArgument }
    guard let removed = map.remove(inside: address, through: address + (size - 1)) else {
      throw .invalidArgument
    }
    for region in removed { Self.release(region) }
    return removed
  }

  mutating func removeAll() -> [DMARegion] {
    let all = map.removeAll().map(\.value)
    for region in all { Self.release(region) }
    return all
  }

  private static func release(_ region: DMARegion) {
    if let p = region.mapping { munmap(p, Int(region.size)) }
  }

  /// The window holding `address`.
  func lookup(_ address: UInt64) -> DMARegion? { map.lookup(address)?.value }
}
