/// Non-overlapping half-open intervals [start, end) kept in address order, for
/// DMA windows. A two-level sorted layout (blocks of at most `blockCapacity`
/// entries, found by binary search over each block's first start) keeps
/// insert, remove and lookup at O(log n + blockCapacity) with no per-node
/// allocation, so 65535 windows cost no more per operation than 10.
struct IntervalMap<Value> {
  struct Entry {
    var start: UInt64
    var end: UInt64
    var value: Value
  }

  private var blocks: [[Entry]] = []
  private(set) var count = 0
  private let blockCapacity = 256

  var isEmpty: Bool { count == 0 }

  /// Index of the block that could hold `address` (the last block whose first start ≤ address).
  private func blockIndex(for address: UInt64) -> Int {
    var lo = 0
    var hi = blocks.count - 1
    var found = 0
    while lo <= hi {
      let mid = (lo + hi) / 2
      if blocks[mid][0].start <= address {
        found = mid
        lo = mid + 1
      } else {
        hi = mid - 1
      }
    }
    return found
  }

  /// Position in `block` of the first entry with start > address.
  private static func upperBound(_ block: [Entry], _ address: UInt64) -> Int {
    var lo = 0
    var hi = block.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if block[mid].start <= address { lo = mid + 1 } else { hi = mid }
    }
    return lo
  }

  /// The entry containing `address`, if any.
  func lookup(_ address: UInt64) -> Entry? {
    guard !blocks.isEmpty else { return nil }
    let b = blockIndex(for: address)
    let block = blocks[b]
    let i = Self.upperBound(block, address) - 1
    guard i >= 0, block[i].end > address else { return nil }
    return block[i]
  }

  /// The entry preceding (start ≤ address) and the one following address, for overlap checks.
  private func neighbours(of start: UInt64) -> (before: Entry?, after: Entry?) {
    guard !blocks.isEmpty else { return (nil, nil) }
    let b = blockIndex(for: start)
    let block = blocks[b]
    let i = Self.upperBound(block, start)
    let before: Entry? = i > 0 ? block[i - 1] : (b > 0 ? blocks[b - 1].last : nil)
    let after: Entry? =
      i < block.count ? block[i] : (b + 1 < blocks.count ? blocks[b + 1].first : nil)
    return (before, after)
  }

  /// Inserts [start, end); returns false (and changes nothing) if it overlaps an entry.
  mutating func insert(start: UInt64, end: UInt64, value: Value) -> Bool {
    let (before, after) = neighbours(of: start)
    if let before, before.end > start { return false }
    if let after, after.start < end { return false }
    let entry = Entry(start: start, end: end, value: value)
    if blocks.isEmpty {
      blocks = [[entry]]
    } else {
      var b = blockIndex(for: start)
      if start < blocks[b][0].start { b = 0 }
      let i = Self.upperBound(blocks[b], start)
      blocks[b].insert(entry, at: i)
      if blocks[b].count > blockCapacity {
        let upper = Array(blocks[b][(blockCapacity / 2)...])
        blocks[b].removeSubrange((blockCapacity / 2)...)
        blocks.insert(upper, at: b + 1)
      }
    }
    count += 1
    return true
  }

  /// Position in `block` of the first entry with start ≥ address.
  private static func lowerBound(_ block: [Entry], _ address: UInt64) -> Int {
    var lo = 0
    var hi = block.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if block[mid].start < address { lo = mid + 1 } else { hi = mid }
    }
    return lo
  }

  /// Whether no entry straddles either edge of [start, last].
  private func edgesClear(_ start: UInt64, _ last: UInt64) -> Bool {
    if let first = lookup(start), first.start != start { return false }
    if let final = lookup(last), final.end - 1 != last { return false }
    return true
  }

  /// The values of every entry lying inside [start, last] (inclusive, so that
  /// a range may end at 2^64), in address order, or nil when an entry
  /// straddles either edge: what `remove(inside:through:)` would remove.
  func values(inside start: UInt64, through last: UInt64) -> [Value]? {
    guard !blocks.isEmpty, start <= last else { return [] }
    guard edgesClear(start, last) else { return nil }
    var found: [Value] = []
    var b = blockIndex(for: start)
    var i = Self.lowerBound(blocks[b], start)
    while b < blocks.count {
      let j = Self.upperBound(blocks[b], last)
      if i < j { found.append(contentsOf: blocks[b][i..<j].lazy.map { $0.value }) }
      guard j == blocks[b].count else { break }
      b += 1
      i = 0
    }
    return found
  }

  /// Removes every entry lying inside [start, last] (inclusive, so that a range
  /// may end at 2^64) and returns their values in address order; none inside
  /// is an empty result. Returns nil, changing nothing, when an entry
  /// straddles either edge. Two lookups decide that, so the cost stays
  /// O(log n + blockCapacity) plus the entries removed.
  mutating func remove(inside start: UInt64, through last: UInt64) -> [Value]? {
    guard !blocks.isEmpty, start <= last else { return [] }
    guard edgesClear(start, last) else { return nil }
    // No entry crosses either edge: the run of starts in [start, last] is the answer.
    var removed: [Value] = []
    var b = blockIndex(for: start)
    var i = Self.lowerBound(blocks[b], start)
    while b < blocks.count {
      let j = Self.upperBound(blocks[b], last)
      let runsOn = j == blocks[b].count
      if i < j {
        removed.append(contentsOf: blocks[b][i..<j].lazy.map { $0.value })
        blocks[b].removeSubrange(i..<j)
      }
      guard runsOn else { break }
      if blocks[b].isEmpty { blocks.remove(at: b) } else { b += 1 }
      i = 0
    }
    count -= removed.count
    return removed
  }

  mutating func removeAll() -> [Entry] {
    let all = blocks.flatMap { $0 }
    blocks = []
    count = 0
    return all
  }

  var entries: [Entry] { blocks.flatMap { $0 } }
}
