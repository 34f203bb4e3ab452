import Glibc
import SystemPackage
import Testing
import VFIODevice
import VFIOUser

/// A save of `data` handed out at most `maxRead` bytes a read.
final class ChunkedSource: MigrationSource {
  let data: [UInt8]
  let maxRead: Int
  var position = 0
  var reads = 0
  var closes = 0
  var dead = false
  init(_ data: [UInt8], maxRead: Int) {
    self.data = data
    self.maxRead = maxRead
  }
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
    if dead { throw Errno(rawValue: ENODEV) }
    reads += 1
    let n = min(buffer.count, maxRead, data.count - position)
    for i in 0..<n { buffer[i] = data[position + i] }
    position += n
    return n
  }
  func close() { closes += 1 }
}

final class CollectingSink: MigrationSink {
  var data: [UInt8] = []
  var closes = 0
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
    data += bytes
    return bytes.count
  }
  func close() { closes += 1 }
}

/// A device that owns its state and records the arcs it was asked for.
final class ArcDevice: MigrationCapable {
  var state = MigrationState.running
  var failed = false
  var arcs: [String] = []
  var failing: (MigrationState, MigrationState)?
  var sources: [ChunkedSource] = []
  var sinks: [CollectingSink] = []
  var save: [UInt8] = Array(0..<100)
  var maxRead = 7

  var migrationFlags: MigrationFlags { [.stopCopy, .p2p] }
  var migrationState: MigrationState { failed ? .error : state }

  func migrationStep(from: MigrationState, to: MigrationState) throws(Errno) -> MigrationStream? {
    #expect(from == migrationState)
    if let failing, failing == (from, to) { throw .ioError }
    arcs.append("\(from)>\(to)")
    state = to
    switch (from, to) {
    case (.stop, .stopCopy):
      sources.append(ChunkedSource(save, maxRead: maxRead))
      return .source(sources.last!)
    case (.stop, .resuming):
      sinks.append(CollectingSink())
      return .sink(sinks.last!)
    default: return nil
    }
  }

  func stopCopySize() throws(Errno) -> UInt64 { UInt64(save.count) }
  func migrationFailed() { failed = true }
  func reset() {
    state = .running
    failed = false
    for source in sources { source.dead = true }
  }
}

@Suite("MigrationSession: the walk and the stream")
struct MigrationSessionTests {
  @Test func aBufferIsFilledFromShortReadsAndIsShortOnlyAtTheEnd() throws {
    let device = ArcDevice()
    var session = MigrationSession()
    try session.set(.stopCopy, on: device)
    #expect(device.arcs == ["RUNNING>RUNNING_P2P", "RUNNING_P2P>STOP", "STOP>STOP_COPY"])
    let source = try session.source()
    var buffer = [UInt8](repeating: 0, count: 64)
    let first = try buffer.withUnsafeMutableBytes { raw throws(Errno) in
      try MigrationSession.fill(raw, from: source, while: { true })
    }
    #expect(first == 64 && buffer == Array(0..<64))
    #expect(device.sources[0].reads == 10)  // 7 bytes a read
    let second = try buffer.withUnsafeMutableBytes { raw throws(Errno) in
      try MigrationSession.fill(raw, from: source, while: { true })
    }
    #expect(second == 36 && Array(buffer[..<36]) == Array(64..<100))
    let third = try buffer.withUnsafeMutableBytes { raw throws(Errno) in
      try MigrationSession.fill(raw, from: source, while: { true })
    }
    #expect(third == 0)
  }

  @Test func aFillStopsBetweenReadsOnceNobodyWantsIt() throws {
    let device = ArcDevice()
    var session = MigrationSession()
    try session.set(.stopCopy, on: device)
    var asked = 0
    var buffer = [UInt8](repeating: 0, count: 64)
    let n = try buffer.withUnsafeMutableBytes { raw throws(Errno) in
      try MigrationSession.fill(
        raw, from: try session.source(),
        while: {
          asked += 1
          return asked < 3  // the client hangs up before the third read after the first
        })
    }
    #expect(n == 21 && device.sources[0].reads == 3)
  }

  @Test func leavingStopCopyDrainsTheSaveAndClosesTheStreamOnce() throws {
    let device = ArcDevice()
    var session = MigrationSession()
    try session.set(.stopCopy, on: device)
    let dropped = try session.set(.running, on: device)
    #expect(dropped == 100)
    #expect(device.sources[0].position == 100 && device.sources[0].closes == 1)
    #expect(session.stream == nil)
    #expect(throws: Errno.invalidArgument) { _ = try session.source() }
  }

  /// The session holds no copy of the state: each walk starts where the device
  /// says it is, and a stream the device stopped serving by itself (a reset
  /// it did on its own) is closed and reads as ENODEV from then on.
  @Test func theWalkStartsWhereTheDeviceIs() throws {
    let device = ArcDevice()
    var session = MigrationSession()
    try session.set(.stopCopy, on: device)
    device.reset()  // behind the session's back: a function-level reset from config space
    try session.set(.running, on: device)
    #expect(device.arcs.count == 3)  // nothing to walk: the device is RUNNING already
    #expect(device.sources[0].closes == 1)
    #expect(throws: Errno(rawValue: ENODEV)) { _ = try session.source() }
    device.state = .stop  // and moved again, by another owner
    try session.set(.running, on: device)
    #expect(device.arcs.suffix(2) == ["STOP>RUNNING_P2P", "RUNNING_P2P>RUNNING"])
  }

  @Test func aFailedRestoreClosesTheSinkAndLeavesTheDeviceInError() throws {
    let device = ArcDevice()
    var session = MigrationSession()
    try session.set(.resuming, on: device)
    let sink = try session.sink()
    _ = try [1, 2, 3].withUnsafeBytes { raw throws(Errno) in try sink.write(raw) }
    device.failing = (.resuming, .stop)
    #expect(throws: Errno.ioError) { try session.set(.running, on: device) }
    #expect(device.migrationState == .error && device.sinks[0].closes == 1)
    #expect(throws: Errno.invalidArgument) { try session.set(.running, on: device) }
    #expect(throws: Errno.invalidArgument) { _ = try session.sink() }
  }

  @Test func aFailedArcKeepsTheStreamOfTheStateTheDeviceStaysIn() throws {
    let device = ArcDevice()
    var session = MigrationSession()
    try session.set(.stopCopy, on: device)
    device.failing = (.stopCopy, .stop)
    #expect(throws: Errno.ioError) { try session.set(.stop, on: device) }
    #expect(device.migrationState == .stopCopy && device.sources[0].closes == 0)
    _ = try session.source()
    session.deviceWasReset()
    #expect(device.sources[0].closes == 1)
    #expect(throws: Errno(rawValue: ENODEV)) { _ = try session.source() }
  }
}
