import SystemPackage
import VFIOUser

/// The migration features of DEVICE_FEATURE, as typed calls. Each reply is
/// checked against the spec's layout.
extension VFIOUserClient {
  /// VFIO_DEVICE_FEATURE_MIGRATION: the states the device supports (ENOTTY when it does not migrate).
  public func migrationFlags() throws(VFIOUserClientError) -> MigrationFlags {
    MigrationFlags(rawValue: try getFeature64(VFIODeviceFeature.migration))
  }

  /// The device's migration state (GET MIG_DEVICE_STATE).
  public func migrationState() throws(VFIOUserClientError) -> MigrationState {
    let reply = try feature(
      flags: VFIODeviceFeatureFlags.get | VFIODeviceFeature.migDeviceState, argsz: 16)
    guard reply.argsz == 16, reply.data.count == 8,
      let state = MigrationState(
        rawValue: reply.data.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
    else { throw .protocolViolation("malformed MIG_DEVICE_STATE reply") }
    return state
  }

  /// SET MIG_DEVICE_STATE: the device walks to `state` before the reply comes.
  public func setMigrationState(_ state: MigrationState) throws(VFIOUserClientError) {
    var data = [UInt8](repeating: 0, count: 8)
    data.withUnsafeMutableBytes { raw in
      raw.storeBytes(of: state.rawValue.littleEndian, as: UInt32.self)
      raw.storeBytes(of: Int32(-1).littleEndian, toByteOffset: 4, as: Int32.self)  // data_fd: unused
    }
    let reply = try feature(
      flags: VFIODeviceFeatureFlags.set | VFIODeviceFeature.migDeviceState, data: data)
    guard reply.data == data else {
      throw .protocolViolation("MIG_DEVICE_STATE reply does not echo the request")
    }
  }

  /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the device's estimate of the stop-copy bytes.
  public func stopCopySize() throws(VFIOUserClientError) -> UInt64 {
    try getFeature64(VFIODeviceFeature.migDataSize)
  }

  private func getFeature64(_ feature: UInt32) throws(VFIOUserClientError) -> UInt64 {
    let reply = try self.feature(flags: VFIODeviceFeatureFlags.get | feature, argsz: 16)
    guard reply.argsz == 16, reply.data.count == 8 else {
      throw .protocolViolation("malformed DEVICE_FEATURE \(feature) reply")
    }
    return reply.data.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
  }
}
