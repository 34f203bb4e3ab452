import SystemPackage

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
