import SystemPackage

// DMA window and DMA transfer payloads (offsets from the end of the header).

/// DMA_MAP request (the reply has no payload).
public struct DMAMapRequest: WirePayload {
  public static let size = 32
  public var argsz: UInt32
  public var flags: VFIODMAMapFlags
  public var offset: UInt64
  public var address: UInt64
  public var size: UInt64

  public init(
    flags: VFIODMAMapFlags, offset: UInt64, address: UInt64, size: UInt64, argsz: UInt32 = 32
  ) {
    self.argsz = argsz
    self.flags = flags
    self.offset = offset
    self.address = address
    self.size = size
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = VFIODMAMapFlags(rawValue: try r.u32(at: 4))
    offset = try r.u64(at: 8)
    address = try r.u64(at: 16)
    size = try r.u64(at: 24)
    guard argsz == UInt32(Self.size) else { throw .invalidArgument }
    // The decoded word keeps unknown bits: any is refused.
    guard flags.isSubset(of: [.read, .write]) else { throw .invalidArgument }
    guard size > 0, address.addingReportingOverflow(size).overflow == false,
      offset.addingReportingOverflow(size).overflow == false
    else { throw .invalidArgument }
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags.rawValue, at: 4)
    bytes.put(offset, at: 8)
    bytes.put(address, at: 16)
    bytes.put(size, at: 24)
  }
}

/// DMA_UNMAP request, and its reply (the original entry echoed).
public struct DMAUnmapPayload: WirePayload {
  public static let size = 24
  public var argsz: UInt32
  public var flags: VFIODMAUnmapFlags
  public var address: UInt64
  public var size: UInt64

  public init(flags: VFIODMAUnmapFlags = [], address: UInt64, size: UInt64, argsz: UInt32 = 24) {
    self.argsz = argsz
    self.flags = flags
    self.address = address
    self.size = size
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = VFIODMAUnmapFlags(rawValue: try r.u32(at: 4))
    address = try r.u64(at: 8)
    size = try r.u64(at: 16)
    guard argsz >= UInt32(Self.size) else { throw .invalidArgument }
    // Only UNMAP_ALL exists in this protocol; the dirty-bitmap flag belonged to v1 migration.
    guard flags.isSubset(of: .all) else { throw .invalidArgument }
    if flags.contains(.all) {
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
    bytes.put(flags.rawValue, at: 4)
    bytes.put(address, at: 8)
    bytes.put(size, at: 16)
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
    let r = ByteReader(bytes)
    guard bytes.count >= 16 else { throw .invalidArgument }
    address = try r.u64(at: 0)
    count = layout == .spec ? try r.u64(at: 8) : UInt64(try r.u32(at: 8))
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
