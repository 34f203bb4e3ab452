import Logging
import SystemPackage
import VFIODevice
import VFIOUser

/// Live update: the simulated VF's whole state handed from one server process
/// to the next (protocol/live-update-device.md). The bytes say everything but
/// the descriptors, which travel beside them: the VRAM memfd (mapped again by
/// the new process, so the client's BAR2 mapping, the old mapping and the new
/// one are the same pages) and the client's interrupt eventfds.
///
/// Not carried: the host (the new server attaches its own), the interrupt
/// tap (tests), the logger (the importer gives one).
extension SimulatedXeVF: HandoverCapable {
  /// What the blob is: "xe-vf sim", NUL-padded to 16 bytes.
  public static let handoverKind: [UInt8] =
    Array("xe-vf sim".utf8) + [UInt8](repeating: 0, count: 7)
  /// The format this server writes, and the only one it reads.
  public static let handoverVersion: UInt32 = 1

  /// The blob's sections, each exactly once, in this order.
  enum HandoverSection: UInt32, CaseIterable {
    case profile = 1
    case memory, config, registers, msix, dma, migration, pf, interrupts, dirtyLog

    var name: String {
      switch self {
      case .profile: "profile"
      case .memory: "device memory"
      case .config: "config space"
      case .registers: "registers"
      case .msix: "MSI-X"
      case .dma: "DMA engine"
      case .migration: "migration and reset"
      case .pf: "PF"
      case .interrupts: "interrupts"
      case .dirtyLog: "dirty page log"
      }
    }
  }

  /// Device memory: VRAM travels as its memfd, SRAM as its bytes.
  enum HandoverMemoryKind: UInt8 {
    case vram = 1
    case sram = 2
  }

  /// Why the state cannot be handed over now; nil when it can.
  ///
  /// Refused: a migration stream open (STOP_COPY, RESUMING, PRE_COPY*), the
  /// PF saving or restoring, holding ring packets, with work queued or GuC
  /// events still to come, and a DMA transfer started and not finished (its
  /// completion belongs to this process: a deferred start, or a host DMA the
  /// client still has to answer). All of it ends by itself or by the client's
  /// next steps; the update can be tried again then. Everything at rest is
  /// carried: RUNNING, STOP, RUNNING_P2P, ERROR after a failed migration, a
  /// doorbell a paused VF holds, interrupts held or pending.
  public var handoverRefusal: String? {
    if !migration.failed, [.stopCopy, .resuming, .preCopy, .preCopyP2P].contains(migration.state) {
      return
        "a migration stream is open (the device is in \(migration.state)); a live update carries"
        + " the device at rest: finish or cancel the migration first"
    }
    if let reason = pf.handoverRefusal() {
      return "\(reason); a live update carries the PF at rest: try again once it is idle"
    }
    if let transfer = dma.accepted, dma.held == nil {
      return
        "the DMA engine has a transfer in flight (\(transfer.length) bytes"
        + " \(transfer.toDevice ? "to" : "from") device offset 0x\(String(transfer.deviceOffset, radix: 16)));"
        + " its completion belongs to this process: try again once it has completed"
    }
    return nil
  }

  /// The device's whole state: `handoverKind`, `handoverVersion`, then the
  /// sections. The descriptors are lent: this device still owns them.
  public func exportHandover() throws(HandoverRefusal) -> HandoverState {
    if let reason = handoverRefusal { throw HandoverRefusal(reason) }
    var writer = ByteWriter(capacity: 8192)
    var descriptors: [FileDescriptor] = []
    writer.append(Self.handoverKind)
    writer.append(Self.handoverVersion)
    for section in HandoverSection.allCases {
      var body = ByteWriter()
      export(section, into: &body, descriptors: &descriptors)
      writer.appendHandoverSection(section.rawValue, body)
    }
    return HandoverState(bytes: writer.bytes, descriptors: descriptors)
  }

