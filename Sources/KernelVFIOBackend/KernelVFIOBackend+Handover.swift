import KernelVFIO
import Logging
import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// A live update's progress in one backend.
struct KernelHandoverProgress {
  /// The windows whose vaddr this process invalidated in its export, by
  /// address: restored if the update is called off.
  var invalidated: [DMAWindow] = []
  /// In a backend a live update brought: the windows the IOMMU holds for
  /// the client, waiting for this process's addresses (`adoptDMAWindows`).
  var awaitingAddresses: [DMAWindow]?
}

/// How an imported kernel device's descriptors become objects again: the
/// kernel's (`live`), or in tests fakes over the same descriptors.
public struct KernelHandoverAdoption {
  /// The device file over the device fd handed over (owned from here).
  public var deviceFile: (FileDescriptor) -> any VFIODeviceFile
  /// The IOMMU domain over the descriptors handed over (owned from here;
  /// type1: the container, then the group) and the group's number.
  public var iommu:
    (_ kind: IOMMUHandover.Kind, _ descriptors: [FileDescriptor], _ group: Int)
      throws(KernelVFIOError) -> IOMMUDomain
  /// Where sysfs is, to read the device's facts again.
  public var paths: SystemPaths

  public init(
    deviceFile: @escaping (FileDescriptor) -> any VFIODeviceFile,
    iommu:
      @escaping (IOMMUHandover.Kind, [FileDescriptor], Int) throws(KernelVFIOError) ->
      IOMMUDomain,
    paths: SystemPaths = .live
  ) {
    self.deviceFile = deviceFile
    self.iommu = iommu
    self.paths = paths
  }

  /// The device fd as a `POSIXDeviceFile`, the container and group as a `Type1Container`.
  public static var live: KernelHandoverAdoption {
    KernelHandoverAdoption(
      deviceFile: { POSIXDeviceFile(adopting: $0.rawValue) },
      iommu: { (kind, descriptors, group) throws(KernelVFIOError) -> IOMMUDomain in
        switch kind {
        case .type1:
          try Type1Container(
            adoptingContainer: OwnedFileDescriptor(taking: descriptors[0]),
            group: OwnedFileDescriptor(taking: descriptors[1]), groupNumber: group)
        }
      })
  }
}

/// Live update of a device behind the kernel's VFIO (protocol/live-update-device.md,
/// "The kernel backend"). The kernel holds the device, its interrupts (the
/// eventfds VFIO_DEVICE_SET_IRQS took) and the IOMMU's mappings; what
/// crosses to the new process is the descriptors that reach them (the device
/// fd, the container and group), what this adapter keeps (the migration
/// path and its state, the PF's debugfs control files, the dirty page log),
/// and the list of DMA windows in the IOMMU. The windows stay mapped across
/// the exec: the export invalidates this process's addresses of the client's
/// memory (VFIO_DMA_UNMAP_FLAG_VADDR), the device's DMA going on meanwhile,
/// and the new process names its own (`adoptDMAWindows`,
/// VFIO_DMA_MAP_FLAG_VADDR); an update called off names this process's again
/// (`handoverAbandoned`).
extension KernelVFIOBackend: HandoverCapable {
  /// What the blob is: "xe-vf kernel", NUL-padded to 16 bytes.
  public static let handoverKind: [UInt8] =
    Array("xe-vf kernel".utf8) + [UInt8](repeating: 0, count: 4)
  /// The format this server writes, and the only one it reads.
  public static let handoverVersion: UInt32 = 1

  /// The blob's sections, each exactly once, in this order.
  enum HandoverSection: UInt32, CaseIterable {
    case device = 1
    case iommu, migration, windows, dirtyLog

    var name: String {
      switch self {
      case .device: "device"
      case .iommu: "IOMMU"
      case .migration: "migration"
      case .windows: "DMA windows"
      case .dirtyLog: "dirty page log"
      }
    }
  }

