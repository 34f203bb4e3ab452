import SystemPackage
import VFIOUser

/// `enum xe_sriov_packet_type`: what a packet of the Xe migration stream
/// carries. A struct over the raw byte, not an enum, because the stream may
/// hold types this code does not know (restore skips them) and 0 (invalid).
public struct XePacketType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
  public var rawValue: UInt8
  public init(rawValue: UInt8) { self.rawValue = rawValue }

  /// Device identity KLVs; first in the stream, tile 0 / GT 0.
  public static let descriptor = XePacketType(rawValue: 1)
  /// End of stream, size 0, tile 0 / GT 0.
  public static let trailer = XePacketType(rawValue: 2)
  /// One u64 PTE per 4 KiB page of the VF's GGTT quota (primary GT).
  public static let ggtt = XePacketType(rawValue: 3)
  /// The GT's four scratch registers, 16 bytes.
  public static let mmio = XePacketType(rawValue: 4)
  /// Opaque GuC VF state, whole dwords, at most 8 MiB.
  public static let guc = XePacketType(rawValue: 5)
  /// A chunk of the VF's VRAM; `offset` is where it starts (primary GT, dGPU).
  public static let vram = XePacketType(rawValue: 6)

  /// The types packet version 1 defines.
  public static let known: Set<XePacketType> = [.descriptor, .trailer, .ggtt, .mmio, .guc, .vram]

  public var description: String {
    switch self {
    case .descriptor: "DESCRIPTOR"
    case .trailer: "TRAILER"
    case .ggtt: "GGTT"
    case .mmio: "MMIO"
    case .guc: "GUC"
    case .vram: "VRAM"
    default: "TYPE_\(rawValue)"
    }
  }
}

/// `struct xe_sriov_packet_hdr`, packed, 24 bytes:
/// version u8 @0, type u8 @1, tile u8 @2, gt u8 @3, flags u32 @4,
/// offset u64 @8, size u64 @16 (the payload bytes that follow).
public struct XePacketHeader: Sendable, Equatable, CustomStringConvertible {
  public static let size = 24
  /// `XE_SRIOV_PACKET_SUPPORTED_VERSION`.
  public static let supportedVersion: UInt8 = 1

  public var version: UInt8
  public var type: XePacketType
  public var tile: UInt8
  public var gt: UInt8
  /// Always 0 today.
  public var flags: UInt32
  /// Offset into the resource: VRAM chunks only, 0 otherwise.
  public var offset: UInt64
  public var size: UInt64

  public init(
    version: UInt8 = XePacketHeader.supportedVersion, type: XePacketType, tile: UInt8 = 0,
    gt: UInt8 = 0, flags: UInt32 = 0, offset: UInt64 = 0, size: UInt64 = 0
  ) {
    self.version = version
    self.type = type
    self.tile = tile
    self.gt = gt
    self.flags = flags
    self.offset = offset
    self.size = size
  }

  /// Decodes exactly 24 bytes; the values are not judged (restore does that).
  /// - Throws: EINVAL when `bytes` is not 24 bytes long.
  public init(decoding bytes: [UInt8]) throws(Errno) {
    guard bytes.count == Self.size else { throw .invalidArgument }
    self = try ByteReader.reading(bytes) { r throws(Errno) in
      XePacketHeader(
        version: try r.u8(at: 0), type: XePacketType(rawValue: try r.u8(at: 1)),
        tile: try r.u8(at: 2), gt: try r.u8(at: 3), flags: try r.u32(at: 4),
        offset: try r.u64(at: 8), size: try r.u64(at: 16))
    }
  }

  public var encoded: [UInt8] {
    var writer = ByteWriter(capacity: Self.size)
    for byte in [version, type.rawValue, tile, gt] { writer.append(byte) }
    writer.append(flags)
    writer.append(offset)
    writer.append(size)
    return writer.bytes
  }

  public var description: String {
    "v\(version) \(type) tile \(tile) gt \(gt) flags \(flags) offset \(offset) size \(size)"
  }
}

/// Follows the Xe packet headers (24 bytes: type u8 at 1, payload size u64 at
/// 16) of a stream going by in pieces of any size: what the sparse form, its
/// encoder and decoder, and the zero-page scan of a checkpoint need to know
/// of the stream, and no more.
public struct XePacketFraming {
  private var header = (UInt64(0), UInt64(0), UInt64(0))
  private var headerCount = 0
  /// Payload bytes of the current packet still to come (0 between packets).
  public private(set) var payloadLeft: UInt64 = 0
  /// The current packet is a VRAM packet.
  public private(set) var inVRAM = false

  public init() {}

  public var inPayload: Bool { payloadLeft > 0 }
  /// Bytes of the current packet header still to come (between packets).
  public var headerBytesLeft: Int { XePacketHeader.size - headerCount }
  /// Nothing of a packet is cut: the stream may end here.
  public var atBoundary: Bool { payloadLeft == 0 && headerCount == 0 }

  /// Takes header bytes from the front of `bytes`; returns how many.
  public mutating func takeHeader(_ bytes: UnsafeRawBufferPointer) -> Int {
    let n = min(XePacketHeader.size - headerCount, bytes.count)
    withUnsafeMutableBytes(of: &header) {
      UnsafeMutableRawBufferPointer(rebasing: $0[headerCount..<(headerCount + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: bytes[0..<n]))
    }
    headerCount += n
    if headerCount == XePacketHeader.size {
      headerCount = 0
      payloadLeft = UInt64(littleEndian: header.2)
      inVRAM =
        UInt8(truncatingIfNeeded: UInt64(littleEndian: header.0) >> 8) == XePacketType.vram.rawValue
    }
    return n
  }

  public mutating func consumePayload(_ count: Int) { payloadLeft -= UInt64(count) }
}

/// A piece of the Xe stream as its bytes are (`data`), or a run of zero bytes
/// standing for them: what the sparse decoder and the zero-page scan hand on.
public enum XeStreamSegment {
  case data(UnsafeRawBufferPointer)
  case zeros(Int)
}
