import SystemPackage

// Payload codecs, one per message layout of docs/interop/vfio-user.rst. Offsets
// are from the end of the 16-byte header.

/// VERSION request and reply: major, minor, optional NUL-terminated JSON.
public struct VersionPayload: WirePayload {
  public var major: UInt16
  public var minor: UInt16
  /// The capabilities JSON without its terminating NUL, or nil when absent.
  public var json: String?

  public init(major: UInt16, minor: UInt16, json: String?) {
    self.major = major
    self.minor = minor
    self.json = json
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= 4 else { throw .invalidArgument }
    major = bytes.u16(0)
    minor = bytes.u16(2)
    guard bytes.count > 4 else {
      json = nil
      return
    }
    let text = UnsafeRawBufferPointer(rebasing: bytes[4...])
    // The JSON must end with its NUL and hold no other.
    guard text.last == 0, text.firstIndex(of: 0) == text.count - 1 else { throw .invalidArgument }
    guard let string = String(validating: text.dropLast(), as: UTF8.self) else {
      throw .invalidArgument
    }
    json = string
  }

  public var encodedSize: Int { 4 + (json.map { $0.utf8.count + 1 } ?? 0) }

  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(major, at: 0)
    bytes.put(minor, at: 2)
    if let json {
      var offset = 4
      for byte in json.utf8 {
        bytes[offset] = byte
        offset += 1
      }
      bytes[offset] = 0
    }
  }
}

/// DMA_MAP request (the reply has no payload).
public struct DMAMapRequest: WirePayload {
  public static let size = 32
  public var argsz: UInt32
  public var flags: UInt32
  public var offset: UInt64
  public var address: UInt64
  public var size: UInt64

  public init(flags: UInt32, offset: UInt64, address: UInt64, size: UInt64, argsz: UInt32 = 32) {
    self.argsz = argsz
    self.flags = flags
    self.offset = offset
    self.address = address
    self.size = size
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    offset = bytes.u64(8)
    address = bytes.u64(16)
    size = bytes.u64(24)
    guard argsz == UInt32(Self.size) else { throw .invalidArgument }
    guard flags & ~(VFIODMAMapFlags.read | VFIODMAMapFlags.write) == 0 else {
      throw .invalidArgument
    }
    guard size > 0, address.addingReportingOverflow(size).overflow == false,
      offset.addingReportingOverflow(size).overflow == false
    else { throw .invalidArgument }
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    bytes.put(offset, at: 8)
    bytes.put(address, at: 16)
    bytes.put(size, at: 24)
  }
}

/// DMA_UNMAP request, and its reply (the original entry echoed).
public struct DMAUnmapPayload: WirePayload {
  public static let size = 24
  public var argsz: UInt32
  public var flags: UInt32
  public var address: UInt64
  public var size: UInt64

  public init(flags: UInt32 = 0, address: UInt64, size: UInt64, argsz: UInt32 = 24) {
    self.argsz = argsz
    self.flags = flags
    self.address = address
    self.size = size
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    address = bytes.u64(8)
    size = bytes.u64(16)
    guard argsz >= UInt32(Self.size) else { throw .invalidArgument }
    // Only UNMAP_ALL exists in this protocol; the dirty-bitmap flag belonged to v1 migration.
    guard flags & ~VFIODMAUnmapFlags.all == 0 else { throw .invalidArgument }
    if flags & VFIODMAUnmapFlags.all != 0 {
      guard address == 0, size == 0 else { throw .invalidArgument }
    } else {
      // As VFIO_IOMMU_UNMAP_DMA: the last byte must not wrap, so a range may end at
      // exactly 2^64 (QEMU drops the vIOMMU section above the MSI window that way).
      guard size > 0, address.addingReportingOverflow(size - 1).overflow == false else {
        throw .invalidArgument
      }
    }
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    bytes.put(address, at: 8)
    bytes.put(size, at: 16)
  }
}

/// DEVICE_GET_INFO request and reply.
public struct DeviceInfoPayload: WirePayload {
  public static let size = 16
  public var argsz: UInt32
  public var flags: UInt32
  public var numRegions: UInt32
  public var numIRQs: UInt32

