import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

/// What must match between a saved stream and the device it is restored into.
public struct DeviceIdentity: Codable, Equatable, CustomStringConvertible {
  public var vendorID: UInt16
  public var deviceID: UInt16
  public var revision: UInt8
  public var subsystemVendorID: UInt16
  public var subsystemID: UInt16
  public var vramSize: UInt64

  public init(
    vendorID: UInt16, deviceID: UInt16, revision: UInt8, subsystemVendorID: UInt16,
    subsystemID: UInt16, vramSize: UInt64
  ) {
    self.vendorID = vendorID
    self.deviceID = deviceID
    self.revision = revision
    self.subsystemVendorID = subsystemVendorID
    self.subsystemID = subsystemID
    self.vramSize = vramSize
  }

  public static func read(from client: VFIOUserClient) throws -> DeviceIdentity {
    let ids = try client.read32(region: VFIOPCIRegion.config, offset: 0)
    let classRev = try client.read32(region: VFIOPCIRegion.config, offset: 8)
    let subsystem = try client.read32(region: VFIOPCIRegion.config, offset: 0x2C)
    let bar2 = try client.regionInfo(VFIOPCIRegion.bar2)  // its descriptor closes with it
    return DeviceIdentity(
      vendorID: UInt16(truncatingIfNeeded: ids), deviceID: UInt16(truncatingIfNeeded: ids >> 16),
      revision: UInt8(truncatingIfNeeded: classRev),
      subsystemVendorID: UInt16(truncatingIfNeeded: subsystem),
      subsystemID: UInt16(truncatingIfNeeded: subsystem >> 16), vramSize: bar2.info.size)
  }

  public var description: String {
    "[\(hex(vendorID, 4)):\(hex(deviceID, 4))] rev \(hex(revision, 2)), subsystem \(hex(subsystemVendorID, 4)):\(hex(subsystemID, 4)), VRAM \(vramSize == 0 ? "none" : formatBytes(vramSize))"
  }

  /// Why a stream from `self` cannot go into `other`, or nil when it can.
  public func incompatibility(with other: DeviceIdentity) -> String? {
    if vendorID != other.vendorID || deviceID != other.deviceID {
      return
        "device id \(hex(vendorID, 4)):\(hex(deviceID, 4)) ≠ \(hex(other.vendorID, 4)):\(hex(other.deviceID, 4)) (the PF would refuse it with ENODEV)"
    }
    if revision != other.revision {
      return
        "revision \(hex(revision, 2)) ≠ \(hex(other.revision, 2)) (the PF would refuse it with ENODEV)"
    }
    if vramSize != other.vramSize {
      return
        "VRAM \(formatBytes(vramSize)) ≠ \(formatBytes(other.vramSize)) (provision the destination with the same quota)"
    }
    return nil
  }
}
