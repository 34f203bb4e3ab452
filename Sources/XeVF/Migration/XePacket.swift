import SystemPackage

/// `enum xe_sriov_packet_type`: what a packet of the Xe migration stream
/// carries. A struct over the raw byte, not an enum, because the stream may
/// hold types this code does not know (restore skips them) and 0 (invalid).
public struct XePacketType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
  public var rawValue: UInt8
  public init(rawValue: UInt8) { self.rawValue = rawValue }

  /// Device identity KLVs; first in the stream, tile 0 / GT 0.
  public static let descriptor = XePacketType(rawValue: 1)
  /// End of stream, size 0, tile 0 / GT 0.
  public static let trailer = XePacketType(rawValue: 2)
  /// One u64 PTE per 4 KiB page of the VF's GGTT quota (primary GT).
  public static let ggtt = XePacketType(rawValue: 3)
  /// The GT's four scratch registers, 16 bytes.
  public static let mmio = XePacketType(rawValue: 4)
  /// Opaque GuC VF state, whole dwords, at most 8 MiB.
  public static let guc = XePacketType(rawValue: 5)
  /// A chunk of the VF's VRAM; `offset` is where it starts (primary GT, dGPU).
  public static let vram = XePacketType(rawValue: 6)

  /// The types packet version 1 defines.
  public static let known: Set<XePacketType> = [.descriptor, .trailer, .ggtt, .mmio, .guc, .vram]

  public var description: String {
    switch self {
    case .descriptor: "DESCRIPTOR"
    case .trailer: "TRAILER"
    case .ggtt: "GGTT"
    case .mmio: "MMIO"
    case .guc: "GUC"
    case .vram: "VRAM"
    default: "TYPE_\(rawValue)"
    }
  }
}

/// `struct xe_sriov_packet_hdr`, packed, 24 bytes:
/// version u8 @0, type u8 @1, tile u8 @2, gt u8 @3, flags u32 @4,
/// offset u64 @8, size u64 @16 (the payload bytes that follow).
public struct XePacketHeader: Sendable, Equatable, CustomStringConvertible {
  public static let size = 24
  /// `XE_SRIOV_PACKET_SUPPORTED_VERSION`.
  public static let supportedVersion: UInt8 = 1

  public var version: UInt8
  public var type: XePacketType
  public var tile: UInt8
  public var gt: UInt8
  /// Always 0 today.
  public var flags: UInt32
  /// Offset into the resource: VRAM chunks only, 0 otherwise.
  public var offset: UInt64
  public var size: UInt64

  public init(
    version: UInt8 = XePacketHeader.supportedVersion, type: XePacketType, tile: UInt8 = 0,
    gt: UInt8 = 0, flags: UInt32 = 0, offset: UInt64 = 0, size: UInt64 = 0
  ) {
    self.version = version
    self.type = type
    self.tile = tile
    self.gt = gt
    self.flags = flags
    self.offset = offset
    self.size = size
  }

  /// Decodes exactly 24 bytes; the values are not judged (restore does that).
  /// - Throws: EINVAL when `bytes` is not 24 bytes long.
  public init(decoding bytes: [UInt8]) throws(Errno) {
    guard bytes.count == Self.size else { throw .invalidArgument }
    var reader = ByteReader(bytes)
    version = try reader.get()
    type = XePacketType(rawValue: try reader.get())
    tile = try reader.get()
    gt = try reader.get()
    flags = try reader.get()
    offset = try reader.get()
    size = try reader.get()
  }

  public var encoded: [UInt8] {
    var writer = ByteWriter(capacity: Self.size)
    writer.put(version)
    writer.put(type.rawValue)
    writer.put(tile)
    writer.put(gt)
    writer.put(flags)
    writer.put(offset)
    writer.put(size)
    return writer.bytes
  }

  public var description: String {
    "v\(version) \(type) tile \(tile) gt \(gt) flags \(flags) offset \(offset) size \(size)"
  }
}

/// One GuC-format KLV: dword 0 = key << 16 | length in dwords, then the value dwords.
public struct XeKLV: Sendable, Equatable {
  /// `MIGRATION_KLV_DEVICE_DEVID_KEY`: the PCI device id, one dword.
  public static let deviceIDKey: UInt16 = 0xF001
  /// `MIGRATION_KLV_DEVICE_REVID_KEY`: the PCI revision id, one dword.
  public static let revisionIDKey: UInt16 = 0xF002

  public var key: UInt16
  public var value: [UInt32]

  public init(key: UInt16, value: [UInt32]) {
    self.key = key
    self.value = value
  }

  /// The KLVs as dwords.
  public static func encode(_ klvs: [XeKLV]) -> [UInt32] {
    klvs.flatMap { [UInt32($0.key) << 16 | UInt32($0.value.count)] + $0.value }
  }

  /// Parses dwords as `xe_sriov_packet_process_descriptor` walks them: a KLV
  /// whose length runs past the end is truncated (EINVAL).
  public static func decode(_ dwords: [UInt32]) throws(Errno) -> [XeKLV] {
    var klvs: [XeKLV] = []
    var at = 0
    while at < dwords.count {
      let key = UInt16(dwords[at] >> 16)
      let length = Int(dwords[at] & 0xFFFF)
      at += 1
      guard length <= dwords.count - at else { throw .invalidArgument }
      klvs.append(XeKLV(key: key, value: Array(dwords[at..<at + length])))
      at += length
    }
    return klvs
  }
}

/// The DESCRIPTOR payload: the identity a destination checks before taking
/// anything else from the stream.
public struct XeMigrationDescriptor: Sendable, Equatable {
  public var deviceID: UInt16
  public var revisionID: UInt8

  public init(deviceID: UInt16, revisionID: UInt8) {
    self.deviceID = deviceID
    self.revisionID = revisionID
  }

  public init(profile: XeProfile) {
    self.init(deviceID: profile.deviceID, revisionID: profile.revisionID)
  }

  /// DEVID then REVID, 16 bytes, as the PF builds it.
  public var payload: [UInt8] {
    [UInt8](
      littleEndian: XeKLV.encode([
        XeKLV(key: XeKLV.deviceIDKey, value: [UInt32(deviceID)]),
        XeKLV(key: XeKLV.revisionIDKey, value: [UInt32(revisionID)]),
      ]))
  }

  /// Checks a received descriptor payload against this (the destination's)
  /// identity: not whole dwords or a truncated KLV → EINVAL; a DEVID or REVID
  /// KLV that differs → ENODEV; unknown keys are skipped, and a KLV that is
  /// absent is not checked (an empty descriptor passes, as on the PF).
  public func validate(_ payload: [UInt8]) throws(Errno) {
    guard payload.count % 4 == 0 else { throw .invalidArgument }
    for klv in try XeKLV.decode(payload.littleEndianWords(UInt32.self)) {
      switch klv.key {
      case XeKLV.deviceIDKey where klv.value.first != UInt32(deviceID),
        XeKLV.revisionIDKey where klv.value.first != UInt32(revisionID):
        throw .operationNotSupportedByDevice
      default: continue
      }
    }
  }
}
