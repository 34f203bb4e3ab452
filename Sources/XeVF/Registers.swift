/// The BAR0 layout of the simulated VF.
///
/// BAR0 is 16 MiB: registers at 0–4 MiB, reserved at 4–8 MiB and the GGTT
/// window at 8–16 MiB (protocol/xe-kernel-facts.md §13). GMD_ID and the VF scratch
/// registers sit at their xe driver offsets. The DMA engine, the MSI-X table
/// and PBA and the SRAM window are the simulator's own (real VFs submit work
/// through GuC, which is not modelled); they live in the top of the register
/// range, where no xe register the simulator models is placed.
///
/// Register accesses are 1, 2, 4 or 8 bytes, naturally aligned. An 8-byte
/// access to the register range is performed as two 4-byte accesses, low
/// dword first, as a CPU's split MMIO would; unknown offsets read 0 and ignore
/// writes.
public enum XeSimRegisters {
  public static let bar0Size: UInt64 = 16 << 20
  /// End of the register range (the GGTT window starts at 8 MiB, after a reserved hole).
  public static let registerRangeEnd: UInt64 = 4 << 20

  /// GMD_ID of the primary GT (read-only, `XeProfile.gmdID`).
  public static let gmdID: UInt64 = 0x0D8C
  /// GMD_ID of the media GT, at the media GSI offset 0x380000 (read-only).
  public static let mediaGMDID: UInt64 = 0x38_0D8C

  /// Scratch registers per GT (VF_SW_FLAG(0..3)); read/write, cleared by FLR.
  public static let scratchCount = 4
  /// VF_SW_FLAG(n) of the primary GT.
  public static func vfSwFlag(_ n: Int) -> UInt64 { 0x19_0240 + 4 * UInt64(n) }
  /// MED_VF_SW_FLAG(n) of the media GT.
  public static func mediaVFSwFlag(_ n: Int) -> UInt64 { 0x19_0310 + 4 * UInt64(n) }
  /// The scratch register `index` of GT `gt` (0 primary, 1 media).
  public static func scratch(gt: Int, index: Int) -> UInt64 {
    gt == 0 ? vfSwFlag(index) : mediaVFSwFlag(index)
  }

  /// 64 KiB of on-device SRAM, the DMA engine's device memory on profiles
  /// without VRAM (ptl, wcl). Reads 0 and ignores writes on bmg.
  public static let sram: UInt64 = 0x20_0000
  public static let sramSize: UInt64 = 64 << 10

  /// MSI-X table: `msixVectors` entries of 16 bytes (address low, address
  /// high, data, vector control with bit 0 = masked; masked after reset).
  public static let msixTable: UInt64 = 0x3F_8000
  /// MSI-X pending bit array: one read-only qword, bit n = vector n pending.
  public static let msixPBA: UInt64 = 0x3F_9000
  public static let msixVectors = 16
  public static let msixEntrySize: UInt64 = 16
  public static let msixVectorControl: UInt64 = 12
  public static let msixVectorMasked: UInt32 = 1 << 0

  /// The GGTT window: 8-byte PTEs. Only the VF's quota (`XeProfile.ggttQuota`
  /// / 4096 PTEs, from the start of the window) is backed; the rest reads 0
  /// and ignores writes. FLR clears it, as the PF's config sanitizing does.
  public static let ggttWindow: UInt64 = 8 << 20
  public static let ggttWindowSize: UInt64 = 8 << 20

