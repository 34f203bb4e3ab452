// Runs inside the guest of KernelGuestTests, as the client of
// `xe-vfio-user serve --device vfio:<address>`: the server drives, through the
// guest kernel's vfio-pci, the simulated Xe VF that the host's xe-vfio-user
// serves to QEMU. Every check goes through the server under test. It prints
// "XEVF: key value..." lines, which the host test parses, and exits non-zero
// on the first failure it cannot report as a line.
//
// Usage: xe-vfu-guest-check SOCKET PCI-ADDRESS
//        xe-vfu-guest-check --map SOCKET LABEL
//        xe-vfu-guest-check --igb SOCKET VF-ADDRESS   (an igb VF: IGB.swift)
//        xe-vfu-guest-check --mtty STEP SOCKET [ARG]  (an mtty mdev: MTTY.swift)
//        xe-vfu-guest-check --live-update SOCKET      (DMA across live updates: LiveUpdate.swift)
//
// Built static (release, --static-swift-stdlib) and copied into the initramfs
// with the dynamic libraries it needs. It uses only the client library, not
// XeVF (which would pull Foundation in): the register offsets below are the
// simulated VF's, from Sources/XeVF/Registers.swift.
import CVFIOUser
import SystemPackage
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

enum Reg {
  static let gmdID: UInt64 = 0x0D8C
  static func scratch(_ n: Int) -> UInt64 { 0x19_0240 + 4 * UInt64(n) }
  static let dmaSrc: UInt64 = 0x3F_0000
  static let dmaDst: UInt64 = 0x3F_0008
  static let dmaLen: UInt64 = 0x3F_0010
  static let dmaCtrl: UInt64 = 0x3F_0014
  static let dmaDoorbell: UInt64 = 0x3F_0018
  static let dmaStatus: UInt64 = 0x3F_001C
  static let ctrlToDevice: UInt32 = 1
  static let ctrlInterrupt: UInt32 = 1 << 31
  static let busy: UInt32 = 1
  static let done: UInt32 = 2
  static let error: UInt32 = 4
}

let bar0 = VFIOPCIRegion.bar0
let config = VFIOPCIRegion.config

func say(_ line: String) {
  print("XEVF: \(line)")
  fflush(nil)  // the console is no terminal: no line buffering
}

func fail(_ what: String) -> Never {
  say("error \(what)")
  exit(1)
}

func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

/// The byte pattern the host test recomputes (as Tests/QEMUInteropTests/Support/Device.swift's `pattern`).
func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
  (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ ($0 >> 8)) }
}

func must<T: ~Copyable>(_ what: String, _ body: () throws(VFIOUserClientError) -> T) -> T {
  do throws(VFIOUserClientError) {
    return try body()
  } catch {
    fail("\(what): \(error)")
  }
}

/// The errno name of a refused request, or "ok".
func outcome(_ body: () throws(VFIOUserClientError) -> Void) -> String {
  do throws(VFIOUserClientError) {
    try body()
    return "ok"
  } catch {
    return error.errno?.name ?? "\(error)"
  }
}

let arguments = CommandLine.arguments
/// `--map SOCKET LABEL`: only one 2 MiB DMA_MAP at 4 GiB, printed as "LABEL outcome" (a
/// server whose RLIMIT_MEMLOCK is too small refuses it; one whose last client left the same
/// window mapped must have unmapped it from the IOMMU).
let mapOnly = arguments.count == 4 && arguments[1] == "--map"
/// `--igb SOCKET VF-ADDRESS`: the checks for an SR-IOV VF of QEMU's igb (IGB.swift).
let igbMode = arguments.count == 4 && arguments[1] == "--igb"
/// `--mtty STEP SOCKET [ARG]`: a step of the checks for an mtty mdev (MTTY.swift).
let mttyMode = (4...5).contains(arguments.count) && arguments[1] == "--mtty"
/// `--live-update SOCKET`: DMA and MSI-X across live updates of the server (LiveUpdate.swift).
let liveUpdateMode = arguments.count == 3 && arguments[1] == "--live-update"
guard arguments.count == 3 || mapOnly || igbMode || mttyMode else {
  say(
    "error usage: xe-vfu-guest-check SOCKET PCI-ADDRESS | --map SOCKET LABEL | --igb SOCKET VF-ADDRESS | --mtty STEP SOCKET [ARG] | --live-update SOCKET"
  )
  exit(2)
}
let socket =
  mttyMode ? arguments[3] : mapOnly || igbMode || liveUpdateMode ? arguments[2] : arguments[1]
