import SystemPackage
import VFIODevice
import VFIOUser

extension Connection {
  /// What a START the device accepted asked for: the state behind STOP and REPORT.
  struct DMALoggingSession {
    var pageSize: UInt64
    /// In address order, disjoint.
    var ranges: [DMALoggingRange]
  }

  /// DMA_LOGGING_START (SET), STOP (SET) and REPORT (GET) on a device that
  /// logs, after `deviceFeature` checked the methods and handled PROBE.
  func dmaLoggingFeature(_ request: DeviceFeaturePayload, logging: any DMALoggingCapable)
    throws(Errno) -> Int
  {
    let out = replyArea
    switch request.feature {
    case VFIODeviceFeature.dmaLoggingStart:
      // vfio_check_feature: room for the fixed part (the kernel's minsz).
      guard Int(request.argsz) >= DeviceFeaturePayload.fixedSize + DMALoggingStartData.fixedSize
      else { throw .invalidArgument }
      let start = try DMALoggingStartData(decoding: request.data)
      let ranges = try DMALogRules.checkStart(
        pageSize: start.pageSize, ranges: start.ranges, minimumPageSize: dma.pageSize)
      if let current = dmaLogging {
        // Asking again for what runs is harmless; anything else would drop pages already logged.
        guard current.pageSize == start.pageSize, current.ranges == ranges else {
          throw .invalidArgument
        }
      } else {
        try logging.startDMALogging(pageSize: start.pageSize, ranges: ranges)
        dmaLogging = DMALoggingSession(pageSize: start.pageSize, ranges: ranges)
        stats.update { $0.dirtyLogging = true }
        let total = ranges.reduce(0) { $0 + $1.length }
        logger.info(
          "DMA logging started: \(ranges.count) ranges, \(total) bytes, \(start.pageSize)-byte pages (\(logging.dmaLoggingMethod))"
        )
      }
      request.encode(into: out)
      return request.encodedSize

    case VFIODeviceFeature.dmaLoggingStop:
      stopDMALogging(logging, why: "by the client")
      request.encode(into: out)
      return request.encodedSize

    default:  // DMA_LOGGING_REPORT
      let asked = try DMALoggingReportData(decoding: request.data)
      // The kernel's order: page size, overflow, then the device (nothing logged: EINVAL).
      let size = try DMALogRules.checkReport(
        iova: asked.iova, length: asked.length, pageSize: asked.pageSize,
        logged: dmaLogging?.ranges ?? [])
      let payloadSize = DeviceFeaturePayload.fixedSize + DMALoggingReportData.fixedSize + size
      // argsz too small for the bitmap, as the kernel's iova_bitmap would fault on it.
      guard Int(request.argsz) >= payloadSize else { throw .invalidArgument }
      guard size <= Int(limits.maxDataXferSize) else { throw .argListTooLong }
      out.put(UInt32(payloadSize), at: 0)
      out.put(request.flags, at: 4)
      DMALoggingReportData(iova: asked.iova, length: asked.length, pageSize: asked.pageSize)
        .encode(
          into: UnsafeMutableRawBufferPointer(rebasing: out[DeviceFeaturePayload.fixedSize...]))
      let bitmap = UnsafeMutableRawBufferPointer(
        rebasing: out[(payloadSize - size)..<payloadSize])
      bitmap.initializeMemory(as: UInt8.self, repeating: 0)
      try logging.reportDMALog(
        iova: asked.iova, length: asked.length, pageSize: asked.pageSize, into: bitmap)
      return payloadSize
    }
  }

  /// Stops logging if it runs (STOP, or the client leaving).
  func stopDMALogging(_ logging: any DMALoggingCapable, why: String) {
    guard dmaLogging != nil else { return }
    logging.stopDMALogging()
    dmaLogging = nil
    stats.update { $0.dirtyLogging = false }
    logger.info("DMA logging stopped \(why)")
  }
}
