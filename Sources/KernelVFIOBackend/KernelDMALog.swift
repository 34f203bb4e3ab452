import KernelVFIO
import SystemPackage
import VFIODevice
import VFIOUser

/// DMA logging for a device behind the kernel's VFIO: the type1 container's
/// dirty-page tracking where the kernel offers it, and otherwise every page
/// of every writable window (what a VMM assumes of a device without a log).
/// Either way the pages are gathered into a `DirtyPageLog`, so a window
/// unmapped while logging keeps its pages until they are reported.
public final class KernelDMALog {
  let tracking: IOMMUDirtyTracking?
  private(set) var log: DirtyPageLog?

  public init(tracking: IOMMUDirtyTracking?) { self.tracking = tracking }

  /// How the pages are known, for the log and `info`.
  public var method: String {
    if let tracking {
      return
        "type1 container dirty tracking (VFIO_IOMMU_DIRTY_PAGES, \(tracking.dirtyPageSize)-byte pages)"
    }
    return "no dirty tracking in the kernel: every page of every writable window reported dirty"
  }

  public var isLogging: Bool { log != nil }

  public func start(pageSize: UInt64, ranges: [DMALoggingRange]) throws(Errno) {
    let log = try DirtyPageLog(pageSize: pageSize, ranges: ranges)
    try tracking?.startDirtyTracking()
    self.log = log
  }

  /// A log a live update brought: the container, handed over with it,
  /// tracks already (its tracking is the kernel's, not the process's).
  public func adopt(_ log: DirtyPageLog) { self.log = log }

  /// Stops the container's tracking too; a refusal leaves nothing to undo.
  public func stop() {
    guard log != nil else { return }
    try? tracking?.stopDirtyTracking()
    log = nil
  }

  /// Takes `window` out of the IOMMU (with `unmap`, or, while the container
  /// tracks, with the unmap that returns the window's dirty pages in the same
  /// call) and keeps what it dirtied until it is reported.
  public func unmap(_ window: DMAWindow, with unmap: () throws(Errno) -> Void) throws(Errno) {
    guard let log, window.writable else { return try unmap() }
    guard let tracking else {
      try unmap()
      log.mark(address: window.address, length: window.size)
      return
    }
    let words = try tracking.unmapReturningDirty(iova: window.address, size: window.size)
    mark(words, of: window, pageSize: tracking.dirtyPageSize, into: log)
  }

  /// Gathers the writable `windows` that overlap the range, then reports
  /// the range from the log (reading clears).
  public func report(
    iova: UInt64, length: UInt64, pageSize: UInt64, into bitmap: UnsafeMutableRawBufferPointer,
    windows: [DMAWindow]
  ) throws(Errno) {
    guard let log else { throw .invalidArgument }
    let last = iova + (length - 1)
    for window in windows
    where window.writable && window.address <= last && iova <= window.end - 1 {
      collect(window, into: log)
    }
    log.report(iova: iova, length: length, pageSize: pageSize, into: bitmap)
  }

  /// A whole window's dirty pages into the log (whole, so the kernel's rule
  /// that a bitmap range must not cut a mapping holds).
  private func collect(_ window: DMAWindow, into log: DirtyPageLog) {
    guard let tracking else {
      log.mark(address: window.address, length: window.size)
      return
    }
    do throws(Errno) {
      let words = try tracking.dirtyBitmap(iova: window.address, size: window.size)
      mark(words, of: window, pageSize: tracking.dirtyPageSize, into: log)
    } catch {
      // The kernel cannot tell: every page is dirty, never one missed.
      log.mark(address: window.address, length: window.size)
    }
  }

  /// The set bits of a container bitmap of `window` into the log.
  private func mark(
    _ words: [UInt64], of window: DMAWindow, pageSize page: UInt64, into log: DirtyPageLog
  ) {
    for (w, word) in words.enumerated() where word != 0 {
      var bits = word
      while bits != 0 {
        let index = UInt64(w * 64 + bits.trailingZeroBitCount)
        bits &= bits - 1
        log.mark(address: window.address + index * page, length: page)
      }
    }
  }
}
