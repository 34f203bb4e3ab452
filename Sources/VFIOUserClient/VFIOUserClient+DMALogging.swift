import SystemPackage
import VFIOUser

/// The DMA logging features of DEVICE_FEATURE, as typed calls, with the
/// replies checked against the spec's layout.
extension VFIOUserClient {
  /// Whether the device logs its DMA writes (PROBE of SET DMA_LOGGING_START).
  public func supportsDMALogging() throws(VFIOUserClientError) -> Bool {
    do {
      _ = try feature(
        flags: VFIODeviceFeatureFlags.probe | VFIODeviceFeatureFlags.set
          | VFIODeviceFeature.dmaLoggingStart)
      return true
    } catch .server(let errno, _) where errno == .inappropriateIOCTLForDevice {
      return false
    }
  }

  /// DMA_LOGGING_START: log the device's writes into `ranges` at `pageSize`.
  public func startDMALogging(pageSize: UInt64, ranges: [DMALoggingRange])
    throws(VFIOUserClientError)
  {
    let data = DMALoggingStartData(pageSize: pageSize, ranges: ranges).encoded()
    let reply = try feature(
      flags: VFIODeviceFeatureFlags.set | VFIODeviceFeature.dmaLoggingStart, data: data)
    guard reply.data == data else {
      throw .protocolViolation("DMA_LOGGING_START reply does not echo the request")
    }
  }

  /// DMA_LOGGING_STOP.
  public func stopDMALogging() throws(VFIOUserClientError) {
    _ = try feature(flags: VFIODeviceFeatureFlags.set | VFIODeviceFeature.dmaLoggingStop)
  }

  /// DMA_LOGGING_REPORT: the bitmap of `pageSize` pages of [iova, iova +
  /// length) the device dirtied since the last report (reading clears them),
  /// as little-endian u64 words. `argsz` overrides the room offered (tests).
  public func dmaLoggingReport(
    iova: UInt64, length: UInt64, pageSize: UInt64, argsz: UInt32? = nil
  ) throws(VFIOUserClientError) -> [UInt64] {
    guard let size = DMALoggingReportData.bitmapSize(length: length, pageSize: pageSize) else {
      throw .protocolViolation("page size \(pageSize) is not a power of two")
    }
    let room = DeviceFeaturePayload.fixedSize + DMALoggingReportData.fixedSize + size
    let reply = try feature(
      flags: VFIODeviceFeatureFlags.get | VFIODeviceFeature.dmaLoggingReport,
      data: DMALoggingReportData(iova: iova, length: length, pageSize: pageSize).encoded(),
      argsz: argsz ?? UInt32(room))
    // Read in place: a 4 GiB range's bitmap is 128 KiB, not worth two more copies.
    let data = reply.data
    guard data.count == DMALoggingReportData.fixedSize + size else {
      throw .protocolViolation(
        "DMA_LOGGING_REPORT reply carries \(data.count) data bytes, not \(DMALoggingReportData.fixedSize + size)"
      )
    }
    let words: [UInt64]? = try Self.decodeReply("DMA_LOGGING_REPORT", data) {
      r throws(Errno) in
      guard try r.u64(at: 0) == iova, try r.u64(at: 8) == length, try r.u64(at: 16) == pageSize
      else { return nil }
      var words = [UInt64](repeating: 0, count: size / 8)
      for i in words.indices { words[i] = try r.u64(at: DMALoggingReportData.fixedSize + i * 8) }
      return words
    }
    guard let words else {
      throw .protocolViolation("DMA_LOGGING_REPORT reply names another range")
    }
    return words
  }
}