  enum HandoverPlan: UInt8 {
    case absent = 0
    case vfio = 1
    case pfDebugfs = 2
  }

  /// The windows in the IOMMU, in address order.
  var iommuWindows: [DMAWindow] { mappedWindows.values.sorted { $0.address < $1.address } }

  /// Why the device cannot be handed over now; nil when it can.
  ///
  /// Refused: the iommufd path (IOMMU_IOAS_CHANGE_PROCESS moves only file
  /// mappings); DMA windows in a container without VFIO_UPDATE_VADDR (a
  /// kernel before 5.12, or a container holding an mdev); a migration
  /// stream open (STOP_COPY, RESUMING, PRE_COPY*); PF controls that are not
  /// descriptors. Everything at rest is carried.
  public var handoverRefusal: String? {
    guard device.iommu.handover != nil else {
      if let why = device.iommu.vaddrUpdateRefusal { return why }
      return "the IOMMU domain (\(device.iommu.path)) cannot be handed to a new process"
    }
    if !mappedWindows.isEmpty, let why = device.iommu.vaddrUpdateRefusal {
      return "\(why) (\(mappedWindows.count) DMA windows are mapped)"
    }
    if let vfio = self as? MigratableKernelVFIOBackend, !vfio.failed {
      if vfio.migration?.stream != nil {
        return
          "a migration stream is open (the kernel's data_fd): finish or cancel the migration first"
      }
      if let state = try? device.migrationState(), Self.streamStates.contains(state) {
        return
          "the device is in \(state), where the kernel keeps a migration stream: finish or cancel the migration first"
      }
    }
    if let pf = self as? PFMigratedKernelVFIOBackend {
      if !pf.pfMigration.failed, Self.streamStates.contains(pf.pfMigration.state) {
        return
          "a migration through the PF is under way (the device is in \(pf.pfMigration.state)): finish or cancel the migration first"
      }
      if pf.pfMigration.controls.handoverDescriptors == nil {
        return "the PF's debugfs control files are not open descriptors to hand over"
      }
    }
    return nil
  }

  static let streamStates: [MigrationState] = [.stopCopy, .resuming, .preCopy, .preCopyP2P]

  /// The backend's state, and this process's addresses of the windows
  /// invalidated (the IOVAs stay mapped). The descriptors are lent.
  public func exportHandover() throws(HandoverRefusal) -> HandoverState {
    if let reason = handoverRefusal { throw HandoverRefusal(reason) }
    guard let iommu = device.iommu.handover else {
      throw HandoverRefusal("the IOMMU domain cannot be handed to a new process")
    }
    var writer = ByteWriter(capacity: 4096)
    var descriptors: [FileDescriptor] = []
    writer.append(Self.handoverKind)
    writer.append(Self.handoverVersion)
    let windows = iommuWindows
    for section in HandoverSection.allCases {
      var body = ByteWriter()
      export(section, into: &body, descriptors: &descriptors, iommu: iommu, windows: windows)
      writer.append(section.rawValue)
      writer.append(UInt64(body.count))
      writer.append(body.bytes)
    }
    // Last, so that nothing fails after it: the device's DMA goes on, and
    // the kernel pins nothing new for these windows until an address is named.
    for window in windows {
      do throws(Errno) {
        try device.iommu.invalidateVaddr(iova: window.address, size: window.size)
        handover.invalidated.append(window)
      } catch {
        restoreAddresses()
        let mdev =
          error == .resourceBusy ? " (EBUSY: the container holds a mediated device)" : ""
        throw HandoverRefusal(
          "the IOMMU would not let \(Self.describe(window)) keep its mapping across the update (VFIO_DMA_UNMAP_FLAG_VADDR: \(error.name)\(mdev))"
        )
      }
    }
    logger.debug("live update: \(windows.count) DMA windows wait for the next process's addresses")
    return HandoverState(bytes: writer.bytes, descriptors: descriptors)
  }

  /// The update was called off after the export: this process's addresses
  /// of the windows are named again, and it serves on as before.
  public func handoverAbandoned() {
    restoreAddresses()
  }

