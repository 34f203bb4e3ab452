import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeStream

/// A byte stream over an array: the "save" side hands out `data` (at most
/// `maxRead` per call), the "restore" side collects what it is given (at most
/// `maxWrite` per call).
final class ArrayStream: MigrationSource, MigrationSink {
  var data: [UInt8]
  var position = 0
  var dead = false
  var closed = false
  var reads = 0
  let maxRead: Int
  let maxWrite: Int
  /// Runs before each read (tests: a client that hangs up mid-request).
  var beforeRead: ((Int) -> Void)?
  init(data: [UInt8] = [], maxRead: Int = .max, maxWrite: Int = .max) {
    self.data = data
    self.maxRead = maxRead
    self.maxWrite = maxWrite
  }
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    if dead { throw Errno(rawValue: ENODEV) }
    precondition(!closed, "read after close")
    reads += 1
    beforeRead?(reads)
    let n = min(buffer.count, data.count - position, maxRead)
    data.withUnsafeBytes {
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position..<(position + n)]))
    }
    position += n
    return n
  }
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    if dead { throw Errno(rawValue: ENODEV) }
    precondition(!closed, "write after close")
    let n = min(bytes.count, maxWrite)
    data.append(contentsOf: bytes[0..<n])
    return n
  }
  func close() {
    precondition(!closed, "closed twice")
    closed = true
  }
}

/// TestDevice plus migration: saves BAR2 behind a 4-byte magic, restores only
/// a valid image. It owns its migration state, as every backend does.
final class MigratingTestDevice: TestDevice, MigrationCapable {
  var arcs: [String] = []
  var failure: (from: MigrationState, to: MigrationState, errno: Errno)?
  var flags: MigrationFlags = [.stopCopy, .p2p]
  /// Stands for an Xe VF's data_fd (a sink that takes any bytes), so a
  /// connection may negotiate the sparse form with it.
  var sparseStreamTransform: (any MigrationStreamTransform)? { SparseMigration.transform }
  /// Where the last arc left the device.
  var state = MigrationState.running
  /// `migrationFailed` stopped the device: ERROR until a reset.
  var stopped = false
  var open: ArrayStream?
  /// Save streams hand out at most this much per read.
  var maxRead = Int.max
  static let magic: [UInt8] = [0x58, 0x45, 0x56, 0x46]

  var migrationFlags: MigrationFlags { flags }
  var migrationState: MigrationState { stopped ? .error : state }

  func migrationStep(from: MigrationState, to: MigrationState) throws(Errno) -> MigrationStream? {
    precondition(from == migrationState, "arc \(from)>\(to) asked in \(migrationState)")
    if let failure, failure.from == from, failure.to == to { throw failure.errno }
    arcs.append("\(from)>\(to)")
    var opened: MigrationStream?
    switch (from, to) {
    case (.stop, .stopCopy):
      let stream = ArrayStream(data: Self.magic + Array(memory), maxRead: maxRead)
      open = stream
      opened = .source(stream)
    case (.stop, .resuming):
      let stream = ArrayStream(maxWrite: 1000)
      open = stream
      opened = .sink(stream)
    case (.resuming, .stop):
      guard let image = open?.data, image.count == Self.magic.count + memory.count,
        Array(image.prefix(4)) == Self.magic
      else { throw .ioError }
      memory.copyMemory(
        from: UnsafeRawBufferPointer(
          start: image.withUnsafeBytes { $0.baseAddress! + 4 }, count: memory.count))
      open = nil
    case (.stopCopy, .stop):
      // The PF refuses to finish a save still in progress (EIO).
      if let open, open.position < open.data.count { throw .ioError }
      open = nil
    default:
      break
    }
    state = to
    return opened
  }

  func stopCopySize() throws(Errno) -> UInt64 { UInt64(Self.magic.count + memory.count) }
  func migrationFailed() { stopped = true }
  override func resetHook() {
    open?.dead = true
    open = nil
    stopped = false
    state = .running
  }
}

let featureGet = VFIODeviceFeatureFlags.get
let featureSet = VFIODeviceFeatureFlags.set
let featureProbe = VFIODeviceFeatureFlags.probe

extension VFIOUserClient {
  /// MIG_DATA_WRITEs of `stream`, `chunk` bytes each.
  func writeStream(_ stream: [UInt8], chunk: Int) throws {
    for offset in stride(from: 0, to: stream.count, by: chunk) {
      try migDataWrite(Array(stream[offset..<min(offset + chunk, stream.count)]))
    }
  }

