import SystemPackage
import XeStream

/// The reader's side of a save: `xe_sriov_pf_migration_read` (protocol/xe-kernel-facts.md §6.2).
struct SaveCursor {
  enum Stage { case descriptor, body, end }

  var stage = Stage.end
  var descriptor = PFPacket(.descriptor, gt: 0, bytes: [])
  /// The packet being read and how many of its bytes (header first) were read.
  var current: PFPacket?
  var offset = 0
  /// Packets each GT has still to deliver.
  var expected: [Int] = []
  var order = SplitMix64(seed: 0)
  /// The GT the reader waits for.
  var chosen: Int?
  /// A failed save fails every later read too (the kernel keeps the error as
  /// its pending packet).
  var error: Errno?
}

extension SimulatedPF {
  enum Outcome: Equatable {
    case again, done
    case failed(Errno)
    /// The step waited, and meanwhile an FLR or a stop ended the save or
    /// restore; the step leaves the state alone.
    case abandoned
  }

  /// The packet types GT `g` saves, in order: what a complete stream holds
  /// for it (`XeRestoreStream.missing`).
  func saveTypes(_ g: Int) -> [XePacketType] {
    let primary = g == 0
    return [.guc] + (primary && ggttBytes > 0 ? [.ggtt] : []) + [.mmio]
      + (primary && vramSize > 0 ? [.vram] : [])
  }

  private func packetCount(_ g: Int, chunk: UInt64) -> Int {
    saveTypes(g).reduce(0) { count, type in
      count + (type == .vram ? Int((vramSize + chunk - 1) / chunk) : 1)
    }
  }

  // MARK: Control

  /// `xe_sriov_pf_control_trigger_save_vf`: arms the stream, then starts the
  /// save on each GT, stopping at the first error.
  func triggerSaveVF(_ content: SaveContent) throws(Errno) {
    try locked { () throws(Errno) in
      startWorkers()
      // `xe_sriov_packet_save_init`; not while a save runs, so a duplicate
      // trigger (EALREADY) leaves the running one alone.
      if !gts.contains(where: { $0.state.contains(.saveWIP) }) {
        self.content = content
        cursor = SaveCursor()
        cursor.stage = .descriptor
        cursor.descriptor = PFPacket(.descriptor, gt: 0, bytes: identity.payload)
        cursor.expected = gts.indices.map { packetCount($0, chunk: content.vramChunkSize) }
        cursor.order = SplitMix64(seed: content.seed)
      }
      for g in gts.indices {
        if has(g, .stopped) || !has(g, .paused) { throw .notPermitted }
        if has(g, .restoreWIP) { throw .resourceBusy }
        guard enter(g, .saveWIP) else { throw .alreadyInProcess }
        gts[g].saveRemaining = saveTypes(g)
        gts[g].vramOffset = 0
        gts[g].vramChunks = 0
        gts[g].ringHighWater = 0
        gts[g].failure = nil
        enterWIP(g)
        enter(g, .saveProcessData)
        queue(g)
      }
    }
  }

  /// `xe_sriov_pf_control_finish_save_vf`: EIO unless every GT produced all its data.
  public func finishSaveVF() throws(Errno) {
    try locked { () throws(Errno) in
      try eachGT { g throws(Errno) in
        guard exit(g, .saveDataDone) else { throw .ioError }  // "save is still in progress"
        enterExpecting(g, .saved)
        exitMismatch(g)
        exitWIP(g)
      }
    }
  }

  /// `xe_sriov_pf_migration_size`: per GT and type, size + one header when
  /// non-zero. It counts the GuC's size query rather than the saved blob,
  /// one VRAM header for all chunks, and no descriptor or trailer, so it is
  /// not the stream's length (protocol/xe-kernel-facts.md §7.4).
  public func stopCopySize() throws(Errno) -> UInt64 {
    try locked { () throws(Errno) in
      var total: UInt64 = 0
      func add(_ size: UInt64) { total += size > 0 ? size + UInt64(XePacketHeader.size) : 0 }
      for g in gts.indices {
        if let error = guc(.query, gt: g) { throw error }
        add(UInt64(GuCVFState.querySize(gt: g, sramSize: sramSize)))
        if g == 0 { add(UInt64(ggttBytes)) }
        add(UInt64(4 * XeSimRegisters.scratchCount))
        if g == 0 { add(vramSize) }
      }
      return total
    }
  }

