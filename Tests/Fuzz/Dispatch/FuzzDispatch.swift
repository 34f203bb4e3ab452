import CVFIOUser
import FuzzSupport
import Logging
import VFIODevice
import VFIOUser
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

// libFuzzer target: the whole dispatcher. Each input is one client's life on
// one connection to the simulated BMG VF, served in-process over a
// socketpair by the server's own connection code: after a valid VERSION, the
// input's messages, each with the descriptors it asks for (memfds or
// eventfds, made fresh), then the hang-up and the server's clean-up. The same
// device serves every input, as it serves one client after another, so a
// hang-up that leaves it broken shows up as a later failure.
//
// Input: records of
//   control u8: bits 0-1 descriptor count (0-3); bits 2-4 descriptor i is an
//     eventfd when bit 2+i is set, else a 64 KiB memfd; bit 7 sends the
//     message as it is, else its header's size is set to its length
//   length u16 (little-endian), then `length` message bytes.

nonisolated(unsafe) let device: SimulatedXeVF = {
  do {
    let vf = try SimulatedXeVF(profile: .bmg, vramSize: 1 << 20, logger: quietLogger)
    // The PF's state machine runs whole, on the fuzzing thread and with no
    // waits: what is fuzzed is its logic, not its timing, and each thread
    // wake-up would cost more than an input.
    vf.pfRunsWorkInline = true
    guard vf.pfRunsWorkInline else { fuzzFailure("the PF's workers started before the fuzzer") }
    vf.pfTiming = .immediate
    vf.vramChunkSize = 64 << 10
    return vf
  } catch {
    fuzzFailure("cannot create the simulated VF: \(error)")
  }
}()

let quietLogger: Logger = {
  var logger = Logger(label: "fuzz-dispatch")
  logger.logLevel = .critical
  return logger
}()

let server: VFIOUserServer = {
  var limits = ServerLimits()
  limits.maxDataXferSize = 64 << 10
  limits.maxDMAMaps = 64
  return VFIOUserServer(backend: device, limits: limits, logger: quietLogger)
}()

/// VERSION as QEMU opens with it (16 descriptors, write_multiple).
let versionMessage = encodeMessage(
  id: 0, command: Command.version.rawValue,
  payload: VersionPayload(
    major: 0, minor: 0,
    json:
      #"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":65536,"max_dma_maps":64,"pgsizes":4096,"write_multiple":true}}"#
  ).encoded())

struct Record {
  var message: [UInt8]
  var descriptors: [Bool]  // true: eventfd
}

func records(_ input: [UInt8]) -> [Record] {
  var out: [Record] = []
  var at = 0
  while at + 3 <= input.count {
    let control = input[at]
    let length = Int(input[at + 1]) | Int(input[at + 2]) << 8
    at += 3
    var message = Array(input[at..<min(at + length, input.count)])
    at += message.count
    if control & 0x80 == 0, message.count >= MessageHeader.size {
      let size = UInt32(message.count)
      for i in 0..<4 { message[4 + i] = UInt8(truncatingIfNeeded: size >> (8 * i)) }
    }
    let descriptors = (0..<Int(control & 3)).map { control & (4 << $0) != 0 }
    out.append(Record(message: message, descriptors: descriptors))
  }
  return out
}

func makeDescriptor(eventfd: Bool) -> Int32 {
  let fd =
    eventfd
    ? cvfu_eventfd(0, O_CLOEXEC | O_NONBLOCK)  // EFD_CLOEXEC | EFD_NONBLOCK
    : cvfu_memfd_create("fuzz-dma", 1)  // MFD_CLOEXEC (needs _GNU_SOURCE, not imported)
  guard fd >= 0 else { fuzzFailure("cannot create a descriptor: \(fd)") }
  if !eventfd, ftruncate(fd, 64 << 10) != 0 { fuzzFailure("ftruncate of a memfd failed") }
  return fd
}

/// Sends what fits into the socket's buffer without blocking: the server
/// reads only after the whole input is written.
func send(_ socket: Int32, _ record: Record) -> Bool {
  let fds = record.descriptors.map(makeDescriptor)
  defer { for fd in fds { close(fd) } }
  return record.message.withUnsafeBytes { raw in
    var iov = iovec(
      iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count)
    let sent = fds.withUnsafeBufferPointer {
      cvfu_sendmsg(socket, &iov, 1, $0.baseAddress, Int32($0.count))
    }
    return sent == raw.count
  }
}

/// Reads and drops the replies (and the server's DMA requests) of one
/// client after another, so the server never blocks on a full socket; a
/// client's end when the server hangs up. One thread for the whole run: one
/// per input would cost more than the input.
final class Drainer: @unchecked Sendable {
  private let start = Semaphore()
  private let drained = Semaphore()
  /// The socket to drain; set before `start` is signalled.
  private var socket: Int32 = -1

  init() {
    if let failed = startThread(name: "fuzz-drain", { [self] in run() }) {
      fuzzFailure("cannot start the drain thread: \(failed)")
    }
    drained.wait()  // the thread is running
  }

  func drain(_ socket: Int32) {
    self.socket = socket
    start.signal()
  }

  func waitDrained() { drained.wait() }

  private func run() {
    // Made before the first input: LeakSanitizer takes what an input
    // allocates and does not free for a leak.
    // (Raw memory: an array passed as `&array` on each call was copied each time at -O.)
    let bufferSize = 1 << 16
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 16)
    let fds = UnsafeMutablePointer<Int32>.allocate(capacity: Int(CVFU_SCM_MAX_FD))
    drained.signal()
    while true {
      start.wait()
      while true {
        var count: Int32 = 0
        let n = cvfu_recvmsg(socket, buffer, bufferSize, fds, CVFU_SCM_MAX_FD, &count, 0)
        for i in 0..<Int(count) { close(fds[i]) }
        if n <= 0 { break }
      }
      drained.signal()
    }
  }
}

