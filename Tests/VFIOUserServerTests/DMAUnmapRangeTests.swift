import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

/// A memfd with a name of its own, never mapped by the test: every mapping of
/// it in /proc/self/maps is the in-process server's.
final class GuestFile {
  let name = "viommu-\(UUID().uuidString.prefix(8))"
  let fd: Int32
  /// `fd`, lent for as long as this lives (DMA_MAP sends it).
  var descriptor: FileDescriptor { FileDescriptor(rawValue: fd) }

  init(size: Int) {
    fd = cvfu_memfd_create(name, 0)
    precondition(fd >= 0)
    ftruncate(fd, off_t(size))
  }

  deinit { close(fd) }

  func bytes(at offset: Int, count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    precondition(n == count)
    return out
  }

  /// The server's mappings of this file: how many, and how many bytes (one
  /// of the whole file while any window of it lives).
  var serverMappings: (count: Int, bytes: UInt64) {
    let maps = readProcFile("/proc/self/maps")
    var count = 0
    var bytes: UInt64 = 0
    for line in maps.split(separator: "\n") where line.contains("/memfd:\(name) ") {
      let range = line.prefix { $0 != " " }.split(separator: "-")
      guard range.count == 2, let start = UInt64(range[0], radix: 16),
        let end = UInt64(range[1], radix: 16)
      else { continue }
      count += 1
      bytes += end - start
    }
    return (count, bytes)
  }
}

/// DMA_UNMAP with the kernel's type1v2 range rules (protocol/README.md,
/// "DMA_UNMAP ranges"), as a client behind a vIOMMU sends it.
@Suite("DMA_UNMAP ranges")
struct DMAUnmapRangeTests {
  static let rw: VFIODMAMapFlags = [.read, .write]
  static let base: UInt64 = 0x1_0000_0000

  /// Three windows inside the 1 MiB block at `base` (4, 8 and 8 KiB, with a
  /// hole before the third) and an 8 KiB one just past it. The file offsets
  /// have gaps, so the kernel cannot merge two mappings into one line of maps.
  private func mapFour(_ client: VFIOUserClient, _ file: GuestFile) throws {
    try client.dmaMap(
      address: Self.base, size: 0x1000, flags: Self.rw, fd: file.descriptor, offset: 0)
    try client.dmaMap(
      address: Self.base + 0x1000, size: 0x2000, flags: Self.rw, fd: file.descriptor,
      offset: 0x1_0000)
    try client.dmaMap(
      address: Self.base + 0x8_0000, size: 0x2000, flags: Self.rw, fd: file.descriptor,
      offset: 0x3_0000)
    try client.dmaMap(
      address: Self.base + 0x10_0000, size: 0x2000, flags: Self.rw, fd: file.descriptor,
      offset: 0x4_0000)
  }

