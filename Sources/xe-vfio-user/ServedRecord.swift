import MigrationTools
import SystemPackage

#if canImport(Glibc)
  import Glibc
#endif

/// How `list`, `info`, `top` and `metrics` learn which servers run, which
/// device each serves and which migration path it took: the vfio-user
/// protocol has no field for any of it. A server of `--device` writes
/// `<run dir>/<BDF>`, a server of the simulated VF `<run dir>/simulated-<pid>`
/// (pid, socket, control socket, migration path), and holds an exclusive
/// `flock` on it for its life. A
/// record counts only while that lock is held, so a server that died (or
/// could not remove the file after dropping privileges) leaves nothing that
/// looks served. The lock also keeps a second server off the same device.
///
/// The run directory is /run/xe-vfio-user (the systemd unit's
/// RuntimeDirectory), or `XE_VFU_RUN_DIR`.
struct ServedRecord: Codable, Equatable {
  var device: String
  var pid: Int
  /// The socket's absolute path, or "fd N" for `serve --fd`.
  var socket: String
  /// The migration path's summary (`MigrationPlan.summary`), "vfio: ...", "pf-debugfs: ...", "none: ...".
  var migration: String
  /// How the server reached the device: identity, driver and IOMMU path
  /// (`KernelVFIODevice.reach`); absent in older records.
  var opened: String?
  /// The control socket's absolute path; absent without one, and in older records.
  var control: String?
  /// What is served, as `serve` logs it; absent in older records.
  var served: String?

  /// A simulated VF's record name: the server's pid keeps it unique.
  static func simulatedName(pid: Int32) -> String { "simulated-\(pid)" }
  var simulated: Bool { device.hasPrefix("simulated-") }

  static var directory: String {
    getenv("XE_VFU_RUN_DIR").map { String(cString: $0) } ?? "/run/xe-vfio-user"
  }

  var text: String {
    "device=\(device)\npid=\(pid)\nsocket=\(socket)\nmigration=\(migration)\n"
      + (opened.map { "opened=\($0)\n" } ?? "") + (control.map { "control=\($0)\n" } ?? "")
      + (served.map { "served=\($0)\n" } ?? "")
  }

  init(
    device: String, pid: Int, socket: String, migration: String, opened: String? = nil,
    control: String? = nil, served: String? = nil
  ) {
    self.device = device
    self.pid = pid
    self.socket = socket
    self.migration = migration
    self.opened = opened
    self.control = control
    self.served = served
  }

  init?(parsing text: String) {
    var fields: [String: String] = [:]
    for line in text.split(separator: "\n") {
      guard let eq = line.firstIndex(of: "=") else { continue }
      fields[String(line[..<eq])] = String(line[line.index(after: eq)...])
    }
    guard let device = fields["device"], let pid = fields["pid"].flatMap({ Int($0) }),
      let socket = fields["socket"], let migration = fields["migration"]
    else { return nil }
    self.init(
      device: device, pid: pid, socket: socket, migration: migration, opened: fields["opened"],
      control: fields["control"], served: fields["served"])
  }

  /// Writes the record and takes its lock; the descriptor stays open (and
  /// locked) until the process ends. Throws, with what to do, only when
  /// another server holds it; a record that cannot be written (no /run, a
  /// user who may not write there) is only a loss for `list` and `info`, so
  /// that comes back as a warning for the log.
  func claim() throws -> String? {
    let dir = Self.directory
    if mkdir(dir, 0o755) != 0, errno != EEXIST {
      return
        "cannot create \(dir) (\(describe(Errno(rawValue: errno)))): `list` and `info` will not know this server serves \(device)"
    }
    let path = "\(dir)/\(device)"
    let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
    guard fd >= 0 else {
      return
        "cannot write \(path) (\(describe(Errno(rawValue: errno)))): `list` and `info` will not know this server serves \(device)"
    }
    guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
      let holder = Self.read(device)
      close(fd)
      throw CLIError(
        "\(device) is already served\(holder.map { " by pid \($0.pid) on \($0.socket)" } ?? "") (\(path) is locked)"
      )
    }
    let bytes = Array(text.utf8)
    _ = ftruncate(fd, 0)
    _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
    return nil
  }

  /// Removes the record on the way out (a server that can no longer unlink
  /// it leaves an unlocked file, which counts as not served).
  func release() { unlink("\(Self.directory)/\(device)") }

  /// The record of `device` if a live server holds it.
  static func read(_ device: String) -> ServedRecord? {
    let fd = open("\(directory)/\(device)", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    // Shared lock taken: nobody holds the exclusive one, so no server.
    if flock(fd, LOCK_SH | LOCK_NB) == 0 { return nil }
    guard let text = try? readTextFile("\(directory)/\(device)") else { return nil }
    return ServedRecord(parsing: text)
  }

  /// Every live server's record.
  static func all() -> [ServedRecord] { names().compactMap(read) }

  /// Records no live server holds (it died, or could not remove its file),
  /// removed once older than a few seconds (a server writes its record
  /// before it locks it); their names.
  static func removeStale() -> [String] {
    names().filter { name in
      let path = "\(directory)/\(name)"
      let fd = open(path, O_RDONLY | O_CLOEXEC)
      guard fd >= 0 else { return false }
      defer { close(fd) }
      var info = stat()
      guard flock(fd, LOCK_EX | LOCK_NB) == 0, fstat(fd, &info) == 0,
        time(nil) - info.st_mtim.tv_sec > 5
      else { return false }
      return unlink(path) == 0
    }
  }

  private static func names() -> [String] {
    guard let dir = opendir(directory) else { return [] }
    var names: [String] = []
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) {
        String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
      }
      if !name.hasPrefix(".") { names.append(name) }
    }
    closedir(dir)
    return names.sorted()
  }

  /// The live record of the server listening on `socketPath`.
  static func serving(socket socketPath: String) -> ServedRecord? {
    let absolute = absolutePath(socketPath)
    return all().first { $0.socket == absolute }
  }

  static func absolutePath(_ path: String) -> String {
    if let resolved = realpath(path, nil) {
      defer { free(resolved) }
      return String(cString: resolved)
    }
    if path.hasPrefix("/") { return path }
    var buffer = [UInt8](repeating: 0, count: Int(PATH_MAX))
    let found = buffer.withUnsafeMutableBytes {
      getcwd($0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) != nil
    }
    guard found else { return path }
    return String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self) + "/" + path
  }
}
