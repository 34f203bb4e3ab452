import CVFIOUser
import Glibc
import SystemPackage
import VFIODevice
import VFIOUser

/// The memory the DMA engine copies to and from: VRAM (BAR2) or, on profiles
/// without VRAM, a small SRAM block reached through BAR0.
///
/// VRAM is a memfd mapped MAP_SHARED, so the client can map the same pages
/// through the fd the region description carries. Nothing touches the pages
/// at creation: they are allocated on first access and idle RSS stays small.
/// An FLR scrubs it, as the real PF's RESET_CONFIG step sanitizes the VF's
/// LMEM (IGT's `xe_sriov_flr` checks LMEM, GGTT and scratch registers are
/// clear after a VF FLR): one client never sees the VRAM another wrote.
final class DeviceMemory {
  let base: UnsafeMutableRawPointer
  let size: UInt64
  /// The memfd behind VRAM, or -1 for SRAM.
  let fd: Int32

  private init(base: UnsafeMutableRawPointer, size: UInt64, fd: Int32) {
    self.base = base
    self.size = size
    self.fd = fd
  }

  /// `size` bytes of zeroed, shareable VRAM.
  static func vram(size: UInt64, name: String) throws(Errno) -> DeviceMemory {
    let fd = cvfu_memfd_create(name, 1)  // MFD_CLOEXEC (needs _GNU_SOURCE, not imported)
    guard fd >= 0 else { throw Errno(rawValue: -fd) }
    guard ftruncate(fd, off_t(size)) == 0 else {
      let error = Errno(rawValue: errno)
      close(fd)
      throw error
    }
    let pointer = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    guard let pointer, pointer != UnsafeMutableRawPointer(bitPattern: -1) else {
      let error = Errno(rawValue: errno)
      close(fd)
      throw error
    }
    return DeviceMemory(base: pointer, size: size, fd: fd)
  }

  /// The VRAM memfd `fd` (`size` bytes, checked by the caller), mapped
  /// MAP_SHARED: the same pages as every other mapping of the file (a live
  /// update's old process, the client's BAR2 mmap).
  static func vram(adopting fd: consuming OwnedFileDescriptor, size: UInt64) throws(Errno)
    -> DeviceMemory
  {
    let pointer = mmap(
      nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd.descriptor.rawValue, 0)
    guard let pointer, pointer != UnsafeMutableRawPointer(bitPattern: -1) else {
      throw Errno(rawValue: errno)  // `fd` closes as it goes
    }
    return DeviceMemory(base: pointer, size: size, fd: fd.release().rawValue)
  }

  /// `size` bytes of zeroed private memory.
  static func sram(size: UInt64) -> DeviceMemory {
    let pointer = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
    pointer.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
    return DeviceMemory(base: pointer, size: size, fd: -1)
  }

  deinit {
    if fd >= 0 {
      munmap(base, Int(size))
      close(fd)
    } else {
      base.deallocate()
    }
  }

  /// Zeroes the memory. VRAM's pages go back to the kernel (a hole punched in
  /// the memfd costs nothing and the client's mapping then reads zeros).
  func scrub() {
    if fd >= 0, cvfu_punch_hole(fd, 0, Int64(size)) == 0 { return }
    base.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
  }

  /// Zeroes `length` bytes at `offset` (checked by the caller). A long run
  /// of VRAM's whole pages is punched out of the memfd (no page is touched,
  /// and the pages go back to the kernel); a short one is cheaper to memset,
  /// as each punch also unmaps the pages from every mapping (a TLB flush).
  func zero(offset: UInt64, length: UInt64) {
    let page: UInt64 = 4096
    let first = (offset + page - 1) & ~(page - 1)
    let last = (offset + length) & ~(page - 1)
    if fd >= 0, last > first, last - first >= Self.punchAtLeast,
      cvfu_punch_hole(fd, Int64(first), Int64(last - first)) == 0
    {
      buffer(offset: offset, length: first - offset).initializeMemory(as: UInt8.self, repeating: 0)
      buffer(offset: last, length: offset + length - last).initializeMemory(
        as: UInt8.self, repeating: 0)
      return
    }
    buffer(offset: offset, length: length).initializeMemory(as: UInt8.self, repeating: 0)
  }

  /// Punches the whole pages between `from` and `to` (checked by the caller)
  /// out of VRAM's memfd; returns them, or nil where nothing was punched
  /// (no whole page, SRAM, or the kernel refused).
  func punchPages(from: UInt64, to: UInt64) -> Range<UInt64>? {
    let page: UInt64 = 4096
    let first = (from + page - 1) & ~(page - 1)
    let last = to & ~(page - 1)
    guard fd >= 0, last > first, cvfu_punch_hole(fd, Int64(first), Int64(last - first)) == 0
    else { return nil }
    return first..<last
  }

  /// Runs of zeros shorter than this are memset rather than punched.
  static let punchAtLeast: UInt64 = 1 << 20

  func contains(offset: UInt64, length: UInt64) -> Bool {
    offset <= size && length <= size - offset
  }

  /// The bytes at `offset`; the caller has checked `contains`.
  func buffer(offset: UInt64, length: UInt64) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: base + Int(offset), count: Int(length))
  }
}

/// VRAM as a save stream reads it. A hole of the VRAM memfd (never written,
/// or punched by a reset or a restored zero run) read through the mapping
/// would be allocated: shmem maps no zero page, so saving a VF whose VRAM is
/// mostly unwritten used to grow the server by the whole VRAM, and paid a
/// page fault for every page of nothing. So bytes are copied with pread
/// (a hole reads as zeros, unallocated), and handed out in place only where
/// that allocates nothing: from the mapping when every page is in the page
/// cache (mincore), from `ZeroMemory` when SEEK_DATA finds no data in them.
/// Nothing is remembered between reads: a few system calls a read, however
/// data and holes interleave.
struct VRAMReader {
  let memory: DeviceMemory

  init(_ memory: DeviceMemory) { self.memory = memory }

  /// Copies the `target.count` bytes at `offset` (checked by the caller), holes as zeros.
  func copy(from offset: UInt64, into target: UnsafeMutableRawBufferPointer) {
    guard !target.isEmpty else { return }
    if memory.fd >= 0,
      cvfu_pread_all(memory.fd, target.baseAddress, target.count, Int64(offset)) == 0
    {
      return
    }
    // SRAM, or a pread the kernel refused: the mapping has the same bytes.
    target.copyMemory(
      from: UnsafeRawBufferPointer(memory.buffer(offset: offset, length: UInt64(target.count))))
  }

  /// The `count` bytes at `offset` (checked by the caller) where they are,
  /// if reading them there allocates nothing: VRAM's mapping when all its
  /// pages are allocated, `ZeroMemory` when they are all a hole; nil when
  /// data and holes mix (the caller copies them).
  func span(at offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
    let mapped = UnsafeRawBufferPointer(memory.buffer(offset: offset, length: UInt64(count)))
    guard memory.fd >= 0, count > 0 else { return mapped }
    if cvfu_all_resident(mapped.baseAddress, count) == 1 { return mapped }
    let data = cvfu_seek_data(memory.fd, Int64(offset))
    let noData = data == -Int64(ENXIO) || (data >= 0 && UInt64(data) >= offset + UInt64(count))
    guard noData, count <= ZeroMemory.size else { return nil }
    return UnsafeRawBufferPointer(rebasing: ZeroMemory.bytes[0..<count])
  }
}
