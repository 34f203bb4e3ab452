import Foundation
import Logging
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeStream
import XeVF

/// The sparse migration stream (protocol/sparse-migration.md) over the real
/// socket: negotiation, a migration between two servers that carries no zero
/// page, a kernel-style sink that receives the raw stream byte for byte,
/// strict framing, and a reset in the middle of a sparse save.
@Suite("Sparse migration stream")
struct SparseMigrationTests {
  static let vram: UInt64 = 8 << 20
  static let page = 4096

  /// A BMG VF whose VRAM holds data in one page of ten (and a scratch register).
  static func sparseVF() throws -> SimulatedXeVF {
    try SimulatedXeVF(profile: .bmg, vramSize: vram, logger: Logger(label: "test"))
  }

  static func fill(_ client: VFIOUserClient) throws {
    for page in stride(from: 0, to: Int(vram) / Self.page, by: 10) {
      let bytes = (0..<Self.page).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ page &+ 1) }
      try client.write(region: 2, offset: UInt64(page * Self.page), data: bytes)
    }
    // A page that is data except for its zero second half, and a partial one.
    try client.write(
      region: 2, offset: 5 * UInt64(Self.page),
      data: [UInt8](repeating: 0xA5, count: Self.page / 2))
    try client.write(region: 2, offset: 7 * UInt64(Self.page) + 100, data: [1, 2, 3])
    try client.write32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 1), 0x5eed)
  }

  static func vramBytes(_ client: VFIOUserClient) throws -> [UInt8] {
    var bytes: [UInt8] = []
    while bytes.count < Int(vram) {
      bytes += try client.read(region: 2, offset: UInt64(bytes.count), count: 1 << 20)
    }
    return bytes
  }

  static func expand(_ sparse: [UInt8]) throws -> [UInt8] {
    var decoder = SparseStreamDecoder()
    var raw: [UInt8] = []
    let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: sparse.count, alignment: 16)
    defer { copy.deallocate() }
    copy.copyBytes(from: sparse)
    try decoder.decode(UnsafeRawBufferPointer(copy)) { segment throws(Errno) in
      switch segment {
      case .data(let data): raw += data
      case .zeros(let count): raw += [UInt8](repeating: 0, count: count)
      }
    }
    #expect(decoder.atBoundary)
    return raw
  }

  static func sparseClient(_ server: RunningServer) throws -> VFIOUserClient {
    let client = try server.connect(capabilities: VFIOUserClient.sparseCapabilities)
    #expect(client.sparseMigration)
    return client
  }

  // MARK: Negotiation

  /// The server's VERSION reply JSON for a client proposing `json`.
  func versionReply(_ server: RunningServer, _ json: String) throws -> String {
    let client = try VFIOUserClient.open(path: server.path)
    let reply = try client.request(
      .version, payload: VersionPayload(major: 0, minor: 0, json: json).encoded())
    return try VersionPayload(decoding: reply.payload).json ?? ""
  }

  @Test func echoedOnlyWhenOffered() throws {
    try withServer(try Self.sparseVF()) { server, _ in
      let offered = try versionReply(
        server, #"{"capabilities":{"max_msg_fds":16,"xe_vfio_user":{"sparse_migration":1}}}"#)
      #expect(offered.contains(#""xe_vfio_user":{"sparse_migration":1}"#))
      #expect(server.waitFor { $0.clientConnected == false })
      // A later version is answered with the one this server speaks.
      let later = try versionReply(
        server, #"{"capabilities":{"xe_vfio_user":{"sparse_migration":7}}}"#)
      #expect(later.contains(#""sparse_migration":1"#))
      #expect(server.waitFor { $0.clientConnected == false })
      // QEMU 11.1's proposal: the reply holds no key QEMU would refuse.
      let qemu = try versionReply(
        server,
        #"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":1048576},"write_multiple":true}}"#
      )
      #expect(!qemu.contains("xe_vfio_user") && !qemu.contains("sparse"))
      #expect(server.waitFor { $0.clientConnected == false })
      let plain = try server.connect()
      #expect(!plain.sparseMigration)
      #expect(plain.serverCapabilities.sparseMigration == nil)
    }
  }

  @Test func aMistypedOfferIsRefused() throws {
    try withServer(try Self.sparseVF()) { server, _ in
      let client = try VFIOUserClient.open(path: server.path)
      #expect(throws: VFIOUserClientError.self) {
        try client.request(
          .version,
          payload: VersionPayload(
            major: 0, minor: 0, json: #"{"capabilities":{"xe_vfio_user":{"sparse_migration":"1"}}}"#
          ).encoded())
      }
    }
  }

  // MARK: Migration

  /// Saves `client`'s device: the whole stream, in `chunk`-byte reads.
  static func save(_ client: VFIOUserClient, chunk: UInt32 = 1 << 20) throws -> [UInt8] {
    try client.setMigrationState(.stopCopy)
    let stream = try client.readStream(chunk: chunk)
    try client.setMigrationState(.running)
    return stream
  }

  @Test func sparseMigrationBetweenTwoServersRestoresEveryByte() throws {
    var keep = ServerLimits()
    keep.resetOnDisconnect = false
    try withServer(try Self.sparseVF(), limits: keep) { src, _ in
      try withServer(try Self.sparseVF()) { dst, _ in
        var a: VFIOUserClient? = try Self.sparseClient(src)
        try Self.fill(a!)
        let vram = try Self.vramBytes(a!)
        let scratch = try a!.read32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 1))
        let sparse = try Self.save(a!, chunk: 100_000)
        // The raw stream of the same state, from a client that did not offer it.
        a = nil
        #expect(src.waitFor { $0.clientConnected == false })
        let raw = try Self.save(try src.connect())
        #expect(try Self.expand(sparse) == raw)
        // 10% of the pages hold data: the sparse stream is a little over 10% of the raw one.
        #expect(sparse.count < raw.count / 8, "sparse \(sparse.count) of \(raw.count)")

        let b = try Self.sparseClient(dst)
        // Stale bytes in the destination's VRAM, which the zero runs must clear.
        for offset in stride(from: 0, to: Int(Self.vram), by: 1 << 20) {
          try b.write(
            region: 2, offset: UInt64(offset), data: [UInt8](repeating: 0xEE, count: 1 << 20))
        }
        try b.setMigrationState(.resuming)
        // Odd message sizes: segments and packet headers cut anywhere.
        try b.writeStream(sparse, chunk: 77_777)
        try b.setMigrationState(.running)
        #expect(try Self.vramBytes(b) == vram)
        // The data segments were received straight into VRAM (all but each
        // message's read-ahead), the framing decoded, never placed.
        let placed = dst.server.statistics.snapshot.migrationBytesPlaced
        #expect(placed > UInt64(sparse.count) / 2 && placed < UInt64(sparse.count))
        #expect(try b.read32(region: 0, offset: XeSimRegisters.scratch(gt: 0, index: 1)) == scratch)
      }
    }
  }

  /// A kernel `data_fd` takes bytes: the zero runs reach it written out, and
  /// it receives exactly the raw stream.
  @Test func aKernelStyleSinkReceivesTheRawStream() throws {
    let sparse = try Self.filledSparseSave()
    let raw = try Self.expand(sparse)
    let device = MigratingTestDevice()
    try withServer(device) { server, device in
      let client = try Self.sparseClient(server)
      try client.setMigrationState(.resuming)
      try client.writeStream(sparse, chunk: 65_536)
      #expect(device.open?.data == raw)
    }
  }

  /// The sparse save of a VF `fill` gave data to.
  static func filledSparseSave() throws -> [UInt8] {
    let server = try RunningServer(backend: try sparseVF())
    defer { server.close() }
    let client = try server.connect(capabilities: VFIOUserClient.sparseCapabilities)
    try fill(client)
    return try save(client)
  }

  // MARK: Malformed framing

  /// A sparse stream with the first segment header of its first VRAM packet replaced.
  static func firstSegmentHeaderOffset(_ sparse: [UInt8]) -> Int {
    var at = 0
    while at + 24 <= sparse.count {
      let size = sparse[(at + 16)..<(at + 24)].reversed().reduce(0) { $0 << 8 | Int($1) }
      if sparse[at + 1] == 6, size > 0 { return at + 24 }
      at += 24 + size
    }
    return -1
  }

  @Test(arguments: [
    ("kind 0", 0, [UInt8(0)]),
    ("kind 3", 0, [3]),
    ("reserved byte 1", 1, [1]),
    ("reserved byte 3", 3, [0x80]),
    ("length 0", 4, [0, 0, 0, 0]),
    ("length past the payload", 4, [0xFF, 0xFF, 0xFF, 0xFF]),
  ])
  func malformedSegmentsAreEINVALAndTheDeviceEndsInError(
    _ field: String, _ offset: Int, _ bytes: [UInt8]
  ) throws {
    var sparse = try Self.filledSparseSave()
    let at = Self.firstSegmentHeaderOffset(sparse)
    try #require(at > 0)
    sparse.replaceSubrange((at + offset)..<(at + offset + bytes.count), with: bytes)
    let head = Array(sparse[0..<(at + 8)])
    let rest = Array(sparse[(at + 8)...])
    try withServer(try Self.sparseVF()) { dst, _ in
      let b = try Self.sparseClient(dst)
      try b.setMigrationState(.resuming)
      expectServerError(.invalidArgument) { try b.migDataWrite(head) }
      // Nothing after it is taken, and the device never claims the state.
      expectServerError(.invalidArgument) { try b.migDataWrite(rest) }
      var finished = true
      do { try b.setMigrationState(.stop) } catch { finished = false }
      #expect(!finished, "\(field)")
      #expect(try b.migrationState() == .error)
      // The server keeps serving: a reset brings the device back.
      try b.reset()
      #expect(try b.migrationState() == .running)
    }
  }

  // MARK: Reset

  @Test func aResetMidSaveStartsTheNextSparseSaveAfresh() throws {
    try withServer(try Self.sparseVF()) { server, _ in
      let a = try Self.sparseClient(server)
      try Self.fill(a)
      let whole = try Self.save(a)
      try a.setMigrationState(.stopCopy)
      // Stop inside a VRAM payload, in the middle of a segment.
      _ = try a.migDataRead(size: 5_000)
      _ = try a.migDataRead(size: 3)
      try a.reset()
      expectServerError(Errno(rawValue: ENODEV)) {
        _ = try a.migDataRead(size: 4096)
      }
      // The reset cleared VRAM; fill it again and save: the stream starts from its first byte.
      try Self.fill(a)
      let again = try Self.save(a, chunk: 4099)
      #expect(try Self.expand(again) == Self.expand(whole))
    }
  }
}
