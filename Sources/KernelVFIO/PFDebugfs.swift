import SystemPackage

/// Why the PF's debugfs controls cannot migrate a VF: one line a person can act on.
public struct PFDebugfsUnavailable: Error, Equatable, Sendable, CustomStringConvertible {
  public enum Kind: String, Sendable, Equatable {
    case notAVF = "not a VF"
    case pfNotXe = "PF not driven by xe"
    case noDebugfs = "no debugfs"
    case notMounted = "debugfs not mounted"
    case notRoot = "debugfs needs root"
    case oldLayout = "pre-6.18 debugfs layout"
    case noSRIOV = "no sriov directory"
    case noVFDirectory = "no VF directory"
    case noMigration = "PF without migration"
    case openFailed = "cannot open the controls"
  }

  public var kind: Kind
  public var message: String

  public init(_ kind: Kind, _ message: String) {
    self.kind = kind
    self.message = message
  }

  public var description: String { message }
}

/// Where a VF's controls live: its PF, its number there, and its debugfs directory.
public struct PFDebugfsLocation: Sendable, Equatable {
  public var vf: PCIAddress
  public var pf: PCIAddress
  /// The debugfs name's number: the PF's `virtfnN` link plus one (`vf1` is `virtfn0`).
  public var vfNumber: Int
  public var directory: String

  public init(vf: PCIAddress, pf: PCIAddress, vfNumber: Int, directory: String) {
    self.vf = vf
    self.pf = pf
    self.vfNumber = vfNumber
    self.directory = directory
  }

  /// Finds the controls of `vf` from sysfs and debugfs, or says why there
  /// are none. Listing goes through `files` because debugfs answers a
  /// non-root user EACCES (the tree is mode 0700).
  public static func find(
    vf address: PCIAddress, paths: SystemPaths, files: any PFControlFileSystem
  ) -> Result<PFDebugfsLocation, PFDebugfsUnavailable> {
    guard let vf = paths.pciDevice(at: address), let pf = vf.physfn else {
      return .failure(
        .init(
          .notAVF,
          "\(address) is not an SR-IOV VF (no physfn link): only a VF is migrated by its PF"))
    }
    let pfDriver = paths.pciDevice(at: pf)?.driver
    guard pfDriver == "xe" else {
      return .failure(
        .init(
          .pfNotXe,
          "the PF \(pf) is driven by \(pfDriver ?? "no driver"), not xe: only the xe PF driver has per-VF migration controls"
        ))
    }
    guard let index = paths.virtfnIndex(of: address, pf: pf) else {
      return .failure(
        .init(.notAVF, "the PF \(pf) has no virtfnN link to \(address): is SR-IOV still enabled?"))
    }
    let debug = "\(paths.sys)/kernel/debug"
    guard paths.exists(debug) else {
      return .failure(
        .init(
          .noDebugfs,
          "\(debug) does not exist: the kernel is built without CONFIG_DEBUG_FS, so the PF's controls are not there"
        ))
    }
    guard paths.debugfsMounted else {
      return .failure(
        .init(
          .notMounted,
          "debugfs is not mounted on /sys/kernel/debug: `mount -t debugfs none /sys/kernel/debug` (as root)"
        ))
    }
    let dri = "\(debug)/dri"
    switch files.list(dri) {
    case .failure(let error) where error == .permissionDenied:
      return .failure(
        .init(
          .notRoot,
          "\(dri): permission denied. debugfs is root's alone (mode 0700): start the server as root (it opens the controls first and keeps them when it drops to --user)"
        ))
    case .failure(let error):
      return .failure(
        .init(.noDebugfs, "\(dri): \(error.name): is the xe driver loaded and debugfs mounted?"))
    case .success(let entries):
      let sriov = "\(dri)/\(pf)/sriov"
      guard case .success = files.list(sriov) else {
        if let old = oldLayout(entries, dri: dri, pf: pf, paths: paths, files: files) {
          return .failure(
            .init(
              .oldLayout,
              "\(old) is the per-GT debugfs layout of kernels before 6.18, which has no save or restore controls: migrating through the PF needs Linux 6.18 or later (6.19 for xe-vfio-pci)"
            ))
        }
        return .failure(
          .init(
            .noSRIOV,
            "\(sriov) does not exist: the PF \(pf) is not in SR-IOV PF mode (xe.max_vfs=0?) or its kernel predates the per-VF controls"
          ))
      }
      let directory = "\(sriov)/vf\(index + 1)"
      guard case .success(let names) = files.list(directory) else {
        return .failure(
          .init(
            .noVFDirectory,
            "\(directory) does not exist: the PF lists no VF \(index + 1) (are its VFs enabled? sriov_numvfs)"
          ))
      }
      let missing = PFControl.allCases.filter { !names.contains($0.rawValue) }
      guard missing.isEmpty else {
        return .failure(
          .init(
            missing.contains(where: PFControl.migration.contains) ? .noMigration : .noVFDirectory,
            "\(directory) lacks \(missing.map(\.rawValue).joined(separator: ", ")): the PF offers no migration for its VFs (the xe PF disables it without memory-based IRQs or with GuC firmware older than 70.54.0; its dmesg says which)"
          ))
      }
      return .success(
        PFDebugfsLocation(vf: address, pf: pf, vfNumber: index + 1, directory: directory))
    }
  }

  /// The directory of the per-GT tree (`dri/<minor>/gt0/vf1`) if this PF has one.
  static func oldLayout(
    _ entries: [String], dri: String, pf: PCIAddress, paths: SystemPaths,
    files: any PFControlFileSystem
  ) -> String? {
    for entry in entries {
      let base = "\(dri)/\(entry)"
      // The minor's directory says whose it is in `name` ("xe dev=0000:03:00.0 ...").
      let owner = entry == "\(pf)" || (paths.firstLine("\(base)/name")?.contains("\(pf)") ?? false)
      guard owner, case .success(let gts) = files.list(base) else { continue }
      for gt in gts where gt.hasPrefix("gt") {
        if case .success(let vfs) = files.list("\(base)/\(gt)"), vfs.contains(where: isVFName) {
          return "\(base)/\(gt)"
        }
      }
    }
    return nil
  }

