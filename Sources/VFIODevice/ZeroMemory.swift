#if canImport(Glibc)
  import Glibc
#endif

/// Address space that reads as zeros and costs no memory: a private,
/// read-only anonymous mapping, every page of it the kernel's one zero page.
/// A save stream hands out spans of it for VRAM that holds nothing (a hole
/// of the VRAM memfd) instead of reading the hole through the VRAM mapping,
/// which would allocate it; the sparse encoder knows such a span is zeros
/// without scanning it.
public enum ZeroMemory {
  /// The longest span of zeros handed out at once (address space only).
  public static let size = 64 << 20

  nonisolated(unsafe) public static let bytes: UnsafeRawBufferPointer = {
    let pointer = mmap(nil, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let pointer, pointer != MAP_FAILED else {
      fatalError("ZeroMemory: mmap of \(size) bytes of address space failed (errno \(errno))")
    }
    return UnsafeRawBufferPointer(start: pointer, count: size)
  }()

  /// Zeros for writing a zero run out as bytes, 64 KiB a write.
  public static var chunk: UnsafeRawBufferPointer {
    UnsafeRawBufferPointer(rebasing: bytes[0..<(64 << 10)])
  }

  /// Whether `span` lies inside `bytes`, so is all zeros.
  public static func holds(_ span: UnsafeRawBufferPointer) -> Bool {
    guard let start = span.baseAddress, let base = bytes.baseAddress else { return false }
    return start >= base && start + span.count <= base + size
  }
}
