import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// The per-VF control files of the Xe PF's debugfs tree,
/// `/sys/kernel/debug/dri/<PF>/sriov/vf<N>/` (protocol/xe-kernel-facts.md §8).
public enum PFControl: String, CaseIterable, Sendable {
  case pause, resume, stop, reset, save, restore
  case migrationData = "migration_data"
  case migrationSize = "migration_size"

  /// How the file is opened: the bool controls are write-only (0200);
  /// `save` and `restore` are also read to finish, and `migration_data` is
  /// read on a save and written on a restore (0600); `migration_size` is 0400.
  public var openFlags: Int32 {
    switch self {
    case .pause, .resume, .stop, .reset: O_WRONLY
    case .save, .restore, .migrationData: O_RDWR
    case .migrationSize: O_RDONLY
    }
  }

  /// The files that carry migration: without them the PF offers none.
  public static let migration: [PFControl] = [.save, .restore, .migrationData, .migrationSize]
}

/// One opened control file. The files are regular debugfs files, but not
/// files in the usual sense: a read of `migration_data` blocks until the PF
/// has produced data, `save` and `restore` are read to finish an operation,
/// and each call at a nonzero position fails (EINVAL, or ESPIPE for
/// `migration_data`). So every call names its position, and is always 0.
public protocol PFControlFile: AnyObject, Sendable {
  func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Result<Int, Errno>
  func pwrite(_ bytes: UnsafeRawBufferPointer, at offset: Int64) -> Result<Int, Errno>
  /// The open file's descriptor (lent), which a live update hands to the
  /// next process (debugfs is root's; the next process may not be); nil
  /// for a file that is not one.
  var descriptor: FileDescriptor? { get }
}

extension PFControlFile {
  public var descriptor: FileDescriptor? { nil }
}

/// Where the control files come from: the real debugfs through POSIX calls
/// (`POSIXControlFiles`), or, in tests, a fake tree whose files behave as
/// the PF's do. Directory listings of debugfs go through here too, since
/// what they fail with (EACCES for a non-root user) is part of the diagnosis.
public protocol PFControlFileSystem: Sendable {
  func open(_ path: String, _ control: PFControl) -> Result<any PFControlFile, Errno>
  /// The names in `directory`, sorted.
  func list(_ directory: String) -> Result<[String], Errno>
}

/// The real files: open(2), pread(2), pwrite(2), opendir(3).
public struct POSIXControlFiles: PFControlFileSystem {
  public init() {}

  public func open(_ path: String, _ control: PFControl) -> Result<any PFControlFile, Errno> {
    let fd = Glibc.open(path, control.openFlags | O_CLOEXEC)
    guard fd >= 0 else { return .failure(Errno(rawValue: errno)) }
    return .success(DescriptorControlFile(fd: fd))
  }

  public func list(_ directory: String) -> Result<[String], Errno> {
    guard let dir = opendir(directory) else { return .failure(Errno(rawValue: errno)) }
    closedir(dir)
    return .success(POSIX.list(directory))
  }
}

/// A control file held open for the server's life, so that it keeps working
/// after the server drops its privileges.
final class DescriptorControlFile: PFControlFile {
  let fd: Int32
  init(fd: Int32) { self.fd = fd }
  deinit { close(fd) }

  var descriptor: FileDescriptor? { FileDescriptor(rawValue: fd) }

  func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Result<Int, Errno> {
    while true {
      let n = Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset))
      if n >= 0 { return .success(n) }
      if errno != EINTR { return .failure(Errno(rawValue: errno)) }
    }
  }

  func pwrite(_ bytes: UnsafeRawBufferPointer, at offset: Int64) -> Result<Int, Errno> {
    while true {
      let n = Glibc.pwrite(fd, bytes.baseAddress, bytes.count, off_t(offset))
      if n >= 0 { return .success(n) }
      if errno != EINTR { return .failure(Errno(rawValue: errno)) }
    }
  }
}
