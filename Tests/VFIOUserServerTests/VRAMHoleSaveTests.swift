import Glibc
import Logging
import Testing
import VFIOUser
import VFIOUserClient
import XeVF

/// A save, and a client's REGION_READ, read the holes of VRAM's memfd (pages
/// never written) as zeros without allocating them: reading a hole through
/// the mapping would, as shmem maps no zero page, so a save once grew the
/// server by the whole VRAM.
@Suite("Reading VRAM's holes")
struct VRAMHoleSaveTests {
  static let vram: UInt64 = 16 << 20
  static let page = 4096
  /// Pages with data: single pages, a run across the 1 MiB reads, the last page.
  static let dataPages = [0..<1, 3..<6, 255..<256, 300..<1324, 2000..<2001, 4095..<4096]

  static func vf() throws -> SimulatedXeVF {
    try SimulatedXeVF(profile: .bmg, vramSize: vram, logger: Logger(label: "test"))
  }

  /// Writes a pattern with no zero byte into `dataPages`.
  static func fill(_ client: VFIOUserClient) throws {
    let perWrite = 256  // pages: 1 MiB, the server's max_data_xfer_size
    for run in dataPages {
      for first in stride(from: run.lowerBound, to: run.upperBound, by: perWrite) {
        let pages = min(perWrite, run.upperBound - first)
        let bytes = (0..<(pages * page)).map { UInt8(truncatingIfNeeded: ($0 + first) % 251 + 1) }
        try client.write(region: 2, offset: UInt64(first * page), data: bytes)
      }
    }
  }

  /// VRAM's memfd, from the region's description: the caller's to close.
  static func vramFD(_ client: VFIOUserClient) throws -> Int32 {
    var region = try client.regionInfo(2)
    return try #require(region.fd.take()?.release().rawValue)
  }

  /// Bytes of the memfd backed by memory.
  static func allocated(_ fd: Int32) -> Int {
    var status = stat()
    #expect(fstat(fd, &status) == 0)
    return Int(status.st_blocks) * 512
  }

  /// VRAM's bytes, read with pread (which reads a hole without allocating it).
  static func contents(_ fd: Int32) -> [UInt8] {
    var bytes = [UInt8](repeating: 0xFF, count: Int(vram))
    let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
    #expect(n == Int(vram))
    return bytes
  }

  /// Odd reads make replies that start in a hole and end in data, and the
  /// reverse; 1 MiB ones are what `save` and `migrate` ask for.
  @Test(arguments: [false, true], [100_000, 1 << 20])
  func aSaveAllocatesNoHoleAndRestoresEveryByte(sparse: Bool, chunk: Int) throws {
    let capabilities =
      sparse ? VFIOUserClient.sparseCapabilities : VFIOUserClient.defaultCapabilities
    try withServer(try Self.vf()) { src, _ in
      try withServer(try Self.vf()) { dst, _ in
        let a = try src.connect(capabilities: capabilities)
        #expect(a.sparseMigration == sparse)
        try Self.fill(a)
        let fd = try Self.vramFD(a)
        defer { close(fd) }
        let written = Self.dataPages.reduce(0) { $0 + $1.count } * Self.page
        let before = Self.allocated(fd)
        #expect(before >= written && before < written + (1 << 20), "\(before) of \(written)")
        let expected = Self.contents(fd)
        let stream = try SparseMigrationTests.save(a, chunk: UInt32(chunk))
        #expect(Self.allocated(fd) == before, "the save allocated VRAM's holes")
        let raw = sparse ? try SparseMigrationTests.expand(stream) : stream
        #expect(raw.count > Int(Self.vram))
        if sparse { #expect(stream.count < raw.count / 2) }

        let b = try dst.connect(capabilities: capabilities)
        let restored = try Self.vramFD(b)
        defer { close(restored) }
        try b.setMigrationState(.resuming)
        try b.writeStream(stream, chunk: 77_777)
        try b.setMigrationState(.running)
        #expect(Self.contents(restored) == expected)
        // The sparse stream's zero runs leave the destination's holes unallocated too.
        if sparse { #expect(Self.allocated(restored) < before + (1 << 20)) }
      }
    }
  }

  /// REGION_READ of BAR2 by message (a client without mmap reads VRAM so):
  /// small reads are copied, large ones leave in place from the mapping where
  /// it is all data and from the zero page where it is all hole, and mixed
  /// ones are copied. Reads below a page sample the start of every page.
  @Test(arguments: [8, 4096, 100_000, 1 << 20])
  func regionReadsAllocateNoHole(size: Int) throws {
    try withServer(try Self.vf()) { server, _ in
      let client = try server.connect()
      try Self.fill(client)
      let fd = try Self.vramFD(client)
      defer { close(fd) }
      let before = Self.allocated(fd)
      let expected = Self.contents(fd)
      var read = [UInt8]()
      var sampled = [UInt8]()
      let step = max(size, Self.page)
      for offset in stride(from: 0, to: Int(Self.vram), by: step) {
        let count = min(size, Int(Self.vram) - offset)
        read += try client.read(region: 2, offset: UInt64(offset), count: count)
        sampled += expected[offset..<(offset + count)]
      }
      #expect(read == sampled)
      #expect(Self.allocated(fd) == before, "REGION_READ allocated VRAM's holes")
    }
  }

  /// The DMA engine copying VRAM to the client: a transfer of VRAM nobody
  /// wrote delivers zeros without allocating it, one of written VRAM its
  /// bytes (the mapping, all allocated, is read in place).
  @Test func engineTransfersFromHolesAllocateNothing() throws {
    let engine = DMALoggingTests()
    try withServer(try Self.vf()) { server, _ in
      let client = try server.connect()
      try Self.fill(client)
      try engine.enableBusMaster(client)
      let guest = GuestFile(size: 1 << 20)
      let guestBase: UInt64 = 0x1000_0000
      try client.dmaMap(
        address: guestBase, size: 1 << 20, flags: DMALoggingTests.rw, fd: guest.descriptor)
      let fd = try Self.vramFD(client)
      defer { close(fd) }
      let before = Self.allocated(fd)
      let expected = Self.contents(fd)
      // A hole of 1 MiB (pages 1324..<1580), then the data of pages 300..<556.
      for page in [1324, 300] {
        #expect(pwrite(guest.fd, [UInt8](repeating: 0xAA, count: 1 << 20), 1 << 20, 0) == 1 << 20)
        let status = try engine.transfer(
          client, device: UInt64(page * Self.page), client: guestBase, length: 1 << 20)
        #expect(status == XeSimRegisters.DMA.statusDone)
        let offset = page * Self.page
        #expect(
          guest.bytes(at: 0, count: 1 << 20) == Array(expected[offset..<(offset + (1 << 20))]))
      }
      #expect(Self.allocated(fd) == before, "the engine's read allocated VRAM's holes")
    }
  }
}
