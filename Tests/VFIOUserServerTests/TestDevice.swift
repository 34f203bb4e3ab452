import CVFIOUser
import Foundation
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserServer

/// A small generic device for the server's own semantics (INTx, MSI and
/// width rules the Xe VF does not have). Registers in BAR0 (4-byte only):
///   0x00 scratch, 0x04 fire interrupt (index << 16 | vector),
///   0x08 DMA address lo, 0x0C hi, 0x10 length, 0x14 go (1 = from client, 2 = to client),
///   0x18 DMA status (0 idle, 1 busy, 2 done, 3 error), 0x1C DMA errno.
/// BAR2 is a 64 KiB memfd with two sparse areas; DMA moves bytes between BAR2 and client memory.
/// Interrupts are emulated with `IRQEmulation`, as the simulated VF does; DMA
/// windows are counted, and knobs make the device refuse what a kernel
/// backend might (an unmap, a SET_IRQS) or keep the client's window files.
class TestDevice: VFIODeviceBackend {
  var host: DeviceHost?
  var scratch: UInt32 = 0
  var resets = 0
  var dmaStatus: UInt32 = 0
  var dmaErrno: UInt32 = 0
  var dmaAddress: UInt64 = 0
  var dmaLength: UInt32 = 0
  var generation = 0
  var irqs = IRQEmulation((0..<5).map { TestDevice.describeIRQ($0)! })
  var mappedWindows = 0
  /// The limits the device reports (`dmaLimits`).
  var limits = DMALimits.unrestricted
  /// When set, DMA_UNMAP (a range or all) is refused with it.
  var refuseUnmap: Errno?
  /// When set, SET_IRQS is refused with it, before the emulation sees the request.
  var refuseSetIRQs: Errno?
  /// Every SET_IRQS the device was handed: index, count and VFIO_IRQ_SET_* flags.
  var setIRQsCalls: [(index: UInt32, count: UInt32, flags: VFIOIRQSetFlags)] = []
  /// Every dmaUnmap call, in order, with the windows it named.
  var unmapCalls: [[DMAWindow]] = []
  /// Runs at the start of each dmaUnmap (tests: what is still mapped then).
  var onUnmap: (([DMAWindow]) -> Void)?
  /// Keep the descriptor of each window mapped with a file (an iommufd-like backend).
  var keepFiles = false
  /// The files kept, by window address; closed when their window is unmapped.
  var keptFiles: [UInt64: FileDescriptor] = [:]
  /// Subclasses hook in here (the migrating test device drops its streams).
  func resetHook() {}
  let memfd: Int32
  let memory: UnsafeMutableRawBufferPointer
  static let bar2Size = 64 * 1024

  init() {
    memfd = cvfu_memfd_create("test-bar2", 0)
    precondition(memfd >= 0)
    ftruncate(memfd, off_t(Self.bar2Size))
    let p = mmap(nil, Self.bar2Size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
    memory = UnsafeMutableRawBufferPointer(start: p, count: Self.bar2Size)
  }

  deinit {
    munmap(memory.baseAddress, memory.count)
    close(memfd)
    for fd in keptFiles.values { try? fd.close() }
  }

  /// Each index's state as the emulation holds it.
  var lastIRQConfiguration: [UInt32: IRQConfiguration] {
    var all: [UInt32: IRQConfiguration] = [:]
    for index in 0..<irqCount { all[index] = irqs.configuration(index) }
    return all
  }

  var deviceFlags: VFIODeviceFlags { [.pci, .reset] }
  var regionCount: UInt32 { 9 }
  var irqCount: UInt32 { 5 }

  /// BAR2 holds an MSI-X table the client may map (VFIO_REGION_INFO_CAP_MSIX_MAPPABLE).
  var bar2MSIXMappable = false

  func region(_ index: UInt32) -> RegionDescription? {
    switch index {
    case 0: RegionDescription(index: 0, size: 4096)
    case 2:
      RegionDescription(
        index: 2, size: UInt64(Self.bar2Size),
        mmap: MmapSource(fd: FileDescriptor(rawValue: memfd), offset: 0),
        sparseAreas: [
          SparseMmapArea(offset: 0, size: 0x4000), SparseMmapArea(offset: 0x8000, size: 0x8000),
        ], msixMappable: bar2MSIXMappable)
    case 6: RegionDescription(index: 6, size: 4096, readable: true, writable: false)
    case 7: RegionDescription(index: 7, size: 256)
    default: RegionDescription(index: index, size: 0, readable: false, writable: false)
    }
  }

  func irq(_ index: UInt32) -> IRQDescription? { Self.describeIRQ(index) }

  static func describeIRQ(_ index: UInt32) -> IRQDescription? {
    switch index {
    case 0:
      IRQDescription(
        index: 0, count: 1,
        flags: [.eventfd, .maskable, .automasked])
    case 1:
      IRQDescription(
        index: 1, count: 4, flags: [.eventfd, .noresize])
    case 2:
      IRQDescription(
        index: 2, count: 8, flags: [.eventfd, .maskable])
    case 3, 4: IRQDescription(index: index, count: 1, flags: .eventfd)
    default: nil
    }
  }

  func read(region: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
    throws(Errno)
  {
    switch region {
    case 0:
      guard buffer.count == 4, offset % 4 == 0 else { throw .invalidArgument }
      let value: UInt32 =
        switch offset {
        case 0x00: scratch
        case 0x08: UInt32(truncatingIfNeeded: dmaAddress)
        case 0x0C: UInt32(truncatingIfNeeded: dmaAddress >> 32)
        case 0x10: dmaLength
        case 0x18: dmaStatus
        case 0x1C: dmaErrno
        default: 0
        }
      buffer.storeBytes(of: value, as: UInt32.self)
    case 2:
      buffer.copyMemory(
        from: UnsafeRawBufferPointer(rebasing: memory[Int(offset)..<(Int(offset) + buffer.count)]))
    case 6, 7:
      for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: Int(offset) + i) }
    default:
      throw .invalidArgument
    }
  }

