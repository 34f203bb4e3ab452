import CVFIOUser

#if canImport(Glibc)
  import Glibc
#endif

// Files, directories, links, a condition variable and a thread on plain POSIX
// calls: the executable links no Foundation (BENCHMARKS.md, "Idle memory"),
// and this layer does not depend on the server, whose Threads.swift has the
// same kind of helpers.

package enum POSIX {
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

  /// A whole (small) file as text, or nil when it cannot be read: with read(2),
  /// which the tests use too (Foundation's `String(contentsOfFile:)` leaks its
  /// buffer when the read fails, as a /proc file of a closed descriptor does).
  package static func readText(_ path: String) -> String? {
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