  // MARK: The worker

  /// `pf_handle_vf_save`: one packet per step while the ring has room.
  func handleSave(_ g: Int) -> Bool {
    guard exit(g, .saveProcessData) else { return false }
    if gts[g].ring.count >= Self.ringSize {
      enter(g, .saveWaitData)
      return true
    }
    switch produce(g) {
    case .again: enter(g, .saveProcessData)
    case .done:
      enter(g, .saveDataDone)
      cond.broadcast()
    case .failed(let error):
      logger.error("GT\(g): VF save failed: \(error)")
      gts[g].failure = error
      enterExpecting(g, .saveFailed)
      cond.broadcast()
      exitWIP(g)
    case .abandoned: return false
    }
    return true
  }

  /// `pf_handle_vf_save_data`: the next packet in the order GUC, GGTT, MMIO, VRAM×N.
  private func produce(_ g: Int) -> Outcome {
    guard let content, let type = gts[g].saveRemaining.first else { return .done }
    switch type {
    case .guc:
      if let error = guc(.query, gt: g) ?? guc(.save, gt: g) { return .failed(error) }
      spend(timingValue.gucLatency)
      guard has(g, .saveWIP) else { return .abandoned }
      push(PFPacket(.guc, gt: g, bytes: content.guc[g]), gt: g)
    case .ggtt:
      push(PFPacket(.ggtt, gt: g, bytes: content.ggtt), gt: g)
    case .mmio:
      push(PFPacket(.mmio, gt: g, bytes: content.mmio[g]), gt: g)
    default:  // VRAM, one chunk per step (the kernel's -EAGAIN per chunk)
      let offset = gts[g].vramOffset
      let size = min(vramSize - offset, content.vramChunkSize)
      if faultsValue.vramChunkTimeout == gts[g].vramChunks {
        spend(timingValue.vramChunk)  // the copy fence never signals
        return has(g, .saveWIP) ? .failed(.timerExpired) : .abandoned
      }
      gts[g].vramChunks += 1
      push(
        PFPacket(XePacketHeader(type: .vram, gt: UInt8(g), offset: offset, size: size), .vram),
        gt: g)
      gts[g].vramOffset += size
      if gts[g].vramOffset < vramSize { return .again }
    }
    gts[g].saveRemaining.removeFirst()
    return .again
  }

  private func push(_ packet: PFPacket, gt g: Int) {
    gts[g].ring.append(packet)
    gts[g].ringHighWater = max(gts[g].ringHighWater, gts[g].ring.count)
    cond.broadcast()
  }

  // MARK: The reader

  /// Fills `buffer` from the save stream, blocking until the workers produce.
  /// Short only at the end; 0 after it. An error loses the bytes this call
  /// already copied, as on the PF.
  func read(
    into buffer: UnsafeMutableRawBufferPointer, stream: Int, vram: VRAMReader?
  ) throws(Errno) -> Int {
    var unused: UnsafeRawBufferPointer?
    return try read(into: buffer, stream: stream, vram: vram, span: &unused, gathering: false)
  }

  /// `read`, but when the rest of `buffer` lies wholly inside the current
  /// VRAM packet's payload and VRAM can hand it out in place
  /// (`VRAMReader.span`: all data, or all hole), that part is consumed and
  /// returned in `span` instead of being copied.
  func read(
    into buffer: UnsafeMutableRawBufferPointer, stream: Int, vram: VRAMReader?,
    span: inout UnsafeRawBufferPointer?, gathering: Bool = true
  ) throws(Errno) -> Int {
    try locked { () throws(Errno) in
      try check(stream: stream)
      if let error = cursor.error { throw error }
      let interruptAt = faultsValue.interruptRead
      faultsValue.interruptRead = nil
      var copied = 0
      while copied < buffer.count {
        if let interruptAt, copied >= interruptAt { throw .interrupted }  // a signal: bytes lost
        if cursor.current == nil {
          guard let next = try nextPacket(stream) else { break }
          cursor.current = next
          cursor.offset = 0
        }
        guard let packet = cursor.current else { break }
        if gathering, interruptAt == nil, let vram, case .vram = packet.payload,
          cursor.offset >= XePacketHeader.size,
          packet.streamSize - UInt64(cursor.offset) >= UInt64(buffer.count - copied)
        {
          let start = packet.header.offset + UInt64(cursor.offset - XePacketHeader.size)
          let rest = buffer.count - copied
          if let gathered = vram.span(at: start, count: rest) {
            span = gathered
            cursor.offset += rest
            if UInt64(cursor.offset) == packet.streamSize { cursor.current = nil }
            return copied
          }
        }
        let limit = min(buffer.count - copied, interruptAt.map { $0 - copied } ?? .max)
        let count = copy(
          packet, from: cursor.offset, count: limit,
          into: UnsafeMutableRawBufferPointer(rebasing: buffer[copied...]), vram: vram)
        copied += count
        cursor.offset += count
        if UInt64(cursor.offset) == packet.streamSize { cursor.current = nil }
      }
      return copied
    }
  }