  /// Reads the whole stream in `chunk`-byte messages.
  func readStream(chunk: UInt32) throws -> [UInt8] {
    var all: [UInt8] = []
    while true {
      let part = try migDataRead(size: chunk)
      all += part
      if part.count < chunk { return all }
    }
  }
}

@Suite("Migration: DEVICE_FEATURE and MIG_DATA over the socket")
struct MigrationTests {
  @Test func featuresFollowTheKernelRules() throws {
    try withServer(MigratingTestDevice()) { server, _ in
      let client = try server.connect()
      let migration = try client.feature(flags: featureGet | VFIODeviceFeature.migration, argsz: 16)
      #expect(migration.argsz == 16 && migration.data == [3, 0, 0, 0, 0, 0, 0, 0])  // STOP_COPY | P2P
      // PROBE succeeds only for methods the feature has, and echoes the request.
      let probe = try client.feature(
        flags: featureProbe | featureGet | VFIODeviceFeature.migDeviceState)
      #expect(
        probe.flags == featureProbe | featureGet | VFIODeviceFeature.migDeviceState
          && probe.data.isEmpty)
      _ = try client.feature(
        flags: featureProbe | featureGet | featureSet | VFIODeviceFeature.migDeviceState)
      expectServerError(.invalidArgument) {
        _ = try client.feature(flags: featureProbe | featureSet | VFIODeviceFeature.migration)
      }
      expectServerError(.invalidArgument) {
        _ = try client.feature(
          flags: featureSet | VFIODeviceFeature.migration, data: [UInt8](repeating: 0, count: 8))
      }
      // Neither GET nor SET; a reply area too small; a SET without its data.
      expectServerError(.invalidArgument) {
        _ = try client.feature(flags: VFIODeviceFeature.migDeviceState, argsz: 16)
      }
      expectServerError(.invalidArgument) {
        _ = try client.feature(flags: featureGet | VFIODeviceFeature.migration, argsz: 12)
      }
      expectServerError(.invalidArgument) {
        _ = try client.feature(
          flags: featureSet | VFIODeviceFeature.migDeviceState, data: [2, 0, 0, 0])
      }
      // No DMA logging on Xe; unknown features.
      for feature in [
        VFIODeviceFeature.dmaLoggingStart, VFIODeviceFeature.dmaLoggingStop,
        VFIODeviceFeature.dmaLoggingReport, 3, 42,
      ] {
        expectServerError(.inappropriateIOCTLForDevice) {
          _ = try client.feature(flags: featureGet | feature, argsz: 64)
        }
      }
      let size = try client.feature(flags: featureGet | VFIODeviceFeature.migDataSize, argsz: 16)
      #expect(
        try MigDataSizeData(decoding: size.data).stopCopyLength == UInt64(4 + TestDevice.bar2Size))
      #expect(try client.migrationState() == .running)
    }
  }

  @Test func deviceWithoutMigrationAnswersENOTTY() throws {
    try withServer(TestDevice()) { server, _ in
      let client = try server.connect()
      expectServerError(.inappropriateIOCTLForDevice) {
        _ = try client.feature(flags: featureGet | VFIODeviceFeature.migration, argsz: 16)
      }
      expectServerError(.inappropriateIOCTLForDevice) {
        _ = try client.feature(flags: featureProbe | VFIODeviceFeature.migDeviceState)
      }
    }
  }

  @Test func saveAndRestoreBetweenTwoServers() throws {
    let source = MigratingTestDevice()
    let destination = MigratingTestDevice()
    for i in 0..<TestDevice.bar2Size { source.memory[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
    try withServer(source) { src, _ in
      try withServer(destination) { dst, _ in
        let a = try src.connect()
        let b = try dst.connect()
        try a.setMigrationState(.stopCopy)
        #expect(source.arcs == ["RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP", "STOP>STOP_COPY"])
        #expect(try a.migrationState() == .stopCopy)
        try b.setMigrationState(.resuming)
        #expect(destination.arcs == ["RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP", "STOP>RESUMING"])
        // Stream through in 4 KiB reads and writes of other sizes (the device takes ≤ 1000 bytes a call).
        let stream = try a.readStream(chunk: 4096)
        #expect(stream.count == 4 + TestDevice.bar2Size)
        #expect(try a.migDataRead(size: 4096).isEmpty)  // after the end: 0 bytes
        try b.writeStream(stream, chunk: 5000)
        try b.setMigrationState(.running)
        #expect(
          destination.arcs.suffix(3) == [
            "RESUMING>STOP", "STOP>RUNNING_P2P", "RUNNING_P2P>RUNNING",
          ])
        #expect(Array(destination.memory) == Array(source.memory))
        try a.setMigrationState(.running)
        #expect(try a.migrationState() == .running)
      }
    }
  }

  @Test func dataCommandsOnlyInTheirStates() throws {
    try withServer(MigratingTestDevice()) { server, _ in
      let client = try server.connect()
      expectServerError(.invalidArgument) { _ = try client.migDataRead(size: 16) }
      expectServerError(.invalidArgument) { try client.migDataWrite([1, 2, 3]) }
      try client.setMigrationState(.stopCopy)
      expectServerError(.invalidArgument) { try client.migDataWrite([1, 2, 3]) }
      expectServerError(.invalidArgument) { _ = try client.migDataRead(size: (1 << 20) + 1) }
      // argsz must leave room for the data asked for.
      var payload = [UInt8](repeating: 0, count: 8)
      payload.withUnsafeMutableBytes { MigDataHeader(argsz: 8, size: 64).encode(into: $0) }
      expectServerError(.invalidArgument) { try client.request(.migDataRead, payload: payload) }
      #expect(try client.migDataRead(size: 16).count == 16)
    }
  }

  @Test func resetDuringStopCopyInvalidatesTheStream() throws {
    try withServer(MigratingTestDevice()) { server, device in
      let client = try server.connect()
      try client.setMigrationState(.stopCopy)
      _ = try client.migDataRead(size: 100)
      try client.reset()
      #expect(try client.migrationState() == .running)
      expectServerError(Errno(rawValue: ENODEV)) { _ = try client.migDataRead(size: 100) }
      #expect(device.open == nil)
      // A new save opens a fresh stream from the start.
      try client.setMigrationState(.stopCopy)
      #expect(try client.migDataRead(size: 4) == MigratingTestDevice.magic)
    }
  }

  @Test func hangUpDuringResumingLeavesTheDeviceRunning() throws {
    try withServer(MigratingTestDevice()) { server, device in
      do {
        let client = try server.connect()
        try client.setMigrationState(.resuming)
        try client.migDataWrite([UInt8](repeating: 9, count: 100))
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.open == nil && device.resets == 1)
      let next = try server.connect()
      #expect(try next.migrationState() == .running)
      expectServerError(.invalidArgument) { try next.migDataWrite([1]) }
    }
  }

  @Test func failedArcStaysAtTheLastGoodStep() throws {
    let device = MigratingTestDevice()
    device.failure = (.runningP2P, .stop, .staleNFSFileHandle)
    try withServer(device) { server, _ in
      let client = try server.connect()
      expectServerError(.staleNFSFileHandle) { try client.setMigrationState(.stopCopy) }
      #expect(try client.migrationState() == .runningP2P)
      device.failure = nil
      try client.setMigrationState(.running)
      #expect(device.arcs.last == "RUNNING_P2P>RUNNING")
    }
  }

  @Test func failedRestoreEndsInErrorUntilReset() throws {
    try withServer(MigratingTestDevice()) { server, device in
      let client = try server.connect()
      try client.setMigrationState(.resuming)
      try client.migDataWrite([1, 2, 3, 4, 5])  // not an image
      expectServerError(.ioError) { try client.setMigrationState(.running) }
      #expect(try client.migrationState() == .error)
      #expect(device.stopped)
      // ERROR is left only by reset.
      expectServerError(.invalidArgument) { try client.setMigrationState(.running) }
      expectServerError(.invalidArgument) { try client.setMigrationState(.stop) }
      try client.reset()
      #expect(try client.migrationState() == .running)
    }
  }

  @Test func unreachableTargetsAreRefusedWithoutMoving() throws {
    try withServer(MigratingTestDevice()) { server, device in
      let client = try server.connect()
      for target: MigrationState in [.error, .preCopy, .preCopyP2P] {
        expectServerError(.invalidArgument) { try client.setMigrationState(target) }
      }
      expectServerError(.invalidArgument) {
        _ = try client.feature(
          flags: featureSet | VFIODeviceFeature.migDeviceState,
          data: MigDeviceStateData(deviceState: 9, dataFD: 0).encoded())
      }
      #expect(device.arcs.isEmpty)
      #expect(try client.migrationState() == .running)
      try client.setMigrationState(.stopCopy)
      expectServerError(.invalidArgument) { try client.setMigrationState(.preCopy) }
      #expect(try client.migrationState() == .stopCopy)
    }
  }
}