  private func export(
    _ section: HandoverSection, into w: inout ByteWriter, descriptors: inout [FileDescriptor]
  ) {
    switch section {
    case .profile:
      let name = Array(profile.name.utf8)
      w.append(UInt16(name.count))
      w.append(name)
      w.append(profile.deviceID)
      w.append(profile.revisionID)
      w.append(profile.classCode)
      w.append(profile.subsystemVendorID)
      w.append(profile.subsystemID)
      w.append(UInt8(profile.hasVRAM ? 1 : 0))
      w.append(profile.defaultVRAMSize)
      w.append(UInt32(profile.gtCount))
      w.append(profile.ggttQuota)
      w.append(profile.gmdID)
      w.append(profile.mediaGMDID)
      w.append(vramSize)
      w.append(vfid)
    case .memory:
      if vramSize > 0 {
        w.append(HandoverMemoryKind.vram.rawValue)
        descriptors.append(FileDescriptor(rawValue: memory.fd))
        w.append(UInt32(descriptors.count - 1))
      } else {
        w.append(HandoverMemoryKind.sram.rawValue)
        w.append(memory.size)
        w.append(UnsafeRawBufferPointer(memory.buffer(offset: 0, length: memory.size)))
      }
    case .config:
      w.append(config.bytes)
    case .registers:
      w.append(UInt32(registers.scratch.count))
      for values in registers.scratch { for value in values { w.append(value) } }
      w.append(UInt8(registers.ptesAllocated ? 1 : 0))
      if registers.ptesAllocated {
        let ptes = registers.ggtt
        w.append(UInt32(ptes.count))
        for pte in ptes { w.append(pte) }
      }
    case .msix:
      let record = msix.gucRecord
      for word in record.table { w.append(word) }
      w.append(record.pending)
      w.append(UInt8(record.clientDrivesTable ? 1 : 0))
      w.append(record.held)
    case .dma:
      w.append(dma.src)
      w.append(dma.dst)
      w.append(dma.len)
      w.append(dma.ctrl)
      w.append(dma.status)
      w.append(dma.completed)
      w.append(dma.generation)
      w.append(UInt8(dma.held == nil ? 0 : 1))
      if let held = dma.held {
        w.append(UInt8(held.toDevice ? 1 : 0))
        w.append(held.deviceOffset)
        w.append(held.clientAddress)
        w.append(held.length)
        w.append(held.vector ?? UInt32.max)
      }
    case .migration:
      w.append(migration.state.rawValue)
      w.append(UInt8(migration.failed ? 1 : 0))
      w.append(UInt8(migration.restorePending ? 1 : 0))
      w.append(migration.seed)
      w.append(migration.vramChunkSize)
      w.append(UInt64(resetCount))
    case .pf:
      pf.exportHandover(into: &w)
    case .interrupts:
      irqs.exportHandover(into: &w, descriptors: &descriptors)
    case .dirtyLog:
      w.append(UInt8(dirtyLog == nil ? 0 : 1))
      dirtyLog?.exportHandover(into: &w)
    }
  }

  /// The device `exportHandover` described, from its bytes and descriptors
  /// (owned: those it uses are the new device's, the rest are closed).
  /// Everything is checked: a blob of another kind or version, truncated, or
  /// with a value no exporter writes is refused, and every descriptor closed.
  public static func importHandover(
    _ bytes: [UInt8], descriptors: consuming OwnedFileDescriptors,
    logger: Logger = Logger(label: "xe-vfio-user.xe-vf")
  ) throws(HandoverRefusal) -> SimulatedXeVF {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    var reader = ByteReader(UnsafeRawBufferPointer(buffer))
    return try HandoverImport(logger: logger).run(&reader, &descriptors)
  }
}

/// One import: the sections read in order, the device built once its
/// memory is known and filled from the rest.
private struct HandoverImport {
  typealias Section = SimulatedXeVF.HandoverSection
  let logger: Logger

  func run(_ reader: inout ByteReader, _ descriptors: inout OwnedFileDescriptors)
    throws(HandoverRefusal) -> SimulatedXeVF
  {
    let kind = try reader.handoverBytes(SimulatedXeVF.handoverKind.count, "the kind tag")
    guard kind.elementsEqual(SimulatedXeVF.handoverKind) else {
      throw HandoverRefusal(
        "the handover state is not a simulated Xe VF's (its kind tag is \(Array(kind)))")
    }
    let version: UInt32 = try reader.handoverField("the format version")
    guard version == SimulatedXeVF.handoverVersion else {
      throw HandoverRefusal(
        "the simulated Xe VF's handover state is format version \(version); this server reads"
          + " version \(SimulatedXeVF.handoverVersion)")
    }
    var identity: (profile: XeProfile, vramSize: UInt64, vfid: UInt16)?
    var device: SimulatedXeVF?
    for section in Section.allCases {
      var body = try reader.openHandoverSection(section.rawValue, section.name)
      switch (section, identity, device) {
      case (.profile, _, _):
        identity = try profile(&body)
      case (.memory, let identity?, _):
        let memory = try self.memory(&body, &descriptors, identity.profile, identity.vramSize)
        device = SimulatedXeVF(
          profile: identity.profile, vfid: identity.vfid, logger: logger, memory: memory)
      case (_, _, let device?):
        try fill(device, section, &body, &descriptors)
      default:
        break  // unreachable: the profile and memory sections come first
      }
      try reader.closeHandoverSection(body, section.name)
    }
    guard reader.remaining == 0 else {
      throw HandoverRefusal.corrupt(
        "the end", at: reader.offset, "\(reader.remaining) bytes follow the last section")
    }
    guard let device else { throw HandoverRefusal("the handover state built no device") }
    device.logger.debug(
      "imported from a live update: \(device.migrationState), \(device.eventFDCount) eventfds")
    return device
  }