  public init(argsz: UInt32 = 16, flags: UInt32 = 0, numRegions: UInt32 = 0, numIRQs: UInt32 = 0) {
    self.argsz = argsz
    self.flags = flags
    self.numRegions = numRegions
    self.numIRQs = numIRQs
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    numRegions = bytes.u32(8)
    numIRQs = bytes.u32(12)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    bytes.put(numRegions, at: 8)
    bytes.put(numIRQs, at: 12)
  }
}

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
  public var flags: UInt32
  public var index: UInt32
  public var capOffset: UInt32
  public var size: UInt64
  public var offset: UInt64
  public var capabilities: [RegionCapability]

  public init(
    argsz: UInt32 = 32, flags: UInt32 = 0, index: UInt32, capOffset: UInt32 = 0, size: UInt64 = 0,
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
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    index = bytes.u32(8)
    capOffset = bytes.u32(12)
    size = bytes.u64(16)
    offset = bytes.u64(24)
    capabilities = []
    guard flags & VFIORegionFlags.caps != 0, bytes.count > Self.fixedSize else { return }
    var next = Int(capOffset)
    var seen = 0
    while next != 0 {
      // Each capability header must lie inside the bytes, after the fixed part, without loops.
      guard next >= Self.fixedSize, next + 8 <= bytes.count, seen < 64 else {
        throw .invalidArgument
      }
      seen += 1
      let id = bytes.u16(next)
      let following = Int(bytes.u32(next + 4))
      switch id {
      case VFIORegionCapID.sparseMmap:
        guard next + 16 <= bytes.count else { throw .invalidArgument }
        let count = Int(bytes.u32(next + 8))
        guard count <= 1024, next + 16 + 16 * count <= bytes.count else { throw .invalidArgument }
        var areas: [SparseMmapArea] = []
        for i in 0..<count {
          let base = next + 16 + 16 * i
          areas.append(SparseMmapArea(offset: bytes.u64(base), size: bytes.u64(base + 8)))
        }
        capabilities.append(.sparseMmap(areas))
      case VFIORegionCapID.type:
        guard next + 16 <= bytes.count else { throw .invalidArgument }
        capabilities.append(.type(type: bytes.u32(next + 8), subtype: bytes.u32(next + 12)))
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
    bytes.put(flags, at: 4)
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
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    index = bytes.u32(8)
    count = bytes.u32(12)
    subRegions = []
    let available = (bytes.count - Self.fixedSize) / IOFDSubRegion.size
    for i in 0..<min(Int(count), available) {
      let base = Self.fixedSize + IOFDSubRegion.size * i
      subRegions.append(
        IOFDSubRegion(
          offset: bytes.u64(base), size: bytes.u64(base + 8), fdIndex: bytes.u32(base + 16),
          type: bytes.u32(base + 20), flags: bytes.u32(base + 24), value: bytes.u64(base + 32)))
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

/// DEVICE_GET_IRQ_INFO request and reply.
public struct IRQInfoPayload: WirePayload {
  public static let size = 16
  public var argsz: UInt32
  public var flags: UInt32
  public var index: UInt32
  public var count: UInt32

  public init(argsz: UInt32 = 16, flags: UInt32 = 0, index: UInt32, count: UInt32 = 0) {
    self.argsz = argsz
    self.flags = flags
    self.index = index
    self.count = count
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    index = bytes.u32(8)
    count = bytes.u32(12)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    bytes.put(index, at: 8)
    bytes.put(count, at: 12)
  }
}

/// DEVICE_SET_IRQS request (the reply has no payload). Eventfds travel as SCM_RIGHTS.
public struct IRQSetPayload: WirePayload {
  public static let fixedSize = 20
  public var argsz: UInt32
  public var flags: UInt32
  public var index: UInt32
  public var start: UInt32
  public var count: UInt32
  /// The DATA_BOOL array, one byte per vector; empty for the other data types.
  public var bools: [UInt8]

  public init(
    argsz: UInt32? = nil, flags: UInt32, index: UInt32, start: UInt32, count: UInt32,
    bools: [UInt8] = []
  ) {
    self.argsz = argsz ?? UInt32(Self.fixedSize + bools.count)
    self.flags = flags
    self.index = index
    self.start = start
    self.count = count
    self.bools = bools
  }

  public var dataType: UInt32 { flags & VFIOIRQSetFlags.dataTypeMask }
  public var action: UInt32 { flags & VFIOIRQSetFlags.actionTypeMask }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    index = bytes.u32(8)
    start = bytes.u32(12)
    count = bytes.u32(16)
    guard argsz >= UInt32(Self.fixedSize) else { throw .invalidArgument }
    // Exactly one data type and one action, nothing else.
    let data = flags & VFIOIRQSetFlags.dataTypeMask
    let action = flags & VFIOIRQSetFlags.actionTypeMask
    guard flags & ~(VFIOIRQSetFlags.dataTypeMask | VFIOIRQSetFlags.actionTypeMask) == 0,
      data.nonzeroBitCount == 1, action.nonzeroBitCount == 1
    else { throw .invalidArgument }
    guard start.addingReportingOverflow(count).overflow == false else { throw .invalidArgument }
    let extra = bytes.count - Self.fixedSize
    if data == VFIOIRQSetFlags.dataBool {
      guard extra == Int(count) else { throw .invalidArgument }
      bools = Array(UnsafeRawBufferPointer(rebasing: bytes[Self.fixedSize...]))
    } else {
      guard extra == 0 else { throw .invalidArgument }
      bools = []
    }
  }

  public var encodedSize: Int { Self.fixedSize + bools.count }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    bytes.put(index, at: 8)
    bytes.put(start, at: 12)
    bytes.put(count, at: 16)
    for (i, b) in bools.enumerated() { bytes[Self.fixedSize + i] = b }
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
    guard bytes.count >= Self.size else { throw .invalidArgument }
    offset = bytes.u64(0)
    region = bytes.u32(8)
    count = bytes.u32(12)
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

/// How the DMA_READ / DMA_WRITE head is laid out on the wire. The spec has
/// `address u64, count u64, data`; QEMU's hw/vfio-user (10.x, 11.x) uses
/// `offset u64, count u32, data` with the struct padded to 16 bytes and data at 12,
/// and answers DMA_WRITE with a bare header.
public enum DMATransferLayout: String, Sendable, CaseIterable {
  case spec
  case qemu

  /// Offset of the data from the start of the payload.
  public var dataOffset: Int { self == .spec ? 16 : 12 }
  /// Payload bytes before and around the data that the message carries beyond `count`.
  public var overhead: Int { 16 }
}

/// The head of DMA_READ / DMA_WRITE requests and replies.
public struct DMAAccessHeader: Equatable, Sendable {
  public var address: UInt64
  public var count: UInt64

  public init(address: UInt64, count: UInt64) {
    self.address = address
    self.count = count
  }

  public init(decoding bytes: UnsafeRawBufferPointer, layout: DMATransferLayout) throws(Errno) {
    guard bytes.count >= 16 else { throw .invalidArgument }
    address = bytes.u64(0)
    count = layout == .spec ? bytes.u64(8) : UInt64(bytes.u32(8))
  }

  public func encode(into bytes: UnsafeMutableRawBufferPointer, layout: DMATransferLayout) {
    bytes.put(address, at: 0)
    switch layout {
    case .spec: bytes.put(count, at: 8)
    case .qemu:
      bytes.put(UInt32(truncatingIfNeeded: count), at: 8)
      bytes.put(UInt32(0), at: 12)
    }
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

  /// The entry at byte `offset` of `bytes` (the caller has checked the length).
  @inlinable
  public init(decoding bytes: UnsafeRawBufferPointer, at offset: Int) {
    self.offset = bytes.u64(offset)
    region = bytes.u32(offset + 8)
    count = bytes.u32(offset + 12)
    data = bytes.u64(offset + 16)
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
    guard bytes.count >= 8 else { throw .invalidArgument }
    let count = bytes.u64(0)
    guard count >= 1, count <= UInt64(WriteMultiLimits.maxWrites) else { throw .invalidArgument }
    guard bytes.count == 8 + WriteMultiEntry.size * Int(count) else { throw .invalidArgument }
    for i in 0..<Int(count) {
      let n = bytes.u32(8 + WriteMultiEntry.size * i + 12)
      guard n >= 1, n <= UInt32(WriteMultiLimits.maxDataPerWrite) else { throw .invalidArgument }
    }
    return Int(count)
  }

  /// Entry `i` of a payload that `validate` accepted, without building the
  /// array (the server's path).
  @inlinable
  public static func entry(_ i: Int, in bytes: UnsafeRawBufferPointer) -> WriteMultiEntry {
    WriteMultiEntry(decoding: bytes, at: 8 + WriteMultiEntry.size * i)
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let count = try Self.validate(bytes)
    entries = (0..<count).map { Self.entry($0, in: bytes) }
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
    guard bytes.count == Self.size else { throw .invalidArgument }
    wrCnt = bytes.u64(0)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) { bytes.put(wrCnt, at: 0) }
}

/// DEVICE_FEATURE request and reply: argsz, flags, feature data.
public struct DeviceFeaturePayload: WirePayload {
  public static let fixedSize = 8
  public var argsz: UInt32
  public var flags: UInt32
  public var data: [UInt8]

  public init(argsz: UInt32? = nil, flags: UInt32, data: [UInt8] = []) {
    self.argsz = argsz ?? UInt32(Self.fixedSize + data.count)
    self.flags = flags
    self.data = data
  }

  public var feature: UInt32 { flags & VFIODeviceFeatureFlags.mask }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = bytes.u32(0)
    flags = bytes.u32(4)
    data = Array(UnsafeRawBufferPointer(rebasing: bytes[Self.fixedSize...]))
    guard argsz >= UInt32(Self.fixedSize) else { throw .invalidArgument }
    let known =
      VFIODeviceFeatureFlags.mask | VFIODeviceFeatureFlags.get | VFIODeviceFeatureFlags.set
      | VFIODeviceFeatureFlags.probe
    guard flags & ~known == 0 else { throw .invalidArgument }
    // GET and SET are exclusive except when probing (as in the kernel).
    let getSet = VFIODeviceFeatureFlags.get | VFIODeviceFeatureFlags.set
    if flags & getSet == getSet, flags & VFIODeviceFeatureFlags.probe == 0 {
      throw .invalidArgument
    }
  }

  public var encodedSize: Int { Self.fixedSize + data.count }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags, at: 4)
    for (i, b) in data.enumerated() { bytes[Self.fixedSize + i] = b }
  }
}

// The data of the DEVICE_FEATURE migration features (after argsz and flags),
// laid out as the kernel's structs. Like the kernel, which copies the first
// `sizeof(struct)` bytes, decoding needs at least that many and ignores the rest.

/// VFIO_DEVICE_FEATURE_MIGRATION (GET): `struct vfio_device_feature_migration`, flags u64.
public struct MigrationFeatureData: WirePayload {
  public static let size = 8
  public var flags: MigrationFlags

  public init(flags: MigrationFlags) { self.flags = flags }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.size else { throw .invalidArgument }
    flags = MigrationFlags(rawValue: bytes.u64(0))
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) { bytes.put(flags.rawValue, at: 0) }
}

/// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (GET and SET):
/// `struct vfio_device_feature_mig_state`, device_state u32, data_fd s32.
/// vfio-user leaves data_fd unused: the server answers -1 and echoes a SET.
public struct MigDeviceStateData: WirePayload {
  public static let size = 8
  /// The raw state, so that a value outside `MigrationState` still decodes (and is refused).
  public var deviceState: UInt32
  public var dataFD: Int32

  public init(deviceState: UInt32, dataFD: Int32 = -1) {
    self.deviceState = deviceState
    self.dataFD = dataFD
  }

  public init(state: MigrationState, dataFD: Int32 = -1) {
    self.init(deviceState: state.rawValue, dataFD: dataFD)
  }

  /// The state, or nil for a number that names none.
  public var state: MigrationState? { MigrationState(rawValue: deviceState) }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.size else { throw .invalidArgument }
    deviceState = bytes.u32(0)
    dataFD = Int32(bitPattern: bytes.u32(4))
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(deviceState, at: 0)
    bytes.put(dataFD, at: 4)
  }
}

/// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE (GET): `struct vfio_device_feature_mig_data_size`,
/// stop_copy_length u64.
public struct MigDataSizeData: WirePayload {
  public static let size = 8
  public var stopCopyLength: UInt64

  public init(stopCopyLength: UInt64) { self.stopCopyLength = stopCopyLength }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.size else { throw .invalidArgument }
    stopCopyLength = bytes.u64(0)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) { bytes.put(stopCopyLength, at: 0) }
}

/// MIG_DATA_READ / MIG_DATA_WRITE head: argsz, size; data follows.
public struct MigDataHeader: Equatable, Sendable {
  public static let size = 8
  public var argsz: UInt32
  public var size: UInt32

  public init(argsz: UInt32, size: UInt32) {
    self.argsz = argsz
    self.size = size
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.size else { throw .invalidArgument }
    argsz = bytes.u32(0)
    size = bytes.u32(4)
    // argsz counts at least this head, as every other argsz of the protocol does.
    guard argsz >= UInt32(Self.size) else { throw .invalidArgument }
  }

  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(size, at: 4)
  }
}

// The data of the DMA logging features, as the vfio-user spec and libvfio-user
// lay them out: the kernel's structs with their user pointers replaced by the
// bytes they point to, inline.

/// One IOVA range to log: `struct vfio_device_feature_dma_logging_range`.
public struct DMALoggingRange: Equatable, Sendable {
  public static let size = 16
  public var iova: UInt64
  public var length: UInt64

