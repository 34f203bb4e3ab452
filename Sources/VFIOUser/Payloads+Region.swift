import SystemPackage

// Region payloads: info with its capability chain, I/O fds, accesses and
// REGION_WRITE_MULTI (offsets from the end of the header).

/// One mmap-able window of a sparse region.
public struct SparseMmapArea: Equatable, Sendable, Hashable {
  public var offset: UInt64
  public var size: UInt64
  public init(offset: UInt64, size: UInt64) {
    self.offset = offset
    self.size = size
  }
}

/// A region capability in the chain after `vfio_region_info`.
public enum RegionCapability: Equatable, Sendable {
  case sparseMmap([SparseMmapArea])
  case type(type: UInt32, subtype: UInt32)
  case msixMappable

  var encodedSize: Int {
    switch self {
    case .sparseMmap(let areas): 16 + 16 * areas.count
    case .type: 16
    case .msixMappable: 8
    }
  }
}

/// DEVICE_GET_REGION_INFO request and reply (the reply carries the capability chain).
public struct RegionInfoPayload: WirePayload {
  public static let fixedSize = 32
  public var argsz: UInt32
  public var flags: VFIORegionFlags
  public var index: UInt32
  public var capOffset: UInt32
  public var size: UInt64
  public var offset: UInt64
  public var capabilities: [RegionCapability]

  public init(
    argsz: UInt32 = 32, flags: VFIORegionFlags = [], index: UInt32, capOffset: UInt32 = 0,
    size: UInt64 = 0,
    offset: UInt64 = 0, capabilities: [RegionCapability] = []
  ) {
    self.argsz = argsz
    self.flags = flags
    self.index = index
    self.capOffset = capOffset
    self.size = size
    self.offset = offset
    self.capabilities = capabilities
  }

  /// Bytes the fixed part plus every capability take.
  public var fullSize: Int { Self.fixedSize + capabilities.reduce(0) { $0 + $1.encodedSize } }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = VFIORegionFlags(rawValue: try r.u32(at: 4))
    index = try r.u32(at: 8)
    capOffset = try r.u32(at: 12)
    size = try r.u64(at: 16)
    offset = try r.u64(at: 24)
    capabilities = []
    guard flags.contains(.caps), bytes.count > Self.fixedSize else { return }
    var next = Int(capOffset)
    var seen = 0
    while next != 0 {
      // Each capability header must lie inside the bytes, after the fixed part, without loops.
      guard next >= Self.fixedSize, next + 8 <= bytes.count, seen < 64 else {
        throw .invalidArgument
      }
      seen += 1
      let id = try r.u16(at: next)
      let following = Int(try r.u32(at: next + 4))
      switch id {
      case VFIORegionCapID.sparseMmap:
        guard next + 16 <= bytes.count else { throw .invalidArgument }
        let count = Int(try r.u32(at: next + 8))
        guard count <= 1024, next + 16 + 16 * count <= bytes.count else { throw .invalidArgument }
        var areas: [SparseMmapArea] = []
        for i in 0..<count {
          let base = next + 16 + 16 * i
          areas.append(SparseMmapArea(offset: try r.u64(at: base), size: try r.u64(at: base + 8)))
        }
        capabilities.append(.sparseMmap(areas))
      case VFIORegionCapID.type:
        guard next + 16 <= bytes.count else { throw .invalidArgument }
        capabilities.append(.type(type: try r.u32(at: next + 8), subtype: try r.u32(at: next + 12)))
      case VFIORegionCapID.msixMappable:
        capabilities.append(.msixMappable)
      default:
        break  // unknown capabilities are skipped, as the kernel's consumers do
      }
      guard following == 0 || following > next else { throw .invalidArgument }
      next = following
    }
  }

  public var encodedSize: Int { capabilities.isEmpty ? Self.fixedSize : fullSize }

  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags.rawValue, at: 4)
    bytes.put(index, at: 8)
    // The chain is written right after the fixed part, so that is where the
    // first capability is, whatever offset a decoded reply had.
    bytes.put(capabilities.isEmpty ? capOffset : UInt32(Self.fixedSize), at: 12)
    bytes.put(size, at: 16)
    bytes.put(offset, at: 24)
    var at = Self.fixedSize
    for (i, cap) in capabilities.enumerated() {
      let next = i + 1 < capabilities.count ? UInt32(at + cap.encodedSize) : 0
      bytes.put(UInt32(next), at: at + 4)
      switch cap {
      case .sparseMmap(let areas):
        bytes.put(VFIORegionCapID.sparseMmap, at: at)
        bytes.put(UInt16(1), at: at + 2)
        bytes.put(UInt32(areas.count), at: at + 8)
        bytes.put(UInt32(0), at: at + 12)
        for (j, area) in areas.enumerated() {
          bytes.put(area.offset, at: at + 16 + 16 * j)
          bytes.put(area.size, at: at + 24 + 16 * j)
        }
      case .type(let type, let subtype):
        bytes.put(VFIORegionCapID.type, at: at)
        bytes.put(UInt16(1), at: at + 2)
        bytes.put(type, at: at + 8)
        bytes.put(subtype, at: at + 12)
      case .msixMappable:
        bytes.put(VFIORegionCapID.msixMappable, at: at)
        bytes.put(UInt16(1), at: at + 2)
      }
      at += cap.encodedSize
    }
  }
}