  private func profile(_ r: inout ByteReader) throws(HandoverRefusal) -> (
    profile: XeProfile, vramSize: UInt64, vfid: UInt16
  ) {
    let nameLength: UInt16 = try r.handoverField("the profile name's length")
    let nameAt = r.offset
    let nameBytes = try r.handoverBytes(Int(nameLength), "the profile name")
    guard let name = String(validating: nameBytes, as: UTF8.self), !name.isEmpty else {
      throw HandoverRefusal.corrupt("the profile name", at: nameAt, "not UTF-8 text")
    }
    let deviceID: UInt16 = try r.handoverField("the device id")
    let revisionID: UInt8 = try r.handoverField("the revision id")
    let classAt = r.offset
    let classCode: UInt32 = try r.handoverField("the class code")
    guard classCode <= 0xFF_FFFF else {
      throw HandoverRefusal.corrupt("the class code", at: classAt, "\(classCode) has 24 bits")
    }
    let subsystemVendorID: UInt16 = try r.handoverField("the subsystem vendor id")
    let subsystemID: UInt16 = try r.handoverField("the subsystem id")
    let hasVRAM = try r.handoverFlag("the profile's VRAM flag")
    let defaultVRAMSize: UInt64 = try r.handoverField("the profile's default VRAM size")
    let gtAt = r.offset
    let gtCount: UInt32 = try r.handoverField("the GT count")
    guard gtCount == 1 || gtCount == 2 else {
      throw HandoverRefusal.corrupt("the GT count", at: gtAt, "\(gtCount) GTs (1 or 2)")
    }
    let quotaAt = r.offset
    let ggttQuota: UInt64 = try r.handoverField("the GGTT quota")
    guard ggttQuota / 4096 * 8 <= XeSimRegisters.ggttWindowSize else {
      throw HandoverRefusal.corrupt(
        "the GGTT quota", at: quotaAt, "\(ggttQuota) bytes do not fit the GGTT window")
    }
    let gmdID: UInt32 = try r.handoverField("the GMD_ID")
    let mediaGMDID: UInt32 = try r.handoverField("the media GMD_ID")
    let sizeAt = r.offset
    let vramSize: UInt64 = try r.handoverField("the VRAM size")
    guard hasVRAM ? vramSize >= 1 << 20 && vramSize.nonzeroBitCount == 1 : vramSize == 0 else {
      throw HandoverRefusal.corrupt(
        "the VRAM size", at: sizeAt,
        "\(vramSize) bytes on a profile \(hasVRAM ? "with" : "without") VRAM")
    }
    let vfidAt = r.offset
    let vfid: UInt16 = try r.handoverField("the VF id")
    guard vfid > 0, vfid < 1 << 10 else {
      throw HandoverRefusal.corrupt("the VF id", at: vfidAt, "\(vfid) (1 to 1023)")
    }
    let profile = XeProfile(
      name: name, deviceID: deviceID, revisionID: revisionID, classCode: classCode,
      subsystemVendorID: subsystemVendorID, subsystemID: subsystemID, hasVRAM: hasVRAM,
      defaultVRAMSize: defaultVRAMSize, gtCount: Int(gtCount), ggttQuota: ggttQuota, gmdID: gmdID,
      mediaGMDID: mediaGMDID)
    return (profile, vramSize, vfid)
  }

