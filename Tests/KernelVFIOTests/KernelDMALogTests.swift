import KernelVFIO
import KernelVFIOBackend
import SystemPackage
import Testing
import VFIODevice
import VFIOUser

/// A type1 container's dirty tracking, faked: the pages "the device" wrote
/// per mapping, handed out and cleared on each GET_BITMAP.
final class FakeDirtyTracking: IOMMUDirtyTracking {
  let dirtyPageSize: UInt64 = 4096
  var started = false
  var dirty: Set<UInt64> = []
  var refuse: Errno?
  var bitmapCalls: [(UInt64, UInt64)] = []

  func startDirtyTracking() throws(Errno) { started = true }
  func stopDirtyTracking() throws(Errno) { started = false }

  var unmapped: [UInt64] = []
  func unmapReturningDirty(iova: UInt64, size: UInt64) throws(Errno) -> [UInt64] {
    let words = try dirtyBitmap(iova: iova, size: size)
    unmapped.append(iova)
    return words
  }

  func dirtyBitmap(iova: UInt64, size: UInt64) throws(Errno) -> [UInt64] {
    if let refuse { throw refuse }
    bitmapCalls.append((iova, size))
    let pages = Int(size / dirtyPageSize)
    var words = [UInt64](repeating: 0, count: (pages + 63) / 64)
    for page in 0..<pages where dirty.contains(iova + UInt64(page) * dirtyPageSize) {
      words[page / 64] |= 1 << UInt64(page % 64)
      dirty.remove(iova + UInt64(page) * dirtyPageSize)
    }
    return words
  }
}

@Suite("Kernel VFIO: DMA logging")
struct KernelDMALogTests {
  static let base: UInt64 = 0x1_0000_0000
  let window = DMAWindow(address: base, size: 0x10_0000, readable: true, writable: true)
  let readOnly = DMAWindow(
    address: base + 0x10_0000, size: 0x1_0000, readable: true, writable: false)
  var ranges: [DMALoggingRange] { [DMALoggingRange(iova: Self.base, length: 0x20_0000)] }

  func report(
    _ log: KernelDMALog, windows: [DMAWindow], length: UInt64 = 0x20_0000, page: UInt64 = 4096
  ) throws -> [Int] {
    var bitmap = [UInt8](
      repeating: 0, count: DMALoggingReportData.bitmapSize(length: length, pageSize: page)!)
    let result: Result<Void, Errno> = bitmap.withUnsafeMutableBytes { raw in
      do throws(Errno) {
        try log.report(
          iova: Self.base, length: length, pageSize: page, into: raw, windows: windows)
        return .success(())
      } catch { return .failure(error) }
    }
    try result.get()
    return bitmap.enumerated().flatMap { i, byte in
      (0..<8).filter { byte & (1 << $0) != 0 }.map { i * 8 + $0 }
    }
  }

  /// The container's pages, gathered per whole mapping, reported and cleared;
  /// a window unmapped while logging keeps its pages until reported.
  @Test func reportsWhatTheContainerTracked() throws {
    let tracking = FakeDirtyTracking()
    let log = KernelDMALog(tracking: tracking)
    #expect(log.method.contains("VFIO_IOMMU_DIRTY_PAGES"))
    try log.start(pageSize: 4096, ranges: ranges)
    #expect(tracking.started)
    tracking.dirty = [Self.base + 0x3000, Self.base + 0xF_F000]
    #expect(try report(log, windows: [window, readOnly]) == [3, 255])
    #expect(tracking.bitmapCalls.map(\.0) == [Self.base], "whole writable mappings only")
    #expect(try report(log, windows: [window, readOnly]) == [])
    // Unmapped while logging: the unmap itself returns the pages, kept until reported.
    tracking.dirty = [Self.base + 0x5000]
    var plainUnmaps = 0
    try log.unmap(window) { () throws(Errno) in plainUnmaps += 1 }
    try log.unmap(readOnly) { () throws(Errno) in plainUnmaps += 1 }
    #expect(tracking.unmapped == [Self.base] && plainUnmaps == 1, "read-only: a plain unmap")
    #expect(try report(log, windows: []) == [5], "kept after the unmap")
    // A kernel that cannot tell: the whole window.
    tracking.refuse = .invalidArgument
    #expect(try report(log, windows: [window]) == Array(0..<256))
    log.stop()
    #expect(!tracking.started)
    #expect(throws: Errno.invalidArgument) { try report(log, windows: [window]) }
  }

  /// Without tracking in the kernel: every page of every writable window, at every report.
  @Test func withoutTrackingEveryWritablePageIsDirty() throws {
    let log = KernelDMALog(tracking: nil)
    #expect(log.method.contains("every page of every writable window"))
    try log.start(pageSize: 4096, ranges: ranges)
    #expect(try report(log, windows: [window, readOnly]) == Array(0..<256))
    #expect(try report(log, windows: [window, readOnly]) == Array(0..<256))
    // At 64 KiB pages: the window's sixteen.
    #expect(try report(log, windows: [window], page: 65536) == Array(0..<16))
    var plainUnmaps = 0
    try log.unmap(window) { () throws(Errno) in plainUnmaps += 1 }
    #expect(plainUnmaps == 1)
    #expect(try report(log, windows: []) == Array(0..<256))
    #expect(try report(log, windows: []) == [])
    // A refused unmap marks nothing more and passes the errno on.
    #expect(throws: Errno.resourceBusy) {
      try log.unmap(window) { () throws(Errno) in throw .resourceBusy }
    }
    #expect(try report(log, windows: []) == [])
  }

  @Test func theMigrationCapabilityNamesTheDirtyPageSizes() throws {
    var raw = RawReply(count: 24 + 32)
    raw.put(UInt32(raw.bytes.count), at: 0)
    raw.put(UInt32(3), at: 4)  // PGSIZES | CAPS
    raw.put(UInt64(0x4020_1000), at: 8)
    raw.put(UInt32(24), at: 16)
    raw.capHeader(at: 24, id: 2, next: 0)
    raw.put(UInt32(0), at: 32)
    raw.put(UInt64(0x1000), at: 40)
    raw.put(UInt64(256 << 20), at: 48)
    let info = try Type1Info(parsing: raw.bytes)
    #expect(info.dirtyPageSizes == 0x1000)
  }
}