  @Test func aRangeHoldingNoWindowSucceeds() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      try mapFour(client, file)
      #expect(file.serverMappings.count == 1)
      #expect(file.serverMappings.bytes == 1 << 20)
      // Nothing mapped there at all; then exactly the hole between two windows.
      for (address, size) in [
        (UInt64(0x4000_0000), UInt64(0x1000)), (Self.base + 0x3000, 0x7_D000),
      ] {
        let echoed = try client.dmaUnmap(address: address, size: size)
        #expect(echoed == DMAUnmapPayload(address: address, size: size))
        #expect(server.server.statistics.snapshot.dmaRegions == 4)
        #expect(device.mappedWindows == 4)
        #expect(file.serverMappings.count == 1)
        #expect(file.serverMappings.bytes == 1 << 20)
      }
      // With no window at all, as at a vIOMMU guest's boot.
      try client.dmaUnmapAll()
      #expect(file.serverMappings.count == 0)
      try client.dmaUnmap(address: Self.base, size: Self.base)
      #expect(server.server.statistics.snapshot.dmaRegions == 0)
    }
  }

  @Test func aRangeHoldingThreeWindowsRemovesThemAll() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      try mapFour(client, file)
      // The device writes through the fourth window before and after.
      for i in 0..<64 { device.memory[i] = UInt8(i + 1) }
      #expect(try deviceDMA(client, to: Self.base + 0x10_0000, length: 64) == .done)
      #expect(file.bytes(at: 0x4_0000, count: 64) == Array(device.memory[0..<64]))

      let echoed = try client.dmaUnmap(address: Self.base, size: 0x10_0000)
      #expect(echoed == DMAUnmapPayload(address: Self.base, size: 0x10_0000))
      #expect(server.server.statistics.snapshot.dmaRegions == 1)
      #expect(device.mappedWindows == 1)
      // One mapping of the whole file serves every window of it, and stays for the fourth.
      #expect(file.serverMappings.count == 1)
      #expect(file.serverMappings.bytes == 1 << 20)

      // The removed windows are gone for the device; the fourth is not.
      for address in [Self.base, Self.base + 0x2000, Self.base + 0x8_0000] {
        #expect(try deviceDMA(client, to: address, length: 16) == .failed(EFAULT))
      }
      for i in 0..<64 { device.memory[i] = UInt8(200 - i) }
      #expect(try deviceDMA(client, to: Self.base + 0x10_0000, length: 64) == .done)
      #expect(file.bytes(at: 0x4_0000, count: 64) == Array(device.memory[0..<64]))
      // The freed range takes new windows again.
      try client.dmaMap(
        address: Self.base + 0x1000, size: 0x1000, flags: Self.rw, fd: file.descriptor)
      #expect(server.server.statistics.snapshot.dmaRegions == 2)
      #expect(file.serverMappings.count == 1)
    }
  }

  @Test func aRangeCuttingThroughAWindowRemovesNothing() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      try mapFour(client, file)
      let cuts: [(address: UInt64, size: UInt64)] = [
        (Self.base + 0x2000, 0x1000),  // inside the second window
        (Self.base + 0x2000, 0x20_0000),  // from the middle of the second, past all the others
        (Self.base, 0x10_1000),  // holds three, ends inside the fourth
        (Self.base - 0x1000, 0x3000),  // holds the first, ends inside the second
      ]
      for cut in cuts {
        expectServerError(.invalidArgument) {
          try client.dmaUnmap(address: cut.address, size: cut.size)
        }
        #expect(server.server.statistics.snapshot.dmaRegions == 4, "\(cut)")
        #expect(device.mappedWindows == 4)
        #expect(file.serverMappings.count == 1)
        #expect(file.serverMappings.bytes == 1 << 20)
      }
      // Not page-aligned: refused like the kernel does, before looking at windows.
      expectServerError(.invalidArgument) { try client.dmaUnmap(address: Self.base, size: 0x800) }
      expectServerError(.invalidArgument) {
        try client.dmaUnmap(address: Self.base + 0x800, size: 0x1000)
      }
      #expect(file.serverMappings.count == 1)
      // Every window still works.
      #expect(try deviceDMA(client, to: Self.base + 0x2FF0, length: 16) == .done)
      #expect(try deviceDMA(client, to: Self.base + 0x8_0000, length: 16) == .done)
    }
  }

  @Test func unmappingTheSameRangeTwice() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      try mapFour(client, file)
      try client.dmaUnmap(address: Self.base, size: 0x20_0000)
      #expect(server.server.statistics.snapshot.dmaRegions == 0)
      #expect(file.serverMappings.count == 0)
      // The second time the range holds nothing: success, as VFIO_IOMMU_UNMAP_DMA v2 answers.
      let echoed = try client.dmaUnmap(address: Self.base, size: 0x20_0000)
      #expect(echoed == DMAUnmapPayload(address: Self.base, size: 0x20_0000))
      #expect(server.server.statistics.snapshot.dmaRegions == 0)
      #expect(device.mappedWindows == 0)
      #expect(file.serverMappings.count == 0)
    }
  }

  /// QEMU drops the vIOMMU section above the MSI window with one unmap of
  /// [0xfef00000, 2^64): the last byte is 2^64 - 1, which the kernel accepts too.
  @Test func aRangeEndingAtTheTopOfTheAddressSpace() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      let top: UInt64 = 0xFFFF_FFFF_FFFF_E000
      try client.dmaMap(address: 0xFEE0_0000, size: 0x1000, flags: Self.rw, fd: file.descriptor)
      try client.dmaMap(
        address: Self.base, size: 0x1000, flags: Self.rw, fd: file.descriptor, offset: 0x2000)
      try client.dmaMap(
        address: top, size: 0x1000, flags: Self.rw, fd: file.descriptor, offset: 0x4000)
      #expect(file.serverMappings.count == 1, "one mapping of the file for its three windows")
      let size = 0 &- UInt64(0xFEF0_0000)
      let echoed = try client.dmaUnmap(address: 0xFEF0_0000, size: size)
      #expect(echoed == DMAUnmapPayload(address: 0xFEF0_0000, size: size))
      #expect(server.server.statistics.snapshot.dmaRegions == 1)
      #expect(device.mappedWindows == 1)
      #expect(file.serverMappings.count == 1, "the window below the range stays")
      // Past 2^64 - 1 is still malformed.
      expectServerError(.invalidArgument) {
        try client.dmaUnmap(address: 0xFEF0_0000, size: size + 0x1000)
      }
      // A cut at the top end: a window to 2^64 - 4 KiB, a range from its middle.
      try client.dmaMap(address: top - 0x2000, size: 0x3000, flags: Self.rw)
      expectServerError(.invalidArgument) { try client.dmaUnmap(address: top, size: 0x2000) }
      #expect(server.server.statistics.snapshot.dmaRegions == 2)
      try client.dmaUnmap(address: top - 0x2000, size: 0x4000)
      #expect(server.server.statistics.snapshot.dmaRegions == 1)
    }
  }

  /// Many windows spread over the table's internal blocks: a range removes
  /// exactly the ones inside it, whatever block they sit in.
  @Test func rangesOverManyWindows() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      let count: UInt64 = 2000
      for i in 0..<count {
        try client.dmaMap(address: Self.base + i * 0x2000, size: 0x1000, flags: Self.rw)
      }
      // Windows 100 ..< 1700: the range starts in the hole before 100 and ends in the one after 1699.
      try client.dmaUnmap(address: Self.base + 99 * 0x2000 + 0x1000, size: 1600 * 0x2000)
      #expect(server.server.statistics.snapshot.dmaRegions == Int(count) - 1600)
      for i: UInt64 in [0, 99, 1700, 1999] {
        expectServerError(.fileExists) {
          try client.dmaMap(address: Self.base + i * 0x2000, size: 0x1000, flags: Self.rw)
        }
      }
      for i: UInt64 in [100, 900, 1699] {
        try client.dmaMap(address: Self.base + i * 0x2000, size: 0x1000, flags: Self.rw)
      }
      try client.dmaUnmap(address: Self.base, size: count * 0x2000)
      #expect(server.server.statistics.snapshot.dmaRegions == 0)
    }
  }

  // MARK: Transfers in flight (windows without an fd: DMA_WRITE messages)

  /// Windows without an fd (4 KiB at 0x8000_0000 and 0x8000_1000, 8 KiB at
  /// 0x8000_2000) and a 12 KiB device→client transfer over them, in 4 KiB
  /// DMA_WRITE chunks. `body` runs while the first chunk's request is on its
  /// way and not answered yet.
  private func racingTransfer(
    _ body: (VFIOUserClient) throws -> Void,
    check: (_ status: DMAOutcome, _ guest: [UInt8], _ device: [UInt8], _ requests: Int) -> Void
  ) throws {
    let caps = Capabilities(maxMsgFDs: 8, maxDataXferSize: 4096)
    try withServer(TestDevice()) { server, device in
      let client = try server.connect(capabilities: caps)
      let guest = UnsafeMutableRawBufferPointer.allocate(byteCount: 0x4000, alignment: 16)
      defer { guest.deallocate() }
      guest.initializeMemory(as: UInt8.self, repeating: 0)
      client.memory.add(address: 0x8000_0000, buffer: guest)
      try client.dmaMap(address: 0x8000_0000, size: 0x1000, flags: Self.rw)
      try client.dmaMap(address: 0x8000_1000, size: 0x1000, flags: Self.rw)
      try client.dmaMap(address: 0x8000_2000, size: 0x2000, flags: Self.rw)
      for i in 0..<0x3000 { device.memory[i] = UInt8(truncatingIfNeeded: i * 7 + 3) }
      try client.write32(region: 0, offset: 0x08, 0x8000_0000)
      try client.write32(region: 0, offset: 0x0C, 0)
      try client.write32(region: 0, offset: 0x10, 0x3000)
      // The reply to "go" leaves first, then the first DMA_WRITE: unanswered until `body` waits.
      try client.write32(region: 0, offset: 0x14, 2)
      #expect(client.serverRequestsHandled == 0)
      try body(client)
      let outcome = try finishDMA(client)
      check(
        outcome, Array(guest[0..<0x3000]), Array(device.memory[0..<0x3000]),
        client.serverRequestsHandled)
      // A late reply to a cancelled request is dropped quietly; the connection goes on.
      _ = try client.serveRequests(timeoutMilliseconds: 50)
      #expect(try client.read32(region: 0, offset: 0x00) == 0)
      #expect(server.server.statistics.snapshot.clientConnected)
    }
  }

  @Test func unmapOfTheWindowInFlightCancelsTheTransfer() throws {
    try racingTransfer { client in
      try client.dmaUnmap(address: 0x8000_0000, size: 0x4000)
    } check: { outcome, guest, device, requests in
      #expect(outcome == .failed(ECANCELED))
      #expect(requests == 1, "no chunk was requested after the unmap")
      // The first chunk was already asked for (the client answered it); nothing after it.
      #expect(guest[0x1000...].allSatisfy { $0 == 0 })
    }
  }

  @Test func unmapOfALaterWindowStopsTheTransferThere() throws {
    try racingTransfer { client in
      try client.dmaUnmap(address: 0x8000_2000, size: 0x10_0000)
    } check: { outcome, guest, device, requests in
      #expect(outcome == .failed(EFAULT))
      #expect(requests == 2)
      #expect(guest[0..<0x2000] == device[0..<0x2000])
      #expect(guest[0x2000...].allSatisfy { $0 == 0 }, "nothing lands in the removed window")
    }
  }

  @Test func refusedUnmapLeavesTheTransferRunning() throws {
    try racingTransfer { client in
      expectServerError(.invalidArgument) {
        try client.dmaUnmap(address: 0x8000_0000, size: 0x3000)  // cuts the 8 KiB window
      }
    } check: { outcome, guest, device, requests in
      #expect(outcome == .done)
      #expect(requests == 3)
      #expect(guest == device)
    }
  }
}

