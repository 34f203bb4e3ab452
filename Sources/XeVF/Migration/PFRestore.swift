import SystemPackage
import XeStream

extension SimulatedPF {
  // MARK: Control

  /// `xe_sriov_pf_control_trigger_restore_vf`: each GT in turn, stopping at the first error.
  public func triggerRestoreVF() throws(Errno) {
    try locked { () throws(Errno) in
      startWorkers()
      for g in gts.indices {
        if has(g, .stopped) || !has(g, .paused) { throw .notPermitted }
        if has(g, .saveWIP) { throw .resourceBusy }
        guard enter(g, .restoreWIP) else { throw .alreadyInProcess }
        gts[g].staged = StagedRestore()
        gts[g].vramChunks = 0
        gts[g].ringHighWater = 0
        gts[g].failure = nil
        enterWIP(g)
        enter(g, .restoreProcessData)
        queue(g)
      }
    }
  }

  /// `xe_sriov_pf_control_finish_restore_vf`: waits up to `PFTiming.restore`
  /// per GT for the worker to drain the ring after the trailer. ETIMEDOUT
  /// without a trailer, EIO when the restore failed. Returns what to apply.
  func finishRestoreVF() throws(Errno) -> [StagedRestore] {
    try locked { () throws(Errno) in
      try eachGT { g throws(Errno) in
        guard waitDone(g, timingValue.restore) else { throw .timedOut }
        if has(g, .restoreFailed) { throw .ioError }
        guard has(g, .restored) else {
          enterMismatch(g)
          throw .ioError
        }
      }
      return gts.map(\.staged)
    }
  }

  /// The first GT whose restore failed, with the worker's errno.
  func restoreFailure() -> (gt: Int, cause: Errno)? {
    locked {
      guard let g = gts.indices.first(where: { has($0, .restoreFailed) }) else { return nil }
      return (g, gts[g].failure ?? .ioError)
    }
  }

  // MARK: The writer

  /// Whether a VRAM packet's payload may go straight into VRAM as it
  /// arrives: only a chunk the worker will accept, and not once GT 0's
  /// restore has failed. The worker still validates the packet.
  func acceptsVRAM(_ header: XePacketHeader) -> Bool {
    let end = header.offset &+ header.size
    return header.gt == 0 && end >= header.size && end <= vramSize
      && locked { !has(0, .restoreFailed) }
  }

  /// `xe_sriov_pf_migration_restore_produce`: a complete packet from the stream.
  /// Blocks while the GT's ring is full; ETIMEDOUT (nothing produced) after
  /// `PFTiming.stream`.
  func restoreProduce(_ packet: PFPacket, stream: Int) throws(Errno) {
    try locked { () throws(Errno) in
      try check(stream: stream)
      let header = packet.header
      switch header.type {
      case .descriptor:
        guard header.tile == 0, header.gt == 0, case .bytes(let payload) = packet.payload else {
          throw .invalidArgument
        }
        try identity.validate(payload)
      case .trailer:
        guard header.tile == 0, header.gt == 0, header.offset == 0, header.size == 0 else {
          throw .invalidArgument
        }
        for g in gts.indices { restoreDataDone(g) }
      default:
        let g = Int(header.gt)
        guard g < gts.count, header.tile == 0, header.type.rawValue != 0 else {
          throw .invalidArgument  // "Received invalid restore packet"
        }
        try produce(packet, gt: g, stream: stream)
      }
    }
  }

  private func produce(_ packet: PFPacket, gt g: Int, stream: Int) throws(Errno) {
    var failure: Errno?
    let room = wait(timingValue.stream) {
      if activeStream != stream || isShutDown {
        failure = .operationNotSupportedByDevice
      } else if has(g, .restoreFailed) {
        failure = .ioError
      }
      return failure != nil || gts[g].ring.count < Self.ringSize
    }
    if let failure { throw failure }
    guard room else { throw .timedOut }
    gts[g].ring.append(packet)
    gts[g].ringHighWater = max(gts[g].ringHighWater, gts[g].ring.count)
    // `xe_gt_sriov_pf_control_process_restore_data`: wake a waiting worker.
    if exit(g, .restoreWaitData) {
      enter(g, .restoreProcessData)
      queue(g)
    }
  }

