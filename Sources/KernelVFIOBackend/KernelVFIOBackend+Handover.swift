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
      writer.appendHandoverSection(section.rawValue, body)
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
}
