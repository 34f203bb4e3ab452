import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer

/// One server mapping per client file and protection, shared by its
/// windows: each window keeps its own rights, and the mapping goes with the
/// last window of it.
@Suite("DMA map cache")
struct DMAMapCacheTests {
  static let rw: VFIODMAMapFlags = [.read, .write]
  static let base: UInt64 = 0x1_0000_0000

  /// The server's mappings of `file`, by permissions ("rw-s", "r--s").
  func mappings(_ file: GuestFile) -> [String] {
    readProcFile("/proc/self/maps").split(separator: "\n")
      .filter { $0.contains("/memfd:\(file.name) ") }
      .map { String($0.split(separator: " ")[1]) }.sorted()
  }

  @Test func manyWindowsOfAFileShareOneMappingThatGoesWithTheLast() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      for i in 0..<256 {
        try client.dmaMap(
          address: Self.base + UInt64(i) * 0x2000, size: 0x1000, flags: Self.rw,
          fd: file.descriptor,
          offset: UInt64(255 - i) * 0x1000)
      }
      #expect(mappings(file) == ["rw-s"])
      // Each window reaches its own page of the file.
      for i in 0..<16 { device.memory[i] = UInt8(0xA0 + i) }
      #expect(try deviceDMA(client, to: Self.base + 7 * 0x2000 + 0x10, length: 16) == .done)
      #expect(file.bytes(at: 248 * 0x1000 + 0x10, count: 16) == Array(device.memory[0..<16]))
      for i in 0..<255 {
        try client.dmaUnmap(address: Self.base + UInt64(i) * 0x2000, size: 0x1000)
      }
      #expect(mappings(file) == ["rw-s"])
      #expect(try deviceDMA(client, to: Self.base + 7 * 0x2000, length: 16) == .failed(EFAULT))
      try client.dmaUnmap(address: Self.base + 255 * 0x2000, size: 0x1000)
      #expect(mappings(file) == [], "the last window took the mapping with it")
    }
  }

  /// A read-only window of a file also mapped writable is mapped read-only
  /// and refuses the device's writes; its fd's own rights still count.
  @Test func eachWindowKeepsItsOwnProtection() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 20)
      try client.dmaMap(address: Self.base, size: 0x1_0000, flags: Self.rw, fd: file.descriptor)
      try client.dmaMap(
        address: Self.base + 0x1_0000, size: 0x1_0000, flags: .read, fd: file.descriptor,
        offset: 0x1_0000)
      #expect(mappings(file) == ["r--s", "rw-s"])
      #expect(try deviceDMA(client, to: Self.base + 0x1_0000, length: 16) == .failed(EPERM))
      #expect(try deviceDMA(client, to: Self.base, length: 16) == .done)
      // The same file through a read-only descriptor: no writable window, though one is mapped.
      let readOnly = open("/proc/self/fd/\(file.fd)", O_RDONLY | O_CLOEXEC)
      #expect(readOnly >= 0)
      defer { close(readOnly) }
      expectServerError(.permissionDenied) {
        try client.dmaMap(
          address: Self.base + 0x8_0000, size: 0x1000, flags: Self.rw,
          fd: FileDescriptor(rawValue: readOnly))
      }
      try client.dmaMap(
        address: Self.base + 0x8_0000, size: 0x1000, flags: .read,
        fd: FileDescriptor(rawValue: readOnly))
      #expect(mappings(file) == ["r--s", "rw-s"], "the read-only mapping serves it")
      #expect(server.server.statistics.snapshot.dmaRegions == 3)
    }
  }

  /// A file that grew after its first window: a window past the old end
  /// gets a larger mapping; the windows of the old one keep theirs until they go.
  @Test func aFileThatGrewGetsALargerMapping() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 1 << 16)
      try client.dmaMap(address: Self.base, size: 0x1000, flags: Self.rw, fd: file.descriptor)
      ftruncate(file.fd, 1 << 20)
      try client.dmaMap(
        address: Self.base + 0x10_0000, size: 0x1000, flags: Self.rw, fd: file.descriptor,
        offset: 0xF_0000)
      #expect(mappings(file).count == 2)
      for i in 0..<16 { device.memory[i] = UInt8(i + 1) }
      #expect(try deviceDMA(client, to: Self.base + 0x10_0000, length: 16) == .done)
      #expect(file.bytes(at: 0xF_0000, count: 16) == Array(device.memory[0..<16]))
      #expect(try deviceDMA(client, to: Self.base, length: 16) == .done)
      #expect(file.bytes(at: 0, count: 16) == Array(device.memory[0..<16]))
      try client.dmaUnmap(address: Self.base, size: 0x1000)
      #expect(mappings(file).count == 1)
      // The larger mapping serves the old range too.
      try client.dmaMap(address: Self.base, size: 0x1000, flags: Self.rw, fd: file.descriptor)
      #expect(mappings(file).count == 1)
    }
  }

  /// The client leaving takes every mapping of its files with it.
  @Test func aHangUpReleasesEveryMapping() throws {
    let file = GuestFile(size: 1 << 20)
    try withServer(TestDevice()) { server, _ in
      do {
        let client = try server.connect()
        for i in 0..<64 {
          try client.dmaMap(
            address: Self.base + UInt64(i) * 0x1000, size: 0x1000,
            flags: i % 2 == 0 ? Self.rw : VFIODMAMapFlags.read, fd: file.descriptor,
            offset: UInt64(i) * 0x1000)
        }
        #expect(mappings(file) == ["r--s", "rw-s"])
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(mappings(file) == [])
    }
  }
}
