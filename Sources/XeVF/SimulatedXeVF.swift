import Logging
import SystemPackage
import VFIODevice
import VFIOUser

/// A software Intel Xe SR-IOV VF: config space, BAR0 registers and GGTT
/// window, VRAM as BAR2 (bmg), MSI-X, FLR, and a DMA engine that exercises
/// the server's DMA and interrupt paths. Behind it sits the PF's side of
/// live migration (`SimulatedPF`, Migration/): pause, save, restore, FLR.
///
/// Not Sendable: one connection thread owns it, and every call, the host's
/// deferred work and DMA completions included, arrives on that thread.
public final class SimulatedXeVF: VFIODeviceBackend {
  public let profile: XeProfile
  /// Size of BAR2 (0 on profiles without VRAM).
  public let vramSize: UInt64
  /// The PF's 1-based number for this VF (`pci_iov_vf_id + 1`); its GGTT
  /// PTEs carry it in the VFID field.
  public let vfid: UInt16
  var logger: Logger
  /// VRAM, or the SRAM block on profiles without VRAM.
  let memory: DeviceMemory
  var config: ConfigSpace
  var registers: RegisterFile
  var msix = MSIXState()
  var dma = DMAEngine()
  /// The client's interrupt eventfds, with vfio-pci's SET_IRQS semantics in software.
  var irqs = IRQEmulation(
    (0..<VFIOPCIIRQ.count).map {
      SimulatedXeVF.describeIRQ($0) ?? IRQDescription(index: $0, count: 0, flags: [])
    })
  /// Sees every interrupt the device raises towards the client, before
  /// SET_IRQS masking (tests: the order of interrupts, which eventfds cannot tell).
  var interruptTap: ((_ index: UInt32, _ vector: UInt32) -> Void)?
  /// The PF's control state machine and migration data for this VF.
  let pf: SimulatedPF
  var migration = VFMigration()
  /// Held strongly until the server detaches it (`attach(host: nil)` on hang-up).
  var host: DeviceHost?
  /// The pages the DMA engine wrote into fd-backed windows, while the client logs them.
  var dirtyLog: DirtyPageLog?
  public internal(set) var resetCount = 0

  public let deviceFlags: VFIODeviceFlags = [.pci, .reset]
  public let regionCount = VFIOPCIRegion.count
  public let irqCount = VFIOPCIIRQ.count

  /// - Parameters:
  ///   - vramSize: BAR2 size for profiles with VRAM: a power of two of at
  ///     least 1 MiB (default `profile.defaultVRAMSize`). Must be nil or 0 for
  ///     profiles without VRAM.
  ///   - vfid: the PF's number for the VF, 1 or more.
  /// - Throws: EINVAL for a bad size, or the errno of memfd_create, ftruncate or mmap.
  public convenience init(
    profile: XeProfile = .bmg, vramSize: UInt64? = nil, vfid: UInt16 = 1,
    logger: Logger = Logger(label: "xe-vfio-user.xe-vf")
  ) throws(Errno) {
    guard vfid > 0, vfid < 1 << 10 else { throw .invalidArgument }  // the PTE's VFID field is 10 bits
    if profile.hasVRAM {
      let size = vramSize ?? profile.defaultVRAMSize
      guard size >= 1 << 20, size.nonzeroBitCount == 1 else { throw .invalidArgument }
      self.init(
        profile: profile, vfid: vfid, logger: logger,
        memory: try DeviceMemory.vram(size: size, name: "xe-vf-\(profile.name)-vram"))
    } else {
      guard vramSize ?? 0 == 0 else { throw .invalidArgument }
      self.init(
        profile: profile, vfid: vfid, logger: logger,
        memory: DeviceMemory.sram(size: XeSimRegisters.sramSize))
    }
  }

  /// A device in its reset state over `memory` (checked by the caller: VRAM
  /// of a valid size, or SRAM on a profile without VRAM).
  init(profile: XeProfile, vfid: UInt16, logger: Logger, memory: DeviceMemory) {
    self.profile = profile
    self.vfid = vfid
    self.logger = logger
    self.logger[metadataKey: "xe-vf"] = "\(profile.name)"
    self.memory = memory
    vramSize = memory.fd >= 0 ? memory.size : 0
    config = ConfigSpace(profile: profile, bar2Size: vramSize)
    registers = RegisterFile(profile: profile)
    pf = SimulatedPF(profile: profile, vramSize: vramSize, logger: self.logger)
  }

  deinit { pf.shutdown() }

  // MARK: Description

  public func region(_ index: UInt32) -> RegionDescription? {
    switch index {
    case VFIOPCIRegion.bar0:
      return RegionDescription(index: index, size: XeSimRegisters.bar0Size)
    case VFIOPCIRegion.bar2 where vramSize > 0:
      return RegionDescription(
        index: index, size: vramSize,
        mmap: MmapSource(fd: FileDescriptor(rawValue: memory.fd), offset: 0),
        sparseAreas: [SparseMmapArea(offset: 0, size: vramSize)])
    case VFIOPCIRegion.config:
      return RegionDescription(index: index, size: UInt64(XePCIConfig.size))
    case 0..<regionCount:
      // BAR1 and BAR3 are the upper halves of 64-bit BARs; BAR4, BAR5, ROM and VGA are absent.
      return RegionDescription(index: index, size: 0, readable: false, writable: false)
    default:
      return nil
    }
  }

