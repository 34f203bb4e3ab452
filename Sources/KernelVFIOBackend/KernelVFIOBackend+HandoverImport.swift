import KernelVFIO
import Logging
import SystemPackage
import VFIODevice
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

// The successor's side of a kernel device's live update: the backend rebuilt
// from the blob `exportHandover` wrote (KernelVFIOBackend+Handover.swift).

extension KernelVFIOBackend {
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
      var body = try reader.openHandoverSection(section.rawValue, section.name)
      switch section {
      case .device: try readDevice(&body, &descriptors)
      case .iommu: try readIOMMU(&body, &descriptors)
      case .migration: try readMigration(&body, &descriptors)
      case .windows: try readWindows(&body)
      case .dirtyLog: try readDirtyLog(&body)
      }
      try reader.closeHandoverSection(body, section.name)
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
