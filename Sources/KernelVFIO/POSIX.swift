import CVFIOUser

#if canImport(Glibc)
  import Glibc
#endif

// Files, directories, links, a condition variable and a thread on plain POSIX
// calls: the executable links no Foundation (BENCHMARKS.md, "Idle memory"),
// and this layer does not depend on the server, whose Threads.swift has the
// same kind of helpers.

enum POSIX {
  /// The target of a symbolic link, or nil when `path` is none.
  static func readLink(_ path: String) -> String? {
    var buffer = [UInt8](repeating: 0, count: 4096)
    let n = buffer.withUnsafeMutableBytes {
      readlink(path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count)
    }
    guard n > 0 else { return nil }
    return String(decoding: buffer[0..<n], as: UTF8.self)
  }

  /// The last component of a symbolic link's target.
  static func linkName(_ path: String) -> String? {
    readLink(path)?.split(separator: "/").last.map(String.init)
  }

  /// A whole (small) file as text, or nil when it cannot be read.
  static func readText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
      let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
      if n < 0, errno == EINTR { continue }
      guard n > 0 else { break }
      bytes += chunk[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
  }

  /// The names in a directory (without . and ..), sorted; empty when it cannot be read.
  static func list(_ path: String) -> [String] {
    guard let dir = opendir(path) else { return [] }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
      }
      if name != ".", name != ".." { names.append(name) }
    }
    return names.sorted()
  }

  /// Whether `path` exists (following links).
  static func exists(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0
  }

  /// `path` with every link and `..` resolved.
  static func realPath(_ path: String) -> String? {
    guard let resolved = realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
  }

  static func trimmed(_ text: Substring) -> String {
    String(
      text.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
  }
}

/// A mutex with a condition variable whose timed waits use the monotonic clock.
final class KernelCondition: @unchecked Sendable {
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

  init() {
    pthread_mutex_init(mutex, nil)
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(condition, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    pthread_cond_destroy(condition)
    pthread_mutex_destroy(mutex)
    condition.deallocate()
    mutex.deallocate()
  }

  func lock() { pthread_mutex_lock(mutex) }
  func unlock() { pthread_mutex_unlock(mutex) }
  func wait() { pthread_cond_wait(condition, mutex) }
  func broadcast() { pthread_cond_broadcast(condition) }

  /// Waits (lock held) until signalled or `deadline`; false once the deadline passed.
  func wait(until deadline: ContinuousClock.Instant) -> Bool {
    let left = ContinuousClock.now.duration(to: deadline)
    guard left > .zero else { return false }
    let (seconds, attoseconds) = left.components
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    var end = timespec(
      tv_sec: now.tv_sec + Int(min(seconds, Int64(Int32.max))),
      tv_nsec: now.tv_nsec + Int(attoseconds / 1_000_000_000))
    if end.tv_nsec >= 1_000_000_000 {
      end.tv_sec += 1
      end.tv_nsec -= 1_000_000_000
    }
    return pthread_cond_timedwait(condition, mutex, &end) != ETIMEDOUT
  }
}

/// Starts a detached thread running `body`; false when none could be created.
func startKernelThread(name: String, _ body: @escaping @Sendable () -> Void) -> Bool {
  final class Start {
    let name: String
    let body: @Sendable () -> Void
    init(_ name: String, _ body: @escaping @Sendable () -> Void) {
      self.name = name
      self.body = body
    }
  }
  var attributes = pthread_attr_t()
  pthread_attr_init(&attributes)
  defer { pthread_attr_destroy(&attributes) }
  pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
  let start = Unmanaged.passRetained(Start(name, body)).toOpaque()
  var thread = pthread_t()
  let rc = pthread_create(
    &thread, &attributes,
    { argument in
      let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
      _ = cvfu_set_thread_name(start.name)
      start.body()
      return nil
    }, start)
  if rc != 0 { Unmanaged<Start>.fromOpaque(start).release() }
  return rc == 0
}
