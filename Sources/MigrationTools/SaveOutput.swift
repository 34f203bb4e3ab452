import Checkpoint
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// Where `save` writes: what the path names, never a replacement for it.
///
/// A regular file (or a path that does not exist yet) is written as a new file
/// beside it and renamed over it only once the checkpoint is complete, so a
/// failed save leaves the old file, or nothing, never a truncated file that
/// looks whole. A symlink is followed, so the file it points to is the one
/// replaced and the link stays. Anything else (a device such as /dev/null, a
/// FIFO, a socket, stdout) is opened and written in place: it is never
/// created, truncated, renamed over or removed.
public final class SaveOutput: SaveFileSink {
  public let name: String
  public let fd: FileDescriptor
  /// The file being written and the path it becomes, for a regular file.
  private let staging: (temporary: String, final: String)?
  private var finished = false
  /// The checkpoint is in place under its name (a regular file renamed over it).
  public private(set) var committed = false
  public private(set) var bytesWritten: UInt64 = 0

  /// "-" is standard output.
  public init(path: String) throws {
    if path == "-" {
      name = "standard output"
      fd = .standardOutput
      staging = nil
      return
    }
    name = path
    var st = stat()
    if stat(path, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
      guard st.st_mode & S_IFMT != S_IFDIR else {
        throw CLIError("\(path) is a directory; name a file to write the checkpoint to")
      }
      do {
        fd = try FileDescriptor.open(path, .writeOnly, options: [.closeOnExec])
      } catch {
        throw EndError(end: "opening \(path)", underlying: error)
      }
      staging = nil
      return
    }
    // A regular file or a new one: stage it in the same directory (rename is atomic there).
    let target = Self.resolveLinks(path)
    let directory = target.lastIndex(of: "/").map { String(target[..<$0]) } ?? "."
    let base =
      target.lastIndex(of: "/").map { String(target[target.index(after: $0)...]) } ?? target
    let folder = directory.isEmpty ? "/" : directory
    Self.removeLeftovers(in: folder, of: base)
    let temporary = "\(folder)/.\(base).\(getpid()).partial"
    do {
      // The checkpoint holds the VF's memory: private to its owner, like an existing file's mode.
      let mode =
        stat(target, &st) == 0 ? FilePermissions(rawValue: st.st_mode & 0o7777) : [.ownerReadWrite]
      fd = try FileDescriptor.open(
        temporary, .writeOnly, options: [.create, .exclusiveCreate, .closeOnExec], permissions: mode
      )
    } catch {
      throw EndError(end: "creating \(path) (as \(temporary) until complete)", underlying: error)
    }
    staging = (temporary, target)
  }

  /// The file being written until the checkpoint is complete, for a regular file.
  public var temporaryPath: String? { finished ? nil : staging?.temporary }

  /// Removes what a `save` to the same file left when it was killed outright
  /// (SIGKILL, a crash, a power cut): `.NAME.PID.partial` beside it, whose
  /// process is gone. A partial file of a save still running is left alone.
  private static func removeLeftovers(in directory: String, of base: String) {
    guard let dir = opendir(directory) else { return }
    defer { closedir(dir) }
    let prefix = ".\(base)."
    let suffix = ".partial"
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) {
        String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
      }
      guard name.hasPrefix(prefix), name.hasSuffix(suffix),
        name.count > prefix.count + suffix.count,
        let pid = pid_t(name.dropFirst(prefix.count).dropLast(suffix.count)), pid > 0,
        kill(pid, 0) != 0, errno == ESRCH
      else { continue }
      let path = "\(directory)/\(name)"
      var st = stat()
      guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFREG, unlink(path) == 0 else {
        continue
      }
      printError("removed \(path), left by a save (pid \(pid)) that did not finish")
    }
  }

  /// Follows symlinks (so the link itself is kept) without requiring the final file to exist.
  private static func resolveLinks(_ path: String) -> String {
    var current = path
    for _ in 0..<40 {
      var st = stat()
      guard lstat(current, &st) == 0, st.st_mode & S_IFMT == S_IFLNK else { return current }
      var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
      let n = readlink(current, &buffer, buffer.count - 1)
      guard n > 0 else { return current }
      let link = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
      if link.hasPrefix("/") {
        current = link
      } else if let slash = current.lastIndex(of: "/") {
        current = String(current[...slash]) + link
      } else {
        current = link
      }
    }
    return current
  }

  public func write(_ bytes: UnsafeRawBufferPointer) throws {
    do { _ = try fd.writeAll(bytes) } catch {
      throw EndError(end: "writing \(name)", underlying: error)
    }
    bytesWritten += UInt64(bytes.count)
  }

  public func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }

  /// Whether the header can be revisited to record the file's length.
  public var seekable: Bool { staging != nil }

  /// Patches `bytes` in at `offset` (only for a staged regular file).
  public func patch(_ bytes: [UInt8], at offset: Int64) throws {
    do {
      _ = try bytes.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: offset, $0) }
    } catch {
      throw EndError(end: "writing \(name)", underlying: error)
    }
  }

  /// Makes the checkpoint durable and puts it in place.
  public func commit() throws {
    guard let staging else { return }
    do {
      guard fsync(fd.rawValue) == 0 else { throw Errno(rawValue: errno) }
      try fd.close()
    } catch {
      throw EndError(end: "writing \(name)", underlying: error)
    }
    finished = true
    guard rename(staging.temporary, staging.final) == 0 else {
      let error = Errno(rawValue: errno)
      unlink(staging.temporary)
      throw EndError(end: "renaming \(staging.temporary) to \(staging.final)", underlying: error)
    }
    committed = true
  }

  /// Drops a checkpoint that did not complete: the staged file is removed; a
  /// device, FIFO or stdout is left as it is.
  public func abandon() {
    guard let staging, !finished else { return }
    finished = true
    try? fd.close()
    unlink(staging.temporary)
  }
}
