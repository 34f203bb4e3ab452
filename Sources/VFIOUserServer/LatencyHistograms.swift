import Synchronization

/// Service time per message type, in fixed log-scale buckets: 8 per power of
/// two (each at most 12.5% wide), from 1 ns to about 9 minutes.
///
/// Why not HdrHistogram (hdrhistogram-swift is available): its recording is a
/// plain `counts[i] += 1` on a class, so a control client reading while the
/// connection thread records would race, and the fix (a lock, or a copy per
/// read under one) puts a lock on the request path. Here, as in
/// `ServerCounters`, the single connection thread bumps a preallocated cell
/// with a relaxed load and store: no lock, no allocation, no locked
/// instruction; readers may see a bucket one sample behind, never torn.
public final class LatencyHistograms: @unchecked Sendable {
  /// Sub-buckets per power of two, as a shift: 2^3 = 8.
  static let subBucketBits = 3
  static let subBuckets = 1 << subBucketBits
  /// Powers of two covered: 2^39 ns ≈ 550 s is the last bucket's floor.
  static let bucketCount = (39 - subBucketBits + 1) * subBuckets + subBuckets
  let slots: Int
  private let cells: UnsafeMutablePointer<Atomic<UInt64>>

  init(slots: Int) {
    self.slots = slots
    cells = .allocate(capacity: slots * Self.bucketCount)
    for i in 0..<(slots * Self.bucketCount) { (cells + i).initialize(to: Atomic(0)) }
  }

  deinit {
    cells.deinitialize(count: slots * Self.bucketCount)
    cells.deallocate()
  }

  /// The bucket `nanoseconds` falls in.
  @inline(__always)
  public static func bucket(_ nanoseconds: UInt64) -> Int {
    if nanoseconds < UInt64(subBuckets) { return Int(nanoseconds) }
    let exponent = 63 - nanoseconds.leadingZeroBitCount
    let mantissa =
      Int(truncatingIfNeeded: nanoseconds >> UInt64(exponent - subBucketBits)) & (subBuckets - 1)
    return min((exponent - subBucketBits + 1) * subBuckets + mantissa, bucketCount - 1)
  }

  /// The lowest value of `bucket`, and its width.
  public static func range(_ bucket: Int) -> (low: UInt64, width: UInt64) {
    if bucket < subBuckets { return (UInt64(bucket), 1) }
    let exponent = bucket / subBuckets + subBucketBits - 1
    let mantissa = UInt64(bucket % subBuckets)
    let unit = UInt64(1) << UInt64(exponent - subBucketBits)
    return ((UInt64(subBuckets) + mantissa) * unit, unit)
  }

  @inline(__always)
  func record(slot: Int, nanoseconds: UInt64) {
    let cell = cells + slot * Self.bucketCount + Self.bucket(nanoseconds)
    cell.pointee.store(cell.pointee.load(ordering: .relaxed) &+ 1, ordering: .relaxed)
  }

  /// What one message type's histogram says.
  public struct Summary: Sendable, Equatable {
    public var samples: UInt64
    /// Nanoseconds, each the middle of the bucket the quantile falls in.
    public var p50: UInt64
    public var p99: UInt64
    public var max: UInt64
  }

  /// The histogram of `slot` summed up, nil when it has no sample.
  public func summary(slot: Int) -> Summary? {
    let counts = (0..<Self.bucketCount).map {
      (cells + slot * Self.bucketCount + $0).pointee.load(ordering: .relaxed)
    }
    let total = counts.reduce(0, &+)
    guard total > 0 else { return nil }
    func quantile(_ q: Double) -> UInt64 {
      let rank = UInt64((Double(total) * q).rounded(.up))
      var seen: UInt64 = 0
      for (bucket, count) in counts.enumerated() {
        seen += count
        if seen >= max(rank, 1) {
          let (low, width) = Self.range(bucket)
          return low + width / 2
        }
      }
      return 0
    }
    let last = counts.lastIndex { $0 > 0 }!
    let (low, width) = Self.range(last)
    return Summary(
      samples: total, p50: quantile(0.5), p99: quantile(0.99), max: low + width - 1)
  }
}