let address = igbMode ? arguments[3] : arguments[2]

/// Connects, waiting for a server that starts in the background.
func connect() -> VFIOUserClient {
  for _ in 0..<400 {
    if let client = try? VFIOUserClient.connect(path: socket) { return client }
    usleep(50_000)
  }
  fail("cannot connect to \(socket)")
}

/// A shared memory buffer for DMA: its memfd and the client's mapping of it.
func sharedBuffer(_ size: Int) -> (fd: FileDescriptor, UnsafeMutableRawBufferPointer) {
  let fd = cvfu_memfd_create("guest-check-dma", 1)  // MFD_CLOEXEC
  guard fd >= 0, ftruncate(fd, off_t(size)) == 0,
    let base = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), base != MAP_FAILED
  else { fail("memfd of \(size) bytes") }
  return (FileDescriptor(rawValue: fd), UnsafeMutableRawBufferPointer(start: base, count: size))
}

let client = connect()
client.timeoutMilliseconds = 30_000
if mapOnly {
  let (fd, _) = sharedBuffer(2 << 20)
  let result = outcome { () throws(VFIOUserClientError) in
    try client.dmaMap(
      address: 0x1_0000_0000, size: 2 << 20, flags: [.read, .write], fd: fd)
  }
  say("\(arguments[3]) \(result)")
  exit(0)
}
if igbMode {
  igbVFChecks(client, address: address)
  exit(0)
}
if mttyMode {
  mttyChecks(client, step: arguments[2], argument: arguments.count == 5 ? arguments[4] : nil)
  exit(0)
}
if liveUpdateMode {
  liveUpdateChecks(client, socket: socket)
  exit(0)
}
let info = must("DEVICE_GET_INFO") { () throws(VFIOUserClientError) in try client.deviceInfo() }
say("device-info flags \(hex(info.flags.rawValue)) regions \(info.numRegions) irqs \(info.numIRQs)")

// 1. Config space through the server, against the guest kernel's own view.
let configInfo = must("config region") { () throws(VFIOUserClientError) in
  try client.regionInfo(config).info
}
let sysfsConfig: [UInt8] = {
  let fd = open("/sys/bus/pci/devices/\(address)/config", O_RDONLY)
  guard fd >= 0 else { fail("open sysfs config") }
  defer { close(fd) }
  var bytes = [UInt8](repeating: 0, count: 4096)
  let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
  guard n > 0 else { fail("read sysfs config") }
  return Array(bytes[0..<n])
}()
let compared = min(Int(configInfo.size), sysfsConfig.count)
let served = must("config read") { () throws(VFIOUserClientError) in
  try client.read(region: config, offset: 0, count: compared)
}
let differing = (0..<compared).filter { served[$0] != sysfsConfig[$0] }
say(
  "config \(compared) bytes match \(differing.isEmpty ? 1 : 0)"
    + (differing.isEmpty
      ? "" : " differ \(differing.prefix(16).map { hex($0) }.joined(separator: ","))")
)
let ids = served.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
say("config-ids \(String(ids, radix: 16))")

// Memory decoding and bus mastering, as a VMM enables them.
let command = served.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4, as: UInt16.self) }
@MainActor func enable() {
  must("COMMAND write") { () throws(VFIOUserClientError) in
    try client.write(
      region: config, offset: 4,
      data: withUnsafeBytes(of: (command | 0x6).littleEndian) { Array($0) })
  }
}
enable()

