import Foundation
import SystemPackage
import Testing
import VFIODevice
import XeStream

@testable import XeVF

/// The PF control state machine: the errno table of protocol/xe-kernel-facts.md §5.4 / §15,
/// the device-level aggregation, GuC faults and the FLR flow.
@Suite struct MigrationControlTests {
  // MARK: The GT-level errno table

  @Test func pauseErrnos() throws {
    let vf = try migratableVF()
    let pf = vf.simulatedPF
    try pf.pause(gt: 0)
    #expect(vf.pfState(0) == .paused)
    #expect(throws: Errno.staleNFSFileHandle) { try pf.pause(gt: 0) }  // already paused
    try pf.resume(gt: 0)
    #expect(vf.pfState(0) == .resumed)
    try pf.stop(gt: 0)
    #expect(vf.pfState(0) == .stopped)
    #expect(throws: Errno.notPermitted) { try pf.pause(gt: 0) }  // stopped
    #expect(throws: Errno.staleNFSFileHandle) { try pf.stop(gt: 0) }  // already stopped
    #expect(throws: Errno.notPermitted) { try pf.resume(gt: 0) }  // not paused
  }

  @Test func resumeErrnos() throws {
    let vf = try migratableVF()
    let pf = vf.simulatedPF
    #expect(throws: Errno.notPermitted) { try pf.resume(gt: 1) }  // not paused
    // During a save, then during a restore: EBUSY on the GT level.
    let save = try vf.beginSave()
    #expect(throws: Errno.resourceBusy) { try pf.resume(gt: 0) }
    #expect(throws: Errno.resourceBusy) { try pf.resume(gt: 1) }
    _ = try readAll(save, chunk: 1 << 20)
    try vf.step(.stopCopy, .stop)
    #expect(vf.pfState(0) == [.paused, .saved])
    _ = try vf.step(.stop, .resuming)
    #expect(throws: Errno.resourceBusy) { try pf.resume(gt: 0) }
  }

