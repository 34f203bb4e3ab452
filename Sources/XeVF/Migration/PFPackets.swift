import XeStream

/// One packet as the PF holds it in a ring: the header and its payload.
struct PFPacket: Sendable {
  enum Payload: Sendable {
    case bytes([UInt8])
    /// The bytes are VRAM at `header.offset`: a save copies them out as they
    /// are read, a restore wrote them in as they arrived. Rings therefore
    /// hold no VRAM, and memory stays bounded whatever the VRAM size.
    case vram
  }

  var header: XePacketHeader
  var payload: Payload

  init(_ header: XePacketHeader, _ payload: Payload) {
    self.header = header
    self.payload = payload
  }

  init(_ type: XePacketType, gt: Int, bytes: [UInt8]) {
    self.init(XePacketHeader(type: type, gt: UInt8(gt), size: UInt64(bytes.count)), .bytes(bytes))
  }

  /// Header plus payload length.
  var streamSize: UInt64 { UInt64(XePacketHeader.size) + header.size }
}

/// What a save carries, captured from the device when the save is triggered
/// (the VF is paused, so it no longer changes; VRAM is read as the stream is).
struct SaveContent: Sendable {
  /// Per GT: the GuC blob and the scratch registers.
  var guc: [[UInt8]]
  var mmio: [[UInt8]]
  /// The primary GT's GGTT PTEs, VFID field cleared.
  var ggtt: [UInt8]
  /// Largest VRAM packet payload (`VF_VRAM_STATE_CHUNK_MAX_SIZE`).
  var vramChunkSize: UInt64
  /// Seeds the order in which the GTs' packets interleave.
  var seed: UInt64
}

/// State a restore validated, applied to the device at finish_restore so a
/// failed restore leaves none of it behind (VRAM excepted: it is written as
/// it arrives, and the device refuses to run until reset).
struct StagedRestore: Sendable, Equatable {
  var ggtt: [UInt64]?
  var mmio: [UInt32]?
  var guc: GuCVFState?
}

/// SplitMix64: a small seeded generator, so a seed names one interleaving
/// (and, in tests, one run of a randomised stress).
public struct SplitMix64: RandomNumberGenerator, Sendable {
  private var state: UInt64
  public init(seed: UInt64) { state = seed }
  public mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}