  /// `xe_gt_sriov_pf_control_restore_data_done`, on the trailer. Its errors
  /// are not reported (the kernel's trailer handler ignores them).
  ///
  /// Deliberate deviation: the kernel sets RESTORE_DATA_DONE on a GT whose
  /// restore already failed too. Nothing clears that bit then, not even an
  /// FLR, and the VF's next restore would complete at once with nothing
  /// restored. Here the trailer only marks GTs that are still restoring.
  private func restoreDataDone(_ g: Int) {
    guard has(g, .restoreWIP) else { return }
    guard enter(g, .restoreDataDone) else { return enterMismatch(g) }
    if exit(g, .restoreWaitData) {
      enter(g, .restoreProcessData)
      queue(g)
    }
  }

  // MARK: The worker

  /// `pf_handle_vf_restore`: one packet per step; RESTORED once the ring is
  /// empty after the trailer.
  func handleRestore(_ g: Int) -> Bool {
    guard exit(g, .restoreProcessData) else { return false }
    if gts[g].ring.isEmpty {
      if exit(g, .restoreDataDone) {
        enterExpecting(g, .restored)
        exitMismatch(g)
        exitWIP(g)
      } else {
        enter(g, .restoreWaitData)
      }
      return true
    }
    let packet = gts[g].ring.removeFirst()
    cond.broadcast()  // room for a blocked writer
    switch apply(packet, gt: g) {
    case .abandoned: return false
    case .failed(let error):
      logger.error("GT\(g): VF restore of \(packet.header.type) failed: \(error)")
      gts[g].failure = error
      enterExpecting(g, .restoreFailed)
      cond.broadcast()
      exitWIP(g)
    default: enter(g, .restoreProcessData)
    }
    return true
  }

  /// Validates one packet and stages its state (VRAM is already in place).
  private func apply(_ packet: PFPacket, gt g: Int) -> Outcome {
    let header = packet.header
    var bytes: [UInt8] = []
    if case .bytes(let payload) = packet.payload { bytes = payload }
    switch header.type {
    case .ggtt:
      guard g == 0 else { return .failed(.noSuchFileOrDirectory) }  // no GGTT node on the media GT
      guard bytes.count == ggttBytes else { return .failed(.invalidArgument) }
      gts[g].staged.ggtt = bytes.littleEndianWords(UInt64.self)
    case .mmio:
      guard bytes.count == 4 * XeSimRegisters.scratchCount else { return .failed(.invalidArgument) }
      gts[g].staged.mmio = bytes.littleEndianWords(UInt32.self)
    case .guc:
      guard !bytes.isEmpty, bytes.count % 4 == 0, bytes.count <= GuCVFState.maxSize else {
        return .failed(.invalidArgument)
      }
      if let error = guc(.restore, gt: g) { return .failed(error) }
      spend(timingValue.gucLatency)
      guard has(g, .restoreWIP) else { return .abandoned }
      do throws(Errno) {
        gts[g].staged.guc = try GuCVFState(
          decoding: bytes, gt: g, gmdID: gmdIDs[g], sramSize: sramSize)
      } catch {
        return .failed(error)
      }
    case .vram:
      // The kernel finds no LMEM object on a GT or device without VRAM.
      guard g == 0, vramSize > 0 else { return .failed(.noSuchAddressOrDevice) }
      let end = header.offset &+ header.size
      guard end >= header.size, end <= vramSize else { return .failed(.invalidArgument) }
      if faultsValue.vramChunkTimeout == gts[g].vramChunks {
        spend(timingValue.vramChunk)
        return has(g, .restoreWIP) ? .failed(.timerExpired) : .abandoned
      }
      gts[g].vramChunks += 1
    default:
      logger.notice("GT\(g): skipping VF migration data of unknown type \(header.type.rawValue)")
    }
    return .done
  }
}
