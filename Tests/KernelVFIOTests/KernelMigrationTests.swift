import Foundation
import KernelVFIO
import SystemPackage
import Testing
import VFIOUser

/// A driver that answers MIG_DEVICE_STATE as vfio_main.c does: a data_fd for
/// STOP→STOP_COPY, STOP→RESUMING and RUNNING→PRE_COPY (a pipe here), -1 otherwise.
final class FakeMigrationDriver: MigrationDriver {
  var state: MigrationState = .running
  var arcs: [MigrationState] = []
  var failNext: Errno?
  /// The other end of each pipe handed out, by the state that opened it.
  var peers: [MigrationState: Int32] = [:]

  func setMigrationState(_ next: MigrationState) throws(Errno) -> Int32 {
    if let failNext {
      self.failNext = nil
      throw failNext
    }
    arcs.append(next)
    defer { state = next }
    var fds: [Int32] = [-1, -1]
    switch (state, next) {
    case (.stop, .stopCopy), (.running, .preCopy):
      _ = Glibc.pipe(&fds)
      peers[next] = fds[1]
      return fds[0]  // the device writes, we read
    case (.stop, .resuming):
      _ = Glibc.pipe(&fds)
      peers[next] = fds[0]
      return fds[1]  // we write, the device reads
    default:
      return -1
    }
  }

  func migrationState() throws(Errno) -> MigrationState { state }
  func stopCopySize() throws(Errno) -> UInt64 { 4096 }

  deinit { for fd in peers.values { close(fd) } }
}

@Suite("Kernel VFIO: migration through the kernel")
struct KernelMigrationTests {
  func read(_ file: MigrationDataFile, _ count: Int) -> Result<[UInt8], Errno> {
    var buffer = [UInt8](repeating: 0, count: count)
    let result: Result<Int, Errno> = buffer.withUnsafeMutableBytes { raw in
      do throws(Errno) { return .success(try file.read(into: raw)) } catch {
        return .failure(error)
      }
    }
    return result.map { Array(buffer[0..<$0]) }
  }

  @Test func stopCopyReadsTheKernelsStreamUntilItsEnd() throws {
    let driver = FakeMigrationDriver()
    let migration = KernelMigration(driver: driver, flags: [.stopCopy, .p2p], timeout: .seconds(5))
    // RUNNING → STOP_COPY as the server walks it: RUNNING_P2P, STOP, STOP_COPY.
    #expect(try migration.step(to: .runningP2P) == nil)
    #expect(try migration.step(to: .stop) == nil)
    let stream = try #require(try migration.step(to: .stopCopy))
    #expect(driver.arcs == [.runningP2P, .stop, .stopCopy])
    let peer = try #require(driver.peers[.stopCopy])
    let data: [UInt8] = Array(0..<200)
    _ = data.withUnsafeBytes { Glibc.write(peer, $0.baseAddress, $0.count) }
    close(peer)
    driver.peers[.stopCopy] = nil
    #expect(read(stream, 256) == .success(data), "short: the end")
    // Leaving STOP_COPY ends the stream.
    #expect(try migration.step(to: .stop) == nil)
    #expect(read(stream, 16) == .failure(Errno(rawValue: ENODEV)))
    #expect(migration.stream == nil)
  }

  @Test func resumingWritesReachTheKernel() throws {
    let driver = FakeMigrationDriver()
    driver.state = .stop
    let migration = KernelMigration(driver: driver, flags: [.stopCopy], timeout: .seconds(5))
    let stream = try #require(try migration.step(to: .resuming))
    let bytes: [UInt8] = [9, 8, 7, 6]
    #expect(try bytes.withUnsafeBytes { try stream.write($0) } == 4)
    var got = [UInt8](repeating: 0, count: 4)
    let n = got.withUnsafeMutableBytes { Glibc.read(driver.peers[.resuming]!, $0.baseAddress, 4) }
    #expect(n == 4 && got == bytes)
    #expect(try migration.step(to: .stop) == nil)
    #expect(stream.isInvalidated, "RESUMING → STOP ends the restore stream")
  }

  /// mtty-style PRE_COPY: the fd RUNNING → PRE_COPY opened carries on through
  /// PRE_COPY_P2P into STOP_COPY, where the kernel returns no new one.
  @Test func preCopyKeepsItsStreamIntoStopCopy() throws {
    let driver = FakeMigrationDriver()
    let migration = KernelMigration(
      driver: driver, flags: [.stopCopy, .p2p, .preCopy], timeout: .seconds(5))
    let stream = try #require(try migration.step(to: .preCopy))
    #expect(try migration.step(to: .preCopyP2P) == nil)
    #expect(try migration.step(to: .stopCopy) == nil)
    #expect(migration.stream === stream && !stream.isInvalidated)
  }

  @Test func aResetKillsTheStreamAndAFailedArcLeavesItAlone() throws {
    let driver = FakeMigrationDriver()
    driver.state = .stop
    let migration = KernelMigration(driver: driver, flags: [.stopCopy], timeout: .seconds(5))
    let stream = try #require(try migration.step(to: .stopCopy))
    driver.failNext = .ioError
    #expect(throws: Errno.ioError) { _ = try migration.step(to: .stop) }
    #expect(!stream.isInvalidated, "the arc failed: still in STOP_COPY")
    migration.deviceReset()
    #expect(read(stream, 8) == .failure(Errno(rawValue: ENODEV)))
    #expect(migration.stream == nil)
    #expect(try migration.stopCopySize() == 4096)
    #expect(migration.kernelState == "STOP_COPY")
  }
}
