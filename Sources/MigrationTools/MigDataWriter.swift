import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import XeStream

#if canImport(Glibc)
  import Glibc
#endif

/// MIG_DATA_WRITEs of a stream given in pieces of any size, up to `depth`
/// in flight: small pieces (segment headers, pages of data) are gathered into
/// `chunk`-byte messages, large ones sent from where they are.
public final class BufferedMigDataWriter {
  public let client: VFIOUserClient
  public let end: String
  public let chunk: Int
  let depth = 4
  private let out: UnsafeMutableRawBufferPointer
  private var pending = 0
  private var inFlight: [UInt16] = []
  private var oldest = 0
  /// Pieces at least this long are sent without being copied.
  static let direct = 64 << 10

  public init(_ client: VFIOUserClient, end: String, chunk: Int) {
    self.client = client
    self.end = end
    self.chunk = chunk
    out = .allocate(byteCount: chunk, alignment: 4096)
  }

  deinit { out.deallocate() }

  public func send(_ bytes: UnsafeRawBufferPointer) throws {
    if bytes.count >= Self.direct {
      // A few bytes gathered (a segment header) travel in the same message.
      let prefix = pending <= 32 ? pending : 0
      try sendPending(ifOver: 32)
      var rest = bytes
      var head = UnsafeRawBufferPointer(rebasing: out[0..<prefix])
      while !rest.isEmpty {
        let n = min(rest.count, chunk - head.count)
        try write(UnsafeRawBufferPointer(rebasing: rest[0..<n]), prefix: head)
        head = UnsafeRawBufferPointer(rebasing: out[0..<0])
        rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      }
      pending = 0
      return
    }
    var rest = bytes
    while !rest.isEmpty {
      let n = min(rest.count, chunk - pending)
      UnsafeMutableRawBufferPointer(rebasing: out[pending..<(pending + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: rest[0..<n]))
      pending += n
      rest = UnsafeRawBufferPointer(rebasing: rest[n...])
      if pending == chunk { try sendPending() }
    }
  }

  public func sendZeros(_ count: Int) throws {
    var left = count
    while left > 0 {
      let n = min(left, ZeroMemory.chunk.count)
      try send(UnsafeRawBufferPointer(rebasing: ZeroMemory.chunk[0..<n]))
      left -= n
    }
  }

  /// Sends what is gathered and waits for every acknowledgement.
  public func flush() throws {
    try sendPending()
    while oldest < inFlight.count { try collect() }
  }

  /// Reads the acknowledgements still due, whatever they say (after a failure).
  public func collectAll() {
    while oldest < inFlight.count {
      let id = inFlight[oldest]
      oldest += 1
      do throws(VFIOUserClientError) { _ = try client.receiveAck(id: id) } catch {
        if case .server = error { continue }
        return  // the server is gone or silent: nothing more will come
      }
    }
  }

  /// Sends what is gathered if it is more than `limit` bytes.
  private func sendPending(ifOver limit: Int = 0) throws {
    guard pending > limit else { return }
    try write(UnsafeRawBufferPointer(rebasing: out[0..<pending]))
    pending = 0
  }

  /// The bytes are in the socket when `sendMigDataWrite` returns: `data` may be reused.
  private func write(
    _ data: UnsafeRawBufferPointer,
    prefix: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)
  ) throws {
    inFlight.append(try on(end) { try client.sendMigDataWrite(data, prefix: prefix) })
    while inFlight.count - oldest > depth { try collect() }
  }

  private func collect() throws {
    let id = inFlight[oldest]
    oldest += 1
    _ = try on(end) { try client.receiveAck(id: id) }
  }
}