// 2. BAR0 registers through REGION_READ / REGION_WRITE.
let gmd = must("GMD_ID") { () throws(VFIOUserClientError) in
  try client.read32(region: bar0, offset: Reg.gmdID)
}
say("bar0-gmdid \(hex(gmd))")
must("scratch write") { () throws(VFIOUserClientError) in
  try client.write32(region: bar0, offset: Reg.scratch(0), 0x5CA1_AB1E)
}
let scratch = must("scratch read") { () throws(VFIOUserClientError) in
  try client.read32(region: bar0, offset: Reg.scratch(0))
}
say("bar0-scratch \(hex(scratch))")

@MainActor func rd(_ offset: UInt64) -> UInt32 { bar0Read(client, offset) }
@MainActor func wr(_ offset: UInt64, _ value: UInt32) { bar0Write(client, offset, value) }

// 3. BAR2 (VRAM): the region's fd is the guest's VFIO device fd; the client maps it.
var bar2 = must("BAR2 region") { () throws(VFIOUserClientError) in
  try client.regionInfo(VFIOPCIRegion.bar2)
}
let bar2Info = bar2.info
// Mapped below, and closed by hand at the end.
guard let bar2FD = bar2.fd.take()?.release().rawValue, bar2Info.flags.contains(.mmap) else {
  fail("BAR2 is not mappable (flags \(hex(bar2Info.flags.rawValue)))")
}
var linkTarget = [UInt8](repeating: 0, count: 256)
let linkLength = linkTarget.withUnsafeMutableBytes {
  readlink("/proc/self/fd/\(bar2FD)", $0.baseAddress!.assumingMemoryBound(to: CChar.self), 255)
}
let fdName = String(decoding: linkTarget[0..<max(0, linkLength)], as: UTF8.self)
say("bar2 size \(bar2Info.size) offset \(hex(bar2Info.offset)) fd \(fdName)")
let window = 4 << 20
guard
  let mapped = mmap(
    nil, window, PROT_READ | PROT_WRITE, MAP_SHARED, bar2FD, off_t(bar2Info.offset)),
  mapped != MAP_FAILED
else { fail("mmap BAR2: \(Errno(rawValue: errno))") }
let vram = UnsafeMutableRawBufferPointer(start: mapped, count: window)
let probe = pattern(65536, seed: 0x21)
vram.baseAddress!.advanced(by: 1 << 20).copyMemory(from: probe, byteCount: probe.count)
let readBack = must("BAR2 read") { () throws(VFIOUserClientError) in
  try client.read(region: VFIOPCIRegion.bar2, offset: 1 << 20, count: probe.count)
}
say(
  "bar2-mmap wrote \(probe.count) at 0x100000 read-through-server match \(readBack == probe ? 1 : 0)"
)

// 4. DMA windows the server must refuse.
let size = 2 << 20
let (memfd, buffer) = sharedBuffer(size)
let rw: VFIODMAMapFlags = [.read, .write]
say(
  "dma-map-nofd \(outcome { () throws(VFIOUserClientError) in try client.dmaMap(address: 0x2_0000_0000, size: 4096, flags: rw) })"
)
say(
  "dma-map-msi-window \(outcome { () throws(VFIOUserClientError) in try client.dmaMap(address: 0xFEE0_0000, size: 4096, flags: rw, fd: memfd) })"
)

// 5. MSI-X vector 0 wired to our eventfd: the server hands it to VFIO_DEVICE_SET_IRQS.
let efd = cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC)
guard efd >= 0 else { fail("eventfd") }
must("SET_IRQS MSI-X") { () throws(VFIOUserClientError) in
  try client.setIRQEventfds(
    index: VFIOPCIIRQ.msix, start: 0, fds: [FileDescriptor(rawValue: efd)], chunk: 16)
}
say("msix-eventfd set")

