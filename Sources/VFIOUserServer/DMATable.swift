import CVFIOUser
import LiveUpdate
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
/// holds it. It keeps a copy of the client's descriptor (one per mapping,
/// not per window), so that a live update can hand the file on.
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
  /// The server's copy of the client's descriptor, closed with the mapping.
  let file: FileDescriptor
  /// Where in the file the mapping starts, and with what protection.
  let fileOffset: UInt64
  let protection: Int32
  var windows = 0

  init(
    base: UnsafeMutableRawPointer, length: Int, key: Key?, mayShrink: Bool, file: FileDescriptor,
    fileOffset: UInt64, protection: Int32
  ) {
    self.base = base
    self.length = length
    self.key = key
    self.mayShrink = mayShrink
    self.file = file
    self.fileOffset = fileOffset
    self.protection = protection
  }

  /// Unmaps it and closes the file.
  func release() {
    munmap(base, length)
    _ = close(file.rawValue)
  }
}

/// What a DMA window's mapping needs of its file's `fstat`: the caller that
/// checked the file hands it on, so a DMA_MAP asks once (a `stat` is 144
/// bytes, copied at every step it is passed; this is 40).
struct FileStatus {
  var isRegularFile: Bool
  var device: UInt64
  var inode: UInt64
  var size: Int64
  var blockSize: Int64