  /// Names this process's address again for each window the export
  /// invalidated. A window whose address a successor named before it died
  /// (EINVAL: its address is valid) is invalidated and named again.
  private func restoreAddresses() {
    for window in handover.invalidated {
      guard let vaddr = window.mapping else { continue }
      do throws(Errno) {
        do throws(Errno) {
          try device.iommu.updateVaddr(vaddr, iova: window.address, size: window.size)
        } catch .invalidArgument {
          try device.iommu.invalidateVaddr(iova: window.address, size: window.size)
          try device.iommu.updateVaddr(vaddr, iova: window.address, size: window.size)
        }
      } catch {
        logger.error(
          "live update called off: the IOMMU would not take this process's address of \(Self.describe(window)) again (\(error.name)); the device still reaches the window, but the kernel cannot pin it anew"
        )
      }
    }
    if !handover.invalidated.isEmpty {
      logger.notice(
        "live update called off: \(handover.invalidated.count) DMA windows have this process's addresses again"
      )
    }
    handover.invalidated = []
  }

  /// In the new process: `windows` are the client's, rebuilt by the server
  /// (their `mapping` this process's addresses). Those with a file must be
  /// exactly the windows the IOMMU holds; each gets its new address.
  public func adoptDMAWindows(_ windows: [DMAWindow]) throws(HandoverRefusal) {
    guard let expected = handover.awaitingAddresses else { return }
    let mine = windows.filter { $0.mapping != nil }.sorted { $0.address < $1.address }
    func key(_ w: DMAWindow) -> [UInt64] {
      [w.address, w.size, w.readable ? 1 : 0, w.writable ? 1 : 0]
    }
    guard mine.map(key) == expected.map(key) else {
      let theirs = Set(mine.map(\.address))
      let held = Set(expected.map(\.address))
      let first =
        expected.first { !theirs.contains($0.address) }.map {
          "\(Self.describe($0)) is in the IOMMU but not among the client's windows"
        }
        ?? mine.first { !held.contains($0.address) }.map {
          "the client's \(Self.describe($0)) is not in the IOMMU"
        } ?? "a window's size or protection differs"
      throw HandoverRefusal(
        "the device's DMA windows do not match the connection's: \(first) (\(expected.count) in the IOMMU, \(mine.count) with a file)"
      )
    }
    var named: [DMAWindow] = []
    for window in mine {
      do throws(Errno) {
        try device.iommu.updateVaddr(window.mapping!, iova: window.address, size: window.size)
        named.append(window)
      } catch {
        // Invalid again, so that the old process can name its own.
        for done in named {
          try? device.iommu.invalidateVaddr(iova: done.address, size: done.size)
        }
        throw HandoverRefusal(
          "the IOMMU would not take this process's address of \(Self.describe(window)) (VFIO_DMA_MAP_FLAG_VADDR: \(error.name))"
        )
      }
    }
    mappedWindows = Dictionary(uniqueKeysWithValues: mine.map { ($0.address, $0) })
    handover.awaitingAddresses = nil
    logger.debug("live update: \(mine.count) DMA windows have this process's addresses")
  }