/// The whole of a /proc file (its size reads as 0, so it is read to EOF).
func readProcFile(_ path: String) -> String {
  let fd = open(path, O_RDONLY | O_CLOEXEC)
  guard fd >= 0 else { return "" }
  defer { close(fd) }
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 65536)
  while true {
    let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    if n <= 0 { break }
    bytes += chunk[0..<n]
  }
  return String(decoding: bytes, as: UTF8.self)
}

enum DMAOutcome: Equatable {
  case done
  case failed(Int32)
}

/// Runs a device→client transfer of the test device and returns how it ended.
func deviceDMA(_ client: VFIOUserClient, to address: UInt64, length: UInt32) throws -> DMAOutcome {
  try client.write32(region: 0, offset: 0x08, UInt32(truncatingIfNeeded: address))
  try client.write32(region: 0, offset: 0x0C, UInt32(truncatingIfNeeded: address >> 32))
  try client.write32(region: 0, offset: 0x10, length)
  try client.write32(region: 0, offset: 0x14, 2)
  return try finishDMA(client)
}

/// Waits for the test device's transfer to end (answering DMA requests meanwhile), then idles it.
func finishDMA(_ client: VFIOUserClient) throws -> DMAOutcome {
  #expect(try eventually { try client.read32(region: 0, offset: 0x18) >= 2 })
  let status = try client.read32(region: 0, offset: 0x18)
  return status == 2 ? .done : .failed(Int32(try client.read32(region: 0, offset: 0x1C)))
}