  private func memory(
    _ r: inout ByteReader, _ descriptors: inout OwnedFileDescriptors, _ profile: XeProfile,
    _ vramSize: UInt64
  ) throws(HandoverRefusal) -> DeviceMemory {
    let kindAt = r.offset
    let kind = SimulatedXeVF.HandoverMemoryKind(rawValue: try r.handoverField("the memory kind"))
    switch kind {
    case .vram? where profile.hasVRAM:
      let index: UInt32 = try r.handoverField("the VRAM memfd")
      let fd = try descriptors.takeHandover(index, for: "the VRAM memfd")
      let found = try? DescriptorKind(of: fd.descriptor)
      guard found == .regularFile(size: Int64(bitPattern: vramSize)) else {
        throw HandoverRefusal(
          "descriptor \(index), the VRAM memfd, is \(found.map { "\($0)" } ?? "not open"), not a"
            + " file of the VRAM's \(vramSize) bytes")
      }
      do throws(Errno) { return try DeviceMemory.vram(adopting: fd, size: vramSize) } catch {
        throw HandoverRefusal("cannot map the VRAM memfd: \(error)")
      }
    case .sram? where !profile.hasVRAM:
      let sizeAt = r.offset
      let size: UInt64 = try r.handoverField("the SRAM size")
      guard size == XeSimRegisters.sramSize else {
        throw HandoverRefusal.corrupt(
          "the SRAM size", at: sizeAt, "\(size) bytes, where SRAM has \(XeSimRegisters.sramSize)")
      }
      let bytes = try r.handoverBytes(Int(size), "the SRAM bytes")
      let memory = DeviceMemory.sram(size: size)
      memory.buffer(offset: 0, length: size).copyMemory(from: bytes)
      return memory
    default:
      throw HandoverRefusal.corrupt(
        "the memory kind", at: kindAt,
        "no memory of this kind on a profile \(profile.hasVRAM ? "with" : "without") VRAM")
    }
  }

  private func fill(
    _ vf: SimulatedXeVF, _ section: Section, _ r: inout ByteReader,
    _ descriptors: inout OwnedFileDescriptors
  ) throws(HandoverRefusal) {
    switch section {
    case .profile, .memory:
      break
    case .config:
      let at = r.offset
      let bytes = try r.handoverBytes(XePCIConfig.size, "the config space")
      if let offset = vf.config.load(handover: bytes) {
        throw HandoverRefusal.corrupt(
          "config space byte 0x\(String(offset, radix: 16))", at: at + offset,
          "its read-only bits differ from this device's config space")
      }
    case .registers:
      try registers(vf, &r)
    case .msix:
      try msix(vf, &r)
    case .dma:
      try dma(vf, &r)
    case .migration:
      try migration(vf, &r)
    case .pf:
      try vf.pf.importHandover(from: &r)
    case .interrupts:
      vf.irqs = try IRQEmulation.importHandover(
        from: &r, descriptors: &descriptors,
        describedAs: (0..<VFIOPCIIRQ.count).map {
          SimulatedXeVF.describeIRQ($0) ?? IRQDescription(index: $0, count: 0, flags: [])
        })
    case .dirtyLog:
      if try r.handoverFlag("the dirty page log's presence") {
        vf.dirtyLog = try DirtyPageLog.importHandover(from: &r)
      }
    }
  }