@Suite("Keeping device state across clients")
struct KeepOnDisconnectTests {
  static var keep: ServerLimits {
    var limits = ServerLimits()
    limits.resetOnDisconnect = false
    return limits
  }

  @Test func runningDeviceKeepsItsStateAndItsWindowsAreReleased() throws {
    try withServer(MigratingTestDevice(), limits: Self.keep) { server, device in
      let guest = GuestMemory(size: 1 << 16)
      do {
        let client = try server.connect()
        try client.write32(region: 0, offset: 0, 0xabcd)
        try client.dmaMap(
          address: 0x10000, size: 0x10000, flags: [.read, .write], fd: guest.descriptor)
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.resets == 0 && server.server.statistics.snapshot.dmaRegions == 0)
      let client = try server.connect()
      #expect(try client.read32(region: 0, offset: 0) == 0xabcd)
    }
  }

  /// A source whose migration client vanished mid-stream is a cancelled
  /// migration: the server drains the save, finishes it and resumes the VF.
  @Test(arguments: [0, 1, 2])
  func sourceLeftInStopCopyResumesWithItsState(chunksRead: Int) throws {
    try withServer(MigratingTestDevice(), limits: Self.keep) { server, device in
      do {
        let client = try server.connect()
        try client.write32(region: 0, offset: 0, 0x5eed)
        try client.write(region: 2, offset: 0, data: [1, 2, 3, 4])
        try client.setMigrationState(.stopCopy)
        for _ in 0..<chunksRead { _ = try client.migDataRead(size: 1000) }
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.resets == 0)
      #expect(
        device.arcs.suffix(3) == ["STOP_COPY>STOP", "STOP>RUNNING_P2P", "RUNNING_P2P>RUNNING"])
      let client = try server.connect()
      #expect(try client.migrationState() == .running)
      #expect(try client.read32(region: 0, offset: 0) == 0x5eed)
      #expect(try client.read(region: 2, offset: 0, count: 4) == [1, 2, 3, 4])
    }
  }

  /// A device a client deliberately left stopped stays stopped, state and all:
  /// resuming it could run a VF whose state already runs elsewhere.
  @Test(arguments: [MigrationState.stop, .runningP2P])
  func deviceLeftStoppedStaysStopped(state: MigrationState) throws {
    try withServer(MigratingTestDevice(), limits: Self.keep) { server, device in
      do {
        let client = try server.connect()
        try client.write32(region: 0, offset: 0, 0x1234)
        try client.setMigrationState(state)
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.resets == 0)
      let client = try server.connect()
      #expect(try client.migrationState() == state)
      #expect(try client.read32(region: 0, offset: 0) == 0x1234)
      try client.setMigrationState(.running)
      #expect(try client.read32(region: 0, offset: 0) == 0x1234)
    }
  }

  /// A destination in RESUMING holds part of a state: it is reset, never left to run.
  @Test func destinationLeftInResumingIsReset() throws {
    try withServer(MigratingTestDevice(), limits: Self.keep) { server, device in
      do {
        let client = try server.connect()
        try client.setMigrationState(.resuming)
        try client.migDataWrite(MigratingTestDevice.magic + [9, 9])
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.resets == 1)
      let client = try server.connect()
      #expect(try client.migrationState() == .running)
    }
  }

  /// Under the default policy every client change resets, mid-migration or not.
  @Test func resetPolicyResetsEvenASourceMidSave() throws {
    try withServer(MigratingTestDevice()) { server, device in
      do {
        let client = try server.connect()
        try client.setMigrationState(.stopCopy)
      }
      #expect(server.waitFor { !$0.clientConnected })
      #expect(device.resets == 1)
      let client = try server.connect()
      #expect(try client.migrationState() == .running)
    }
  }
}

@Suite("Leaving STOP_COPY")
struct CancelledSaveTests {
  /// STOP_COPY → STOP with the save half read: the server drains the rest
  /// rather than strand the source (the PF refuses to finish an unread save).
  @Test func stopCopyToStopDrainsAnUnreadSave() throws {
    try withServer(MigratingTestDevice()) { server, device in
      let client = try server.connect()
      try client.write(region: 2, offset: 0, data: [7, 7])
      try client.setMigrationState(.stopCopy)
      _ = try client.migDataRead(size: 100)
      try client.setMigrationState(.running)
      #expect(
        device.arcs.suffix(3) == ["STOP_COPY>STOP", "STOP>RUNNING_P2P", "RUNNING_P2P>RUNNING"])
      #expect(device.open == nil)
      #expect(try client.read(region: 2, offset: 0, count: 2) == [7, 7])
      // The next save starts from the beginning.
      try client.setMigrationState(.stopCopy)
      let stream = try client.readStream(chunk: 4096)
      #expect(Array(stream.prefix(6)) == MigratingTestDevice.magic + [7, 7])
    }
  }
}
