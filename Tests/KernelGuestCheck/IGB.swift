// `xe-vfu-guest-check --igb SOCKET VF-ADDRESS`: the checks for a real SR-IOV VF,
// an igbvf function of QEMU's igb (82576) that the guest kernel created through
// sriov_numvfs and bound to vfio-pci, served by `xe-vfio-user serve --device
// vfio:<VF>`. Each check prints one "XEVF: key value..." line.
//
// The register offsets are the 82576 VF's (Linux drivers/net/ethernet/intel/igbvf/regs.h).
import CVFIOUser
import SystemPackage
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

enum IGBVFReg {
  /// Extended interrupt cause set / mask set: bit n is MSI-X vector n.
  static let eics: UInt64 = 0x1520
  static let eims: UInt64 = 0x1524
  /// Auto-clear, and the cause register (write 1 to clear).
  static let eiac: UInt64 = 0x152C
  static let eicr: UInt64 = 0x1580
  /// Receive descriptor control of the VF's queue 0; FLR clears its enable bit.
  static let rxdctl0: UInt64 = 0x2828
  static let rxdctlEnable: UInt32 = 1 << 25
}

/// The last path component of a symbolic link's target, or "none".
func linkName(_ path: String) -> String {
  var target = [UInt8](repeating: 0, count: 512)
  let n = target.withUnsafeMutableBytes {
    readlink(path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), 511)
  }
  guard n > 0 else { return "none" }
  return String(decoding: target[0..<n], as: UTF8.self).split(separator: "/").last.map(
    String.init) ?? "none"
}

/// A sysfs file's bytes (at most 4096).
func sysfsBytes(_ path: String) -> [UInt8] {
  let fd = open(path, O_RDONLY)
  guard fd >= 0 else { fail("open \(path)") }
  defer { close(fd) }
  var bytes = [UInt8](repeating: 0, count: 4096)
  let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
  guard n > 0 else { fail("read \(path)") }
  return Array(bytes[0..<n])
}

func le16(_ bytes: [UInt8], _ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }
func le32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
  UInt32(le16(bytes, at)) | UInt32(le16(bytes, at + 2)) << 16
}

/// The offset of capability `id` in the standard list, or nil.
func capability(_ id: UInt8, in config: [UInt8]) -> Int? {
  guard le16(config, 6) & 0x10 != 0 else { return nil }
  var at = Int(config[0x34] & 0xFC)
  var hops = 0
  while at != 0, at + 1 < config.count, hops < 48 {
    if config[at] == id { return at }
    at = Int(config[at + 1] & 0xFC)
    hops += 1
  }
  return nil
}

/// Waits up to `milliseconds` for the eventfd to count; returns the count.
func waitEventfd(_ fd: Int32, milliseconds: Int) -> Int64 {
  for _ in 0..<(milliseconds / 10) {
    let n = cvfu_eventfd_drain(fd)
    if n > 0 { return n }
    usleep(10_000)
  }
  return 0
}

