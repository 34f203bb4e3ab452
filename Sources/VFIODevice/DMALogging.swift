import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// A device that reports the client memory its DMA dirtied (DEVICE_FEATURE
/// DMA_LOGGING_START / STOP / REPORT), so a VMM can pre-copy guest RAM while
/// the device runs. A backend without it answers those features ENOTTY.
///
/// The server keeps the protocol's state and checks (`DMALogRules`): the
/// device sees a START only while logging is off, with ranges and a page size
/// that passed them, a REPORT only while logging is on and only for a range
/// inside the logged ones, and a STOP only after a START. Logging outlives a
/// device reset and the DMA windows (pages dirtied in a window the client
/// then unmapped are still reported); the server stops it when the client
/// leaves.
public protocol DMALoggingCapable: AnyObject {
  /// How the device knows what it dirtied, for the log and `info`: "exact:
  /// the DMA engine's writes", "type1 container dirty tracking", ...
  var dmaLoggingMethod: String { get }
  /// Starts logging writes into `ranges` (sorted, disjoint, page-aligned) at `pageSize`.
  func startDMALogging(pageSize: UInt64, ranges: [DMALoggingRange]) throws(Errno)
  func stopDMALogging()
  /// Sets in `bitmap` (zeroed, `DMALoggingReportData.bitmapSize` bytes) a
  /// bit per `pageSize` page of [iova, iova + length) the device dirtied since
  /// the last report of it, and clears those pages in the log.
  func reportDMALog(
    iova: UInt64, length: UInt64, pageSize: UInt64, into bitmap: UnsafeMutableRawBufferPointer
  ) throws(Errno)
}

/// The kernel's rules for the DMA logging features
/// (`vfio_ioctl_device_feature_logging_start` / `_report`).
public enum DMALogRules {
  /// LOG_MAX_RANGES: more ranges in one START are E2BIG.
  public static let maxRanges = 256
  /// Bitmap bytes one START may ask the server to keep (2 GiB covers
  /// 64 TiB of IOVA at 4 KiB pages); more is E2BIG. Untouched bitmap pages cost no memory.
  public static let maxBitmapBytes: UInt64 = 2 << 30

  /// A START's page size and ranges: a power of two of at least
  /// `minimumPageSize` (the DMA page), 1 to 256 ranges, each non-empty,
  /// aligned to the page size, not wrapping, and overlapping no other.
  /// Returns the ranges in address order.
  public static func checkStart(
    pageSize: UInt64, ranges: [DMALoggingRange], minimumPageSize: UInt64
  ) throws(Errno) -> [DMALoggingRange] {
    guard pageSize >= minimumPageSize, pageSize & (pageSize - 1) == 0 else {
      throw .invalidArgument
    }
    guard !ranges.isEmpty else { throw .invalidArgument }
    guard ranges.count <= maxRanges else { throw .argListTooLong }
    let mask = pageSize - 1
    var bitmapBytes: UInt64 = 0
    for range in ranges {
      guard range.length > 0, range.iova & mask == 0, range.length & mask == 0,
        range.iova <= UInt64.max - (range.length - 1)
      else { throw .invalidArgument }
      bitmapBytes += (range.length / pageSize + 63) / 64 * 8
    }
    guard bitmapBytes <= maxBitmapBytes else { throw .argListTooLong }
    let sorted = ranges.sorted { $0.iova < $1.iova }
    for (a, b) in zip(sorted, sorted.dropFirst()) where a.iova + (a.length - 1) >= b.iova {
      throw .invalidArgument
    }
    return sorted
  }

  /// A REPORT's page size and range against the logged `ranges`: a power of
  /// two of at least 4 KiB, a range that does not wrap (EOVERFLOW), is
  /// aligned to the page size and lies inside the logged ranges (EINVAL).
  /// Returns the bitmap's size.
  public static func checkReport(
    iova: UInt64, length: UInt64, pageSize: UInt64, logged ranges: [DMALoggingRange]
  ) throws(Errno) -> Int {
    guard pageSize >= 4096, pageSize & (pageSize - 1) == 0 else { throw .invalidArgument }
    guard length > 0 else { throw .invalidArgument }
    guard iova <= UInt64.max - (length - 1) else { throw .overflow }
    guard iova & (pageSize - 1) == 0, length & (pageSize - 1) == 0 else {
      throw .invalidArgument
    }
    // Covered by the (sorted, disjoint) ranges with no gap.
    var next = iova
    let last = iova + (length - 1)
    for range in ranges where range.iova <= next && next <= range.iova + (range.length - 1) {
      let rangeLast = range.iova + (range.length - 1)
      if rangeLast >= last {
        return DMALoggingReportData.bitmapSize(length: length, pageSize: pageSize)!
      }
      next = rangeLast + 1
    }
    throw .invalidArgument
  }
}

