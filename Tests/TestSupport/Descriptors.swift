import CVFIOUser
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

// Leak checks that count one object's descriptors, not all of /proc/self/fd:
// other tests open and close descriptors in parallel, so a count of one
// object stays exact where a total would not.

/// A pipe whose write end is given away: `writerClosed` tells whether every
/// copy of it has been closed, whatever descriptor number it had (a check
/// that a number reused by another test cannot fool).
public final class PipeProbe {
  public let reader: Int32
  public let writer: FileDescriptor

  public init() {
    var ends: [Int32] = [-1, -1]
    precondition(pipe(&ends) == 0)
    reader = ends[0]
    writer = FileDescriptor(rawValue: ends[1])
    _ = fcntl(reader, F_SETFL, O_NONBLOCK)
  }

  /// True once no write end is open anywhere (the reader sees end of file).
  public var writerClosed: Bool {
    var byte: UInt8 = 0
    return read(reader, &byte, 1) == 0
  }

  deinit { _ = close(reader) }
}

/// An eventfd the test keeps; `lend()` gives a device a duplicate it owns.
public final class TestEventFD {
  public let fd: Int32
  public init() {
    fd = cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC)
    precondition(fd >= 0)
  }
  deinit { close(fd) }
  public func lend() -> FileDescriptor { FileDescriptor(rawValue: dup(fd)) }
  /// Reads and clears the counter: how many times it was signalled since.
  public func count() -> Int64 { max(cvfu_eventfd_drain(fd), 0) }
  public func signal() { _ = cvfu_eventfd_signal(fd) }
  /// Descriptors of this process on this eventfd (its own included).
  public var references: Int { eventFDReferences(fd) }
}

/// The `eventfd-id:` line of an eventfd's /proc/self/fdinfo entry (unique
/// per eventfd while a descriptor holds it; all eventfds share one inode), or nil.
public func eventFDIdentity(_ fd: Int32) -> String? {
  let info = open("/proc/self/fdinfo/\(fd)", O_RDONLY | O_CLOEXEC)
  guard info >= 0 else { return nil }
  defer { close(info) }
  var bytes = [UInt8](repeating: 0, count: 512)
  let n = read(info, &bytes, bytes.count)
  guard n > 0 else { return nil }
  return String(decoding: bytes[..<n], as: UTF8.self).split(separator: "\n")
    .first { $0.hasPrefix("eventfd-id:") }.map(String.init)
}

/// Descriptors of this process on the eventfd `fd` refers to.
public func eventFDReferences(_ fd: Int32) -> Int {
  guard let id = eventFDIdentity(fd) else { return -1 }
  return openDescriptors { eventFDIdentity($0) == id }
}

/// Descriptors of this process on the file `fd` refers to (by device and inode).
public func fileReferences(_ fd: Int32) -> Int {
  var target = stat()
  guard fstat(fd, &target) == 0 else { return -1 }
  return openDescriptors {
    var other = stat()
    return fstat($0, &other) == 0 && other.st_dev == target.st_dev && other.st_ino == target.st_ino
  }
}

/// How many open descriptors of this process satisfy `matches`.
public func openDescriptors(_ matches: (Int32) -> Bool) -> Int {
  guard let directory = opendir("/proc/self/fd") else { return -1 }
  defer { closedir(directory) }
  let listing = dirfd(directory)
  var found = 0
  while let entry = readdir(directory) {
    let name = withUnsafeBytes(of: entry.pointee.d_name) {
      String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
    }
    if let fd = Int32(name), fd != listing, matches(fd) { found += 1 }
  }
  return found
}
