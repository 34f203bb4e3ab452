import CVFIOUser
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

// Files, child processes and number formatting without Foundation: linking
// it makes every process of this binary, `serve` included, megabytes larger.

/// The whole of a small file (such as one under /proc) as text.
public func readTextFile(_ path: String) throws -> String {
  let fd = try FileDescriptor.open(FilePath(path), .readOnly)
  defer { try? fd.close() }
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 4096)
  while true {
    let n = try chunk.withUnsafeMutableBytes { try fd.read(into: $0) }
    if n == 0 { break }
    bytes += chunk[..<n]
  }
  return String(decoding: bytes, as: UTF8.self)
}

/// Replaces the contents of `path` (created if missing) with `text`.
public func writeTextFile(_ path: String, _ text: String) throws {
  let fd = try FileDescriptor.open(
    FilePath(path), .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite])
  try fd.closeAfter { _ = try fd.writeAll(text.utf8) }
}

/// Copies the file at `source` to `destination` (replaced), with `permissions`.
public func copyFile(_ source: String, to destination: String, permissions: FilePermissions) throws
{
  let input = try FileDescriptor.open(FilePath(source), .readOnly)
  defer { try? input.close() }
  let output = try FileDescriptor.open(
    FilePath(destination), .writeOnly, options: [.create, .truncate], permissions: permissions)
  try output.closeAfter {
    let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    defer { chunk.deallocate() }
    while true {
      let n = try input.read(into: chunk)
      if n == 0 { break }
      _ = try output.writeAll(UnsafeRawBufferPointer(rebasing: chunk[..<n]))
    }
  }
}

/// The value of the `field` line of /proc/`pid`/status in KiB (VmRSS, RssAnon...).
public func procStatusKiB(_ field: String, pid: String = "self") -> Int? {
  guard let status = try? readTextFile("/proc/\(pid)/status"),
    let line = status.split(separator: "\n").first(where: { $0.hasPrefix("\(field):") })
  else { return nil }
  let words = line.split(separator: " ", omittingEmptySubsequences: true)
  return words.count > 1 ? Int(words[1]) : nil
}

/// The path of the running executable.
public func currentExecutable() -> String {
  var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
  let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
  guard n > 0 else { return CommandLine.arguments[0] }
  return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A child process started with posix_spawn: no descriptors but standard
/// input, output and error are inherited, and no signal is blocked in it.
public struct ChildProcess {
  public let pid: pid_t

  public init(_ executable: String, _ arguments: [String], silenceStandardError: Bool = false)
    throws(Errno)
  {
    let silence = silenceStandardError ? open("/dev/null", O_WRONLY | O_CLOEXEC) : -1
    defer { if silence >= 0 { close(silence) } }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { for pointer in argv { free(pointer) } }
    var pid: pid_t = 0
    let dups: [Int32] = silence >= 0 ? [silence, 2] : []
    let rc = cvfu_spawn(&pid, executable, argv, nil, dups, Int32(dups.count / 2), 3, 0)
    guard rc == 0 else { throw Errno(rawValue: rc) }
    self.pid = pid
  }

  public func interrupt() { kill(pid, SIGINT) }

  /// Waits for the child to end; returns its wait status.
  @discardableResult public func wait() -> Int32 {
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    return status
  }
}

extension String {
  /// printf-style formatting of numbers (`%.2f`, `%d`...), like Foundation's
  /// `String(format:)` in the C locale; `%@` is not supported.
  public init(printf format: String, _ arguments: CVarArg...) {
    var capacity = 64
    while true {
      var buffer = [CChar](repeating: 0, count: capacity)
      let n = withVaList(arguments) { Int(vsnprintf(&buffer, capacity, format, $0)) }
      if n < 0 {
        self = format
        return
      }
      if n < capacity {
        self = String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return
      }
      capacity = n + 1
    }
  }
}

/// Whether two socket paths name one socket, however each is spelled (a
/// symlink, a relative path): the same device and inode. Paths that do not
/// exist are the same only when spelled the same.
public func sameSocket(_ a: String, _ b: String) -> Bool {
  var first = stat()
  var second = stat()
  guard stat(a, &first) == 0, stat(b, &second) == 0 else { return a == b }
  return first.st_dev == second.st_dev && first.st_ino == second.st_ino
}
