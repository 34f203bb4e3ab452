import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// Runs a client→device transfer of the test device and returns how it ended.
func deviceDMA(_ client: VFIOUserClient, from address: UInt64, length: UInt32) throws
  -> DMAOutcome
{
  try client.write32(region: 0, offset: 0x08, UInt32(truncatingIfNeeded: address))
  try client.write32(region: 0, offset: 0x0C, UInt32(truncatingIfNeeded: address >> 32))
  try client.write32(region: 0, offset: 0x10, length)
  try client.write32(region: 0, offset: 0x14, 1)
  return try finishDMA(client)
}

/// A client that cuts the file behind a DMA window short after DMA_MAP: the
/// server's next copy through the window touches pages past the file's end,
/// which raises SIGBUS. The copy is guarded: the transfer fails with EFAULT,
/// the server keeps serving, and the window stays until the client unmaps it.
@Suite("DMA through a file the client shrank")
struct ShrunkDMAFileTests {
  static let rw: VFIODMAMapFlags = [.read, .write]
  static let base: UInt64 = 0x1_0000_0000

  /// The server's DMA writes and reads (the test device's `dmaWrite` /
  /// `dmaRead`) past the new end fail with EFAULT, in both directions and
  /// for a transfer that starts inside the file; what lies inside still
  /// works, and so does all of it once the file has grown back.
  @Test func transfersPastTheNewEndFailWithEFAULT() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 0x1_0000)
      try client.dmaMap(address: Self.base, size: 0x1_0000, flags: Self.rw, fd: file.descriptor)
      for i in 0..<64 { device.memory[i] = UInt8(0x40 + i) }
      #expect(try deviceDMA(client, to: Self.base + 0x8000, length: 64) == .done)
      #expect(ftruncate(file.fd, 0x4000) == 0)

      #expect(try deviceDMA(client, to: Self.base + 0x8000, length: 64) == .failed(EFAULT))
      #expect(try deviceDMA(client, from: Self.base + 0x8000, length: 64) == .failed(EFAULT))
      #expect(try deviceDMA(client, to: Self.base + 0x3F00, length: 0x200) == .failed(EFAULT))
      #expect(try deviceDMA(client, from: Self.base + 0x3F00, length: 0x200) == .failed(EFAULT))
      #expect(try deviceDMA(client, to: Self.base + 0x1000, length: 64) == .done)
      #expect(file.bytes(at: 0x1000, count: 64) == Array(device.memory[0..<64]))

      // The window is still the client's: grown back, the file is reachable again.
      #expect(file.serverMappings.count == 1)
      #expect(ftruncate(file.fd, 0x1_0000) == 0)
      #expect(try deviceDMA(client, to: Self.base + 0xF000, length: 64) == .done)
      #expect(file.bytes(at: 0xF000, count: 64) == Array(device.memory[0..<64]))

      #expect(ftruncate(file.fd, 0) == 0)
      #expect(try deviceDMA(client, from: Self.base, length: 16) == .failed(EFAULT))
      try client.dmaUnmap(address: Self.base, size: 0x1_0000)
      #expect(file.serverMappings.count == 0, "the unmap took the mapping")
      #expect(file.openDescriptors == 1, "only the test's own descriptor is left")
      try client.write32(region: 0, offset: 0, 0x5A5A)
      #expect(try client.read32(region: 0, offset: 0) == 0x5A5A)
    }
  }

  /// A second window of the same file takes the mapping the first one made
  /// (the server asks its seals only when it maps): its copies are guarded
  /// too, so a shrink behind it fails the transfer with EFAULT.
  @Test func aWindowSharingTheMappingIsGuardedToo() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let file = GuestFile(size: 0x1_0000)
      try client.dmaMap(address: Self.base, size: 0x8000, flags: Self.rw, fd: file.descriptor)
      try client.dmaMap(
        address: Self.base + 0x10_0000, size: 0x8000, flags: Self.rw, fd: file.descriptor,
        offset: 0x8000)
      #expect(file.serverMappings.count == 1, "one mapping of the file serves both windows")
      for i in 0..<64 { device.memory[i] = UInt8(0x20 + i) }
      #expect(try deviceDMA(client, to: Self.base + 0x10_0000, length: 64) == .done)
      #expect(file.bytes(at: 0x8000, count: 64) == Array(device.memory[0..<64]))
      #expect(ftruncate(file.fd, 0x4000) == 0)
      #expect(try deviceDMA(client, to: Self.base + 0x10_0000, length: 64) == .failed(EFAULT))
      #expect(try deviceDMA(client, from: Self.base + 0x10_0000, length: 64) == .failed(EFAULT))
      #expect(try deviceDMA(client, to: Self.base, length: 64) == .done)
      try client.dmaUnmap(address: Self.base, size: 0x20_0000)
      #expect(file.serverMappings.count == 0)
      #expect(file.openDescriptors == 1)
    }
  }

  /// A memfd sealed against shrinking (as QEMU's memory-backend-memfd makes
  /// it) cannot be cut short: ftruncate fails with EPERM and DMA goes on.
  /// The server needs to do nothing for it.
  @Test func aSealedMemfdCannotShrink() throws {
    try withServer(TestDevice()) { server, device in
      let client = try server.connect()
      let fd = cvfu_memfd_create("sealed-guest", UInt32(CVFU_MFD_ALLOW_SEALING))
      #expect(fd >= 0)
      defer { close(fd) }
      #expect(ftruncate(fd, 0x1_0000) == 0)
      #expect(cvfu_seal_shrink(fd) == 0)
      try client.dmaMap(
        address: Self.base, size: 0x1_0000, flags: Self.rw, fd: FileDescriptor(rawValue: fd))
      #expect(ftruncate(fd, 0x4000) == -1 && errno == EPERM)
      for i in 0..<64 { device.memory[i] = UInt8(0x80 + i) }
      #expect(try deviceDMA(client, to: Self.base + 0x8000, length: 64) == .done)
      var landed = [UInt8](repeating: 0, count: 64)
      #expect(landed.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 64, 0x8000) } == 64)
      #expect(landed == Array(device.memory[0..<64]))
      try client.dmaUnmap(address: Self.base, size: 0x1_0000)
    }
  }
}