  /// A one-channel copy engine between device memory (VRAM on bmg, SRAM
  /// otherwise) and client memory, so DMA and MSI-X can be exercised.
  ///
  /// Program SRC, DST, LEN and CTRL, then write anything to DOORBELL. The
  /// transfer runs after the reply to that write; STATUS shows busy, then done
  /// or error with the errno in bits 16–31 (EPERM: bus mastering off; EINVAL:
  /// LEN 0 or the device range outside device memory; EBUSY: a doorbell while
  /// busy, which leaves the running transfer alone; other values come from
  /// the client's DMA; ENODEV: no client attached). A doorbell that starts a
  /// transfer clears done, error and errno; every started transfer, failed or
  /// not, bumps COMPLETED and, when CTRL asks for it, raises its MSI-X vector.
  /// A reset makes the engine idle and drops the completions still to come.
  /// While the VF is paused for migration a doorbell is accepted (busy) but
  /// its transfer starts only on resume, and interrupts wait for resume too.
  public enum DMA {
    public static let base: UInt64 = 0x3F_0000
    /// u64: device memory offset (to client) or client address (to device).
    public static let src: UInt64 = base + 0x00
    /// u64: client address (to client) or device memory offset (to device).
    public static let dst: UInt64 = base + 0x08
    /// u32: bytes to copy.
    public static let len: UInt64 = base + 0x10
    /// u32: direction, vector, interrupt enable.
    public static let ctrl: UInt64 = base + 0x14
    /// u32, write-only: any write starts a transfer.
    public static let doorbell: UInt64 = base + 0x18
    /// u32: busy (RO), done and error (write 1 to clear), errno in 16–31.
    public static let status: UInt64 = base + 0x1C
    /// u32, read-only: transfers finished since reset.
    public static let completed: UInt64 = base + 0x20
    public static let blockSize: UInt64 = 0x24

    /// CTRL bit 0: 0 = device memory → client memory, 1 = client memory → device memory.
    public static let ctrlToDevice: UInt32 = 1 << 0
    public static let ctrlVectorShift: UInt32 = 8
    public static let ctrlVectorMask: UInt32 = 0xFF << 8
    /// CTRL bit 31: raise the MSI-X vector in bits 8–15 on completion.
    public static let ctrlInterrupt: UInt32 = 1 << 31

    public static let statusBusy: UInt32 = 1 << 0
    public static let statusDone: UInt32 = 1 << 1
    public static let statusError: UInt32 = 1 << 2
    public static let statusErrnoShift: UInt32 = 16

    /// A CTRL value.
    public static func control(toDevice: Bool, vector: UInt8 = 0, interrupt: Bool = false) -> UInt32
    {
      (toDevice ? ctrlToDevice : 0) | UInt32(vector) << ctrlVectorShift
        | (interrupt ? ctrlInterrupt : 0)
    }
    /// The errno a STATUS value carries (0 when none).
    public static func errno(ofStatus status: UInt32) -> Int32 { Int32(status >> statusErrnoShift) }
  }
}

/// The config space layout of the simulated VF: a type 0 header, a PCI
/// Express capability (endpoint, FLR capable) and an MSI-X capability. No PM
/// capability ("our VFs do not implement the PM capability", xe_pci_sriov.c)
/// and no extended capabilities (the header at 0x100 reads 0).
public enum XePCIConfig {
  public static let size = 4096
  public static let commandIO: UInt16 = 1 << 0
  public static let commandMemory: UInt16 = 1 << 1
  public static let commandBusMaster: UInt16 = 1 << 2
  public static let commandINTxDisable: UInt16 = 1 << 10
  public static let statusCapList: UInt16 = 1 << 4

  public static let capPCIe: UInt8 = 0x10
  public static let capMSIX: UInt8 = 0x11
  public static let pcieCap = 0x40
  public static let msixCap = 0x80

  /// Device Capabilities bit 28: Function Level Reset capable.
  public static let devCapFLR: UInt32 = 1 << 28
  /// Offset of Device Control in the PCIe capability; bit 15 initiates an FLR.
  public static let devCtl = 0x08
  public static let devCtlInitiateFLR: UInt16 = 1 << 15
  /// MSI-X Message Control bits.
  public static let msixEnable: UInt16 = 1 << 15
  public static let msixFunctionMask: UInt16 = 1 << 14
}