/// A dirty-page bitmap per logged IOVA range, at the logging page size. Marking
/// is a few word operations; a report converts to the page size asked for and
/// clears what it reported. The bitmaps are anonymous memory reserved without
/// commitment, so logging a large guest costs only the pages ever written.
public final class DirtyPageLog {
  struct Range {
    var iova: UInt64
    /// One past the last byte (a range's last byte may be 2⁶⁴ - 1, so compared as `last`).
    var last: UInt64
    var words: UnsafeMutablePointer<UInt64>
    var wordCount: Int
  }

  public let pageSize: UInt64
  let shift: UInt64
  private var ranges: [Range] = []

  /// `ranges` as `DMALogRules.checkStart` returns them.
  public init(pageSize: UInt64, ranges: [DMALoggingRange]) throws(Errno) {
    self.pageSize = pageSize
    shift = UInt64(pageSize.trailingZeroBitCount)
    for range in ranges {
      let pages = range.length >> shift
      let count = Int((pages + 63) / 64)
      let bytes = count * 8
      let p = mmap(
        nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
      guard let p, p != MAP_FAILED else {
        let error = Errno(rawValue: errno)
        release()
        throw error
      }
      self.ranges.append(
        Range(
          iova: range.iova, last: range.iova + (range.length - 1),
          words: p.bindMemory(to: UInt64.self, capacity: count), wordCount: count))
    }
  }

  deinit { release() }

  private func release() {
    for range in ranges { munmap(range.words, range.wordCount * 8) }
    ranges = []
  }

  /// Marks the pages of [address, address + length) that lie in logged ranges.
  public func mark(address: UInt64, length: UInt64) {
    guard length > 0 else { return }
    let last = address &+ (length - 1)
    for range in ranges where range.iova <= last && address <= range.last {
      let first = (max(address, range.iova) - range.iova) >> shift
      let final = (min(last, range.last) - range.iova) >> shift
      Self.setBits(range.words, from: Int(first), through: Int(final))
    }
  }

  /// Whether the page holding `address` is marked (tests).
  public func isMarked(_ address: UInt64) -> Bool {
    for range in ranges where range.iova <= address && address <= range.last {
      let bit = Int((address - range.iova) >> shift)
      return range.words[bit / 64] & (1 << UInt64(bit % 64)) != 0
    }
    return false
  }

  /// Fills `bitmap` (zeroed, whole u64 words, bit n = page n of `reportPage`
  /// bytes from `iova`) from the log, and clears the logged pages the
  /// report covers wholly. A logged page only partly inside the range (a
  /// report page smaller than the log's) stays marked for the report of
  /// its other part: a page may be reported twice, never missed.
  public func report(
    iova: UInt64, length: UInt64, pageSize reportPage: UInt64,
    into bitmap: UnsafeMutableRawBufferPointer
  ) {
    let last = iova + (length - 1)
    let reportShift = UInt64(reportPage.trailingZeroBitCount)
    for range in ranges where range.iova <= last && iova <= range.last {
      let lo = max(iova, range.iova)
      let hi = min(last, range.last)
      let first = Int((lo - range.iova) >> shift)
      let final = Int((hi - range.iova) >> shift)
      if reportPage == pageSize {
        // Same pages: words shifted into place. Every logged page here lies wholly inside.
        let offset = Int((lo - iova) >> shift) - first  // report bit = log bit + offset
        for w in (first / 64)...(final / 64) {
          var mask = UInt64.max
          if w == first / 64 { mask &= UInt64.max << UInt64(first % 64) }
          if w == final / 64, final % 64 != 63 { mask &= (1 << UInt64(final % 64 + 1)) - 1 }
          let value = range.words[w] & mask
          guard value != 0 else { continue }
          range.words[w] &= ~mask
          let target = w * 64 + offset  // report bit of this word's bit 0 (≥ 0 where bits are set)
          Self.orShifted(value, at: target, into: bitmap)
        }
        continue
      }
      for w in (first / 64)...(final / 64) {
        var value = range.words[w]
        while value != 0 {
          let b = w * 64 + value.trailingZeroBitCount
          value &= value - 1
          guard b >= first, b <= final else { continue }
          let pageStart = range.iova + UInt64(b) << shift
          let pageLast = pageStart + (pageSize - 1)
          let from = (max(pageStart, iova) - iova) >> reportShift
          let through = (min(pageLast, last) - iova) >> reportShift
          Self.setBits(bitmap, from: Int(from), through: Int(through))
          if pageStart >= iova && pageLast <= last {
            range.words[b / 64] &= ~(1 << UInt64(b % 64))
          }
        }
      }
    }
  }

  /// Sets bits first...last of the words at `words`.
  @inline(__always)
  static func setBits(_ words: UnsafeMutablePointer<UInt64>, from first: Int, through last: Int) {
    let fw = first / 64
    let lw = last / 64
    let head = UInt64.max << UInt64(first % 64)
    let tail = last % 64 == 63 ? UInt64.max : (1 << UInt64(last % 64 + 1)) - 1
    if fw == lw {
      words[fw] |= head & tail
      return
    }
    words[fw] |= head
    var w = fw + 1
    while w < lw {
      words[w] = UInt64.max
      w += 1
    }
    words[lw] |= tail
  }

  /// setBits on a little-endian bitmap of bytes that may be unaligned.
  static func setBits(_ bitmap: UnsafeMutableRawBufferPointer, from first: Int, through last: Int) {
    for w in (first / 64)...(last / 64) {
      let lo = max(first, w * 64) - w * 64
      let hi = min(last, w * 64 + 63) - w * 64
      let mask = (hi == 63 ? UInt64.max : (1 << UInt64(hi + 1)) - 1) & (UInt64.max << UInt64(lo))
      orWord(mask, word: w, into: bitmap)
    }
  }

  /// ORs `value` into the bitmap with its bit 0 at bit `target`.
  static func orShifted(_ value: UInt64, at target: Int, into bitmap: UnsafeMutableRawBufferPointer)
  {
    let s = UInt64(((target % 64) + 64) % 64)
    let w = (target - Int(s)) / 64
    if w >= 0, (w + 1) * 8 <= bitmap.count { orWord(value << s, word: w, into: bitmap) }
    if s != 0, (w + 2) * 8 <= bitmap.count { orWord(value >> (64 - s), word: w + 1, into: bitmap) }
  }

  @inline(__always)
  static func orWord(_ value: UInt64, word: Int, into bitmap: UnsafeMutableRawBufferPointer) {
    guard value != 0 else { return }
    let at = word * 8
    let old = UInt64(littleEndian: bitmap.loadUnaligned(fromByteOffset: at, as: UInt64.self))
    bitmap.storeBytes(of: (old | value).littleEndian, toByteOffset: at, as: UInt64.self)
  }
}

// MARK: Live update

/// The dirty page log's section of a live update's handover state
/// (protocol/live-update-device.md, "Dirty page log"): a device that logs
/// its DMA embeds it, so pages dirtied before the update are still reported
/// after it.
extension DirtyPageLog {
  /// The section's format version.
  public static let handoverVersion: UInt32 = 1

