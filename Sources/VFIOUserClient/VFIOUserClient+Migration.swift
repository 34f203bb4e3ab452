import SystemPackage
import VFIOUser

/// The migration features of DEVICE_FEATURE, as typed calls. Each reply is
/// checked against the spec's layout.
extension VFIOUserClient {
  /// VFIO_DEVICE_FEATURE_MIGRATION: the states the device supports (ENOTTY when it does not migrate).
  public func migrationFlags() throws(VFIOUserClientError) -> MigrationFlags {
    try getFeature(VFIODeviceFeature.migration, as: MigrationFeatureData.self).flags
  }

  /// The device's migration state (GET MIG_DEVICE_STATE).
  public func migrationState() throws(VFIOUserClientError) -> MigrationState {
    let data = try getFeature(VFIODeviceFeature.migDeviceState, as: MigDeviceStateData.self)
    guard let state = data.state else {
      throw .protocolViolation("MIG_DEVICE_STATE reply names no state (\(data.deviceState))")
    }
    return state
  }

  /// SET MIG_DEVICE_STATE: the device walks to `state` before the reply comes.
  public func setMigrationState(_ state: MigrationState) throws(VFIOUserClientError) {
    let data = MigDeviceStateData(state: state).encoded()  // data_fd -1: unused by vfio-user
    let reply = try feature(
      flags: VFIODeviceFeatureFlags.set | VFIODeviceFeature.migDeviceState, data: data)
    guard reply.data == data else {
      throw .protocolViolation("MIG_DEVICE_STATE reply does not echo the request")
    }
  }

  /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the device's estimate of the stop-copy bytes.
  public func stopCopySize() throws(VFIOUserClientError) -> UInt64 {
    try getFeature(VFIODeviceFeature.migDataSize, as: MigDataSizeData.self).stopCopyLength
  }

  /// GET of a feature whose data is `T`: 8 bytes, as every migration feature's is.
  private func getFeature<T: WirePayload>(_ feature: UInt32, as: T.Type)
    throws(VFIOUserClientError) -> T
  {
    let size = 8
    let reply = try self.feature(
      flags: VFIODeviceFeatureFlags.get | feature,
      argsz: UInt32(DeviceFeaturePayload.fixedSize + size))
    guard Int(reply.argsz) == DeviceFeaturePayload.fixedSize + size, reply.data.count == size,
      let data = try? T(decoding: reply.data)
    else { throw .protocolViolation("malformed DEVICE_FEATURE \(feature) reply") }
    return data
  }
}
