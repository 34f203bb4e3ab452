import CVFIOUser
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

// BAR0 registers and the copy engine of the simulated VF, through `client`:
// the checks in main.swift and the live-update steps (LiveUpdate.swift) share them.

@MainActor func bar0Read(_ client: VFIOUserClient, _ offset: UInt64) -> UInt32 {
  must("BAR0 read \(hex(offset))") { () throws(VFIOUserClientError) in
    try client.read32(region: VFIOPCIRegion.bar0, offset: offset)
  }
}

@MainActor func bar0Write(_ client: VFIOUserClient, _ offset: UInt64, _ value: UInt32) {
  must("BAR0 write \(hex(offset))") { () throws(VFIOUserClientError) in
    try client.write32(region: VFIOPCIRegion.bar0, offset: offset, value)
  }
}

/// One copy-engine transfer between VRAM at `vramOffset` and `iova`; returns
/// the final STATUS (then cleared).
@MainActor func copyEngine(
  _ client: VFIOUserClient, toDevice: Bool, vramOffset: UInt64, iova: UInt64, length: UInt32,
  interrupt: Bool
) -> UInt32 {
  let (src, dst) = toDevice ? (iova, vramOffset) : (vramOffset, iova)
  bar0Write(client, Reg.dmaSrc, UInt32(truncatingIfNeeded: src))
  bar0Write(client, Reg.dmaSrc + 4, UInt32(truncatingIfNeeded: src >> 32))
  bar0Write(client, Reg.dmaDst, UInt32(truncatingIfNeeded: dst))
  bar0Write(client, Reg.dmaDst + 4, UInt32(truncatingIfNeeded: dst >> 32))
  bar0Write(client, Reg.dmaLen, length)
  bar0Write(
    client, Reg.dmaCtrl, (toDevice ? Reg.ctrlToDevice : 0) | (interrupt ? Reg.ctrlInterrupt : 0))
  bar0Write(client, Reg.dmaDoorbell, 1)
  for _ in 0..<60_000 {
    let status = bar0Read(client, Reg.dmaStatus)
    if status & Reg.busy == 0, status & (Reg.done | Reg.error) != 0 {
      bar0Write(client, Reg.dmaStatus, Reg.done | Reg.error)
      return status
    }
    usleep(500)
  }
  fail("copy engine timed out")
}
