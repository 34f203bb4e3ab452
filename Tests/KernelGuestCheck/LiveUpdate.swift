// `xe-vfu-guest-check --live-update SOCKET`: DMA through the guest's IOMMU
// across live updates of the kernel-backed server. One connection throughout:
// a DMA window of a memfd and an MSI-X eventfd are set up, the VF's copy
// engine moves bytes into the window and raises the vector, then
// `xe-vfio-user live-update -s SOCKET` replaces the server (twice, the second
// time with a second window), and after each the same client runs the engine
// again into the same windows and checks the bytes and the eventfd. Last, the
// server in charge then unmaps a window, and the engine can no longer reach it.
// VRAM from 2 MiB on is used (the main check's final bytes at 1 MiB stay).
import CVFIOUser
import SystemPackage
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

@MainActor func liveUpdateChecks(_ client: VFIOUserClient, socket: String) {
  func copy(toDevice: Bool, vram: UInt64, iova: UInt64, length: Int, interrupt: Bool) -> UInt32 {
    copyEngine(
      client, toDevice: toDevice, vramOffset: vram, iova: iova, length: UInt32(length),
      interrupt: interrupt)
  }

  // COMMAND: memory decode and bus mastering on (the earlier checks left them so; again anyway).
  let command = must("COMMAND read") { () throws(VFIOUserClientError) in
    try client.read(region: VFIOPCIRegion.config, offset: 4, count: 2)
  }
  must("COMMAND write") { () throws(VFIOUserClientError) in
    try client.write(region: VFIOPCIRegion.config, offset: 4, data: [command[0] | 0x6, command[1]])
  }
  let efd = cvfu_eventfd(0, O_NONBLOCK | O_CLOEXEC)
  guard efd >= 0 else { fail("eventfd") }
  must("SET_IRQS MSI-X") { () throws(VFIOUserClientError) in
    try client.setIRQEventfds(
      index: VFIOPCIIRQ.msix, start: 0, fds: [FileDescriptor(rawValue: efd)], chunk: 16)
  }
  func fired() -> Int64 {
    for _ in 0..<1000 {
      let n = cvfu_eventfd_drain(efd)
      if n > 0 { return n }
      usleep(10_000)
    }
    return 0
  }

  let rw: VFIODMAMapFlags = [.read, .write]
  let size = 1 << 20
  let half = size / 2
  let (memfd, buffer) = sharedBuffer(size)
  let iova: UInt64 = 0x1_0000_0000
  let map = outcome { () throws(VFIOUserClientError) in
    try client.dmaMap(address: iova, size: UInt64(size), flags: rw, fd: memfd)
  }
  say("lu-map iova \(hex(iova)) size \(size) \(map)")

  /// Through the device and back: the window's first half up to VRAM at
  /// `vram`, then down into its second half, raising MSI-X vector 0.
  func roundTrip(
    _ label: String, window: UnsafeMutableRawBufferPointer, iova: UInt64, vram: UInt64, seed: UInt8
  ) {
    let half = window.count / 2
    let bytes = pattern(half, seed: seed)
    window.baseAddress!.copyMemory(from: bytes, byteCount: half)
    memset(window.baseAddress! + half, 0, half)
    _ = cvfu_eventfd_drain(efd)
    let up = copy(toDevice: true, vram: vram, iova: iova, length: half, interrupt: false)
    let down = copy(
      toDevice: false, vram: vram, iova: iova + UInt64(half), length: half, interrupt: true)
    let match = Array(UnsafeRawBufferPointer(rebasing: window[half...])) == bytes
    say(
      "\(label) status \(hex(up & 0xFFFF)) \(hex(down & 0xFFFF)) match \(match ? 1 : 0) msix \(fired() > 0 ? 1 : 0)"
    )
  }

  func liveUpdate(_ label: String) { runLiveUpdate(label, socket: socket) }

  roundTrip("lu-before", window: buffer, iova: iova, vram: 2 << 20, seed: 0x31)
  liveUpdate("lu-update-1")
  roundTrip("lu-after-1", window: buffer, iova: iova, vram: 3 << 20, seed: 0x47)

  // A second window, mapped (pinned) by the new process, then a second update with both.
  let (memfd2, buffer2) = sharedBuffer(size)
  let iova2 = iova + UInt64(size) * 4
  let map2 = outcome { () throws(VFIOUserClientError) in
    try client.dmaMap(address: iova2, size: UInt64(size), flags: rw, fd: memfd2)
  }
  say("lu-map-2 iova \(hex(iova2)) \(map2)")
  roundTrip("lu-window-2", window: buffer2, iova: iova2, vram: 4 << 20, seed: 0x52)
  liveUpdate("lu-update-2")
  roundTrip("lu-after-2", window: buffer, iova: iova, vram: 5 << 20, seed: 0x63)
  roundTrip("lu-after-2-window-2", window: buffer2, iova: iova2, vram: 6 << 20, seed: 0x74)

  // The server now in charge unmaps the first window: the engine no longer reaches it.
  let unmapped = outcome { () throws(VFIOUserClientError) in
    _ = try client.dmaUnmap(address: iova, size: UInt64(size))
  }
  memset(buffer.baseAddress!, 0x5A, size)
  let status = copy(toDevice: false, vram: 2 << 20, iova: iova, length: half, interrupt: false)
  say(
    "lu-unmapped \(unmapped) status \(hex(status & 0xFFFF)) errno \(status >> 16) untouched \(buffer.allSatisfy { $0 == 0x5A } ? 1 : 0)"
  )
  munmap(buffer.baseAddress, size)
  munmap(buffer2.baseAddress, size)
  close(memfd.rawValue)
  close(memfd2.rawValue)
  close(efd)
  say("lu-done")
}

/// `xe-vfio-user live-update -s SOCKET`, its exit status and first line of output said as `label`.
func runLiveUpdate(_ label: String, socket: String) {
  let output = "/tmp/live-update-\(label).txt"
  let status = system("/bin/xe-vfio-user live-update -s \(socket) >\(output) 2>&1")
  let fd = open(output, O_RDONLY)
  var text = [UInt8](repeating: 0, count: 2048)
  let n = fd >= 0 ? read(fd, &text, text.count) : 0
  if fd >= 0 { close(fd) }
  let line = String(decoding: text[0..<max(0, n)], as: UTF8.self).split(separator: "\n").first
  say("\(label) exit \((status >> 8) & 0xFF) \(line.map(String.init) ?? "")")
}