  private func export(
    _ section: HandoverSection, into w: inout ByteWriter, descriptors: inout [FileDescriptor],
    iommu: IOMMUHandover, windows: [DMAWindow]
  ) {
    func descriptor(_ fd: FileDescriptor) {
      descriptors.append(fd)
      w.append(UInt32(descriptors.count - 1))
    }
    switch section {
    case .device:
      w.append(UInt8(device.iommuPath == .group ? 1 : 2))
      descriptor(FileDescriptor(rawValue: device.fd))
      Self.put(device.address, into: &w)
      Self.put(device.mdev?.uuid ?? "", into: &w)
    case .iommu:
      w.append(iommu.kind.rawValue)
      w.append(UInt32(iommu.descriptors.count))
      for fd in iommu.descriptors { descriptor(fd) }
      w.append(UInt32(iommu.group))
    case .migration:
      let (seconds, attoseconds) = migrationTimeout.components
      w.append(UInt64(max(0, seconds * 1000 + attoseconds / 1_000_000_000_000_000)))
      switch self {
      case let vfio as MigratableKernelVFIOBackend:
        w.append(HandoverPlan.vfio.rawValue)
        w.append(vfio.migrationFlags.rawValue)
        w.append(UInt8(vfio.failed ? 1 : 0))
      case let pf as PFMigratedKernelVFIOBackend:
        let migration = pf.pfMigration
        let location = migration.controls.location
        w.append(HandoverPlan.pfDebugfs.rawValue)
        Self.put(location.vf, into: &w)
        Self.put(location.pf, into: &w)
        w.append(UInt32(location.vfNumber))
        Self.put(location.directory, into: &w)
        w.append(migration.state.rawValue)
        w.append(UInt8(migration.failed ? 1 : 0))
        for fd in migration.controls.handoverDescriptors ?? [] { descriptor(fd) }
      default:
        w.append(HandoverPlan.absent.rawValue)
        if case .none(let why) = plan { Self.put(why, into: &w) } else { Self.put("", into: &w) }
      }
    case .windows:
      w.append(UInt32(windows.count))
      for window in windows {
        w.append(window.address)
        w.append(window.size)
        w.append(UInt8((window.readable ? 1 : 0) | (window.writable ? 2 : 0)))
      }
    case .dirtyLog:
      w.append(UInt8(dmaLog.log == nil ? 0 : 1))
      dmaLog.log?.exportHandover(into: &w)
    }
  }

  /// An optional PCI address: a flag, then domain `u32`, bus, device, function `u8`.
  static func put(_ address: PCIAddress?, into w: inout ByteWriter) {
    w.append(UInt8(address == nil ? 0 : 1))
    if let address {
      w.append(address.domain)
      w.append(address.bus)
      w.append(address.device)
      w.append(address.function)
    }
  }

  /// A string: its UTF-8 length `u16`, then the bytes.
  static func put(_ text: String, into w: inout ByteWriter) {
    let bytes = Array(text.utf8.prefix(Int(UInt16.max)))
    w.append(UInt16(bytes.count))
    w.append(bytes)
  }

  /// The backend `exportHandover` described, over the descriptors it names
  /// (owned: those it uses are the new backend's, the rest are closed). The
  /// device is asked again what it has (regions, interrupts, the IOMMU's
  /// facts), and nothing is changed: no reset, no SET_IRQS, no mapping; the
  /// DMA windows wait for `adoptDMAWindows`.
  public static func importHandover(
    _ bytes: [UInt8], descriptors: consuming OwnedFileDescriptors,
    logger: Logger = Logger(label: "xe-vfio-user.kernel"),
    adoption: KernelHandoverAdoption = .live
  ) throws(HandoverRefusal) -> KernelVFIOBackend {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    var reader = ByteReader(UnsafeRawBufferPointer(buffer))
    var importer = KernelHandoverImport(logger: logger, adoption: adoption)
    return try importer.run(&reader, &descriptors)
  }
}

/// One import: the sections in order, the device opened again once its
/// descriptors and the IOMMU's are known, the backend made once the
/// migration path is, then filled from the rest.
private struct KernelHandoverImport {
  typealias Section = KernelVFIOBackend.HandoverSection
  let logger: Logger
  let adoption: KernelHandoverAdoption
  var deviceFD: FileDescriptor?
  var path = IOMMUPath.group
  var address: PCIAddress?
  var mdev: String?
  var device: KernelVFIODevice?
  var backend: KernelVFIOBackend?