@MainActor func igbVFChecks(_ client: VFIOUserClient, address: String) {
  let sysfs = "/sys/bus/pci/devices/\(address)"
  // 1. SR-IOV enumeration: the VF's physfn is the PF, whose virtfn0 is the VF.
  let pf = linkName("\(sysfs)/physfn")
  say("sriov-physfn \(pf)")
  say("sriov-virtfn0 \(linkName("/sys/bus/pci/devices/\(pf)/virtfn0"))")

  let info = must("DEVICE_GET_INFO") { () throws(VFIOUserClientError) in try client.deviceInfo() }
  say(
    "device-info pci \(info.flags.contains(.pci) ? 1 : 0) reset \(info.flags.contains(.reset) ? 1 : 0) regions \(info.numRegions) irqs \(info.numIRQs)"
  )

  // 2. Config space through the server against the guest kernel's sysfs view.
  let configSize = must("config region") { () throws(VFIOUserClientError) in
    try client.regionInfo(VFIOPCIRegion.config).info.size
  }
  // A VF's own vendor and device IDs read as all-ones (SR-IOV 1.1, 3.4.1.1): sysfs
  // `config` shows that, while vfio-pci reports the IDs the kernel keeps for the
  // VF, which are sysfs `vendor` and `device`. Those stand in for the first 4 bytes
  // of the kernel's view, and the BAR type bits below for its BARs.
  var kernel = sysfsBytes("\(sysfs)/config")
  say("config-sysfs-ids \(String(le32(kernel, 0), radix: 16))")
  let id = { (name: String) -> UInt16 in
    let text = String(decoding: sysfsBytes("\(sysfs)/\(name)"), as: UTF8.self)
    return UInt16(text.dropFirst(2).prefix { $0.isHexDigit }, radix: 16) ?? 0
  }
  let (vendor, device) = (id("vendor"), id("device"))
  kernel[0..<4] = [
    UInt8(vendor & 0xFF), UInt8(vendor >> 8), UInt8(device & 0xFF), UInt8(device >> 8),
  ]
  // Its BARs read as zero too (the PF's SR-IOV capability holds their base): vfio-pci
  // reports, for each BAR the kernel assigned (sysfs `resource`), the type bits alone.
  var virtualized = ["ids"]
  let resources = String(decoding: sysfsBytes("\(sysfs)/resource"), as: UTF8.self)
    .split(separator: "\n").prefix(6).map {
      $0.split(separator: " ").map { UInt64($0.dropFirst(2), radix: 16) ?? 0 }
    }
  for (bar, fields) in resources.enumerated()
  where fields.count == 3 && fields[0] != 0 && le32(kernel, 0x10 + 4 * bar) == 0 {
    let flags = fields[2]
    // IORESOURCE_IO; else IORESOURCE_MEM_64 and IORESOURCE_PREFETCH
    let type: UInt8 =
      flags & 0x100 != 0 ? 1 : (flags & 0x10_0000 != 0 ? 4 : 0) | (flags & 0x2000 != 0 ? 8 : 0)
    kernel[0x10 + 4 * bar] = type
    virtualized.append("bar\(bar)=\(hex(type))")
  }
  say("config-vf-virtualized \(virtualized.joined(separator: " "))")
  let compared = min(Int(configSize), kernel.count)
  let served = must("config read") { () throws(VFIOUserClientError) in
    try client.read(region: VFIOPCIRegion.config, offset: 0, count: compared)
  }
  let differing = (0..<compared).filter { served[$0] != kernel[$0] }
  say(
    "config \(compared) bytes match \(differing.isEmpty ? 1 : 0)"
      + (differing.isEmpty
        ? "" : " differ \(differing.prefix(16).map { hex($0) }.joined(separator: ","))")
  )
  say("config-ids \(String(le32(served, 0), radix: 16))")

  // 3. The MSI-X capability (through the server) and the IRQ info the server reports.
  guard let msix = capability(0x11, in: served) else { fail("no MSI-X capability") }
  let control = le16(served, msix + 2)
  let vectors = Int(control & 0x7FF) + 1
  let table = le32(served, msix + 4)
  let pba = le32(served, msix + 8)
  say(
    "msix-cap offset \(hex(msix)) vectors \(vectors) table bar\(table & 7)+\(hex(table & ~7)) pba bar\(pba & 7)+\(hex(pba & ~7)) kernel-vectors \(Int(le16(kernel, msix + 2) & 0x7FF) + 1)"
  )
  let flr = capability(0x10, in: served).map { le32(served, $0 + 4) & (1 << 28) != 0 } ?? false
  say("pcie-flr \(flr ? 1 : 0)")
  let msixInfo = must("GET_IRQ_INFO MSI-X") { () throws(VFIOUserClientError) in
    try client.irqInfo(VFIOPCIIRQ.msix)
  }
  let intxInfo = must("GET_IRQ_INFO INTx") { () throws(VFIOUserClientError) in
    try client.irqInfo(VFIOPCIIRQ.intx)
  }
  say(
    "irq-info msix \(msixInfo.count) flags \(hex(msixInfo.flags.rawValue)) intx \(intxInfo.count)")

  // Memory decoding and bus mastering (an MSI is a write by the device).
  let command = le16(served, 4) | 0x6
  must("COMMAND write") { () throws(VFIOUserClientError) in
    try client.write(
      region: VFIOPCIRegion.config, offset: 4,
      data: withUnsafeBytes(of: command.littleEndian) { Array($0) })
  }
  @MainActor func rd(_ offset: UInt64) -> UInt32 {
    must("BAR0 read \(hex(offset))") { () throws(VFIOUserClientError) in
      try client.read32(region: VFIOPCIRegion.bar0, offset: offset)
    }
  }
  @MainActor func wr(_ offset: UInt64, _ value: UInt32) {
    must("BAR0 write \(hex(offset))") { () throws(VFIOUserClientError) in
      try client.write32(region: VFIOPCIRegion.bar0, offset: offset, value)
    }
  }

  // 4. An eventfd per MSI-X vector through VFIO_DEVICE_SET_IRQS; the device
  // raises vector 0 when its EICS bit is set (with the bit enabled in EIMS).
  let fds = (0..<Int(msixInfo.count)).map { _ in cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC) }
  guard !fds.isEmpty, fds.allSatisfy({ $0 >= 0 }) else { fail("eventfds") }
  must("SET_IRQS MSI-X") { () throws(VFIOUserClientError) in
    try client.setIRQEventfds(
      index: VFIOPCIIRQ.msix, start: 0, fds: fds.map(FileDescriptor.init(rawValue:)), chunk: 16)
  }
  say("msix-eventfd set \(fds.count)")
  let enabled = le16(
    must("MSI-X control read") { () throws(VFIOUserClientError) in
      try client.read(region: VFIOPCIRegion.config, offset: UInt64(msix + 2), count: 2)
    }, 0)
  say("msix-enabled \(enabled & 0x8000 != 0 ? 1 : 0)")
  // Each raised cause clears itself (EIAC), so every EICS write is a new edge.
  wr(IGBVFReg.eiac, 0x7)
  wr(IGBVFReg.eicr, 0x7)
  wr(IGBVFReg.eims, 0x7)
  for fd in fds { _ = cvfu_eventfd_drain(fd) }
  wr(IGBVFReg.eics, 0x1)
  let fired0 = waitEventfd(fds[0], milliseconds: 5000)
  wr(IGBVFReg.eics, 0x2)
  let fired1 = fds.count > 1 ? waitEventfd(fds[1], milliseconds: 5000) : 0
  say("msix-fired vector0 \(fired0) vector1 \(fired1)")
  // Teardown: DATA_NONE with count 0 disables MSI-X; the same cause then reaches no eventfd.
  let teardown = outcome { () throws(VFIOUserClientError) in
    try client.setIRQs(
      IRQSetPayload(
        flags: [.dataNone, .actionTrigger], index: VFIOPCIIRQ.msix,
        start: 0, count: 0))
  }
  let disabled = le16(
    must("MSI-X control read") { () throws(VFIOUserClientError) in
      try client.read(region: VFIOPCIRegion.config, offset: UInt64(msix + 2), count: 2)
    }, 0)
  wr(IGBVFReg.eics, 0x1)
  say(
    "msix-teardown \(teardown) enabled \(disabled & 0x8000 != 0 ? 1 : 0) fired-after \(waitEventfd(fds[0], milliseconds: 500))"
  )
  for fd in fds { close(fd) }

  // 5. DEVICE_RESET: VFIO_DEVICE_RESET, an FLR of the VF (the kernel restores
  // config space around it, so the evidence is a device register: the queue enable).
  let before = rd(IGBVFReg.rxdctl0)
  wr(IGBVFReg.rxdctl0, before | IGBVFReg.rxdctlEnable)
  let set = rd(IGBVFReg.rxdctl0)
  let reset = outcome { () throws(VFIOUserClientError) in try client.reset() }
  let after = rd(IGBVFReg.rxdctl0)
  say("reset \(reset) rxdctl0 set \(hex(set)) after \(hex(after))")
  say("check-done")
}
