import KernelVFIO
import KernelVFIOBackend
import Logging
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

// protocol/malformed.json replayed against the kernel backend: the real
// server engine over a real Unix socket, serving `KernelVFIOBackend` over a
// `KernelVFIODevice` whose device fd is a fake vfio-pci VF that checks what
// reaches it as the kernel does. A case whose outcome differs from the
// simulated devices' says so in `expect_kernel`; `kernel_only` cases are
// about the kernel backend alone.

/// A server of the kernel backend over `FakeVFIOPCIDevice`.
enum FakeKernelServer {
  /// The kernel backend over `fake`, as `serve --device` makes it.
  static func backend(_ fake: FakeVFIOPCIDevice, _ iommu: FakeIOMMU = FakeIOMMU()) throws
    -> KernelVFIOBackend
  {
    var logger = Logger(label: "kernel-corpus")
    logger.logLevel = .critical
    return KernelVFIOBackend.make(try KernelVFIODevice.adopt(fake, iommu: iommu), logger: logger)
  }

  static func drive(_ entry: SocketCorpusCase) throws {
    let reset = try #require(
      FakeVFIOPCIDevice.ResetBehaviour(rawValue: entry.kernelDevice ?? "works"),
      "\(entry.name): unknown kernel_device \(entry.kernelDevice ?? "")")
    let fake = FakeVFIOPCIDevice(reset: reset)
    let iommu = FakeIOMMU()
    try withServer(try backend(fake, iommu), limits: entry.serverLimits) { server, _ in
      try MalformedCorpusSocketTests.drive(entry, server, mappedWindows: { iommu.mappings.count })
      server.close()
    }
    // What the kernel would still reference once the client has gone: nothing.
    #expect(fake.held == 0, "\(entry.name): the device still has \(fake.held) eventfds set")
    #expect(iommu.mappings.isEmpty, "\(entry.name): \(iommu.mappings.count) IOMMU mappings left")
    #expect(
      fake.migrationState == .running && fake.resumeSource < 0,
      "\(entry.name): the device was left in \(fake.migrationState)")
  }
}

@Suite("Malformed corpus against the kernel backend (fake vfio-pci device)")
struct MalformedCorpusKernelTests {
  @Test(arguments: SocketCorpus.all.map(\.onKernel))
  func corpusEntry(_ entry: SocketCorpusCase) throws {
    try MalformedCorpusSocketTests.drive(entry)
  }

  /// The fake answers as vfio-pci: what the adapter learns from it at open.
  @Test func adapterSeesTheFakeAsAVF() throws {
    let device = try KernelVFIODevice.adopt(FakeVFIOPCIDevice(), iommu: FakeIOMMU())
    #expect(device.regions.count == 9 && device.irqs.count == 5)
    #expect(device.regions[2].sparseAreas?.count == 2)
    #expect(device.regions[8].size == 0, "no VGA: EINVAL from the kernel, an empty region here")
    #expect(device.migrationFlags == .stopCopy)
    #expect(device.irqs[2].count == 8)
  }

  /// A save through the kernel's data_fd restored into a second device: the
  /// state crosses through the seam, the server and the socket both ways.
  @Test func saveAndRestoreThroughTheKernelBackend() throws {
    let source = FakeVFIOPCIDevice()
    let destination = FakeVFIOPCIDevice()
    var stream: [UInt8] = []
    try withServer(try FakeKernelServer.backend(source)) { server, _ in
      let client = try server.connect()
      try client.write32(region: VFIOPCIRegion.bar0, offset: 0x10, 0xfeed_face)
      try client.setMigrationState(.stopCopy)
      #expect(try client.stopCopySize() == UInt64(FakeVFIOPCIDevice.stateSize))
      while true {
        let chunk = try client.migDataRead(size: 1000)
        if chunk.isEmpty { break }
        stream += chunk
      }
      try client.setMigrationState(.running)
    }
    #expect(stream.count == FakeVFIOPCIDevice.stateSize)
    try withServer(try FakeKernelServer.backend(destination)) { server, _ in
      let client = try server.connect()
      try client.setMigrationState(.stop)
      try client.setMigrationState(.resuming)
      try client.migDataWrite(stream)
      try client.setMigrationState(.running)
      #expect(try client.read32(region: VFIOPCIRegion.bar0, offset: 0x10) == 0xfeed_face)
    }
    #expect(destination.migrationState == .running)
  }

  /// VFIO_DEVICE_RESET refused as busy (EAGAIN) changed nothing in the
  /// kernel, so the save stream it did not end is still read to its end.
  @Test func busyResetKeepsTheSaveStream() throws {
    let fake = FakeVFIOPCIDevice(reset: .busy)
    try withServer(try FakeKernelServer.backend(fake)) { server, _ in
      let client = try server.connect()
      try client.write32(region: VFIOPCIRegion.bar0, offset: 0, 0x1234_5678)
      try client.setMigrationState(.stopCopy)
      expectServerError(.resourceTemporarilyUnavailable) { try client.reset() }
      #expect(try client.migrationState() == .stopCopy)
      let saved = try client.migDataRead(size: 8192)
      #expect(saved.count == FakeVFIOPCIDevice.stateSize)
      #expect(saved.prefix(4) == [0x78, 0x56, 0x34, 0x12])
    }
    #expect(fake.migrationState == .running, "the client left: back to RUNNING through the arcs")
  }
}
