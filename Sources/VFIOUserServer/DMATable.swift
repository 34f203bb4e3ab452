import CVFIOUser
import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// One server mapping of a client's file, shared by every window of that
/// file with the same protection: a vIOMMU client sends a DMA_MAP and a
/// DMA_UNMAP per I/O, all of one guest-RAM file, and an mmap + munmap (a TLB
/// shootdown) for each would cost more than the messages. It goes when its
/// last window goes, so the client's memory is let go as soon as no window
/// holds it.
final class FileMapping {
  struct Key: Hashable {
    var device: UInt64
    var inode: UInt64
    var protection: Int32
  }

  let base: UnsafeMutableRawPointer
  let length: Int
  /// nil for a mapping of one window alone (a file that is not a regular file).
  let key: Key?
  /// Whether the client can cut the file short under the mapping (no
  /// F_SEAL_SHRINK): a page past the file's new end raises SIGBUS, so every
  /// copy through this mapping is a guarded one (`cvfu_guarded_copy`).
  let mayShrink: Bool
  var windows = 0

  init(base: UnsafeMutableRawPointer, length: Int, key: Key?, mayShrink: Bool) {
    self.base = base
    self.length = length
    self.key = key
    self.mayShrink = mayShrink
  }
}

/// The client's DMA windows. Windows sent with an fd are reached through the
/// server's mapping of that file (one per file and protection, shared); the
/// fd itself goes to the device (which keeps it or lets it go, so 65535
/// windows need not cost 65535 descriptors). Windows without one are reached
/// by messages.
///
/// Changes are in two steps so the device can refuse: `prepare` checks and
/// maps a window before the device hears of it, and `windows(inside:size:)`
/// finds what an unmap would remove before the device agrees and `remove`
/// releases it.
struct DMATable {
  struct Entry {
    var window: DMAWindow
    var backing: FileMapping?
  }

  private var map = IntervalMap<Entry>()
  /// The current mapping of each file and protection; older, smaller ones
  /// live on in the windows that use them.
  private var files: [FileMapping.Key: FileMapping] = [:]
  /// The smallest page of the negotiated pgsizes: the alignment of every window.
  let pageSize: UInt64
  let limit: Int
  /// The device's IOVA ranges: every window lies inside one.
  let limits: DMALimits
  private static let systemPage = UInt64(sysconf(Int32(_SC_PAGESIZE)))

  init(pageSize: UInt64, limit: Int, limits: DMALimits = .unrestricted) {
    self.pageSize = pageSize
    self.limit = limit
    self.limits = limits
  }

  var count: Int { map.count }
  var windows: [DMAWindow] { map.entries.map { $0.value.window } }
  /// Server mappings of client files (tests, statistics).
  var fileMappingCount: Int { files.count }

  /// Checks a new window, in the order the kernel's type1 does: alignment
  /// (EINVAL), a free slot (ENOSPC), overlap (EEXIST), then the device's IOVA
  /// ranges (ERANGE); then maps the client's `file` (lent, not closed here),
  /// or takes a mapping of it already made. The window is not in the table
  /// yet: `insert` adds it, and `release` undoes this when it cannot.
  mutating func prepare(_ request: DMAMapRequest, file: FileDescriptor?) throws(Errno) -> Entry {
    let mask = pageSize - 1
    guard request.address & mask == 0, request.size & mask == 0 else { throw .invalidArgument }
    if file != nil { guard request.offset & mask == 0 else { throw .invalidArgument } }
    guard map.count < limit else { throw .noSpace }
    if map.lookup(request.address) != nil { throw .fileExists }
    guard limits.allows(address: request.address, size: request.size) else {
      throw .outOfRange
    }
    var entry = Entry(
      window: DMAWindow(
        address: request.address, size: request.size,
        readable: request.flags.contains(.read),
        writable: request.flags.contains(.write),
        fileOffset: file == nil ? 0 : request.offset))
    if let file {
      var protection: Int32 = 0
      if entry.window.readable { protection |= PROT_READ }
      if entry.window.writable { protection |= PROT_WRITE }
      let backing = try mapping(
        of: file, protection: protection, offset: request.offset, size: request.size)
      backing.windows += 1
      entry.backing = backing
      entry.window.mapping =
        backing.key == nil ? backing.base : backing.base + Int(request.offset)
    }
    return entry
  }

