import SystemPackage
import VFIODevice
import VFIOUser

/// The registers and state of the simulator's copy engine (see
/// `XeSimRegisters.DMA`). Host interaction lives in the extension below; this
/// part is pure state so the rules are easy to follow.
struct DMAEngine {
  typealias R = XeSimRegisters.DMA

  /// One started transfer, captured at the doorbell so later register writes
  /// cannot change it.
  struct Transfer {
    var toDevice: Bool
    var deviceOffset: UInt64
    var clientAddress: UInt64
    var length: UInt64
    /// The MSI-X vector to raise on completion, if CTRL asked for one.
    var vector: UInt32?
    /// The engine generation it belongs to; a reset starts a new one.
    var generation: UInt64
  }

  var src: UInt64 = 0
  var dst: UInt64 = 0
  var len: UInt32 = 0
  var ctrl: UInt32 = 0
  private(set) var status: UInt32 = 0
  private(set) var completed: UInt32 = 0
  /// Bumped by every reset so completions of older transfers are recognised.
  private(set) var generation: UInt64 = 0
  /// The transfer a doorbell started and that has not finished.
  private(set) var accepted: Transfer?
  /// A started transfer the paused VF has not run yet; it runs on resume.
  var held: Transfer?

  var busy: Bool { status & R.statusBusy != 0 }

  /// Resets the registers to 0 and starts a new generation.
  mutating func reset() {
    self = DMAEngine(generation: generation &+ 1)
  }

  private init(generation: UInt64) { self.generation = generation }
  init() {}

  /// An engine as a live update carries it: the registers, the generation,
  /// and the transfer a paused VF holds (accepted, and run on resume).
  init(
    src: UInt64, dst: UInt64, len: UInt32, ctrl: UInt32, status: UInt32, completed: UInt32,
    generation: UInt64, held: Transfer?
  ) {
    self.src = src
    self.dst = dst
    self.len = len
    self.ctrl = ctrl
    self.status = status
    self.completed = completed
    self.generation = generation
    self.held = held
    accepted = held
  }

  /// Reads the dword at byte offset `offset` from the block's base.
  func read(offset: UInt64) -> UInt32 {
    switch offset + R.base {
    case R.src: UInt32(truncatingIfNeeded: src)
    case R.src + 4: UInt32(truncatingIfNeeded: src >> 32)
    case R.dst: UInt32(truncatingIfNeeded: dst)
    case R.dst + 4: UInt32(truncatingIfNeeded: dst >> 32)
    case R.len: len
    case R.ctrl: ctrl
    case R.status: status
    case R.completed: completed
    default: 0  // DOORBELL is write-only
    }
  }

  /// Writes the bytes of `mask` of the dword at `offset` from the base.
  /// Returns the transfer to start when the write rang an idle engine's doorbell.
  mutating func write(offset: UInt64, value: UInt32, mask: UInt32) -> Transfer? {
    func merge(_ old: UInt32) -> UInt32 { old & ~mask | value & mask }
    func mergeHalf(_ old: UInt64, high: Bool) -> UInt64 {
      let shift: UInt64 = high ? 32 : 0
      let lane = UInt64(mask) << shift
      return old & ~lane | UInt64(value) << shift & lane
    }
    switch offset + R.base {
    case R.src: src = mergeHalf(src, high: false)
    case R.src + 4: src = mergeHalf(src, high: true)
    case R.dst: dst = mergeHalf(dst, high: false)
    case R.dst + 4: dst = mergeHalf(dst, high: true)
    case R.len: len = merge(len)
    case R.ctrl: ctrl = merge(ctrl)
    case R.status:
      // Done and error are write-1-to-clear; clearing error drops its errno.
      let clear = value & mask & (R.statusDone | R.statusError)
      status &= ~clear
      if clear & R.statusError != 0 { status &= 0xFFFF }
    case R.doorbell: return ring()
    default: break
    }
    return nil
  }

  private mutating func ring() -> Transfer? {
    if busy {
      fail(.resourceBusy)
      return nil
    }
    status = R.statusBusy
    let toDevice = ctrl & R.ctrlToDevice != 0
    accepted = Transfer(
      toDevice: toDevice, deviceOffset: toDevice ? dst : src, clientAddress: toDevice ? src : dst,
      length: UInt64(len),
      vector: ctrl & R.ctrlInterrupt != 0 ? (ctrl & R.ctrlVectorMask) >> R.ctrlVectorShift : nil,
      generation: generation)
    return accepted
  }

  /// Sets error with `error` in the errno field, keeping busy and done.
  private mutating func fail(_ error: Errno) {
    let code = UInt32(UInt16(truncatingIfNeeded: error.rawValue))
    status = status & 0xFFFF | R.statusError | code << R.statusErrnoShift
  }

  /// Ends `transfer` with `error` (nil on success). Returns false, changing
  /// nothing, when the transfer belongs to an earlier generation.
  mutating func finish(_ transfer: Transfer, error: Errno?) -> Bool {
    guard transfer.generation == generation, busy else { return false }
    status &= ~R.statusBusy
    accepted = nil
    if let error {
      fail(error)
    } else {
      status |= R.statusDone
    }
    completed &+= 1
    return true
  }
}

