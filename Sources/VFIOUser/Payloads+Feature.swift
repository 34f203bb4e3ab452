import SystemPackage

// DEVICE_FEATURE and its migration and DMA logging data, and the migration data head.

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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = try r.u32(at: 4)
    data = Array(try r.rest(from: Self.fixedSize))
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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.size else { throw .invalidArgument }
    flags = MigrationFlags(rawValue: try r.u64(at: 0))
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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.size else { throw .invalidArgument }
    deviceState = try r.u32(at: 0)
    dataFD = try r.s32(at: 4)
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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.size else { throw .invalidArgument }
    stopCopyLength = try r.u64(at: 0)
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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.size else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    size = try r.u32(at: 4)
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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    pageSize = try r.u64(at: 0)
    let count = Int(try r.u32(at: 8))
    guard count <= (bytes.count - Self.fixedSize) / DMALoggingRange.size else {
      throw .invalidArgument
    }
    ranges = []
    ranges.reserveCapacity(count)
    for i in 0..<count {
      let at = Self.fixedSize + DMALoggingRange.size * i
      ranges.append(DMALoggingRange(iova: try r.u64(at: at), length: try r.u64(at: at + 8)))
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
    let r = ByteReader(bytes)
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    iova = try r.u64(at: 0)
    length = try r.u64(at: 8)
    pageSize = try r.u64(at: 16)
    bitmap = Array(try r.rest(from: Self.fixedSize))
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