  /// Descriptor, then the GTs' packets, then the trailer; nil at the end.
  private func nextPacket(_ stream: Int) throws(Errno) -> PFPacket? {
    switch cursor.stage {
    case .descriptor:
      cursor.stage = .body
      return cursor.descriptor
    case .body:
      do throws(Errno) {
        if let packet = try consume(stream) { return packet }
      } catch {
        if error == .ioError { cursor.error = error }
        throw error
      }
      cursor.stage = .end
      return PFPacket(.trailer, gt: 0, bytes: [])
    case .end:
      return nil
    }
  }

  /// `xe_sriov_pf_migration_save_consume`. Which GT's packet comes next is
  /// drawn from the seeded generator among the GTs with packets left, so the
  /// interleaving depends on the seed only, never on thread timing; the
  /// reader then waits for that GT. nil once every GT is SAVE_DATA_DONE and
  /// drained.
  private func consume(_ stream: Int) throws(Errno) -> PFPacket? {
    let open = cursor.expected.indices.filter { cursor.expected[$0] > 0 }
    guard !open.isEmpty else {
      try waitForSave(stream) { gts.allSatisfy { $0.state.contains(.saveDataDone) } }
      return nil
    }
    // A read that gave up waiting (ETIMEDOUT) retries the same GT.
    let g = cursor.chosen ?? open[Int(cursor.order.next() % UInt64(open.count))]
    cursor.chosen = g
    try waitForSave(stream) { !gts[g].ring.isEmpty }
    cursor.chosen = nil
    let packet = gts[g].ring.removeFirst()
    cursor.expected[g] -= 1
    // `xe_gt_sriov_pf_control_process_save_data`: room again, wake the worker.
    if has(g, .saveFailed) { throw .ioError }
    if exit(g, .saveWaitData) {
      enter(g, .saveProcessData)
      queue(g)
    }
    return packet
  }

  /// Waits for `ready`. EIO once a GT's save failed or was cancelled (stopped
  /// or reset: the kernel would wait forever), ENODEV once the stream is
  /// invalid, ETIMEDOUT after `PFTiming.stream`.
  private func waitForSave(_ stream: Int, until ready: () -> Bool) throws(Errno) {
    var failure: Errno?
    let ended = wait(timingValue.stream) {
      if ready() { return true }
      if activeStream != stream || isShutDown {
        failure = .operationNotSupportedByDevice
      } else if gts.contains(where: {
        $0.state.contains(.saveFailed) || !$0.state.contains(.saveWIP)
      }) {
        failure = .ioError
      }
      return failure != nil
    }
    if let failure { throw failure }
    guard ended else { throw .timedOut }
  }

  /// Copies up to `count` bytes of `packet`, starting `offset` bytes into
  /// its header-then-payload, into `out`; returns how many.
  private func copy(
    _ packet: PFPacket, from offset: Int, count: Int, into out: UnsafeMutableRawBufferPointer,
    vram: VRAMReader?
  ) -> Int {
    let headerSize = XePacketHeader.size
    var done = 0
    if offset < headerSize {
      let header = packet.header.encoded
      done = min(count, headerSize - offset)
      out.copyBytes(from: header[offset..<offset + done])
    }
    let at = offset + done - headerSize  // payload offset
    let take = min(count - done, Int(packet.header.size) - at)
    guard take > 0 else { return done }
    let target = UnsafeMutableRawBufferPointer(rebasing: out[done..<done + take])
    switch packet.payload {
    case .bytes(let bytes):
      target.copyBytes(from: bytes[at..<at + take])
    case .vram:
      vram?.copy(from: packet.header.offset + UInt64(at), into: target)
    }
    return done + take
  }
}