let drainer = Drainer()

func fuzzDispatch(_ input: [UInt8]) {
  var pair: [Int32] = [-1, -1]
  guard cvfu_socketpair(&pair) == 0 else { fuzzFailure("socketpair failed") }
  let (client, serverEnd) = (pair[0], pair[1])
  _ = cvfu_socket_buffers(client, 1 << 20)
  _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
  if send(client, Record(message: versionMessage, descriptors: [])) {
    for record in records(input) where !send(client, record) { break }
  }
  shutdown(client, Int32(SHUT_WR))
  _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) & ~O_NONBLOCK)

  drainer.drain(client)
  _ = server.serve(connected: serverEnd)
  drainer.waitDrained()
  close(client)

  // What every client must find: a device RUNNING, its interrupts released.
  guard device.migrationState == .running else {
    fuzzFailure("the device is \(device.migrationState) after a client left")
  }
  guard device.eventFDCount == 0 else {
    fuzzFailure("\(device.eventFDCount) eventfds still held after a client left")
  }
}

/// A record of `message` with no descriptors and its size set by the harness.
func record(_ message: [UInt8], descriptors: UInt8 = 0) -> [UInt8] {
  [descriptors, UInt8(message.count & 0xFF), UInt8(message.count >> 8)] + message
}

func featureSet(id: UInt16, state: MigrationState) -> [UInt8] {
  encodeMessage(
    id: id, command: Command.deviceFeature.rawValue,
    payload: DeviceFeaturePayload(
      flags: VFIODeviceFeature.migDeviceState | VFIODeviceFeatureFlags.set,
      data: MigDeviceStateData(state: state).encoded()
    ).encoded())
}

/// Every client->server request of protocol/messages.json (with its fds as
/// memfds, or eventfds for SET_IRQS) and every malformed case, one per seed;
/// then migration sequences: a save read out, and restores of the Xe packets
/// of protocol/xe-packets.json.
func dispatchSeeds(_ protocolDirectory: String) -> [[UInt8]] {
  var seeds: [[UInt8]] = []
  forEachFixture(protocolDirectory + "/messages.json") { object in
    guard object.string("direction") == "client->server", object.string("kind") == "request",
      let bytes = object.hex("hex"), bytes.count < 1 << 16
    else { return }
    let fds = UInt8(min(object.integer("fds") ?? 0, 3))
    let eventfds: UInt8 =
      bytes.count > 3 && bytes[2] == UInt8(Command.deviceSetIRQs.rawValue) ? 0x1C : 0
    seeds.append(record(bytes, descriptors: fds | eventfds))
  }
  forEachFixture(protocolDirectory + "/malformed.json") { object in
    guard let bytes = object.hex("hex"), bytes.count < 1 << 16 else { return }
    seeds.append([0x80, UInt8(bytes.count & 0xFF), UInt8(bytes.count >> 8)] + bytes)
  }
  var xePackets: [[UInt8]] = []
  forEachFixture(protocolDirectory + "/xe-packets.json", key: "packets") { object in
    if let bytes = object.hex("hex") { xePackets.append(bytes) }
  }
  let toResuming = [MigrationState.stop, .resuming].enumerated().map {
    record(featureSet(id: UInt16(1 + $0.offset), state: $0.element))
  }
  func migDataWrite(id: UInt16, _ data: [UInt8]) -> [UInt8] {
    var head = [UInt8](repeating: 0, count: MigDataHeader.size)
    head.withUnsafeMutableBytes {
      MigDataHeader(argsz: UInt32(MigDataHeader.size + data.count), size: UInt32(data.count))
        .encode(into: $0)
    }
    return record(
      encodeMessage(id: id, command: Command.migDataWrite.rawValue, payload: head + data))
  }
  for packet in xePackets {
    seeds.append(
      (toResuming + [migDataWrite(id: 3, packet), record(featureSet(id: 4, state: .stop))])
        .flatMap { $0 })
  }
  if xePackets.count >= 3 {
    let stream = xePackets[0] + xePackets[2]  // descriptor, trailer
    seeds.append(
      (toResuming + [
        migDataWrite(id: 3, stream), record(featureSet(id: 4, state: .stop)),
        record(featureSet(id: 5, state: .running)),
      ]).flatMap { $0 })
  }
  var readHead = [UInt8](repeating: 0, count: MigDataHeader.size)
  readHead.withUnsafeMutableBytes { MigDataHeader(argsz: 8, size: 4096).encode(into: $0) }
  seeds.append(
    ([MigrationState.stop, .stopCopy].enumerated().map {
      record(featureSet(id: UInt16(1 + $0.offset), state: $0.element))
    }
      + (3..<8).map {
        record(
          encodeMessage(id: UInt16($0), command: Command.migDataRead.rawValue, payload: readHead))
      } + [record(featureSet(id: 9, state: .stop)), record(featureSet(id: 10, state: .running))])
      .flatMap { $0 })
  seeds += regressionInputs(protocolDirectory, target: "dispatch")
  return seeds
}

@main
enum FuzzDispatchTarget {
  static func main() {
    _ = drainer
    fuzzTargetMain(seeds: dispatchSeeds) { fuzzDispatch(Array($0)) }
  }
}