  /// The status of `file` (one fstat).
  init(of file: FileDescriptor) throws(Errno) {
    var status = stat()
    guard fstat(file.rawValue, &status) == 0 else { throw Errno(rawValue: errno) }
    isRegularFile = status.st_mode & S_IFMT == S_IFREG
    device = UInt64(status.st_dev)
    inode = UInt64(status.st_ino)
    size = Int64(status.st_size)
    blockSize = Int64(status.st_blksize)
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
  /// or takes a mapping of it already made. `status` is the file's, when the
  /// caller has just asked for it (nil: asked here). The window is not in the
  /// table yet: `insert` adds it, and `release` undoes this when it cannot.
  mutating func prepare(
    _ request: DMAMapRequest, file: FileDescriptor?, status: FileStatus? = nil
  )
    throws(Errno) -> Entry
  {
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
        of: file, status: status, protection: protection, offset: request.offset,
        size: request.size)
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
  ///
  /// Taking the current mapping costs no question about seals: they belong
  /// to the file and can only be added, so its mapping's `mayShrink` (and
  /// the SIGBUS guard installed for it) still holds. A vIOMMU client's
  /// DMA_MAPs of guest RAM take this path: one fcntl each, no fstat here.
  private mutating func mapping(
    of file: FileDescriptor, status known: FileStatus?, protection: Int32, offset: UInt64,
    size: UInt64
  ) throws(Errno) -> FileMapping {
    let (end, overflow) = offset.addingReportingOverflow(size)
    guard !overflow, end <= UInt64(Int64.max) else { throw .overflow }
    let status: FileStatus
    if let known { status = known } else { status = try FileStatus(of: file) }
    guard status.isRegularFile else {
      // A device or other special file: its own mapping, as mmap allows it.
      let mayShrink = try Self.mayShrink(file)
      let base = try Self.map(file, protection, offset: offset, length: size)
      return try Self.keeping(file, unmapping: base, length: Int(size)) { kept in
        FileMapping(
          base: base, length: Int(size), key: nil, mayShrink: mayShrink, file: kept,
          fileOffset: offset, protection: protection)
      }
    }
    // What mmap would refuse: a shared writable mapping of a file not open
    // for writing, or any mapping of one not open for reading (EACCES). A
    // mapping already made must not lend the window rights its fd lacks.
    let access = fcntl(file.rawValue, F_GETFL) & O_ACCMODE
    guard access == O_RDWR || (access == O_RDONLY && protection & PROT_WRITE == 0) else {
      throw .permissionDenied
    }
    let key = FileMapping.Key(device: status.device, inode: status.inode, protection: protection)
    if let current = files[key], end <= UInt64(current.length) { return current }
    let mayShrink = try Self.mayShrink(file)
    // hugetlbfs maps (and unmaps) whole huge pages, its st_blksize.
    let block = UInt64(max(status.blockSize, 0))
    let page = block.nonzeroBitCount == 1 ? max(Self.systemPage, block) : Self.systemPage
    let fileSize = (UInt64(max(status.size, 0)) + page - 1) / page * page
    let length = max(fileSize, end)
    let base = try Self.map(file, protection, offset: 0, length: length)
    let mapping = try Self.keeping(file, unmapping: base, length: Int(length)) { kept in
      FileMapping(
        base: base, length: Int(length), key: key, mayShrink: mayShrink, file: kept,
        fileOffset: 0, protection: protection)
    }
    files[key] = mapping  // a smaller one before it lives on in its windows
    return mapping
  }

  /// A copy of `file` for a new mapping at `base` (unmapped again if no copy can be made).
  private static func keeping(
    _ file: FileDescriptor, unmapping base: UnsafeMutableRawPointer, length: Int,
    _ make: (FileDescriptor) -> FileMapping
  ) throws(Errno) -> FileMapping {
    let kept = fcntl(file.rawValue, F_DUPFD_CLOEXEC, 0)
    guard kept >= 0 else {
      let error = Errno(rawValue: errno)
      munmap(base, length)
      throw error
    }
    return make(FileDescriptor(rawValue: kept))
  }

  /// Whether the client can cut `file` short under a mapping (no
  /// F_SEAL_SHRINK); if so, the SIGBUS guard the copies through it need is
  /// installed (once per process).
  private static func mayShrink(_ file: FileDescriptor) throws(Errno) -> Bool {
    guard !cvfu_file_cannot_shrink(file.rawValue) else { return false }
    let installed = cvfu_guard_install()
    guard installed == 0 else { throw Errno(rawValue: -installed) }
    return true
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
    backing.release()
    if let key = backing.key, files[key] === backing { files[key] = nil }
  }

  /// The window holding `address`, with its mapping.
  @inline(__always)
  func lookup(_ address: UInt64) -> Entry? { map.lookup(address)?.value }

  // MARK: Live update

  /// Writes every mapping (its file as a descriptor) and every window.
  func exportHandover(into out: inout HandoverEncoder) {
    var mappings: [ObjectIdentifier: Int] = [:]
    var ordered: [FileMapping] = []
    for entry in map.entries {
      guard let backing = entry.value.backing, mappings[ObjectIdentifier(backing)] == nil else {
        continue
      }
      mappings[ObjectIdentifier(backing)] = ordered.count
      ordered.append(backing)
    }
    out.int(ordered.count)
    for backing in ordered {
      out.descriptor(backing.file)
      out.u64(backing.fileOffset)
      out.int(backing.length)
      out.u32(UInt32(bitPattern: backing.protection))
      out.optional(backing.key) { out, key in
        out.u64(key.device)
        out.u64(key.inode)
      }
      out.bool(backing.key.map { files[$0] === backing } ?? false)
      out.bool(backing.mayShrink)
    }
    out.int(map.count)
    for entry in map.entries {
      let window = entry.value.window
      out.u64(window.address)
      out.u64(window.size)
      out.bool(window.readable)
      out.bool(window.writable)
      out.u64(window.fileOffset)
      if let backing = entry.value.backing, let index = mappings[ObjectIdentifier(backing)],
        let pointer = window.mapping
      {
        out.u32(UInt32(index))
        out.int(pointer - backing.base)
      } else {
        out.u32(.max)
        out.int(0)
      }
    }
  }

  /// Rebuilds the table `exportHandover` wrote: each file mapped again
  /// (taking its descriptor from `descriptors`), each window checked and
  /// inserted. The table must be empty.
  mutating func importHandover(
    from input: inout HandoverDecoder, descriptors: inout OwnedFileDescriptors
  ) throws(HandoverRefusal) {
    var mappings: [FileMapping] = []
    defer {
      // Mappings no window took (a corrupt record) go again.
      for mapping in mappings where mapping.windows == 0 { mapping.release() }
    }
    for _ in 0..<(try input.count(itemBytes: 27)) {
      let index = try input.descriptor(count: descriptors.count)
      let fileOffset = try input.u64()
      let length = try input.int()
      let protection = Int32(bitPattern: try input.u32())
      let key = try input.optional { input throws(HandoverRefusal) in
        (try input.u64(), try input.u64())
      }
      let current = try input.bool()
      let mayShrink = try input.bool()
      guard let file = descriptors.take(index), length > 0,
        protection & ~(PROT_READ | PROT_WRITE) == 0
      else { throw input.corrupt() }
      if mayShrink, cvfu_guard_install() != 0 {
        throw HandoverRefusal("cannot install the SIGBUS guard for a client file that may shrink")
      }
      let base: UnsafeMutableRawPointer
      do throws(Errno) {
        base = try Self.map(
          file.descriptor, protection, offset: fileOffset, length: UInt64(length))
      } catch {
        throw HandoverRefusal("cannot map a DMA window's file again: \(error)")
      }
      let mapping = FileMapping(
        base: base, length: length,
        key: key.map { FileMapping.Key(device: $0.0, inode: $0.1, protection: protection) },
        mayShrink: mayShrink, file: file.release(), fileOffset: fileOffset,
        protection: protection)
      mappings.append(mapping)
      if current, let key = mapping.key { files[key] = mapping }
    }
    for _ in 0..<(try input.count(itemBytes: 38)) {
      var window = DMAWindow(
        address: try input.u64(), size: try input.u64(), readable: try input.bool(),
        writable: try input.bool(), fileOffset: try input.u64())
      let index = try input.u32()
      let offset = try input.int()
      var entry = Entry(window: window, backing: nil)
      if index != .max {
        guard Int(index) < mappings.count, offset >= 0,
          UInt64(offset) <= UInt64(mappings[Int(index)].length),
          window.size <= UInt64(mappings[Int(index)].length - offset)
        else { throw input.corrupt() }
        let backing = mappings[Int(index)]
        window.mapping = backing.base + offset
        entry = Entry(window: window, backing: backing)
        backing.windows += 1
      }
      let mask = pageSize - 1
      guard window.size > 0, window.address & mask == 0, window.size & mask == 0,
        window.address <= UInt64.max - window.size, map.count < limit,
        map.insert(start: window.address, end: window.end, value: entry)
      else {
        release(entry)
        throw input.corrupt()
      }
    }
  }
}