extension DMALoggingTests {
  /// The simulated VF's DMA engine into a window whose file the client cut
  /// short: the transfer ends with STATUS error and EFAULT, as the engine
  /// reports an address no window holds (an IOMMU fault on hardware); a DMA
  /// logging report still answers and counts the page the failed write aimed
  /// at as dirty (part of it may have landed); the VF keeps working.
  @Test func engineDMAIntoAShrunkFileFailsWithEFAULT() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 4 << 20)
    try withServer(vf) { server, _ in
      let file = GuestFile(size: Self.guestSize)
      let client = try server.connect()
      try enableBusMaster(client)
      try client.dmaMap(
        address: Self.guestBase, size: UInt64(Self.guestSize), flags: Self.rw, fd: file.descriptor)
      try client.startDMALogging(
        pageSize: Self.page,
        ranges: [DMALoggingRange(iova: Self.guestBase, length: UInt64(Self.guestSize))])
      #expect(ftruncate(file.fd, 0x8000) == 0)

      for toDevice in [false, true] {
        let status = try transfer(
          client, toDevice: toDevice, client: Self.guestBase + 0x1_0000, length: 4096)
        #expect(status & D.statusError != 0 && status & D.statusDone == 0)
        #expect(D.errno(ofStatus: status) == EFAULT)
      }
      #expect(try report(client) == [16])
      #expect(try transfer(client, client: Self.guestBase + 0x1000, length: 64) == D.statusDone)
      #expect(try report(client) == [1])

      try client.stopDMALogging()
      try client.dmaUnmap(address: Self.guestBase, size: UInt64(Self.guestSize))
      #expect(file.serverMappings.count == 0)
      #expect(file.openDescriptors == 1)
    }
  }
}