/// One copy-engine transfer; returns the final STATUS (then cleared).
@MainActor func copy(
  toDevice: Bool, vramOffset: UInt64, iova: UInt64, length: UInt32, interrupt: Bool
) -> UInt32 {
  copyEngine(
    client, toDevice: toDevice, vramOffset: vramOffset, iova: iova, length: length,
    interrupt: interrupt)
}

@MainActor func drainEventfd(waitingUpTo seconds: Int) -> UInt64 {
  for _ in 0..<(seconds * 100) {
    let n = cvfu_eventfd_drain(efd)
    if n > 0 { return UInt64(n) }
    usleep(10_000)
  }
  return 0
}

// 6. DMA into the client's memfd through the guest's IOMMU, then not after the unmap.
let iova: UInt64 = 0x1_0000_0000
memset(buffer.baseAddress!, 0, size)
let map = outcome { () throws(VFIOUserClientError) in
  try client.dmaMap(address: iova, size: UInt64(size), flags: rw, fd: memfd)
}
say("dma-map iova \(hex(iova)) size \(size) \(map)")
let source = pattern(size, seed: 0x5D)
vram.baseAddress!.copyMemory(from: source, byteCount: size)
_ = cvfu_eventfd_drain(efd)
var status = copy(toDevice: false, vramOffset: 0, iova: iova, length: UInt32(size), interrupt: true)
say("dma-mapped status \(hex(status & 0xFFFF)) match \(Array(buffer) == source ? 1 : 0)")
say("msix fired \(drainEventfd(waitingUpTo: 10))")
let upload = pattern(size, seed: 0x77)
buffer.baseAddress!.copyMemory(from: upload, byteCount: size)
status = copy(
  toDevice: true, vramOffset: UInt64(size), iova: iova, length: UInt32(size), interrupt: false)
say(
  "dma-to-device status \(hex(status & 0xFFFF)) match \(Array(UnsafeRawBufferPointer(rebasing: vram[size..<2 * size])) == upload ? 1 : 0)"
)
let unmapped = must("DMA_UNMAP") { () throws(VFIOUserClientError) in
  try client.dmaUnmap(address: iova, size: UInt64(size))
}
say("unmap size \(unmapped.size)")
memset(buffer.baseAddress!, 0x5A, size)
status = copy(toDevice: false, vramOffset: 0, iova: iova, length: UInt32(size), interrupt: false)
say(
  "dma-unmapped status \(hex(status & 0xFFFF)) errno \(status >> 16) untouched \(buffer.allSatisfy { $0 == 0x5A } ? 1 : 0)"
)

// 7. DEVICE_RESET: VFIO_DEVICE_RESET in the guest, a function-level reset of the host's VF.
wr(Reg.scratch(1), 0x600D_F00D)
let reset = outcome { () throws(VFIOUserClientError) in try client.reset() }
say("reset \(reset) scratch \(hex(rd(Reg.scratch(1))))")

// 8. What the host reads back from its own VF after the guest is gone (no reset after this).
enable()
let final: [UInt32] = [0x5EC0_0001, 0x5EC0_0002, 0x5EC0_0003, 0x5EC0_0004]
for (n, value) in final.enumerated() { wr(Reg.scratch(n), value) }
say("final-scratch \((0..<4).map { hex(rd(Reg.scratch($0))) }.joined(separator: " "))")
let finalVRAM = pattern(65536, seed: 0x99)
vram.baseAddress!.advanced(by: 1 << 20).copyMemory(from: finalVRAM, byteCount: finalVRAM.count)
say("final-vram offset 0x100000 size \(finalVRAM.count) seed 0x99")

// 9. A window left mapped at hang-up: the server must take it out of the IOMMU.
let leftover = outcome { () throws(VFIOUserClientError) in
  try client.dmaMap(address: iova, size: UInt64(size), flags: rw, fd: memfd)
}
say("left-mapped iova \(hex(iova)) \(leftover)")

munmap(mapped, window)
munmap(buffer.baseAddress, size)
try? memfd.close()
close(bar2FD)
say("check-done")