/// One sub-region of a DEVICE_GET_REGION_IO_FDS reply (ioeventfd or ioregionfd form).
public struct IOFDSubRegion: Equatable, Sendable {
  public static let size = 40
  public static let typeIOEventFD: UInt32 = 0
  public static let typeIORegionFD: UInt32 = 1
  public var offset: UInt64
  public var size: UInt64
  public var fdIndex: UInt32
  public var type: UInt32
  public var flags: UInt32
  /// datamatch (ioeventfd) or user_data (ioregionfd).
  public var value: UInt64

  public init(
    offset: UInt64, size: UInt64, fdIndex: UInt32, type: UInt32, flags: UInt32, value: UInt64
  ) {
    self.offset = offset
    self.size = size
    self.fdIndex = fdIndex
    self.type = type
    self.flags = flags
    self.value = value
  }
}

/// DEVICE_GET_REGION_IO_FDS request and reply.
public struct RegionIOFDsPayload: WirePayload {
  public static let fixedSize = 16
  public var argsz: UInt32
  public var flags: UInt32
  public var index: UInt32
  public var count: UInt32
  public var subRegions: [IOFDSubRegion]

  public init(
    argsz: UInt32 = 16, flags: UInt32 = 0, index: UInt32, count: UInt32 = 0,
    subRegions: [IOFDSubRegion] = []
  ) {
    self.argsz = argsz
    self.flags = flags
    self.index = index
    self.count = count
    self.subRegions = subRegions
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = try r.u32(at: 4)
    index = try r.u32(at: 8)
    count = try r.u32(at: 12)
    subRegions = []
    let available = (bytes.count - Self.fixedSize) / IOFDSubRegion.size
    for i in 0..<min(Int(count), available) {
      let base = Self.fixedSize + IOFDSubRegion.size * i
      subRegions.append(
        IOFDSubRegion(
          offset: try r.u64(at: base), size: try r.u64(at: base + 8),
          fdIndex: try r.u32(at: base + 16),
          type: try r.u32(at: base + 20), flags: try r.u32(at: base + 24),
          value: try r.u64(at: base + 32)))
    }
  }

  public var encodedSize: Int { Self.fixedSize + IOFDSubRegion.size * subRegions.count }

  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    bytes.put(index, at: 8)
    bytes.put(count, at: 12)
    for (i, sub) in subRegions.enumerated() {
      let base = Self.fixedSize + IOFDSubRegion.size * i
      bytes.put(sub.offset, at: base)
      bytes.put(sub.size, at: base + 8)
      bytes.put(sub.fdIndex, at: base + 16)
      bytes.put(sub.type, at: base + 20)
      bytes.put(sub.flags, at: base + 24)
      bytes.put(UInt32(0), at: base + 28)
      bytes.put(sub.value, at: base + 32)
    }
  }
}

/// The 16-byte head of REGION_READ / REGION_WRITE requests and replies; data follows it.
public struct RegionAccessHeader: Equatable, Sendable {
  public static let size = 16
  public var offset: UInt64
  public var region: UInt32
  public var count: UInt32

  public init(offset: UInt64, region: UInt32, count: UInt32) {
    self.offset = offset
    self.region = region
    self.count = count
  }