  public init(iova: UInt64, length: UInt64) {
    self.iova = iova
    self.length = length
  }
}

/// DMA_LOGGING_START (SET): page_size u64 @0, num_ranges u32 @8, reserved u32
/// @12, then num_ranges × {iova u64, length u64} @16 (where the kernel's
/// `vfio_device_feature_dma_logging_control` has a pointer). The reply echoes it.
public struct DMALoggingStartData: WirePayload {
  public static let fixedSize = 16
  public var pageSize: UInt64
  public var ranges: [DMALoggingRange]

  public init(pageSize: UInt64, ranges: [DMALoggingRange]) {
    self.pageSize = pageSize
    self.ranges = ranges
  }

  /// Needs every range num_ranges announces; bytes beyond them are ignored.
  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    pageSize = bytes.u64(0)
    let count = Int(bytes.u32(8))
    guard count <= (bytes.count - Self.fixedSize) / DMALoggingRange.size else {
      throw .invalidArgument
    }
    ranges = (0..<count).map { i in
      let at = Self.fixedSize + DMALoggingRange.size * i
      return DMALoggingRange(iova: bytes.u64(at), length: bytes.u64(at + 8))
    }
  }

  public var encodedSize: Int { Self.fixedSize + DMALoggingRange.size * ranges.count }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(pageSize, at: 0)
    bytes.put(UInt32(ranges.count), at: 8)
    bytes.put(UInt32(0), at: 12)
    for (i, range) in ranges.enumerated() {
      let at = Self.fixedSize + DMALoggingRange.size * i
      bytes.put(range.iova, at: at)
      bytes.put(range.length, at: at + 8)
    }
  }
}