extension SimulatedXeVF {
  /// DOORBELL was written: mark the engine busy and run the transfer once
  /// the reply to this write has gone out.
  func ringDoorbell(_ transfer: DMAEngine.Transfer) {
    if workHeld {  // a paused VF keeps the doorbell and runs it on resume
      dma.held = transfer
      logger.debug("DMA doorbell held: the VF is paused")
      return
    }
    guard let host else {
      complete(transfer, .failure(.operationNotSupportedByDevice))
      return
    }
    let direction = transfer.toDevice ? "client→device" : "device→client"
    let device = String(transfer.deviceOffset, radix: 16)
    let client = String(transfer.clientAddress, radix: 16)
    logger.debug(
      "DMA \(direction) of \(transfer.length) bytes, device 0x\(device), client 0x\(client)")
    host.deferWork { [self] in begin(transfer) }
  }

  /// Checks the transfer against the device state and hands it to the host.
  private func begin(_ transfer: DMAEngine.Transfer) {
    guard transfer.generation == dma.generation else { return }  // reset since the doorbell
    if workHeld {  // paused between the doorbell and its start
      dma.held = transfer
      return
    }
    guard config.busMasterEnabled else { return complete(transfer, .failure(.notPermitted)) }
    guard transfer.length > 0,
      memory.contains(offset: transfer.deviceOffset, length: transfer.length)
    else {
      return complete(transfer, .failure(.invalidArgument))
    }
    guard let host else { return complete(transfer, .failure(.operationNotSupportedByDevice)) }
    let device = memory.buffer(offset: transfer.deviceOffset, length: transfer.length)
    // The completion holds the device strongly: the buffer points into its memory.
    let done: (Result<Void, Errno>) -> Void = { [self] in complete(transfer, $0) }
    if transfer.toDevice {
      host.dmaRead(address: transfer.clientAddress, into: device, completion: done)
    } else {
      // VRAM the VF never wrote leaves from the zero page, as a save reads it,
      // rather than being allocated by the read (a mix of data and holes is
      // read through the mapping; SRAM's span is its memory).
      let source = VRAMReader(memory).span(at: transfer.deviceOffset, count: device.count)
      host.dmaWrite(
        address: transfer.clientAddress, from: source ?? UnsafeRawBufferPointer(device),
        log: dirtyLog, completion: done)
    }
  }

  private func complete(_ transfer: DMAEngine.Transfer, _ result: Result<Void, Errno>) {
    let error: Errno?
    switch result {
    case .success: error = nil
    case .failure(let e): error = e
    }
    guard dma.finish(transfer, error: error) else {
      logger.debug(
        "DMA completion of an earlier generation ignored (\(error.map { "\($0)" } ?? "success"))")
      return
    }
    if let error { logger.debug("DMA failed: \(error)") }
    if let vector = transfer.vector { raiseMSIX(vector) }
  }
}

/// DMA logging: the engine's writes that land through the server's mappings
/// of fd-backed windows, page by page as they land (`DeviceHost.dmaWrite(log:)`).
/// A device reset keeps the log: the pages written before it are still dirty.
extension SimulatedXeVF: DMALoggingCapable {
  public var dmaLoggingMethod: String { "exact: the DMA engine's writes into fd-backed windows" }

  public func startDMALogging(pageSize: UInt64, ranges: [DMALoggingRange]) throws(Errno) {
    dirtyLog = try DirtyPageLog(pageSize: pageSize, ranges: ranges)
  }

  public func stopDMALogging() { dirtyLog = nil }

  public func reportDMALog(
    iova: UInt64, length: UInt64, pageSize: UInt64, into bitmap: UnsafeMutableRawBufferPointer
  ) throws(Errno) {
    guard let dirtyLog else { throw .invalidArgument }
    dirtyLog.report(iova: iova, length: length, pageSize: pageSize, into: bitmap)
  }
}

extension DMAEngine {
  /// The engine as the GuC blob carries it. A transfer started but not
  /// finished is carried as held, so the destination runs it on resume.
  var gucRecord: GuCVFState.Engine {
    let pending = held ?? (busy ? accepted : nil)
    return GuCVFState.Engine(
      src: src, dst: dst, len: len, ctrl: ctrl, status: status, completed: completed,
      held: pending.map {
        GuCVFState.HeldTransfer(
          toDevice: $0.toDevice, deviceOffset: $0.deviceOffset, clientAddress: $0.clientAddress,
          length: $0.length, vector: $0.vector)
      })
  }

  /// Loads a restored engine, keeping this engine's generation.
  mutating func load(_ saved: GuCVFState.Engine) {
    src = saved.src
    dst = saved.dst
    len = saved.len
    ctrl = saved.ctrl
    status = saved.status
    completed = saved.completed
    held = saved.held.map {
      Transfer(
        toDevice: $0.toDevice, deviceOffset: $0.deviceOffset, clientAddress: $0.clientAddress,
        length: $0.length, vector: $0.vector, generation: generation)
    }
    accepted = held
  }
}