  private func registers(_ vf: SimulatedXeVF, _ r: inout ByteReader) throws(HandoverRefusal) {
    let countAt = r.offset
    let gts: UInt32 = try r.handoverField("the scratch GT count")
    guard gts == vf.registers.scratch.count else {
      throw HandoverRefusal.corrupt(
        "the scratch GT count", at: countAt,
        "\(gts) GTs, where the device has \(vf.registers.scratch.count)")
    }
    for gt in 0..<Int(gts) {
      var values: [UInt32] = []
      for n in 0..<XeSimRegisters.scratchCount {
        values.append(try r.handoverField("GT\(gt) scratch register \(n)"))
      }
      vf.registers.load(scratch: values, gt: gt)
    }
    guard try r.handoverFlag("the GGTT's presence") else { return }
    let ptesAt = r.offset
    let count: UInt32 = try r.handoverField("the GGTT PTE count")
    guard count == vf.registers.ggttCount else {
      throw HandoverRefusal.corrupt(
        "the GGTT PTE count", at: ptesAt,
        "\(count) PTEs, where the quota has \(vf.registers.ggttCount)")
    }
    let bytes = try r.handoverBytes(8 * Int(count), "the GGTT PTEs")
    vf.registers.load(
      ggtt: (0..<Int(count)).map {
        UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self))
      })
  }

  private func msix(_ vf: SimulatedXeVF, _ r: inout ByteReader) throws(HandoverRefusal) {
    var table: [UInt32] = []
    for dword in 0..<MSIXState.vectors * 4 {
      let at = r.offset
      let value: UInt32 = try r.handoverField("MSI-X table dword \(dword)")
      guard dword % 4 != 3 || value & ~XeSimRegisters.msixVectorMasked == 0 else {
        throw HandoverRefusal.corrupt(
          "MSI-X vector \(dword / 4)'s control", at: at, "bits other than the mask bit: \(value)")
      }
      table.append(value)
    }
    let vectors = UInt64(1) << UInt64(MSIXState.vectors) - 1
    let pendingAt = r.offset
    let pending: UInt64 = try r.handoverField("the MSI-X pending bits")
    let driven = try r.handoverFlag("whether the client drives the MSI-X table")
    let heldAt = r.offset
    let held: UInt64 = try r.handoverField("the MSI-X vectors held while paused")
    for (value, at, field) in [(pending, pendingAt, "pending"), (held, heldAt, "held")]
    where value & ~vectors != 0 {
      throw HandoverRefusal.corrupt(
        "the MSI-X \(field) bits", at: at, "vectors past the table's \(MSIXState.vectors)")
    }
    vf.msix.load(
      GuCVFState.MSIX(table: table, pending: pending, clientDrivesTable: driven, held: held))
  }

  private func dma(_ vf: SimulatedXeVF, _ r: inout ByteReader) throws(HandoverRefusal) {
    let src: UInt64 = try r.handoverField("the DMA engine's SRC")
    let dst: UInt64 = try r.handoverField("the DMA engine's DST")
    let len: UInt32 = try r.handoverField("the DMA engine's LEN")
    let ctrl: UInt32 = try r.handoverField("the DMA engine's CTRL")
    let status: UInt32 = try r.handoverField("the DMA engine's STATUS")
    let completed: UInt32 = try r.handoverField("the DMA engine's COMPLETED")
    let generation: UInt64 = try r.handoverField("the DMA engine's generation")
    var held: DMAEngine.Transfer?
    if try r.handoverFlag("the DMA engine's held transfer's presence") {
      let toDevice = try r.handoverFlag("the held transfer's direction")
      let deviceOffset: UInt64 = try r.handoverField("the held transfer's device offset")
      let clientAddress: UInt64 = try r.handoverField("the held transfer's client address")
      let length: UInt64 = try r.handoverField("the held transfer's length")
      let vectorAt = r.offset
      let vector: UInt32 = try r.handoverField("the held transfer's MSI-X vector")
      guard vector == UInt32.max || vector <= 0xFF else {
        throw HandoverRefusal.corrupt(
          "the held transfer's MSI-X vector", at: vectorAt, "\(vector) (CTRL has 8 bits for it)")
      }
      held = DMAEngine.Transfer(
        toDevice: toDevice, deviceOffset: deviceOffset, clientAddress: clientAddress,
        length: length, vector: vector == UInt32.max ? nil : vector, generation: generation)
    }
    vf.dma = DMAEngine(
      src: src, dst: dst, len: len, ctrl: ctrl, status: status, completed: completed,
      generation: generation, held: held)
  }

  private func migration(_ vf: SimulatedXeVF, _ r: inout ByteReader) throws(HandoverRefusal) {
    let stateAt = r.offset
    let raw: UInt32 = try r.handoverField("the migration state")
    guard let state = MigrationState(rawValue: raw), state != .error else {
      throw HandoverRefusal.corrupt("the migration state", at: stateAt, "no state \(raw)")
    }
    let failed = try r.handoverFlag("the migration-failed flag")
    guard failed || ![.stopCopy, .resuming, .preCopy, .preCopyP2P].contains(state) else {
      throw HandoverRefusal.corrupt(
        "the migration state", at: stateAt, "\(state), a state with a stream, is never handed over")
    }
    let restorePending = try r.handoverFlag("the restore-pending flag")
    let seed: UInt64 = try r.handoverField("the migration seed")
    let chunkAt = r.offset
    let chunk: UInt64 = try r.handoverField("the VRAM chunk size")
    guard chunk > 0 else {
      throw HandoverRefusal.corrupt("the VRAM chunk size", at: chunkAt, "0 bytes")
    }
    let resetsAt = r.offset
    let resets: UInt64 = try r.handoverField("the reset count")
    guard let resetCount = Int(exactly: resets), resetCount >= 0 else {
      throw HandoverRefusal.corrupt("the reset count", at: resetsAt, "\(resets)")
    }
    vf.migration = VFMigration(
      state: state, failed: failed, restorePending: restorePending, restoreStream: nil, seed: seed,
      vramChunkSize: chunk)
    vf.resetCount = resetCount
  }
}
