import SystemPackage
import VFIOUser

/// The simulated GuC's opaque per-VF state, the GUC packet's payload.
///
/// A real GuC saves its scheduler state for the VF (contexts, doorbells,
/// pending work). The simulator's equivalent of that work is its DMA engine,
/// so the primary GT's blob carries the engine registers with any doorbell
/// held while paused, the MSI-X table, PBA and the vectors held while paused,
/// and, on profiles without VRAM (ptl, wcl), the 64 KiB SRAM the engine
/// copies to and from: that memory is device state no other packet type
/// carries, and the real stream of an integrated part has no VRAM packet. The
/// media GT's blob carries only its identity: the simulator models no media
/// engine state.
///
/// Layout, little-endian dwords, version 1:
///
///     magic 'XGUC' (0x43554758), version, gt, GMD_ID, record count,
///     then per record: tag, length in dwords, the dwords
///
/// Records: 1 ENGINE (17 dwords), 2 MSIX (69), 3 SRAM (SRAM size / 4).
/// Restore refuses a blob with another magic, version, GT or GMD_ID, a
/// record that runs past the end or a known record of the wrong length (the
/// GuC rejects it: EIO); unknown records are skipped.
struct GuCVFState: Equatable, Sendable {
  static let magic: UInt32 = 0x4355_4758
  static let version: UInt32 = 1
  /// `XE_GT_SRIOV_PF_MIGRATION_GUC_DATA_MAX_SIZE`.
  static let maxSize = 8 << 20

  enum Tag: UInt32 {
    case engine = 1
    case msix = 2
    case sram = 3
  }

  /// A transfer the engine accepted but has not run (the VF was paused).
  struct HeldTransfer: Equatable, Sendable {
    var toDevice: Bool
    var deviceOffset: UInt64
    var clientAddress: UInt64
    var length: UInt64
    var vector: UInt32?
  }

  struct Engine: Equatable, Sendable {
    var src: UInt64 = 0
    var dst: UInt64 = 0
    var len: UInt32 = 0
    var ctrl: UInt32 = 0
    var status: UInt32 = 0
    var completed: UInt32 = 0
    var held: HeldTransfer?
  }

  struct MSIX: Equatable, Sendable {
    var table: [UInt32]
    var pending: UInt64
    var clientDrivesTable: Bool
    /// Vectors raised while paused, delivered on resume.
    var held: UInt64
  }

  var gt: Int
  var gmdID: UInt32
  var engine: Engine?
  var msix: MSIX?
  var sram: [UInt8]?

  /// What the GuC answers to the size query (`GUC_PF_OPCODE_VF_SAVE` with
  /// size 0): room for every record the GT can hold, rounded up to 4 KiB.
  /// The saved blob is smaller, which is one reason the stop-copy estimate
  /// differs from the bytes produced (protocol/xe-kernel-facts.md §7.4).
  static func querySize(gt: Int, sramSize: Int?) -> Int {
    var size = 4 * 5
    if gt == 0 {
      size += 4 * (2 + 17) + 4 * (2 + 69)
      if let sramSize { size += 8 + sramSize }
    }
    return (size + 4095) / 4096 * 4096
  }

  var encoded: [UInt8] {
    var records: [(Tag, [UInt32])] = []
    if let engine {
      let held = engine.held
      let words: [UInt32] =
        split(engine.src) + split(engine.dst) + [
          engine.len, engine.ctrl, engine.status, engine.completed, held == nil ? 0 : 1,
          held?.toDevice == true ? 1 : 0,
        ] + split(held?.deviceOffset ?? 0) + split(held?.clientAddress ?? 0)
        + split(held?.length ?? 0) + [held?.vector ?? UInt32.max]
      records.append((.engine, words))
    }
    if let msix {
      records.append(
        (
          .msix,
          msix.table + split(msix.pending) + [msix.clientDrivesTable ? 1 : 0] + split(msix.held)
        ))
    }
    if let sram { records.append((.sram, sram.littleEndianWords(UInt32.self))) }

    var writer = ByteWriter()
    for word in [Self.magic, Self.version, UInt32(gt), gmdID, UInt32(records.count)] {
      writer.append(word)
    }
    for (tag, words) in records {
      writer.append(tag.rawValue)
      writer.append(UInt32(words.count))
      for word in words { writer.append(word) }
    }
    return writer.bytes
  }

  /// Decodes a blob for GT `gt` whose GMD_ID is `gmdID`, as the GuC checks it.
  /// - Throws: EIO when the GuC would reject it.
  init(decoding bytes: [UInt8], gt: Int, gmdID: UInt32, sramSize: Int?) throws(Errno) {
    do throws(Errno) {
      guard bytes.count % 4 == 0 else { throw Errno.ioError }
      let records = try ByteReader.reading(bytes) { reader throws(Errno) in
        guard try reader.read(UInt32.self) == Self.magic,
          try reader.read(UInt32.self) == Self.version, try reader.read(UInt32.self) == UInt32(gt),
          try reader.read(UInt32.self) == gmdID
        else { throw Errno.ioError }
        var records: [(tag: UInt32, words: [UInt32])] = []
        for _ in 0..<(try reader.read(UInt32.self)) {
          let tag = try reader.read(UInt32.self)
          let length = Int(try reader.read(UInt32.self))
          guard length <= reader.remaining / 4 else { throw Errno.ioError }
          records.append((tag, Array(try reader.read(count: 4 * length)).littleEndianWords()))
        }
        return records
      }
      self.gt = gt
      self.gmdID = gmdID
      for (tag, record) in records {
        var words = record
        switch Tag(rawValue: tag) {
        case .engine:
          guard words.count == 17 else { throw Errno.ioError }
          func u64(_ i: Int) -> UInt64 { UInt64(words[i]) | UInt64(words[i + 1]) << 32 }
          engine = Engine(
            src: u64(0), dst: u64(2), len: words[4], ctrl: words[5], status: words[6],
            completed: words[7],
            held: words[8] == 0
              ? nil
              : HeldTransfer(
                toDevice: words[9] != 0, deviceOffset: u64(10), clientAddress: u64(12),
                length: u64(14), vector: words[16] == UInt32.max ? nil : words[16]))
        case .msix:
          let entries = XeSimRegisters.msixVectors * 4
          guard words.count == entries + 5 else { throw Errno.ioError }
          let tail = Array(words[entries...])
          words.removeLast(5)
          msix = MSIX(
            table: words, pending: UInt64(tail[0]) | UInt64(tail[1]) << 32,
            clientDrivesTable: tail[2] != 0, held: UInt64(tail[3]) | UInt64(tail[4]) << 32)
        case .sram:
          guard let sramSize, words.count * 4 == sramSize else { throw Errno.ioError }
          sram = [UInt8](littleEndian: words)
        case nil:
          continue
        }
      }
    } catch {
      // A truncated blob is one the GuC rejects, like any other malformed one.
      throw .ioError
    }
  }

  init(gt: Int, gmdID: UInt32, engine: Engine? = nil, msix: MSIX? = nil, sram: [UInt8]? = nil) {
    self.gt = gt
    self.gmdID = gmdID
    self.engine = engine
    self.msix = msix
    self.sram = sram
  }

  private func split(_ value: UInt64) -> [UInt32] {
    [UInt32(truncatingIfNeeded: value), UInt32(truncatingIfNeeded: value >> 32)]
  }
}