/// DMA_LOGGING_REPORT (GET): iova u64 @0, length u64 @8, page_size u64 @16;
/// the reply carries the same and then the bitmap @24 (where the kernel's
/// `vfio_device_feature_dma_logging_report` has a pointer): bit n of the
/// little-endian u64 words is page n of the range, `bitmapSize` bytes.
public struct DMALoggingReportData: WirePayload {
  public static let fixedSize = 24
  public var iova: UInt64
  public var length: UInt64
  public var pageSize: UInt64
  /// Empty in a request.
  public var bitmap: [UInt8]

  public init(iova: UInt64, length: UInt64, pageSize: UInt64, bitmap: [UInt8] = []) {
    self.iova = iova
    self.length = length
    self.pageSize = pageSize
    self.bitmap = bitmap
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    iova = bytes.u64(0)
    length = bytes.u64(8)
    pageSize = bytes.u64(16)
    bitmap = Array(UnsafeRawBufferPointer(rebasing: bytes[Self.fixedSize...]))
  }

  /// The bitmap's bytes for `length` bytes of `pageSize` pages: whole u64
  /// words, `ROUND_UP(pages, 64) / 8`. nil when the page size is not a power
  /// of two or the size does not fit an Int.
  public static func bitmapSize(length: UInt64, pageSize: UInt64) -> Int? {
    guard pageSize != 0, pageSize & (pageSize - 1) == 0 else { return nil }
    let shift = UInt64(pageSize.trailingZeroBitCount)
    let pages = (length >> shift) + (length & (pageSize - 1) != 0 ? 1 : 0)
    let words = pages / 64 + (pages % 64 != 0 ? 1 : 0)
    guard words <= UInt64(Int.max / 8) else { return nil }
    return Int(words * 8)
  }

  public var encodedSize: Int { Self.fixedSize + bitmap.count }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(iova, at: 0)
    bytes.put(length, at: 8)
    bytes.put(pageSize, at: 16)
    for (i, b) in bitmap.enumerated() { bytes[Self.fixedSize + i] = b }
  }
}