  @inlinable
  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count >= Self.size else { throw .invalidArgument }
    offset = try r.u64(at: 0)
    region = try r.u32(at: 8)
    count = try r.u32(at: 12)
  }

  @inlinable
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(offset, at: 0)
    bytes.put(region, at: 8)
    bytes.put(count, at: 12)
  }

  public func encoded(data: [UInt8] = []) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Self.size + data.count)
    out.withUnsafeMutableBytes { encode(into: $0) }
    out.replaceSubrange(Self.size..., with: data)
    return out
  }
}

/// One entry of REGION_WRITE_MULTI.
public struct WriteMultiEntry: Equatable, Sendable {
  public static let size = 24
  public var offset: UInt64
  public var region: UInt32
  public var count: UInt32
  /// Up to 8 data bytes, little-endian in a u64.
  public var data: UInt64

  public init(offset: UInt64, region: UInt32, count: UInt32, data: UInt64) {
    self.offset = offset
    self.region = region
    self.count = count
    self.data = data
  }

  /// The entry at byte `offset` of `bytes`.
  @inlinable
  public init(decoding bytes: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
    let r = ByteReader(bytes)
    self.offset = try r.u64(at: offset)
    region = try r.u32(at: offset + 8)
    count = try r.u32(at: offset + 12)
    data = try r.u64(at: offset + 16)
  }

  @inlinable
  public func encode(into bytes: UnsafeMutableRawBufferPointer, at offset: Int) {
    bytes.put(self.offset, at: offset)
    bytes.put(region, at: offset + 8)
    bytes.put(count, at: offset + 12)
    bytes.put(data, at: offset + 16)
  }

  /// Runs `body` on the `count` data bytes (little-endian, as on the wire), with no allocation.
  @inlinable
  public func withData<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E)
    -> R
  {
    var value = data.littleEndian
    let n = Int(min(count, UInt32(MemoryLayout<UInt64>.size)))
    return try withUnsafeBytes(of: &value) { raw throws(E) in
      try body(UnsafeRawBufferPointer(rebasing: raw[..<n]))
    }
  }
}

/// REGION_WRITE_MULTI request.
public struct WriteMultiPayload: WirePayload {
  public var entries: [WriteMultiEntry]

  public init(entries: [WriteMultiEntry]) { self.entries = entries }

  /// Validates the layout without building an array (the server's path).
  @inlinable
  public static func validate(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let r = ByteReader(bytes)
    guard bytes.count >= 8 else { throw .invalidArgument }
    let count = try r.u64(at: 0)
    guard count >= 1, count <= UInt64(WriteMultiLimits.maxWrites) else { throw .invalidArgument }
    guard bytes.count == 8 + WriteMultiEntry.size * Int(count) else { throw .invalidArgument }
    for i in 0..<Int(count) {
      let n = try r.u32(at: 8 + WriteMultiEntry.size * i + 12)
      guard n >= 1, n <= UInt32(WriteMultiLimits.maxDataPerWrite) else { throw .invalidArgument }
    }
    return Int(count)
  }

  /// Entry `i` of a payload that `validate` accepted, without building the
  /// array (the server's path).
  @inlinable
  public static func entry(_ i: Int, in bytes: UnsafeRawBufferPointer) throws(Errno)
    -> WriteMultiEntry
  {
    try WriteMultiEntry(decoding: bytes, at: 8 + WriteMultiEntry.size * i)
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let count = try Self.validate(bytes)
    entries = []
    entries.reserveCapacity(count)
    for i in 0..<count { entries.append(try Self.entry(i, in: bytes)) }
  }

  public var encodedSize: Int { 8 + WriteMultiEntry.size * entries.count }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(UInt64(entries.count), at: 0)
    for (i, entry) in entries.enumerated() {
      entry.encode(into: bytes, at: 8 + WriteMultiEntry.size * i)
    }
  }
}

/// REGION_WRITE_MULTI reply: the number of writes done, a bare u64 `wr_cnt`.
public struct WriteMultiReply: WirePayload {
  public static let size = 8
  public var wrCnt: UInt64

  public init(wrCnt: UInt64) { self.wrCnt = wrCnt }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count == Self.size else { throw .invalidArgument }
    wrCnt = try r.u64(at: 0)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) { bytes.put(wrCnt, at: 0) }
}
