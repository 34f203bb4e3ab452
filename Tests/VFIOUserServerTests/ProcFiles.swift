import Glibc

/// Reads small `/proc` files with plain read(2). Foundation's
/// `String(contentsOfFile:)` leaks its buffer when the read fails, which it does
/// whenever the descriptor an fdinfo file describes is closed meanwhile (a server
/// thread closing a descriptor while a test looks), and LeakSanitizer fails the run.
enum ProcFiles {
  /// The file's text, or nil when it cannot be opened or read.
  static func text(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
      let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
      if count < 0 {
        if errno == EINTR { continue }
        return nil
      }
      if count == 0 { break }
      bytes += chunk[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
  }
}
