import CVFIOUser
import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

extension GuestFile {
  /// Descriptors of this process open on the file: the test's own, and any
  /// the server or the device still holds. (Counted by the file's unique
  /// name, so descriptors other tests open meanwhile do not disturb it.)
  var openDescriptors: Int {
    guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
    else { return -1 }
    return entries.filter { entry in
      let target = try? FileManager.default.destinationOfSymbolicLink(
        atPath: "/proc/self/fd/" + entry)
      return target?.hasPrefix("/memfd:\(name) ") == true
    }.count
  }
}

/// What the device interface lets a backend decide: refuse an unmap, keep the
/// client's files, set the DMA limits, refuse a SET_IRQS, own the migration state.
@Suite("The device's part: DMA, interrupts, migration state")
struct DeviceInterfaceTests {
  static let rw: VFIODMAMapFlags = [.read, .write]
  static let base: UInt64 = 0x1_0000_0000
  static var keep: ServerLimits {
    var limits = ServerLimits()
    limits.resetOnDisconnect = false
    return limits
  }

  // MARK: DMA

  /// The device hears of an unmap before the server lets the memory go, and
  /// may refuse it: the client gets its errno and no window is removed, all
  /// three of a range included. Refused at hang-up, the memory goes anyway.
  @Test func aRefusedUnmapRemovesNothing() throws {
    let device = TestDevice()
    let file = GuestFile(size: 1 << 20)
    try withServer(device) { server, _ in
      do {
        let client = try server.connect()
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
        var mappedWhenTold: [Int] = []
        device.onUnmap = { _ in mappedWhenTold.append(file.serverMappings.count) }
        device.refuseUnmap = .resourceBusy

        expectServerError(.resourceBusy) { try client.dmaUnmap(address: Self.base, size: 1 << 20) }
        // Told of the three windows in one call, while their memory was still mapped.
        #expect(
          device.unmapCalls.last?.map(\.address) == [
            Self.base, Self.base + 0x1000, Self.base + 0x8_0000,
          ])
        #expect(mappedWhenTold == [1])  // one mapping of the file serves its windows
        #expect(server.server.statistics.snapshot.dmaRegions == 4)
        #expect(device.mappedWindows == 4 && file.serverMappings.count == 1)
        expectServerError(.resourceBusy) { _ = try client.dmaUnmapAll() }
        #expect(device.unmapCalls.last?.count == 4 && file.serverMappings.count == 1)

        // The windows still carry the device's DMA.
        for i in 0..<0x2000 { device.memory[i] = UInt8(truncatingIfNeeded: i &* 5 &+ 1) }
        #expect(try deviceDMA(client, to: Self.base + 0x8_0000, length: 0x2000) == .done)
        #expect(file.bytes(at: 0x3_0000, count: 0x2000) == Array(device.memory[0..<0x2000]))

        // Agreed: the three go, told first as before.
        device.refuseUnmap = nil
        try client.dmaUnmap(address: Self.base, size: 1 << 20)
        #expect(mappedWhenTold == [1, 1, 1])
        #expect(server.server.statistics.snapshot.dmaRegions == 1)
        #expect(device.mappedWindows == 1 && file.serverMappings.count == 1)
        device.refuseUnmap = .resourceBusy
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.unmapCalls.last?.map(\.address) == [Self.base + 0x10_0000])
      #expect(file.serverMappings.count == 0)
      #expect(server.server.statistics.snapshot.dmaRegions == 0)
    }
  }

  /// The client's descriptor is the device's once DMA_MAP reaches it: kept
  /// (an iommufd-like backend) until the window goes, or let go at once.
  /// Beside it the server keeps one copy per mapping of the file (not per
  /// window), which a live update hands on, until the mapping's last window goes.
  @Test func theClientsFileIsTheDevicesToKeepOrLetGo() throws {
    let device = TestDevice()
    let file = GuestFile(size: 1 << 16)
    try withServer(device) { server, _ in
      let client = try server.connect()
      #expect(file.openDescriptors == 1)  // the test's own
      try client.dmaMap(address: 0x10000, size: 0x1000, flags: Self.rw, fd: file.descriptor)
      #expect(file.openDescriptors == 2)  // the server's copy of its mapping; the device let go
      device.keepFiles = true
      try client.dmaMap(
        address: 0x20000, size: 0x1000, flags: Self.rw, fd: file.descriptor, offset: 0x1000)
      #expect(file.openDescriptors == 3, "the device's, and no second copy: one mapping")
      var st = stat()
      let kept = try #require(device.keptFiles[0x20000])
      #expect(fstat(kept.rawValue, &st) == 0)
      var own = stat()
      _ = fstat(file.fd, &own)
      #expect(st.st_ino == own.st_ino)
      try client.dmaUnmap(address: 0x20000, size: 0x1000)
      #expect(file.openDescriptors == 2 && device.keptFiles.isEmpty)
      try client.dmaUnmap(address: 0x10000, size: 0x1000)
      #expect(file.openDescriptors == 1, "the mapping's last window went, and its copy with it")
    }
  }

  /// The device's page sizes, window count and IOVA ranges are what VERSION
  /// offers and what DMA_MAP enforces; outside the ranges is ERANGE.
  @Test func theDevicesLimitsReachVersionAndDMAMap() throws {
    let device = TestDevice()
    device.limits = DMALimits(
      pageSizes: 0x1_0000 | 0x20_0000, maxWindows: 3,
      iovaRanges: [0x1_0000_0000...0x1_FFFF_FFFF, 0x3_0000_0000...0x3_000F_FFFF])
    let file = GuestFile(size: 1 << 20)
    try withServer(device) { server, _ in
      let client = try server.connect()
      #expect(client.serverCapabilities.pgsizes == 0x21_0000)
      #expect(client.serverCapabilities.maxDMAMaps == 3)
      // 4 KiB-aligned, but not to the device's smallest page (64 KiB).
      expectServerError(.invalidArgument) {
        try client.dmaMap(address: 0x1_0000_1000, size: 0x1_0000, flags: Self.rw)
      }
      expectServerError(.invalidArgument) {
        try client.dmaMap(address: 0x1_0000_0000, size: 0x1000, flags: Self.rw)
      }
      // Outside the ranges, across the end of one, below them: ERANGE; the file is closed.
      expectServerError(.outOfRange) {
        try client.dmaMap(
          address: 0x2_0000_0000, size: 0x1_0000, flags: Self.rw, fd: file.descriptor)
      }
      #expect(file.openDescriptors == 1)
      expectServerError(.outOfRange) {
        try client.dmaMap(address: 0x3_000F_0000, size: 0x2_0000, flags: Self.rw)
      }
      expectServerError(.outOfRange) {
        try client.dmaMap(address: 0, size: 0x1_0000, flags: Self.rw)
      }
      #expect(device.mappedWindows == 0)
      // Inside: to the very end of a range, a whole range; then no fourth.
      try client.dmaMap(address: 0x1_0000_0000, size: 0x1_0000, flags: Self.rw, fd: file.descriptor)
      try client.dmaMap(address: 0x1_FFFF_0000, size: 0x1_0000, flags: Self.rw)
      try client.dmaMap(address: 0x3_0000_0000, size: 0x10_0000, flags: Self.rw)
      expectServerError(.noSpace) {
        try client.dmaMap(address: 0x1_0010_0000, size: 0x1_0000, flags: Self.rw)
      }
      #expect(device.mappedWindows == 3)
      #expect(server.server.statistics.snapshot.dmaRegions == 3)
    }
    // The server's own limit, where smaller, is the offer.
    var fewer = ServerLimits()
    fewer.maxDMAMaps = 2
    try withServer(TestDevice(), limits: fewer) { server, device in
      device.limits = DMALimits(pageSizes: 0x1000 | 0x200, maxWindows: 5)
      let client = try server.connect()
      #expect(client.serverCapabilities.maxDMAMaps == 2)
      #expect(client.serverCapabilities.pgsizes == 0x1000)  // none below the server's page
    }
  }

  // MARK: Interrupts

  /// A SET_IRQS the device refuses, by its own failure or by vfio-pci's
  /// rules, changes nothing: wired vectors stay wired, a masked one keeps its
  /// latch, and the eventfds the refused request brought are closed.
  @Test func aRefusedSetIRQsLeavesTheInterruptsAsTheyWere() throws {
    let trigger: VFIOIRQSetFlags = [.dataEventfd, .actionTrigger]
    let device = TestDevice()
    try withServer(device) { server, _ in
      let client = try server.connect()
      let fds = (0..<2).map { _ in makeEventFD() }
      defer { fds.forEach { close($0) } }
      try client.setIRQs(
        IRQSetPayload(flags: trigger, index: 2, start: 0, count: 2),
        fds: fds.map(FileDescriptor.init(rawValue:)))
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataNone, .actionMask], index: 2, start: 1,
          count: 1))
      try client.write32(region: 0, offset: 4, 2 << 16 | 1)  // raised while masked: latched
      let before = device.lastIRQConfiguration[2]
      #expect(before?.pending[1] == true)

      device.refuseSetIRQs = .resourceBusy  // as a kernel's VFIO_DEVICE_SET_IRQS might
      var probe = SentDescriptors()
      probe.append(cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC))
      expectServerError(.resourceBusy) {
        try client.setIRQs(
          IRQSetPayload(flags: trigger, index: 2, start: 0, count: 2),
          fds: [probe.lent[0], probe.lent[0]])
      }
      #expect(probe.leaked().isEmpty)
      probe.close()
      #expect(device.lastIRQConfiguration[2] == before)
      #expect(server.server.statistics.snapshot.irqFDs == 2)

      device.refuseSetIRQs = nil
      var unmaskProbe = SentDescriptors()
      unmaskProbe.append(cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC))
      expectServerError(.invalidArgument) {  // only INTx's unmask takes an eventfd
        try client.setIRQs(
          IRQSetPayload(
            flags: [.dataEventfd, .actionUnmask], index: 2, start: 1,
            count: 1),
          fds: [unmaskProbe.lent[0]])
      }
      #expect(unmaskProbe.leaked().isEmpty)
      unmaskProbe.close()
      #expect(device.lastIRQConfiguration[2] == before)

      try client.write32(region: 0, offset: 4, 2 << 16 | 0)
      #expect(eventCount(fds[0]) == 1)
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataNone, .actionUnmask], index: 2, start: 1,
          count: 1))
      #expect(eventCount(fds[1]) == 1)
    }
  }

  /// When the client leaves, only the indexes it set up and did not disable
  /// itself are disabled: a kernel refuses to disable one that is not enabled.
  @Test func aHangUpDisablesTheIndexesTheClientSetUp() throws {
    let trigger: VFIOIRQSetFlags = [.dataEventfd, .actionTrigger]
    let disable: VFIOIRQSetFlags = [.dataNone, .actionTrigger]
    let device = TestDevice()
    try withServer(device) { server, _ in
      do {
        let client = try server.connect()
        let fd = makeEventFD()
        defer { close(fd) }
        try client.setIRQs(
          IRQSetPayload(flags: trigger, index: 2, start: 0, count: 1),
          fds: [FileDescriptor(rawValue: fd)])
        try client.setIRQs(
          IRQSetPayload(flags: trigger, index: VFIOPCIIRQ.err, start: 0, count: 1),
          fds: [FileDescriptor(rawValue: fd)])
        try client.setIRQs(IRQSetPayload(flags: disable, index: VFIOPCIIRQ.err, start: 0, count: 0))
        device.setIRQsCalls = []
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.setIRQsCalls.map(\.index) == [2])
      #expect(device.setIRQsCalls.first?.count == 0 && device.setIRQsCalls.first?.flags == disable)
      #expect(device.eventFDCount == 0)
    }
  }

  // MARK: Migration

  /// The device's migration state has no copy in the server: a device that
  /// moved while no client was connected (here: reset by its owner) is where
  /// the next client finds it, not where the last client left it.
  @Test func theNextClientFindsTheDeviceWhereItIs() throws {
    let device = MigratingTestDevice()
    try withServer(device, limits: Self.keep) { server, _ in
      do {
        let client = try server.connect()
        try client.setMigrationState(.stop)
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.migrationState == .stop && device.resets == 0)
      do {
        let client = try server.connect()
        #expect(try client.migrationState() == .stop)
      }
      #expect(server.waitFor { !$0.clientConnected && $0.connectionsServed == 2 })
      try device.reset()
      let client = try server.connect()
      #expect(try client.migrationState() == .running)
      try client.setMigrationState(.stop)
      #expect(device.arcs.suffix(2) == ["RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP"])
    }
  }

  /// GET asks the device each time: the simulated VF reset by a
  /// function-level reset written to its config space is RUNNING at once,
  /// and the save it was serving reads ENODEV.
  @Test func aResetTheDeviceDidItselfIsSeenByTheNextGet() throws {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 4 << 20)
    try withServer(vf) { server, _ in
      let client = try server.connect()
      try client.setMigrationState(.stopCopy)
      #expect(try client.migDataRead(size: 64).count == 64)
      let devCtl = UInt64(XePCIConfig.pcieCap + XePCIConfig.devCtl)
      let control = try client.read(region: VFIOPCIRegion.config, offset: devCtl, count: 2)
      let value = UInt16(control[0]) | UInt16(control[1]) << 8 | XePCIConfig.devCtlInitiateFLR
      try client.write(
        region: VFIOPCIRegion.config, offset: devCtl,
        data: [UInt8(truncatingIfNeeded: value), UInt8(value >> 8)])
      #expect(try client.migrationState() == .running)
      expectServerError(Errno(rawValue: ENODEV)) { _ = try client.migDataRead(size: 64) }
      try client.setMigrationState(.running)  // nothing to walk; the dead stream is let go
      expectServerError(Errno(rawValue: ENODEV)) { _ = try client.migDataRead(size: 64) }
      try client.setMigrationState(.stopCopy)
      #expect(try client.migDataRead(size: 64).count == 64)
    }
  }

  /// MIG_DATA_READ fills its reply from as many device reads as it takes: a
  /// device that hands out 100 bytes a read still gives full replies, short
  /// only at the end.
  @Test func migDataReadIsShortOnlyAtTheEnd() throws {
    let device = MigratingTestDevice()
    device.maxRead = 100
    try withServer(device) { server, _ in
      let client = try server.connect()
      try client.setMigrationState(.stopCopy)
      var sizes: [Int] = []
      var all: [UInt8] = []
      while true {
        let part = try client.migDataRead(size: 4096)
        sizes.append(part.count)
        all += part
        if part.count < 4096 { break }
      }
      #expect(all == MigratingTestDevice.magic + Array(device.memory))
      #expect(sizes.dropLast().allSatisfy { $0 == 4096 })
      #expect(sizes.last == (4 + TestDevice.bar2Size) % 4096)
      #expect(try client.migDataRead(size: 4096).isEmpty)
    }
  }

  /// A client that hangs up while its MIG_DATA_READ is being filled: the fill
  /// stops at the next read rather than reading the rest for nobody, and the
  /// connection ends (the device is reset under the default policy).
  @Test func aFillStopsWhenTheClientHangsUp() throws {
    let device = MigratingTestDevice()
    device.maxRead = 16
    try withServer(device) { server, _ in
      let client = try server.connect()
      try client.setMigrationState(.stopCopy)
      let stream = try #require(device.open)
      let socket = client.socket.rawValue
      stream.beforeRead = { read in
        if read == 3 { _ = shutdown(socket, Int32(SHUT_RDWR)) }
      }
      #expect(throws: (any Error).self) { _ = try client.migDataRead(size: 4096) }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(stream.reads == 3, "no read after the hang-up was seen")
      #expect(device.resets == 1)
    }
  }
}