  func write(region: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(Errno) {
    switch region {
    case 0:
      guard buffer.count == 4, offset % 4 == 0 else { throw .invalidArgument }
      let value = buffer.loadUnaligned(as: UInt32.self)
      switch offset {
      case 0x00: scratch = value
      case 0x04: if host != nil { irqs.trigger(index: value >> 16, vector: value & 0xFFFF) }
      case 0x08: dmaAddress = (dmaAddress & ~0xFFFF_FFFF) | UInt64(value)
      case 0x0C: dmaAddress = (dmaAddress & 0xFFFF_FFFF) | (UInt64(value) << 32)
      case 0x10: dmaLength = value
      case 0x14: startDMA(toClient: value == 2)
      default: break
      }
    case 2:
      UnsafeMutableRawBufferPointer(rebasing: memory[Int(offset)..<(Int(offset) + buffer.count)])
        .copyMemory(from: buffer)
    case 7:
      break
    default:
      throw .invalidArgument
    }
  }

  private func startDMA(toClient: Bool) {
    guard let host, dmaStatus != 1 else { return }
    dmaStatus = 1
    let length = Int(min(dmaLength, UInt32(Self.bar2Size)))
    let address = dmaAddress
    let generation = generation
    let buffer = UnsafeMutableRawBufferPointer(rebasing: memory[0..<length])
    host.deferWork { [self] in
      let done: (Result<Void, Errno>) -> Void = { [self] result in
        guard self.generation == generation else { return }
        switch result {
        case .success: dmaStatus = 2
        case .failure(let e):
          dmaStatus = 3
          dmaErrno = UInt32(e.rawValue)
        }
      }
      if toClient {
        host.dmaWrite(address: address, from: UnsafeRawBufferPointer(buffer), completion: done)
      } else {
        host.dmaRead(address: address, into: buffer, completion: done)
      }
    }
  }

  func reset() throws(Errno) {
    resetHook()
    resets += 1
    generation += 1
    scratch = 0
    dmaStatus = 0
    dmaErrno = 0
  }

  func attach(host: DeviceHost?) { self.host = host }

  func setIRQs(_ request: consuming IRQSetRequest) throws(Errno) {
    setIRQsCalls.append((request.index, request.count, request.flags))
    if let refuseSetIRQs { throw refuseSetIRQs }
    try irqs.apply(request)
  }

  var eventFDCount: Int { irqs.descriptorCount }

  var dmaLimits: DMALimits { limits }

  func dmaMap(_ window: DMAWindow, file: consuming OwnedFileDescriptor?) throws(Errno) {
    mappedWindows += 1
    if keepFiles, let kept = file.take() { keptFiles[window.address] = kept.release() }
  }

  func dmaUnmap(_ windows: [DMAWindow]) throws(Errno) {
    unmapCalls.append(windows)
    onUnmap?(windows)
    if let refuseUnmap { throw refuseUnmap }
    mappedWindows -= windows.count
    for window in windows { try? keptFiles.removeValue(forKey: window.address)?.close() }
  }
}
