import CVFIOUser

/// Finds the zero pages inside VRAM packets of an Xe migration stream
/// (protocol/xe-migration-stream.md) as it goes by in chunks of any size:
/// it follows the 24-byte packet headers, and cuts each VRAM payload into
/// 4 KiB pages counted from the payload's start, holding a page split
/// between chunks until it is whole. Everything else is data. It judges
/// nothing: a stream it cannot follow is still carried byte for byte.
public final class XeStreamScanner {
  public static let page = 4096
  private var framing = XePacketFraming()
  /// A VRAM page split between chunks (and, once the stream ends, its tail).
  private let carry: UnsafeMutableRawBufferPointer
  private var carryCount = 0

  public init() { carry = .allocate(byteCount: Self.page, alignment: 64) }
  deinit { carry.deallocate() }

  /// Calls `emit` with the segments of `data`, in order; spans point into `data` or the carry.
  public func scan(_ data: UnsafeRawBufferPointer, emit: (XeStreamSegment) throws -> Void) rethrows
  {
    var at = 0
    while at < data.count {
      if !framing.inPayload {
        // A header, whole or in pieces: it is data.
        let n = framing.takeHeader(UnsafeRawBufferPointer(rebasing: data[at...]))
        try emit(.data(UnsafeRawBufferPointer(rebasing: data[at..<(at + n)])))
        at += n
        continue
      }
      let n = Int(min(framing.payloadLeft, UInt64(data.count - at)))
      let payload = UnsafeRawBufferPointer(rebasing: data[at..<(at + n)])
      if framing.inVRAM { try scanVRAM(payload, emit: emit) } else { try emit(.data(payload)) }
      framing.consumePayload(n)
      at += n
      if !framing.inPayload, carryCount > 0 {
        // A payload that is not whole pages: its last piece is data.
        try emit(.data(UnsafeRawBufferPointer(rebasing: carry[0..<carryCount])))
        carryCount = 0
      }
    }
  }

  /// What is held when the stream ends (a stream cut inside a page), or nil.
  public func flush() -> UnsafeRawBufferPointer? {
    defer { carryCount = 0 }
    return carryCount > 0 ? UnsafeRawBufferPointer(rebasing: carry[0..<carryCount]) : nil
  }

  private func scanVRAM(_ bytes: UnsafeRawBufferPointer, emit: (XeStreamSegment) throws -> Void)
    rethrows
  {
    var rest = bytes
    if carryCount > 0 {
      let n = min(Self.page - carryCount, rest.count)
      UnsafeMutableRawBufferPointer(rebasing: carry[carryCount..<(carryCount + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: rest[0..<n]))
      carryCount += n
      rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      guard carryCount == Self.page else { return }
      carryCount = 0
      if cvfu_all_zero(carry.baseAddress, Self.page) {
        try emit(.zeros(Self.page))
      } else {
        try emit(.data(UnsafeRawBufferPointer(carry)))
      }
    }
    // Whole pages: runs of data and runs of zeros.
    var runStart = 0
    var runZero = false
    var at = 0
    while at + Self.page <= rest.count {
      let zero = cvfu_all_zero(rest.baseAddress! + at, Self.page)
      if zero != runZero, at > runStart {
        let run = UnsafeRawBufferPointer(rebasing: rest[runStart..<at])
        try emit(runZero ? .zeros(run.count) : .data(run))
        runStart = at
      }
      runZero = zero
      at += Self.page
    }
    if at > runStart {
      let run = UnsafeRawBufferPointer(rebasing: rest[runStart..<at])
      try emit(runZero ? .zeros(run.count) : .data(run))
    }
    // A page cut by the chunk's end waits for the rest of it.
    if at < rest.count {
      UnsafeMutableRawBufferPointer(rebasing: carry[0..<(rest.count - at)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: rest[at...]))
      carryCount = rest.count - at
    }
  }
}
