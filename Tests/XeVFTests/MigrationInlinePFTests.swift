import SystemPackage
import Testing
import VFIODevice
import VFIOUser

@testable import XeVF

/// The simulated PF with its work run inline and no waits (as the fuzz
/// targets run it): the same state machine, so a save restores, a broken
/// stream fails, a reset recovers, and no worker thread is started.
@Suite("Simulated PF run inline")
struct MigrationInlinePFTests {
  func inlineVF(seed: UInt64 = 0) throws -> SimulatedXeVF {
    let vf = try migratableVF(.bmg, vram: 4 << 20, chunk: 1 << 20, seed: seed)
    vf.pfRunsWorkInline = true
    vf.pfTiming = .immediate
    #expect(vf.pfRunsWorkInline)
    return vf
  }

  @Test func saveAndRestoreRoundTrip() throws {
    let source = try inlineVF(seed: 3)
    try populate(source)
    let stream = try source.save(readSize: 4096)
    for writeSize in [1 << 20, 23] {
      let destination = try inlineVF()
      try destination.restore(stream, writeSize: writeSize)
      #expect(MigratedState(destination) == MigratedState(source))
      #expect(sameDeviceMemory(source, destination))
      try destination.resumeRunning()
    }
    #expect(!source.simulatedPF.workersStarted)
  }

  @Test func aStreamWithoutItsTrailerFailsAndAResetRecovers() throws {
    let source = try inlineVF(seed: 4)
    let stream = try source.save()
    let destination = try inlineVF()
    let sink = try destination.beginRestore()
    try writeAll(sink, Array(stream.dropLast(24)), chunk: 4096)
    #expect(thrownErrno { _ = try destination.step(.resuming, .stop) } != nil)
    destination.migrationFailed()
    #expect(destination.migrationState == .error)
    try destination.reset()
    #expect(destination.migrationState == .running)
  }

  /// Once the workers run, the PF stays threaded: inline is set before the first operation.
  @Test func inlineIsRefusedOnceTheWorkersRun() throws {
    let vf = try migratableVF()
    try vf.stopRunning()
    vf.pfRunsWorkInline = true
    #expect(!vf.pfRunsWorkInline)
    try vf.resumeRunning()
  }
}