  /// The logged ranges, in address order.
  public var loggedRanges: [DMALoggingRange] {
    ranges.map { DMALoggingRange(iova: $0.iova, length: $0.last - $0.iova + 1) }
  }

  /// Appends the log to `writer`: its page size, and per range its bounds and
  /// the runs of non-zero bitmap words (the rest is zero, and a large idle
  /// log costs a few bytes).
  public func exportHandover(into writer: inout ByteWriter) {
    writer.append(Self.handoverVersion)
    writer.append(pageSize)
    writer.append(UInt32(ranges.count))
    for range in ranges {
      writer.append(range.iova)
      writer.append(range.last - range.iova + 1)  // a length that fit in a u64 once
      var runs: [Swift.Range<Int>] = []
      var w = 0
      while w < range.wordCount {
        guard range.words[w] != 0 else {
          w += 1
          continue
        }
        let start = w
        while w < range.wordCount, range.words[w] != 0 { w += 1 }
        runs.append(start..<w)
      }
      writer.append(UInt32(runs.count))
      for run in runs {
        writer.append(UInt64(run.lowerBound))
        writer.append(UInt32(run.count))
        for k in run { writer.append(range.words[k]) }
      }
    }
  }

  /// Reads the section `exportHandover` wrote: the ranges are checked as a
  /// DMA_LOGGING_START's are (`DMALogRules.checkStart`, any power-of-two page
  /// size), and every run must lie inside its range's bitmap.
  public static func importHandover(from reader: inout ByteReader) throws(HandoverRefusal)
    -> DirtyPageLog
  {
    let version: UInt32 = try reader.handoverField("the dirty page log's format version")
    guard version == handoverVersion else {
      throw HandoverRefusal(
        "the dirty page log is format version \(version); this server reads version \(handoverVersion)"
      )
    }
    let pageSizeAt = reader.offset
    let pageSize: UInt64 = try reader.handoverField("the dirty page log's page size")
    guard pageSize > 0, pageSize & (pageSize - 1) == 0 else {
      throw HandoverRefusal.corrupt(
        "the dirty page log's page size", at: pageSizeAt, "\(pageSize) is not a power of two")
    }
    let shift = UInt64(pageSize.trailingZeroBitCount)
    let countAt = reader.offset
    let count: UInt32 = try reader.handoverField("the dirty page log's range count")
    guard count > 0, count <= DMALogRules.maxRanges else {
      throw HandoverRefusal.corrupt(
        "the dirty page log's range count", at: countAt,
        "\(count) ranges (1 to \(DMALogRules.maxRanges) are logged)")
    }
    // First the whole section, checked; then the log, filled from it.
    var ranges: [DMALoggingRange] = []
    var runs: [[(start: Int, words: UnsafeRawBufferPointer)]] = []
    for r in 0..<Int(count) {
      let field = "dirty page log range \(r)"
      let rangeAt = reader.offset
      let range = DMALoggingRange(
        iova: try reader.handoverField("\(field)'s IOVA"),
        length: try reader.handoverField("\(field)'s length"))
      guard range.length > 0, range.length & (pageSize - 1) == 0 else {
        throw HandoverRefusal.corrupt(
          field, at: rangeAt,
          "length \(range.length) is not a whole number of \(pageSize)-byte pages")
      }
      let pages = range.length >> shift
      let wordCount = (pages + 63) / 64
      let runCount: UInt32 = try reader.handoverField("\(field)'s run count")
      var rangeRuns: [(start: Int, words: UnsafeRawBufferPointer)] = []
      var end: UInt64 = 0
      for k in 0..<Int(runCount) {
        let runAt = reader.offset
        let start: UInt64 = try reader.handoverField("\(field) run \(k)'s first word")
        let length: UInt32 = try reader.handoverField("\(field) run \(k)'s word count")
        guard length > 0, start >= end, start < wordCount, UInt64(length) <= wordCount - start
        else {
          throw HandoverRefusal.corrupt(
            "\(field) run \(k)", at: runAt,
            "words \(start)..<\(start &+ UInt64(length)) of a \(wordCount)-word bitmap, after word \(end)"
          )
        }
        let wordsAt = reader.offset
        let words = try reader.handoverBytes(8 * Int(length), "\(field) run \(k)'s words")
        end = start + UInt64(length)
        if end == wordCount, pages % 64 != 0 {
          let last = UInt64(
            littleEndian: words.loadUnaligned(fromByteOffset: words.count - 8, as: UInt64.self))
          guard last >> (pages % 64) == 0 else {
            throw HandoverRefusal.corrupt(
              "\(field) run \(k)'s last word", at: wordsAt + words.count - 8,
              "bits set past the range's \(pages) pages")
          }
        }
        rangeRuns.append((Int(start), words))
      }
      ranges.append(range)
      runs.append(rangeRuns)
    }
    do throws(Errno) {
      guard
        try DMALogRules.checkStart(pageSize: pageSize, ranges: ranges, minimumPageSize: 1)
          == ranges
      else { throw Errno.invalidArgument }
    } catch {
      throw HandoverRefusal(
        "the handover state is corrupt: the dirty page log's ranges are not ranges a DMA_LOGGING_START accepts (\(error))"
      )
    }
    let log: DirtyPageLog
    do throws(Errno) { log = try DirtyPageLog(pageSize: pageSize, ranges: ranges) } catch {
      throw HandoverRefusal("cannot allocate the dirty page log's bitmaps: \(error)")
    }
    for (r, rangeRuns) in runs.enumerated() {
      let words = log.ranges[r].words
      for run in rangeRuns {
        for k in 0..<run.words.count / 8 {
          words[run.start + k] = UInt64(
            littleEndian: run.words.loadUnaligned(fromByteOffset: 8 * k, as: UInt64.self))
        }
      }
    }
    return log
  }
}
