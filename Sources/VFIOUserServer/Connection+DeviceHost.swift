import CVFIOUser
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserSocket

/// A device-initiated transfer between device memory and client memory. Runs
/// window by window: memcpy where the client shared an fd, DMA_READ /
/// DMA_WRITE messages (one chunk in flight) where it did not.
final class DMAJob {
  enum Direction { case fromClient, toClient }
  let direction: Direction
  let address: UInt64
  let buffer: UnsafeMutableRawBufferPointer
  let completion: (Result<Void, Errno>) -> Void
  /// Where writes through the server's mappings are logged (DMA logging), if anywhere.
  let log: DirtyPageLog?
  var done = 0
  var chunk = 0
  var requestID: UInt16 = 0

  init(
    direction: Direction, address: UInt64, buffer: UnsafeMutableRawBufferPointer,
    log: DirtyPageLog? = nil, completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    self.log = log
    self.direction = direction
    self.address = address
    self.buffer = buffer
    self.completion = completion
  }
}

extension Connection: DeviceHost {
  func deferWork(_ work: @escaping () -> Void) { deferred.append(work) }

  func dmaRead(
    address: UInt64, into buffer: UnsafeMutableRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    advance(
      DMAJob(direction: .fromClient, address: address, buffer: buffer, completion: completion))
  }

  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    dmaWrite(address: address, from: buffer, log: nil, completion: completion)
  }

  func dmaWrite(
    address: UInt64, from buffer: UnsafeRawBufferPointer, log: DirtyPageLog?,
    completion: @escaping (Result<Void, Errno>) -> Void
  ) {
    advance(
      DMAJob(
        direction: .toClient, address: address,
        buffer: UnsafeMutableRawBufferPointer(mutating: buffer), log: log,
        completion: completion))
  }

  /// Largest DMA_READ / DMA_WRITE chunk: what both sides accept, and what QEMU can answer.
  private var chunkLimit: Int {
    Int(
      min(
        clientCapabilities.effectiveMaxDataXferSize, limits.maxDataXferSize,
        limits.maxDMAMessageData))
  }

  private func advance(_ job: DMAJob) {
    while job.done < job.buffer.count {
      let current = job.address &+ UInt64(job.done)
      guard let entry = dma.lookup(current) else { return finish(job, .badAddress) }
      let window = entry.window
      let allowed = job.direction == .fromClient ? window.readable : window.writable
      guard allowed else { return finish(job, .notPermitted) }
      let n = Int(min(UInt64(job.buffer.count - job.done), window.end - current))
      if let base = window.mapping {
        let client = base + Int(current - window.address)
        let device = job.buffer.baseAddress! + job.done
        let toClient = job.direction == .toClient
        let target = toClient ? client : device
        let source = UnsafeRawPointer(toClient ? device : client)
        let copied: Bool
        if entry.backing?.mayShrink ?? false {
          copied = cvfu_guarded_copy(target, source, n) == 0
        } else {
          target.copyMemory(from: source, byteCount: n)
          copied = true
        }
        // A failed write may have landed in part: its pages count as dirty.
        if toClient, let log = job.log { log.mark(address: current, length: UInt64(n)) }
        guard copied else {
          logger.warning(
            "DMA \(toClient ? "to" : "from") client 0x\(String(current, radix: 16)) +0x\(String(n, radix: 16)) faulted: the client cut the file behind the window short; EFAULT"
          )
          return finish(job, .badAddress)
        }
        job.done += n
        continue
      }
      job.chunk = min(n, chunkLimit)
      do throws(Errno) {
        try sendDMARequest(job, address: current)
      } catch {
        return finish(job, error)
      }
      return  // resumes in handleReply
    }
    finish(job, nil)
  }

  private func finish(_ job: DMAJob, _ error: Errno?) {
    job.completion(error.map { .failure($0) } ?? .success(()))
  }

  private func sendDMARequest(_ job: DMAJob, address: UInt64) throws(Errno) {
    nextRequestID = nextRequestID == UInt16.max ? 0x8000 : nextRequestID + 1
    job.requestID = nextRequestID
    let command: Command = job.direction == .fromClient ? .dmaRead : .dmaWrite
    let data = job.direction == .toClient ? job.chunk : 0
    // Both layouts use a 16-byte head; QEMU's puts data at 12 and pads the end by 4.
    var head = [UInt8](repeating: 0, count: MessageHeader.size + 16 + data)
    head.withUnsafeMutableBytes { raw in
      MessageHeader(messageID: job.requestID, command: command, size: UInt32(raw.count)).encode(
        into: raw)
      let payload = UnsafeMutableRawBufferPointer(rebasing: raw[MessageHeader.size...])
      DMAAccessHeader(address: address, count: UInt64(job.chunk)).encode(
        into: payload, layout: dmaLayout)
      if data > 0 {
        let src = UnsafeRawBufferPointer(rebasing: job.buffer[job.done..<(job.done + data)])
        UnsafeMutableRawBufferPointer(rebasing: payload[dmaLayout.dataOffset...]).copyMemory(
          from: src)
      }
    }
    outstanding[job.requestID] = job
    flush()  // replies already queued go first
    do throws(Errno) {
      try channel.send(bytes: head)
    } catch {
      outstanding[job.requestID] = nil
      sendFailed(error, "DMA request \(job.requestID)")
      throw error
    }
  }

  /// A reply from the client to one of our DMA requests.
  func handleReply(header: MessageHeader, payload: UnsafeRawBufferPointer) {
    guard let job = outstanding.removeValue(forKey: header.messageID) else {
      if abandoned.remove(header.messageID) == nil {
        logger.warning(
          "reply \(header.messageID) (\(commandName(header.command))) to no request of ours; ignored"
        )
      }
      return
    }
    let expected: Command = job.direction == .fromClient ? .dmaRead : .dmaWrite
    guard header.command == expected.rawValue else {
      logger.warning(
        "reply \(header.messageID) is \(commandName(header.command)), expected \(expected): EPROTO")
      return finish(job, .protocolError)
    }
    if header.isError {
      return finish(
        job, header.error == 0 ? .ioError : Errno(rawValue: Int32(bitPattern: header.error)))
    }
    switch job.direction {
    case .fromClient:
      guard payload.count == 16 + job.chunk,
        let access = try? DMAAccessHeader(decoding: payload, layout: dmaLayout),
        access.count == UInt64(job.chunk)
      else {
        logger.warning("malformed DMA_READ reply \(header.messageID): EPROTO")
        return finish(job, .protocolError)
      }
      let data = UnsafeRawBufferPointer(
        rebasing: payload[dmaLayout.dataOffset..<(dmaLayout.dataOffset + job.chunk)])
      UnsafeMutableRawBufferPointer(rebasing: job.buffer[job.done..<(job.done + job.chunk)])
        .copyMemory(from: data)
    case .toClient:
      // The spec echoes address and count; QEMU answers with the bare header.
      guard payload.count == 0 || payload.count == 16 else { return finish(job, .protocolError) }
    }
    job.done += job.chunk
    advance(job)
    runDeferredWork()
  }

  /// Cancels transfers in flight (reset, unmap of everything, hang-up); their
  /// late replies are dropped silently.
  func abortDMAJobs() {
    let jobs = outstanding
    outstanding = [:]
    for (id, job) in jobs {
      abandoned.insert(id)
      finish(job, .canceled)
    }
  }

  /// Cancels transfers whose current chunk lies in `window`.
  func abortDMAJobs(touching window: DMAWindow) {
    for (id, job) in outstanding {
      let current = job.address &+ UInt64(job.done)
      guard current >= window.address, current < window.end else { continue }
      outstanding[id] = nil
      abandoned.insert(id)
      finish(job, .canceled)
    }
  }
}