  @Test func saveAndRestoreTriggerErrnos() throws {
    let vf = try migratableVF(.ptlSmall)
    let pf = vf.simulatedPF
    // Not paused.
    #expect(throws: Errno.notPermitted) { try pf.triggerSaveVF(vf.saveContent()) }
    #expect(throws: Errno.notPermitted) { try pf.triggerRestoreVF() }
    try vf.stopRunning()
    // Duplicates, and one while the other runs.
    try pf.triggerSaveVF(vf.saveContent())
    #expect(throws: Errno.alreadyInProcess) { try pf.triggerSaveVF(vf.saveContent()) }
    #expect(throws: Errno.resourceBusy) { try pf.triggerRestoreVF() }
    #expect(
      eventually { vf.pfState(0).contains(.saveDataDone) && vf.pfState(1).contains(.saveDataDone) })
    try pf.finishSaveVF()
    try pf.triggerRestoreVF()
    #expect(throws: Errno.alreadyInProcess) { try pf.triggerRestoreVF() }
    #expect(throws: Errno.resourceBusy) { try pf.triggerSaveVF(vf.saveContent()) }
    // Stopped.
    try vf.reset()
    try pf.stopVF()
    #expect(throws: Errno.notPermitted) { try pf.triggerSaveVF(vf.saveContent()) }
    #expect(throws: Errno.notPermitted) { try pf.triggerRestoreVF() }
  }

  @Test func finishSaveBeforeDataDoneIsEIO() throws {
    // 8 VRAM chunks and 3 more packets on GT 0: more than its ring holds.
    let vf = try migratableVF(.bmg, vram: 8 << 20, chunk: 1 << 20)
    let stream = try vf.beginSave()
    #expect(eventually { vf.pfState(0).contains(.saveWaitData) })
    #expect(!vf.pfState(0).contains(.saveDataDone))
    #expect(throws: Errno.ioError) { try vf.step(.stopCopy, .stop) }
    #expect(vf.migrationState == .stopCopy)
    // The stream was disabled before finish_save ran.
    var byte: [UInt8] = [0]
    #expect(throws: Errno.operationNotSupportedByDevice) {
      try byte.withUnsafeMutableBytes { _ = try stream.read(into: $0) }
    }
    // A save never read stays stuck (resume refuses) until a reset.
    #expect(throws: Errno.resourceBusy) { try vf.simulatedPF.resume(gt: 0) }
    try vf.reset()
    #expect(vf.pfState(0) == .ready)
    #expect(vf.migrationState == .running)
  }

  /// The PF itself, as the kernel's: finish_restore without a trailer waits
  /// `PFTiming.restore` for it, then answers ETIMEDOUT.
  @Test func pfFinishRestoreWithoutTrailerTimesOut() throws {
    let vf = try migratableVF(.ptlSmall)
    let pf = vf.simulatedPF
    pf.timing.restore = .milliseconds(80)
    try pf.pauseVF()
    try pf.triggerRestoreVF()
    let id = pf.openStream()
    let descriptor = XeMigrationDescriptor(profile: .ptlSmall).packet
    let header = try XePacketHeader(decoding: Array(descriptor.prefix(XePacketHeader.size)))
    try pf.restoreProduce(
      PFPacket(header, .bytes(Array(descriptor.dropFirst(XePacketHeader.size)))), stream: id)
    pf.closeStream()
    let start = Date()
    #expect(throws: Errno.timedOut) { _ = try pf.finishRestoreVF() }
    #expect(Date().timeIntervalSince(start) >= 0.08)
    #expect(pf.state(gt: 0).isSuperset(of: [.paused, .restoreWIP, .restoreWaitData]))
  }

  /// The VF knows the stream lacks its trailer: RESUMING → STOP does not
  /// wait for the PF's timeout (left at the kernel's 20 s per GT, halved).
  @Test func finishRestoreWithoutTrailerIsENODATA() throws {
    let vf = try migratableVF(.ptlSmall)
    let stream = try vf.beginRestore()
    try writeAll(stream, XeMigrationDescriptor(profile: .ptlSmall).packet, chunk: 64)
    #expect(throws: Errno.noData) { try vf.step(.resuming, .stop) }
    #expect(vf.migrationState == .resuming)
    // The PF is left restoring, waiting for data that will not come.
    #expect(eventually { vf.pfState(0).isSuperset(of: [.paused, .restoreWIP, .restoreWaitData]) })
    // What the server does on a failed restore: ERROR until a reset.
    vf.migrationFailed()
    #expect(vf.migrationState == .error)
    try vf.reset()
    #expect(vf.migrationState == .running)
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
  }

  // MARK: Device level

  @Test func deviceLevelFailuresBecomeEUCLEAN() throws {
    let vf = try migratableVF()
    let pf = vf.simulatedPF
    try pf.pauseVF()
    // Both GTs ESTALE: the second failure turns the result into EUCLEAN.
    #expect(throws: Errno.structureNeedsCleaning) { try pf.pauseVF() }
    try pf.resumeVF()

    // Only GT 1 fails: its errno.
    vf.pfFaults.inject(.error(.noSpace), on: .pause, gt: 1)
    #expect(throws: Errno.ioError) { try pf.pauseVF() }
    #expect(vf.pfState(0) == .paused)
    #expect(vf.pfState(1) == [.resumed, .pauseFailed])
    try vf.reset()

    // Only GT 0 fails: still EUCLEAN, the kernel's `result ? -EUCLEAN : err`.
    vf.pfFaults = PFFaults()
    vf.pfFaults.inject(.error(.noSpace), on: .pause, gt: 0)
    #expect(throws: Errno.structureNeedsCleaning) { try pf.pauseVF() }
    #expect(vf.pfState(1) == .paused)
  }

  // MARK: GuC faults

  @Test func gucBusyIsRetried() throws {
    let vf = try migratableVF()
    vf.pfFaults.inject(.busy(times: 3), on: .pause)
    vf.pfFaults.inject(.busy(times: 2), on: .resume, gt: 1)
    try vf.step(.running, .runningP2P)
    try vf.step(.runningP2P, .running)
    #expect(vf.pfState(0) == .resumed && vf.pfState(1) == .resumed)
    #expect(vf.pfFaults.guc.isEmpty)  // every retry was used
  }

  @Test func gucRejectionIsMismatchAndFailed() throws {
    let vf = try migratableVF()
    vf.pfFaults.inject(.rejected, on: .pause, gt: 1)
    #expect(throws: Errno.ioError) { try vf.step(.running, .runningP2P) }
    #expect(vf.pfState(1) == [.mismatch, .pauseFailed])
    #expect(vf.migrationState == .running)

    vf.pfFaults.inject(nil, on: .pause, gt: 1)
    vf.pfFaults.inject(.rejected, on: .resume, gt: 0)
    try vf.simulatedPF.pause(gt: 1)  // a retry that succeeds clears the mismatch
    #expect(vf.pfState(1) == .paused)
    #expect(throws: Errno.structureNeedsCleaning) { try vf.simulatedPF.resumeVF() }
    #expect(vf.pfState(0) == [.paused, .resumeFailed, .mismatch])
  }

  @Test func gucErrorIsFailedWithoutMismatch() throws {
    let vf = try migratableVF()
    vf.pfFaults.inject(.error(.noSpace), on: .stop, gt: 0)
    #expect(throws: Errno.ioError) { try vf.simulatedPF.stop(gt: 0) }
    #expect(vf.pfState(0) == .stopFailed)
  }

  @Test func gucTimeouts() throws {
    let vf = try migratableVF()
    let pf = vf.simulatedPF
    // PAUSE is acknowledged but PAUSE_DONE never comes: the pause wait expires.
    vf.pfTiming.control = .milliseconds(50)
    vf.pfFaults.inject(.timeout, on: .pause, gt: 0)
    let start = Date()
    #expect(throws: Errno.timedOut) { try pf.pause(gt: 0) }
    #expect(Date().timeIntervalSince(start) >= 0.05)
    #expect(vf.pfState(0) == [.wip, .pauseWIP, .pauseWaitGuC])
    #expect(throws: Errno.alreadyInProcess) { try pf.pause(gt: 0) }
    // An FLR clears it.
    vf.pfFaults = PFFaults()
    try vf.reset()
    #expect(vf.pfState(0) == .ready)

    // RESUME has no G2H: the H2G itself fails after gucAck, so the resume fails.
    vf.pfTiming.control = .seconds(1)  // well above gucAck
    vf.pfTiming.gucAck = .milliseconds(50)
    try pf.pause(gt: 1)
    vf.pfFaults.inject(.timeout, on: .resume, gt: 1)
    #expect(throws: Errno.ioError) { try pf.resume(gt: 1) }
    #expect(vf.pfState(1) == [.paused, .resumeFailed])
  }

  @Test func saveGuCFailureFailsTheReader() throws {
    let vf = try migratableVF(.ptlSmall)
    vf.pfFaults.inject(.error(.noBufferSpace), on: .save, gt: 1)
    let stream = try vf.beginSave()
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    #expect(throws: Errno.ioError) {
      try buffer.withUnsafeMutableBytes { _ = try stream.read(into: $0) }
    }
    #expect(throws: Errno.ioError) {
      try buffer.withUnsafeMutableBytes { _ = try stream.read(into: $0) }
    }
    #expect(vf.simulatedPF.failure(gt: 1) == .noBufferSpace)
    #expect(vf.pfState(1) == [.paused, .saveFailed])
    #expect(throws: Errno.ioError) { try vf.step(.stopCopy, .stop) }
  }

  @Test func stuckVRAMChunkFailsTheSave() throws {
    let vf = try migratableVF(.bmg, vram: 4 << 20, chunk: 1 << 20)
    vf.pfTiming.vramChunk = .milliseconds(30)
    vf.pfFaults.vramChunkTimeout = 2
    let stream = try vf.beginSave()
    #expect(throws: Errno.ioError) { _ = try readAll(stream, chunk: 1 << 20) }
    #expect(vf.simulatedPF.failure(gt: 0) == .timerExpired)
  }

  // MARK: Stop and FLR

  @Test func migrationFailedStopsTheVFUntilAnFLR() throws {
    let vf = try migratableVF()
    vf.migrationFailed()
    #expect(vf.pfState(0) == .stopped && vf.pfState(1) == .stopped)
    #expect(vf.workHeld)
    #expect(throws: Errno.structureNeedsCleaning) { try vf.step(.running, .runningP2P) }
    try vf.reset()
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
    #expect(!vf.workHeld)
    try vf.step(.running, .runningP2P)
  }

  @Test func flrPrepareAndReset() throws {
    let vf = try migratableVF()
    let pf = vf.simulatedPF
    try pf.prepareFLR(gt: 0)
    #expect(vf.pfState(0) == [.wip, .flrWIP, .flrPrepare])
    #expect(throws: Errno.alreadyInProcess) { try pf.prepareFLR(gt: 0) }
    // reset's own prepare gets EALREADY on GT 0 (logged); the notification
    // then takes GT 0 out of FLR_PREPARE and the flow completes.
    try vf.reset()
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
    #expect(vf.migrationState == .running)
  }

  @Test func flrFailureIsReportedByWaitFLR() throws {
    let vf = try migratableVF()
    vf.pfTiming.flr = .milliseconds(40)
    vf.pfFaults.inject(.rejected, on: .flrStart, gt: 1)
    try vf.reset()  // errors are only logged
    #expect(vf.pfState(1) == [.flrFailed, .mismatch])
    // GT 0 waits at the FLR checkpoint for a GT that will never come.
    #expect(vf.pfState(0).isSuperset(of: [.flrWIP, .flrSync]))
    #expect(throws: Errno.ioError) { try vf.simulatedPF.waitFLR(gt: 1) }
    #expect(throws: Errno.timedOut) { try vf.simulatedPF.waitFLR(gt: 0) }
    // A second FLR brings GT 1 to the checkpoint, and both through.
    vf.pfFaults = PFFaults()
    vf.pfTiming.flr = .seconds(1)
    try vf.reset()
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
  }

  @Test func lateFLRNotificationIsWaitedForWithPrepare() throws {
    let vf = try migratableVF()
    try vf.stopRunning()
    vf.pfFaults.flrNotificationDelay = .milliseconds(60)
    let start = Date()
    try vf.reset()
    #expect(Date().timeIntervalSince(start) >= 0.06)
    #expect(vf.pfState(0) == .ready && vf.pfState(1) == .ready)
  }

  @Test func lateFLRNotificationWithoutPrepareIsMissed() throws {
    let vf = try migratableVF()
    try vf.stopRunning()
    vf.pfFaults.flrNotificationDelay = .milliseconds(60)
    vf.pfFaults.skipFLRPrepare = true
    try vf.reset()
    // wait_flr returned before the PF knew: the VF still looks paused.
    #expect(vf.pfState(0) == .paused)
    #expect(vf.migrationState == .running)
    #expect(vf.workHeld)
    #expect(eventually { vf.pfState(0) == .ready && vf.pfState(1) == .ready })
  }

  @Test func arcsTheDriverDoesNotHaveAreEINVAL() throws {
    let vf = try migratableVF()
    #expect(vf.migrationFlags == [.stopCopy, .p2p])
    #expect(throws: Errno.invalidArgument) { try vf.step(.running, .stop) }
    #expect(throws: Errno.invalidArgument) { try vf.step(.running, .preCopy) }
    #expect(throws: Errno.invalidArgument) { try vf.step(.stop, .stopCopy) }  // the device is RUNNING
    try vf.stopRunning()
    #expect(throws: Errno.invalidArgument) { try vf.step(.stop, .running) }
    #expect(throws: Errno.invalidArgument) { try vf.step(.stop, .error) }
    #expect(vf.migrationState == .stop)
  }
}

extension XeMigrationDescriptor {
  /// The whole DESCRIPTOR packet.
  var packet: [UInt8] { XeVFTests.packet(XePacketHeader(type: .descriptor), payload) }
}