  /// Counts and flags as vfio-pci reports them for a VF: INTx is maskable and
  /// automasked but has no vector (pin 0), MSI has none (no capability), MSI-X
  /// resizes dynamically (no NORESIZE), ERR and REQ have one vector each.
  public func irq(_ index: UInt32) -> IRQDescription? { Self.describeIRQ(index) }

  static func describeIRQ(_ index: UInt32) -> IRQDescription? {
    let eventfd = VFIOIRQInfoFlags.eventfd
    switch index {
    case VFIOPCIIRQ.intx:
      return IRQDescription(
        index: index, count: 0,
        flags: [eventfd, .maskable, .automasked])
    case VFIOPCIIRQ.msi:
      return IRQDescription(index: index, count: 0, flags: [eventfd, .noresize])
    case VFIOPCIIRQ.msix:
      return IRQDescription(index: index, count: UInt32(MSIXState.vectors), flags: eventfd)
    case VFIOPCIIRQ.err, VFIOPCIIRQ.req:
      return IRQDescription(index: index, count: 1, flags: [eventfd, .noresize])
    default: return nil
    }
  }

  // MARK: Access

  public func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  {
    switch region {
    case VFIOPCIRegion.config:
      try ConfigSpace.validate(offset: offset, count: buffer.count, isWrite: false)
      config.read(offset: Int(offset), into: buffer)
    case VFIOPCIRegion.bar0:
      try readBAR0(offset: offset, into: buffer)
    case VFIOPCIRegion.bar2 where vramSize > 0:
      try checkVRAM(offset: offset, count: buffer.count)
      VRAMReader(memory).copy(from: offset, into: buffer)
    default:
      throw .invalidArgument
    }
  }

  /// VRAM reads have no side effects, so large ones may leave straight from
  /// it, where that allocates none of its holes (`VRAMReader.span`).
  public func directRead(region: UInt32, offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
    guard region == VFIOPCIRegion.bar2, vramSize > 0 else { return nil }
    return VRAMReader(memory).span(at: offset, count: count)
  }

  public func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer)
    throws(Errno)
  {
    switch region {
    case VFIOPCIRegion.config:
      try ConfigSpace.validate(offset: offset, count: buffer.count, isWrite: true)
      let effects = config.write(offset: Int(offset), from: buffer)
      if effects.contains(.flr) {
        functionLevelReset(reason: "PCIe FLR")
      } else if effects.contains(.msixControl) {
        deliverPendingMSIX()
      }
    case VFIOPCIRegion.bar0:
      try writeBAR0(offset: offset, from: buffer)
    case VFIOPCIRegion.bar2 where vramSize > 0:
      try checkVRAM(offset: offset, count: buffer.count)
      memory.buffer(offset: offset, length: UInt64(buffer.count)).copyMemory(from: buffer)
    default:
      throw .invalidArgument
    }
  }

  private func checkVRAM(offset: UInt64, count: Int) throws(Errno) {
    guard memory.contains(offset: offset, length: UInt64(count)) else { throw .invalidArgument }
  }

  // MARK: Lifecycle

  public func reset() throws(Errno) { functionLevelReset(reason: "DEVICE_RESET") }

  public func attach(host: DeviceHost?) {
    self.host = host
    logger.debug("\(host == nil ? "client detached" : "client attached")")
  }

  // MARK: Interrupts

  /// SET_IRQS, applied in software (the VF's interrupts are simulated too).
  public func setIRQs(_ request: consuming IRQSetRequest) throws(Errno) {
    try irqs.apply(request)
  }

  public var eventFDCount: Int { irqs.descriptorCount }

  /// What both DEVICE_RESET and a config-space FLR do: config space, BAR0
  /// registers, GGTT, MSI-X table and PBA back to their reset values, and the
  /// DMA engine idle in a new generation so late completions are ignored;
  /// device memory scrubbed, as the PF does on a VF FLR. Around the
  /// hardware reset runs the PF's FLR flow (`resetWithPF`).
  func functionLevelReset(reason: String) {
    resetWithPF {
      config.reset()
      registers.reset()
      msix.reset()
      dma.reset()
      memory.scrub()
    }
    resetCount += 1
    logger.debug("\(reason): function reset")
  }

  // MARK: Inspection (tests, CLI)

  /// The memfd behind BAR2 (lent), or nil without VRAM.
  public var vramFD: FileDescriptor? { vramSize > 0 ? FileDescriptor(rawValue: memory.fd) : nil }
  /// Bytes of device memory the DMA engine reaches (VRAM, or SRAM without VRAM).
  public var deviceMemorySize: UInt64 { memory.size }
  /// Scratch register `index` (0..<4) of GT `gt` (0 primary, 1 media).
  public func scratch(gt: Int, index: Int) -> UInt32 { registers.scratch[gt][index] }
  /// Runs `body` on the device memory: VRAM, or the SRAM block without VRAM.
  public func withDeviceMemory<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R)
    throws(E) -> R
  {
    try body(memory.buffer(offset: 0, length: memory.size))
  }
  /// The DMA engine's STATUS register.
  public var dmaStatus: UInt32 { dma.status }
  /// The DMA engine's COMPLETED register.
  public var dmaCompleted: UInt32 { dma.completed }
  /// The MSI-X pending bits.
  public var msixPending: UInt64 { msix.pending }
  /// The config space Command register.
  public var command: UInt16 { config.command }
}
