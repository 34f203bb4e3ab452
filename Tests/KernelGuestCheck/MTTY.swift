// `xe-vfu-guest-check --mtty STEP SOCKET [ARG]`: the checks for an mdev of the
// Linux sample driver mtty (samples/vfio-mdev/mtty.c, a 16550-like serial port
// in BAR0 with VFIO migration through a kernel data_fd), served by
// `xe-vfio-user serve --device mdev:<UUID>`. Each step prints "XEVF: key value..."
// lines for the host test. mtty loops its transmit FIFO back: a byte written to
// THR (BAR0 + 0) is the next byte read from RBR (BAR0 + 0); the FIFO holds 16.
//
//   probe SOCKET        device, regions, interrupts and migration flags as the client sees them
//   reset SOCKET        RUNNING → STOP_COPY, part of the stream read, DEVICE_RESET:
//                       the stream then answers ENODEV and the device is RUNNING
//   write SOCKET TEXT   TEXT into the FIFO, byte by byte
//   read SOCKET COUNT   COUNT bytes out of the FIFO (and the line status after)
//   live-update SOCKET  with a DMA window mapped, `xe-vfio-user live-update` is refused
//                       (an mdev's container has no VFIO_UPDATE_VADDR); without, it
//                       goes through, and the FIFO still reads data ready
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

enum MTTYReg {
  /// Transmit holding (write) / receive buffer (read), with DLAB clear.
  static let data: UInt64 = 0
  /// Line status: bit 0 is "data ready".
  static let lineStatus: UInt64 = 5
}

func mttyRead8(_ client: VFIOUserClient, _ offset: UInt64) -> UInt8 {
  must("BAR0 read at \(offset)") { () throws(VFIOUserClientError) in
    try client.read(region: VFIOPCIRegion.bar0, offset: offset, count: 1)[0]
  }
}

@MainActor func mttyChecks(_ client: VFIOUserClient, step: String, argument: String?) {
  switch step {
  case "probe":
    let info = must("DEVICE_GET_INFO") { () throws(VFIOUserClientError) in try client.deviceInfo() }
    say(
      "mtty-device pci \(info.flags.contains(.pci) ? 1 : 0) regions \(info.numRegions) irqs \(info.numIRQs)"
    )
    let config = must("config") { () throws(VFIOUserClientError) in
      try client.read(region: VFIOPCIRegion.config, offset: 0, count: 4)
    }
    say("mtty-ids \(String(le32(config, 0), radix: 16))")
    let bar0 = must("BAR0 info") { () throws(VFIOUserClientError) in
      try client.regionInfo(VFIOPCIRegion.bar0).info
    }
    say("mtty-bar0 size \(bar0.size) mmap \(bar0.flags.contains(.mmap) ? 1 : 0)")
    let irqs = [VFIOPCIIRQ.intx, VFIOPCIIRQ.msi, VFIOPCIIRQ.msix].map { index in
      let count = (try? client.irqInfo(index).count) ?? 0
      return "\(VFIOPCIIRQ.name(index)) \(count)"
    }
    say("mtty-irqs \(irqs.joined(separator: " "))")
    let flags = must("MIGRATION") { () throws(VFIOUserClientError) in try client.migrationFlags() }
    let names = [(MigrationFlags.stopCopy, "STOP_COPY"), (.p2p, "P2P"), (.preCopy, "PRE_COPY")]
      .filter { flags.contains($0.0) }.map(\.1)
    say("mtty-migration \(names.joined(separator: "|"))")
    let state = must("state") { () throws(VFIOUserClientError) in try client.migrationState() }
    say("mtty-state \(state)")
  case "reset":
    must("STOP") { () throws(VFIOUserClientError) in try client.setMigrationState(.stop) }
    must("STOP_COPY") { () throws(VFIOUserClientError) in try client.setMigrationState(.stopCopy) }
    let size = (try? client.stopCopySize()) ?? 0
    let head = must("MIG_DATA_READ") { () throws(VFIOUserClientError) in
      try client.migDataRead(size: 8)
    }
    say("mtty-reset stop-copy-size \(size) read \(head.count)")
    must("DEVICE_RESET") { () throws(VFIOUserClientError) in try client.reset() }
    let after = outcome { () throws(VFIOUserClientError) in _ = try client.migDataRead(size: 8) }
    let state = must("state") { () throws(VFIOUserClientError) in try client.migrationState() }
    say("mtty-after-reset read \(after) state \(state)")
  case "write":
    let text = Array((argument ?? "").utf8)
    for byte in text {
      must("THR write") { () throws(VFIOUserClientError) in
        try client.write(region: VFIOPCIRegion.bar0, offset: MTTYReg.data, data: [byte])
      }
    }
    say("mtty-wrote \(text.count) lsr \(hex(mttyRead8(client, MTTYReg.lineStatus)))")
  case "read":
    let count = Int(argument ?? "") ?? 0
    let bytes = (0..<count).map { _ in mttyRead8(client, MTTYReg.data) }
    say("mtty-read \(String(decoding: bytes, as: UTF8.self))")
    say("mtty-read-lsr \(hex(mttyRead8(client, MTTYReg.lineStatus)))")
  case "live-update":
    let (memfd, buffer) = sharedBuffer(1 << 20)
    let window: UInt64 = 0x1_0000_0000
    say(
      "mtty-lu-map \(outcome { () throws(VFIOUserClientError) in try client.dmaMap(address: window, size: 1 << 20, flags: [.read, .write], fd: memfd) })"
    )
    runLiveUpdate("mtty-lu-refused", socket: socket)
    say(
      "mtty-lu-unmap \(outcome { () throws(VFIOUserClientError) in _ = try client.dmaUnmap(address: window, size: 1 << 20) })"
    )
    runLiveUpdate("mtty-lu-update", socket: socket)
    say("mtty-lu-lsr \(hex(mttyRead8(client, MTTYReg.lineStatus)))")
    munmap(buffer.baseAddress, buffer.count)
    close(memfd.rawValue)
  default:
    fail("unknown mtty step \(step)")
  }
}
