import Foundation
import SystemPackage
import Testing
import VFIODevice
import VFIOUser
import XeStream

@testable import XeVF

/// Restore validation (protocol/xe-kernel-facts.md §6.3, §7.3, §15) against the malformed
/// packets of protocol/xe-packets.json, and what a failed restore leaves.
@Suite struct MigrationRestoreTests {
  /// The fixtures' destination: a bmg VF with 8 MiB of VRAM, with state of
  /// its own that a failed restore must not disturb.
  func destination() throws -> SimulatedXeVF {
    let vf = try migratableVF(.bmg, vram: 8 << 20)
    try vf.setReg32(XeSimRegisters.vfSwFlag(0), 0x5EED)
    try vf.setReg64(XeSimRegisters.ggttWindow, 0x7000_0001)
    return vf
  }

  @Test(arguments: XePacketFixtures.loaded.restoreErrors)
  func malformedPacketIsRefused(_ fixture: XePacketFixture) throws {
    let expect = try #require(fixture.expect)
    let want = try #require(errnoNamed(expect.errno))
    let cause = try expect.cause.map { try #require(errnoNamed($0)) }
    let vf = try destination()
    let before = MigratedState(vf)
    let stream = try vf.beginRestore()
    let descriptor = XeMigrationDescriptor(profile: .bmg).packet
    if fixture.header.type != 1 { try writeAll(stream, descriptor, chunk: 7) }

    switch expect.at {
    case "write":
      // Refused by the write that completes the packet, and by every later one.
      let error = thrownErrno { try writeAll(stream, fixture.bytes, chunk: 5) }
      #expect(error == want)
      #expect(thrownErrno { try writeAll(stream, descriptor, chunk: 64) } == want)
      // No trailer ever came: refused at once, not after the PF's restore
      // timeout (left at its value: ETIMEDOUT here would mean it was waited for).
      #expect(thrownErrno { try vf.step(.resuming, .stop) } == .noData)
      #expect(thrownErrno { try vf.step(.resuming, .stop) } == .noData)  // again: still incomplete
      #expect(vf.pfState(0).contains(.restoreWIP) && !vf.pfState(0).contains(.restoreFailed))
    default:
      // Accepted, then failed by the worker: EIO on a later write or at finish.
      try writeAll(stream, fixture.bytes, chunk: 4096)
      #expect(
        eventually {
          vf.pfState(0).contains(.restoreFailed) || vf.pfState(1).contains(.restoreFailed)
        })
      let trailer = packet(XePacketHeader(type: .trailer))
      let late = thrownErrno { try writeAll(stream, trailer, chunk: 24) }
      #expect(late == nil || late == .ioError)
      #expect(thrownErrno { try vf.step(.resuming, .stop) } == want)
      let gt = Int(fixture.header.gt)
      #expect(vf.simulatedPF.failure(gt: gt) == cause)
      #expect(thrownErrno { try vf.step(.resuming, .stop) } == .ioError)  // again: still failed
    }
    // Never running on half the state: nothing was applied, the device stays
    // in RESUMING, and only a reset gets it out.
    #expect(vf.migrationState == .resuming)
    #expect(MigratedState(vf) == before)
    #expect(vf.workHeld)
    try vf.reset()
    #expect(vf.migrationState == .running)
    #expect(
      vf.pfState(0) == .ready && vf.pfState(1) == .ready, "\(vf.pfState(0)) / \(vf.pfState(1))")
  }

  @Test func stateIsAppliedOnlyAfterTheTrailer() throws {
    let source = try migratableVF(.ptlSmall)
    try populate(source)
    let bytes = try source.save()
    let vf = try migratableVF(.ptlSmall)
    let stream = try vf.beginRestore()
    try writeAll(stream, Array(bytes.dropLast(24)), chunk: 1000)  // all but the trailer
    let pf = vf.simulatedPF
    #expect(
      eventually {
        pf.state(gt: 0).contains(.restoreWaitData) && pf.state(gt: 1).contains(.restoreWaitData)
      })
    #expect(MigratedState(vf) != MigratedState(source))
    try writeAll(stream, Array(bytes.suffix(24)), chunk: 24)
    try vf.step(.resuming, .stop)
    #expect(MigratedState(vf) == MigratedState(source))
    #expect(vf.pfState(0) == [.paused, .restored])
  }

  @Test func unknownPacketTypesAreSkipped() throws {
    let source = try migratableVF(.ptlSmall)
    try populate(source)
    var bytes = try source.save()
    let unknown = try #require(
      XePacketFixtures.loaded.packets.first { $0.name == "unknown-type-9" })
    bytes.insert(contentsOf: unknown.bytes, at: 40)  // after the descriptor
    let vf = try migratableVF(.ptlSmall)
    try vf.restore(bytes, writeSize: 13)
    #expect(MigratedState(vf) == MigratedState(source))
  }

  @Test func workerFailureSurfacesOnTheNextWrite() throws {
    let vf = try destination()
    let stream = try vf.beginRestore()
    try writeAll(stream, XeMigrationDescriptor(profile: .bmg).packet, chunk: 64)
    try writeAll(stream, packet(XePacketHeader(type: .mmio, gt: 1), [1, 2, 3, 4]), chunk: 64)
    #expect(eventually { vf.pfState(1).contains(.restoreFailed) })
    #expect(vf.simulatedPF.failure(gt: 1) == .invalidArgument)
    // Another type: a second MMIO packet would be refused as a repeat (EINVAL).
    let guc = packet(XePacketHeader(type: .guc, gt: 1), [UInt8](repeating: 0, count: 16))
    #expect(thrownErrno { try writeAll(stream, guc, chunk: 64) } == .ioError)
  }

  @Test func identitiesSayWhatCanBeRestored() throws {
    let bmg = try migratableVF(.bmg, vram: 8 << 20).migrationIdentity
    #expect(
      bmg
        == XeMigrationIdentity(
          profile: "bmg", deviceID: 0xE211, revisionID: 0, vramSize: 8 << 20, ggttQuota: 64 << 20))
    #expect(bmg.canRestore(from: try migratableVF(.bmg, vram: 4 << 20).migrationIdentity))
    #expect(!bmg.canRestore(from: try migratableVF(.bmg, vram: 16 << 20).migrationIdentity))
    #expect(!bmg.canRestore(from: try migratableVF(.bmgSmall, vram: 8 << 20).migrationIdentity))
    #expect(!bmg.canRestore(from: try migratableVF(.ptl).migrationIdentity))
  }

  @Test func incompatibleSourcesAreRefused() throws {
    // Another device: the descriptor says so (ENODEV).
    let ptl = try migratableVF(.ptlSmall)
    let ptlStream = try ptl.save()
    let bmg = try destination()
    #expect(thrownErrno { try bmg.restore(ptlStream) } == .operationNotSupportedByDevice)

    // Same device, another GGTT quota: the GGTT packet fails in the worker.
    let small = try migratableVF(.bmgSmall, vram: 8 << 20)
    let smallStream = try small.save()
    let vf = try destination()
    #expect(thrownErrno { try vf.restore(smallStream) } == .ioError)
    #expect(vf.simulatedPF.failure(gt: 0) == .invalidArgument)
    #expect(vf.migrationState == .resuming)
  }

  @Test func aFailedRestoreBlocksResume() throws {
    // Defence in depth: even if the server let the device leave RESUMING
    // after a failed restore, it would not run the half-restored VF.
    let vf = try destination()
    _ = try vf.beginRestore()
    #expect(thrownErrno { try vf.step(.resuming, .stop) } == .noData)  // an empty stream
    #expect(vf.migrationState == .resuming)
    vf.migration.state = .stop  // as a confused server would
    try vf.step(.stop, .runningP2P)
    #expect(thrownErrno { try vf.step(.runningP2P, .running) } == .ioError)
    #expect(vf.workHeld)
  }

  /// Where an incomplete stream stops, and what the device says is missing.
  enum Cut: String, CaseIterable, CustomStringConvertible {
    case empty, insideFirstHeader, insideVRAMPayload, beforeTrailer, insideTrailerHeader
    var description: String { rawValue }
  }

  /// A stream without its trailer cannot complete: RESUMING → STOP answers
  /// ENODATA at once (not ETIMEDOUT after the PF's 10 s per GT), the server's
  /// ERROR follows, and after a reset the whole stream restores.
  @Test(arguments: Cut.allCases)
  func incompleteStreamIsRefusedAtOnce(_ cut: Cut) throws {
    let source = try migratableVF(.bmg, vram: 8 << 20)
    try populate(source)
    let bytes = try source.save()
    let parsed = try packets(bytes)
    let vram = try #require(parsed.firstIndex { $0.header.type == .vram })
    let vramStart = parsed[..<vram].reduce(0) { $0 + XePacketHeader.size + $1.payload.count }
    let (end, missing): (Int, String) =
      switch cut {
      case .empty: (0, "the stream is empty: no bytes were written, no trailer")
      case .insideFirstHeader:
        (10, "the stream ends inside packet 1's header at byte 10 of 24 (stream byte 10)")
      case .insideVRAMPayload:
        (
          vramStart + XePacketHeader.size + 4096,
          "the stream ends inside packet \(vram + 1) (VRAM, GT 0) at byte 4096 of its"
            + " 1048576-byte payload (stream byte \(vramStart + XePacketHeader.size + 4096))"
        )
      case .beforeTrailer:
        (
          bytes.count - XePacketHeader.size,
          "no trailer: the stream ends after packet \(parsed.count - 1)"
            + " (\(bytes.count - XePacketHeader.size) bytes)"
        )
      case .insideTrailerHeader:
        (bytes.count - 10, "the stream ends inside packet \(parsed.count)'s header at byte 14")
      }
    let vf = try destination()
    let stream = try vf.beginRestore()
    try writeAll(stream, Array(bytes[..<end]), chunk: 65536)
    #expect(vf.migration.restoreStream?.missing?.contains(missing) == true)
    #expect(thrownErrno { try vf.step(.resuming, .stop) } == .noData)
    #expect(vf.migrationState == .resuming)
    #expect(vf.workHeld)
    vf.migrationFailed()  // as the server does on a failed RESUMING → STOP
    #expect(vf.migrationState == .error)
    #expect(thrownErrno { try writeAll(stream, [0], chunk: 1) } == .operationNotSupportedByDevice)
    try vf.reset()
    #expect(vf.migrationState == .running)
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
    try vf.restore(bytes, writeSize: 100_000)
    #expect(MigratedState(vf) == MigratedState(source))
    #expect(sameDeviceMemory(source, vf))
  }

  /// A stream that fails in the worker and then ends without a trailer: EIO
  /// at once, the failure saying more than the missing trailer.
  @Test func failedAndIncompleteIsEIOAtOnce() throws {
    let vf = try destination()
    let stream = try vf.beginRestore()
    try writeAll(stream, XeMigrationDescriptor(profile: .bmg).packet, chunk: 64)
    try writeAll(stream, packet(XePacketHeader(type: .mmio, gt: 1), [1, 2, 3, 4]), chunk: 64)
    #expect(eventually { vf.pfState(1).contains(.restoreFailed) })
    #expect(thrownErrno { try vf.step(.resuming, .stop) } == .ioError)
    // GT 0 was not waited for: its worker, which may still be applying the
    // descriptor on a loaded machine, goes back to waiting for data.
    #expect(eventually { vf.pfState(0).contains(.restoreWaitData) })
    try vf.reset()
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
  }

  /// The kernel's timeout stays for what it is for: a complete stream the PF
  /// is still applying. Retried once the PF is done, the restore completes.
  @Test func completeStreamOnASlowPFStillTimesOut() throws {
    let source = try migratableVF(.ptlSmall)
    try populate(source)
    let bytes = try source.save()
    let vf = try migratableVF(.ptlSmall)
    vf.pfTiming.gucLatency = .milliseconds(300)  // the worker sits on each GuC packet
    vf.pfTiming.restore = .milliseconds(20)
    let stream = try vf.beginRestore()
    try writeAll(stream, bytes, chunk: 1 << 20)
    #expect(vf.migration.restoreStream?.trailerReceived == true)
    #expect(thrownErrno { try vf.step(.resuming, .stop) } == .timedOut)
    #expect(vf.migrationState == .resuming)
    #expect(MigratedState(vf) != MigratedState(source))
    #expect(
      eventually(5) { vf.pfState(0).contains(.restored) && vf.pfState(1).contains(.restored) })
    try vf.step(.resuming, .stop)
    #expect(MigratedState(vf) == MigratedState(source))
  }

  @Test func aWriteThatWaitsTooLongTakesAPrefix() throws {
    let source = try migratableVF(.bmg, vram: 1 << 20, chunk: 64 << 10)
    let bytes = try source.save()
    let vf = try migratableVF(.bmg, vram: 1 << 20)
    let stream = try vf.beginRestore()
    vf.pfTiming.gucLatency = .milliseconds(150)  // the worker sits on each GuC packet
    vf.pfTiming.stream = .milliseconds(10)  // the writer gives up waiting for room
    var at = 0
    var prefixes = 0
    var timeouts = 0
    while at < bytes.count {
      do {
        let taken = try bytes[at...].withUnsafeBytes { try stream.write($0) }
        if at + taken < bytes.count { prefixes += 1 }
        at += taken
      } catch let error as Errno where error == .timedOut {
        timeouts += 1  // nothing taken; the held packet goes first next time
      }
    }
    #expect(prefixes > 0)
    try vf.step(.resuming, .stop)
    #expect(sameDeviceMemory(source, vf))
    #expect(MigratedState(vf) == MigratedState(source))
    _ = timeouts
  }

  @Test func restoreRingsStayBounded() throws {
    let source = try migratableVF(.bmg, vram: 8 << 20, chunk: 32 << 10)
    let bytes = try source.save()
    let vf = try migratableVF(.bmg, vram: 8 << 20)
    vf.pfTiming.gucLatency = .milliseconds(20)  // a slow worker: the writer must wait
    try vf.restore(bytes, writeSize: 1 << 20)
    #expect(vf.simulatedPF.ringHighWater(gt: 0) == SimulatedPF.ringSize)
    #expect(sameDeviceMemory(source, vf))
  }
}