  /// A mapping of `file` with `protection` holding [offset, offset + size):
  /// the file's current one when it reaches that far, else a new one of the
  /// whole file (or up to the window's end, past the end of the file, which
  /// is what a mapping of the window alone would give too).
  private mutating func mapping(
    of file: FileDescriptor, protection: Int32, offset: UInt64, size: UInt64
  ) throws(Errno) -> FileMapping {
    let (end, overflow) = offset.addingReportingOverflow(size)
    guard !overflow, end <= UInt64(Int64.max) else { throw .overflow }
    var status = stat()
    guard fstat(file.rawValue, &status) == 0 else { throw Errno(rawValue: errno) }
    let mayShrink = !cvfu_file_cannot_shrink(file.rawValue)
    if mayShrink {
      let installed = cvfu_guard_install()
      guard installed == 0 else { throw Errno(rawValue: -installed) }
    }
    guard status.st_mode & S_IFMT == S_IFREG else {
      // A device or other special file: its own mapping, as mmap allows it.
      return FileMapping(
        base: try Self.map(file, protection, offset: offset, length: size), length: Int(size),
        key: nil, mayShrink: mayShrink)
    }
    // What mmap would refuse: a shared writable mapping of a file not open
    // for writing, or any mapping of one not open for reading (EACCES). A
    // mapping already made must not lend the window rights its fd lacks.
    let access = fcntl(file.rawValue, F_GETFL) & O_ACCMODE
    guard access == O_RDWR || (access == O_RDONLY && protection & PROT_WRITE == 0) else {
      throw .permissionDenied
    }
    let key = FileMapping.Key(
      device: UInt64(status.st_dev), inode: UInt64(status.st_ino), protection: protection)
    if let current = files[key], end <= UInt64(current.length) { return current }
    // hugetlbfs maps (and unmaps) whole huge pages, its st_blksize.
    let block = UInt64(max(status.st_blksize, 0))
    let page = block.nonzeroBitCount == 1 ? max(Self.systemPage, block) : Self.systemPage
    let fileSize = (UInt64(max(status.st_size, 0)) + page - 1) / page * page
    let length = max(fileSize, end)
    let mapping = FileMapping(
      base: try Self.map(file, protection, offset: 0, length: length), length: Int(length),
      key: key, mayShrink: mayShrink)
    files[key] = mapping  // a smaller one before it lives on in its windows
    return mapping
  }

  private static func map(
    _ file: FileDescriptor, _ protection: Int32, offset: UInt64, length: UInt64
  ) throws(Errno) -> UnsafeMutableRawPointer {
    let p = mmap(
      nil, Int(length), protection == 0 ? PROT_NONE : protection, MAP_SHARED, file.rawValue,
      off_t(Int64(bitPattern: offset)))
    guard let p, p != MAP_FAILED else { throw Errno(rawValue: errno) }
    return p
  }

  /// Adds a window `prepare` made. On overlap (EEXIST) its mapping is released.
  mutating func insert(_ entry: Entry) throws(Errno) {
    guard map.insert(start: entry.window.address, end: entry.window.end, value: entry) else {
      release(entry)
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
    return found.map(\.window)
  }

  /// Removes and releases the windows inside the range (checked by `windows(inside:size:)`).
  mutating func remove(inside address: UInt64, size: UInt64) {
    for entry in map.remove(inside: address, through: address + (size - 1)) ?? [] {
      release(entry)
    }
  }

  /// Removes and releases every window.
  mutating func removeAll() {
    for entry in map.removeAll() { release(entry.value) }
  }

  /// Lets a window that the table no longer holds (or never held) go: its
  /// mapping goes with its last window.
  mutating func release(_ entry: Entry) {
    guard let backing = entry.backing else { return }
    backing.windows -= 1
    guard backing.windows == 0 else { return }
    munmap(backing.base, backing.length)
    if let key = backing.key, files[key] === backing { files[key] = nil }
  }

  /// The window holding `address`, with its mapping.
  @inline(__always)
  func lookup(_ address: UInt64) -> Entry? { map.lookup(address)?.value }
}