  static func isVFName(_ name: String) -> Bool {
    name.hasPrefix("vf") && Int(name.dropFirst(2)) != nil
  }
}

extension SystemPaths {
  /// N of the PF's `virtfnN` link that points at `vf`.
  public func virtfnIndex(of vf: PCIAddress, pf: PCIAddress) -> Int? {
    for name in listing(pciDevice(pf)) where name.hasPrefix("virtfn") {
      if let n = Int(name.dropFirst(6)), linkName("\(pciDevice(pf))/\(name)") == "\(vf)" {
        return n
      }
    }
    return nil
  }

  /// Whether a debugfs is mounted on /sys/kernel/debug (the mount table in `proc`).
  var debugfsMounted: Bool {
    let table = POSIX.readText("\(proc)/mounts") ?? ""
    return table.split(separator: "\n").contains { line in
      let fields = line.split(separator: " ")
      return fields.count > 2 && fields[1] == "/sys/kernel/debug" && fields[2] == "debugfs"
    }
  }
}

/// The VF's control files, opened once when serving starts and kept, so they
/// work after the server drops root.
public final class PFVFControls: @unchecked Sendable {
  public let location: PFDebugfsLocation
  let files: [PFControl: any PFControlFile]

  /// Opens every control file of `location`, then reads `migration_size`
  /// once: a PF whose migration is off fails that read.
  public static func open(_ location: PFDebugfsLocation, files: any PFControlFileSystem)
    -> Result<PFVFControls, PFDebugfsUnavailable>
  {
    var opened: [PFControl: any PFControlFile] = [:]
    for control in PFControl.allCases {
      let path = "\(location.directory)/\(control.rawValue)"
      switch files.open(path, control) {
      case .success(let file): opened[control] = file
      case .failure(let error):
        return .failure(
          .init(
            error == .permissionDenied ? .notRoot : .openFailed,
            "cannot open \(path): \(error.name)\(error == .permissionDenied ? " (debugfs is root's alone)" : "")"
          ))
      }
    }
    let controls = PFVFControls(location: location, files: opened)
    do throws(Errno) {
      _ = try controls.migrationSize()
    } catch {
      return .failure(
        .init(
          .noMigration,
          "reading \(location.directory)/migration_size failed (\(error.name)): the PF does not migrate this VF"
        ))
    }
    return .success(controls)
  }

  init(location: PFDebugfsLocation, files: [PFControl: any PFControlFile]) {
    self.location = location
    self.files = files
  }

  func file(_ control: PFControl) -> any PFControlFile { files[control]! }

  /// Every control file's descriptor (lent), in `PFControl.allCases`
  /// order, for a live update; nil when one is not a descriptor.
  public var handoverDescriptors: [FileDescriptor]? {
    let descriptors = PFControl.allCases.compactMap { files[$0]?.descriptor }
    return descriptors.count == PFControl.allCases.count ? descriptors : nil
  }

  /// The controls another process opened, handed over by a live update:
  /// `descriptors` in `PFControl.allCases` order, owned from here.
  public static func adopt(_ location: PFDebugfsLocation, descriptors: [FileDescriptor])
    -> PFVFControls
  {
    precondition(descriptors.count == PFControl.allCases.count)
    var files: [PFControl: any PFControlFile] = [:]
    for (control, fd) in zip(PFControl.allCases, descriptors) {
      files[control] = DescriptorControlFile(fd: fd.rawValue)
    }
    return PFVFControls(location: location, files: files)
  }

  /// Writes the boolean "1" (the controls take `kstrtobool`, not words).
  public func trigger(_ control: PFControl) throws(Errno) {
    let written = [UInt8]("1\n".utf8).withUnsafeBytes { file(control).pwrite($0, at: 0) }
    _ = try written.get()
  }

  /// Reads `save` or `restore` to finish the operation: empty on success,
  /// the PF's errno otherwise.
  public func finish(_ control: PFControl) throws(Errno) {
    var buffer = [UInt8](repeating: 0, count: 16)
    _ = try buffer.withUnsafeMutableBytes { file(control).pread(into: $0, at: 0) }.get()
  }

  /// `migration_size`: "%zd\n" of the PF's estimate.
  public func migrationSize() throws(Errno) -> UInt64 {
    var buffer = [UInt8](repeating: 0, count: 32)
    let n = try buffer.withUnsafeMutableBytes { file(.migrationSize).pread(into: $0, at: 0) }.get()
    let text = String(decoding: buffer[0..<n], as: UTF8.self)
    let number = text.split(separator: "\n").first.map(String.init) ?? ""
    guard let size = Int64(number) else { throw .ioError }
    guard size >= 0 else { throw Errno(rawValue: Int32(truncatingIfNeeded: -size)) }
    return UInt64(size)
  }

  /// `migration_data`, as the stream's system calls: always at position 0
  /// (the PF's handlers never advance it, and answer ESPIPE elsewhere). The
  /// file stays open when the stream ends.
  var dataIO: any StreamIO { DataFileIO(file: file(.migrationData)) }
}

private struct DataFileIO: StreamIO {
  let file: any PFControlFile
  func read(into buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Errno> {
    file.pread(into: buffer, at: 0)
  }
  func write(_ bytes: UnsafeRawBufferPointer) -> Result<Int, Errno> { file.pwrite(bytes, at: 0) }
  func close() {}
}