  mutating func run(_ reader: inout ByteReader, _ descriptors: inout OwnedFileDescriptors)
    throws(HandoverRefusal) -> KernelVFIOBackend
  {
    let kind = try reader.handoverBytes(KernelVFIOBackend.handoverKind.count, "the kind tag")
    guard kind.elementsEqual(KernelVFIOBackend.handoverKind) else {
      throw HandoverRefusal(
        "the handover state is not a kernel VFIO device's (its kind tag is \(String(decoding: kind.prefix { $0 != 0 }, as: UTF8.self).debugDescription))"
      )
    }
    let version: UInt32 = try reader.handoverField("the format version")
    guard version == KernelVFIOBackend.handoverVersion else {
      throw HandoverRefusal(
        "the kernel VFIO device's handover state is format version \(version); this server reads"
          + " version \(KernelVFIOBackend.handoverVersion)")
    }
    defer {
      // A device file made but no backend: closed with it; a descriptor not
      // yet made into one: closed here.
      if device == nil, let deviceFD { _ = Glibc.close(deviceFD.rawValue) }
    }
    for section in Section.allCases {
      var body = try open(section, &reader)
      switch section {
      case .device: try readDevice(&body, &descriptors)
      case .iommu: try readIOMMU(&body, &descriptors)
      case .migration: try readMigration(&body, &descriptors)
      case .windows: try readWindows(&body)
      case .dirtyLog: try readDirtyLog(&body)
      }
      try close(section, body, &reader)
    }
    guard reader.remaining == 0 else {
      throw HandoverRefusal.corrupt(
        "the end", at: reader.offset, "\(reader.remaining) bytes follow the last section")
    }
    guard let backend else { throw HandoverRefusal("the handover state built no device") }
    logger.debug(
      "imported from a live update: \(backend.device.reach), \(backend.handover.awaitingAddresses?.count ?? 0) DMA windows"
    )
    return backend
  }

  private func open(_ section: Section, _ reader: inout ByteReader) throws(HandoverRefusal)
    -> ByteReader
  {
    let at = reader.offset
    let tag: UInt32 = try reader.handoverField("the \(section.name) section's tag")
    guard tag == section.rawValue else {
      throw HandoverRefusal.corrupt(
        "a section tag", at: at,
        "section \(tag) where section \(section.rawValue) (\(section.name)) belongs")
    }
    let length: UInt64 = try reader.handoverField("the \(section.name) section's length")
    guard length <= UInt64(reader.remaining) else {
      throw HandoverRefusal.truncated(
        "the \(section.name) section", at: reader.offset, size: Int(clamping: length),
        of: reader.count)
    }
    let end = reader.offset + Int(length)
    return ByteReader(UnsafeRawBufferPointer(rebasing: reader.bytes[..<end]), offset: reader.offset)
  }

  private func close(_ section: Section, _ body: ByteReader, _ reader: inout ByteReader)
    throws(HandoverRefusal)
  {
    guard body.remaining == 0 else {
      throw HandoverRefusal.corrupt(
        "the \(section.name) section", at: body.offset, "\(body.remaining) bytes left unread")
    }
    reader.offset = body.count
  }

  private func address(_ r: inout ByteReader, _ field: String) throws(HandoverRefusal)
    -> PCIAddress?
  {
    guard try r.handoverFlag("\(field)'s flag") else { return nil }
    let domain: UInt32 = try r.handoverField("\(field)'s domain")
    let bus: UInt8 = try r.handoverField("\(field)'s bus")
    let at = r.offset
    let device: UInt8 = try r.handoverField("\(field)'s device")
    let function: UInt8 = try r.handoverField("\(field)'s function")
    guard device < 32, function < 8 else {
      throw HandoverRefusal.corrupt(field, at: at, "device \(device), function \(function)")
    }
    return PCIAddress(domain: domain, bus: bus, device: device, function: function)
  }

  private func string(_ r: inout ByteReader, _ field: String) throws(HandoverRefusal) -> String {
    let length: UInt16 = try r.handoverField("\(field)'s length")
    let at = r.offset
    let bytes = try r.handoverBytes(Int(length), field)
    guard let text = String(validating: bytes, as: UTF8.self) else {
      throw HandoverRefusal.corrupt(field, at: at, "not UTF-8")
    }
    return text
  }

