import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

extension Errno {
  /// The errno's C name, e.g. "EINVAL" (logs, test expectations, the malformed corpus).
  public var name: String {
    Self.names.first { $0.value == rawValue }?.name ?? "errno \(rawValue)"
  }

  /// The errno for a C name such as "ENOSYS".
  public init?(name: String) {
    guard let entry = Self.names.first(where: { $0.name == name }) else { return nil }
    self.init(rawValue: entry.value)
  }

  private static let names: [(name: String, value: Int32)] = [
    ("EPERM", Glibc.EPERM), ("ENOENT", Glibc.ENOENT), ("EIO", Glibc.EIO), ("E2BIG", Glibc.E2BIG),
    ("EBADF", Glibc.EBADF), ("EAGAIN", Glibc.EAGAIN), ("ENOMEM", Glibc.ENOMEM),
    ("EACCES", Glibc.EACCES),
    ("EFAULT", Glibc.EFAULT), ("EBUSY", Glibc.EBUSY), ("EEXIST", Glibc.EEXIST),
    ("ENODEV", Glibc.ENODEV),
    ("EINVAL", Glibc.EINVAL), ("ENOTTY", Glibc.ENOTTY), ("ENOSPC", Glibc.ENOSPC),
    ("ESPIPE", Glibc.ESPIPE),
    ("EPIPE", Glibc.EPIPE), ("ENOSYS", Glibc.ENOSYS), ("EPROTO", Glibc.EPROTO),
    ("EMSGSIZE", Glibc.EMSGSIZE),
    ("ERANGE", Glibc.ERANGE), ("ENOTSUP", Glibc.ENOTSUP), ("ETIMEDOUT", Glibc.ETIMEDOUT),
    ("EALREADY", Glibc.EALREADY),
    ("ESTALE", Glibc.ESTALE), ("ECANCELED", Glibc.ECANCELED), ("EUCLEAN", Glibc.EUCLEAN),
    ("ECONNRESET", Glibc.ECONNRESET), ("ETIME", Glibc.ETIME),
    ("ENODATA", Glibc.ENODATA), ("EOVERFLOW", Glibc.EOVERFLOW),
    // What opening, reading and writing files and sockets meets (the commands' messages).
    ("ENXIO", Glibc.ENXIO), ("ENOTDIR", Glibc.ENOTDIR), ("EISDIR", Glibc.EISDIR),
    ("ENFILE", Glibc.ENFILE), ("EMFILE", Glibc.EMFILE), ("ETXTBSY", Glibc.ETXTBSY),
    ("EFBIG", Glibc.EFBIG), ("EROFS", Glibc.EROFS), ("ENAMETOOLONG", Glibc.ENAMETOOLONG),
    ("ELOOP", Glibc.ELOOP), ("ENOTSOCK", Glibc.ENOTSOCK), ("EADDRINUSE", Glibc.EADDRINUSE),
    ("ECONNREFUSED", Glibc.ECONNREFUSED), ("ENOTCONN", Glibc.ENOTCONN), ("EDQUOT", Glibc.EDQUOT),
  ]
}