  private func take(
    _ r: inout ByteReader, _ descriptors: inout OwnedFileDescriptors, _ field: String
  ) throws(HandoverRefusal) -> FileDescriptor {
    let index: UInt32 = try r.handoverField("\(field)'s descriptor index")
    return try descriptors.takeHandover(index, for: field).release()
  }

  private mutating func readDevice(
    _ r: inout ByteReader, _ descriptors: inout OwnedFileDescriptors
  ) throws(HandoverRefusal) {
    let at = r.offset
    switch try r.handoverField("the IOMMU path", as: UInt8.self) {
    case 1: path = .group
    case let other:
      throw HandoverRefusal.corrupt(
        "the IOMMU path", at: at, "\(other) (only the group/container path, 1, is handed over)")
    }
    deviceFD = try take(&r, &descriptors, "the device fd")
    address = try address(&r, "the PCI address")
    let uuid = try string(&r, "the mdev UUID")
    mdev = uuid.isEmpty ? nil : uuid
    guard address == nil || mdev == nil else {
      throw HandoverRefusal.corrupt(
        "the device's name", at: r.offset, "both a PCI address and an mdev UUID")
    }
  }

  private mutating func readIOMMU(
    _ r: inout ByteReader, _ descriptors: inout OwnedFileDescriptors
  ) throws(HandoverRefusal) {
    let at = r.offset
    let raw: UInt8 = try r.handoverField("the IOMMU kind")
    guard let kind = IOMMUHandover.Kind(rawValue: raw) else {
      throw HandoverRefusal.corrupt("the IOMMU kind", at: at, "\(raw)")
    }
    let countAt = r.offset
    let count: UInt32 = try r.handoverField("the IOMMU's descriptor count")
    guard count == 2 else {
      throw HandoverRefusal.corrupt(
        "the IOMMU's descriptor count", at: countAt, "\(count) (type1: the container and group)")
    }
    // Each owned from its take: the adoption owns them, or they are closed here.
    var fds: [FileDescriptor] = []
    do throws(HandoverRefusal) {
      fds.append(try take(&r, &descriptors, "the container"))
      fds.append(try take(&r, &descriptors, "the IOMMU group"))
    } catch {
      for fd in fds { _ = Glibc.close(fd.rawValue) }
      throw error
    }
    let group: UInt32
    do throws(HandoverRefusal) {
      group = try r.handoverField("the IOMMU group's number")
    } catch {
      for fd in fds { _ = Glibc.close(fd.rawValue) }
      throw error
    }
    guard let deviceFD else { throw HandoverRefusal("the handover state has no device fd") }
    let iommu: IOMMUDomain
    do throws(KernelVFIOError) {
      iommu = try adoption.iommu(kind, fds, Int(group))
    } catch {
      throw HandoverRefusal("the IOMMU handed over cannot be taken: \(error.message)")
    }
    let file = adoption.deviceFile(deviceFD)
    do throws(KernelVFIOError) {
      device = try KernelVFIODevice.adopt(
        handedOver: file, iommu: iommu, path: path, address: address, mdev: mdev,
        paths: adoption.paths)
    } catch {
      self.deviceFD = nil  // the file owns it, and closes it with itself
      throw HandoverRefusal("the device handed over cannot be asked what it has: \(error.message)")
    }
  }

  private mutating func readMigration(
    _ r: inout ByteReader, _ descriptors: inout OwnedFileDescriptors
  ) throws(HandoverRefusal) {
    guard let device else { throw HandoverRefusal("the handover state has no device") }
    let timeoutMilliseconds: UInt64 = try r.handoverField("the migration timeout")
    let timeout = Duration.milliseconds(Int64(clamping: timeoutMilliseconds))
    let at = r.offset
    let raw: UInt8 = try r.handoverField("the migration path")
    switch KernelVFIOBackend.HandoverPlan(rawValue: raw) {
    case .absent?:
      let why = try string(&r, "the reason for no migration")
      backend = KernelVFIOBackend(
        device, logger: logger, plan: .none(why), migrationTimeout: timeout)
    case .vfio?:
      let flagsAt = r.offset
      let flags: UInt64 = try r.handoverField("the migration flags")
      let failed = try r.handoverFlag("the migration-failed flag")
      guard let kernel = device.migrationFlags, kernel.rawValue == flags else {
        throw HandoverRefusal.corrupt(
          "the migration flags", at: flagsAt,
          "0x\(String(flags, radix: 16)), but the device reports \(device.migrationFlags.map { "0x\(String($0.rawValue, radix: 16))" } ?? "no migration")"
        )
      }
      backend = MigratableKernelVFIOBackend(
        device, logger: logger, migrationTimeout: timeout, failed: failed)
    case .pfDebugfs?:
      guard let vf = try address(&r, "the VF's address"),
        let pf = try address(&r, "the PF's address")
      else {
        throw HandoverRefusal.corrupt("the PF controls' location", at: r.offset, "no address")
      }
      let number: UInt32 = try r.handoverField("the VF number")
      let directory = try string(&r, "the controls' directory")
      let stateAt = r.offset
      let rawState: UInt32 = try r.handoverField("the PF migration state")
      guard let state = MigrationState(rawValue: rawState),
        [.running, .runningP2P, .stop, .error].contains(state)
      else {
        throw HandoverRefusal.corrupt(
          "the PF migration state", at: stateAt, "\(rawState) is no state at rest")
      }
      let failed = try r.handoverFlag("the PF migration-failed flag")
      var files: [FileDescriptor] = []
      for control in PFControl.allCases {
        do throws(HandoverRefusal) {
          files.append(try take(&r, &descriptors, "the PF's \(control.rawValue) control"))
        } catch {
          for fd in files { _ = Glibc.close(fd.rawValue) }
          throw error
        }
      }
      let controls = PFVFControls.adopt(
        PFDebugfsLocation(vf: vf, pf: pf, vfNumber: Int(number), directory: directory),
        descriptors: files)
      backend = PFMigratedKernelVFIOBackend(
        device, logger: logger,
        migration: PFDebugfsMigration(
          controls: controls, timeout: timeout, state: state, failed: failed))
    case nil:
      throw HandoverRefusal.corrupt("the migration path", at: at, "\(raw)")
    }
  }

  private mutating func readWindows(_ r: inout ByteReader) throws(HandoverRefusal) {
    guard let backend else { throw HandoverRefusal("the handover state has no device") }
    let count: UInt32 = try r.handoverField("the DMA window count")
    var windows: [DMAWindow] = []
    var end: UInt64 = 0
    for k in 0..<count {
      let at = r.offset
      let iova: UInt64 = try r.handoverField("window \(k)'s IOVA")
      let size: UInt64 = try r.handoverField("window \(k)'s size")
      let flags: UInt8 = try r.handoverField("window \(k)'s protection")
      guard size > 0, iova <= UInt64.max - size, iova >= end, flags & ~3 == 0, flags != 0 else {
        throw HandoverRefusal.corrupt(
          "window \(k)", at: at,
          "[0x\(String(iova, radix: 16)), +0x\(String(size, radix: 16))] protection \(flags): empty, overlapping, out of order or neither readable nor writable"
        )
      }
      end = iova + size
      windows.append(
        DMAWindow(address: iova, size: size, readable: flags & 1 != 0, writable: flags & 2 != 0))
    }
    backend.handover.awaitingAddresses = windows
  }

  private mutating func readDirtyLog(_ r: inout ByteReader) throws(HandoverRefusal) {
    guard let backend else { throw HandoverRefusal("the handover state has no device") }
    guard try r.handoverFlag("the DMA logging flag") else { return }
    let log = try DirtyPageLog.importHandover(from: &r)
    backend.dmaLog.adopt(log)
  }
}
