import CVFIOUser
import Foundation
import KernelVFIO
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

/// A VF behind vfio-pci, as the device fd's ioctls, pread and pwrite answer
/// it: the checks and errnos of drivers/vfio/pci/vfio_pci_core.c,
/// vfio_pci_intrs.c, vfio_pci_rdwr.c, vfio_pci_config.c and vfio_main.c
/// (argsz, flags, index, start + count, overflow), so the server's validation
/// can be compared with the kernel's. Layout (as `TestDevice`, so the corpus
/// means the same): BAR0 4 KiB, BAR2 64 KiB mmap-able in two sparse areas,
/// ROM 4 KiB (read only), config 256 bytes, no VGA; INTx, MSI (4), MSI-X (8),
/// ERR and REQ; BAR accesses need memory decode on in COMMAND. Migration v2 with STOP_COPY: the state is BAR0 and config
/// space, carried by a pipe as the data_fd. No DMA logging (no log_ops).
///
/// The eventfds the kernel would reference are remembered by their identity,
/// not held, so the tests' leak checks see only what the server holds; `held`
/// counts them so a test can check none stays configured.
final class FakeVFIOPCIDevice: VFIODeviceFile {
  /// How VFIO_DEVICE_RESET goes: the function resets, it has no reset
  /// (reset_works false: no VFIO_DEVICE_FLAGS_RESET, EINVAL), or
  /// pci_try_reset_function finds the device busy (EAGAIN).
  enum ResetBehaviour: String, Sendable {
    case works
    case none = "no_reset"
    case busy = "reset_busy"
  }

  static let offsetShift: UInt64 = 40  // VFIO_PCI_OFFSET_SHIFT
  static let bar0Size = 4096
  static let bar2Size = 64 * 1024
  static let romSize = 4096
  static let configSize = 256
  static let irqCounts: [UInt32] = [1, 4, 8, 1, 1]
  static let stateSize = bar0Size + configSize

  /// A memfd stands for the device fd: what the server lends its clients to map BAR2 through.
  let fd: Int32
  var bar0 = [UInt8](repeating: 0, count: bar0Size)
  var bar2 = [UInt8](repeating: 0, count: bar2Size)
  var config = [UInt8](repeating: 0, count: configSize)
  /// vdev->irq_type: the index whose vectors are enabled (INTx, MSI or MSI-X), or nil (NONE).
  var irqType: UInt32?
  /// vdev->num_ctx for MSI/MSI-X.
  var vectorCount: UInt32 = 0
  /// The triggers set, by index and vector: the eventfd's identity.
  var triggers: [UInt32: [UInt32: String]] = [:]
  var intxUnmaskFD: String?
  var migrationState = MigrationState.running
  /// The device's end of the data_fd pipe while RESUMING.
  var resumeSource: Int32 = -1
  var resets = 0
  /// Every ioctl number the device was asked, in order (tests: what reached the kernel).
  var ioctls: [UInt] = []

  let resetBehaviour: ResetBehaviour

  init(reset: ResetBehaviour = .works) {
    resetBehaviour = reset
    fd = cvfu_memfd_create("fake-vfio-pci", 1)  // MFD_CLOEXEC
    precondition(fd >= 0)
    config[0] = 0x86
    config[1] = 0x80  // vendor 8086
    config[4] = 0x06  // COMMAND: memory decode and bus master on, as a client left it
  }

  deinit {
    close(fd)
    if resumeSource >= 0 { close(resumeSource) }
  }

  /// Eventfds the kernel would still reference.
  var held: Int { triggers.values.reduce(0) { $0 + $1.count } + (intxUnmaskFD == nil ? 0 : 1) }

  // MARK: ioctl

  func ioctl(_ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
    ioctls.append(request)
    switch request {
    case VFIOIoctl.deviceGetInfo: return getInfo(argument!)
    case VFIOIoctl.deviceGetRegionInfo: return getRegionInfo(argument!)
    case VFIOIoctl.deviceGetIRQInfo: return getIRQInfo(argument!)
    case VFIOIoctl.deviceSetIRQs: return setIRQs(argument!)
    case VFIOIoctl.deviceReset: return reset()
    case VFIOIoctl.deviceFeature: return feature(argument!)
    default: return -ENOTTY
    }
  }

  private func getInfo(_ arg: UnsafeMutableRawPointer) -> Int32 {
    guard arg.u32(0) >= 16 else { return -EINVAL }  // minsz: offsetofend(num_irqs)
    let flags: VFIODeviceFlags = resetBehaviour == .none ? .pci : [.pci, .reset]
    arg.put(flags.rawValue, 4)
    arg.put(VFIOPCIRegion.count, 8)
    arg.put(VFIOPCIIRQ.count, 12)
    return 0
  }

  /// vfio_pci_ioctl_get_region_info, with the capability chain a variant driver adds to BAR2.
  private func getRegionInfo(_ arg: UnsafeMutableRawPointer) -> Int32 {
    let argsz = arg.u32(0)
    let index = arg.u32(8)
    guard argsz >= 32, index < VFIOPCIRegion.count else { return -EINVAL }
    var flags: VFIORegionFlags = []
    var size: UInt64 = 0
    var caps: [UInt8] = []
    switch index {
    case VFIOPCIRegion.bar0:
      (flags, size) = ([.read, .write], UInt64(Self.bar0Size))
    case VFIOPCIRegion.bar2:
      (flags, size) = ([.read, .write, .mmap], UInt64(Self.bar2Size))
      // vfio_region_info_cap_sparse_mmap: header {id, version, next}, nr_areas, reserved, areas.
      caps = le16(VFIORegionCapID.sparseMmap) + le16(1) + le32(0) + le32(2) + le32(0)
      for (offset, length) in [(0, 0x4000), (0x8000, 0x8000)] as [(UInt64, UInt64)] {
        caps += le64(offset) + le64(length)
      }
    case VFIOPCIRegion.rom: (flags, size) = (.read, UInt64(Self.romSize))
    case VFIOPCIRegion.config:
      (flags, size) = ([.read, .write], UInt64(Self.configSize))
    case VFIOPCIRegion.vga: return -EINVAL  // !vdev->has_vga
    default: break  // an absent BAR: size 0, flags 0
    }
    arg.put(UInt64(index) << Self.offsetShift, 24)
    arg.put(size, 16)
    var capOffset: UInt32 = 0
    if !caps.isEmpty {
      flags.insert(.caps)
      if argsz < UInt32(32 + caps.count) {
        arg.put(UInt32(32 + caps.count), 0)
      } else {
        // vfio_info_cap_shift: the chain's offsets become the reply's; a single capability ends it.
        (arg + 32).copyMemory(from: caps, byteCount: caps.count)
        capOffset = 32
      }
    }
    arg.put(flags.rawValue, 4)
    arg.put(capOffset, 12)
    return 0
  }

  private func getIRQInfo(_ arg: UnsafeMutableRawPointer) -> Int32 {
    let index = arg.u32(8)
    guard arg.u32(0) >= 16, index < VFIOPCIIRQ.count else { return -EINVAL }
    let flags: VFIOIRQInfoFlags =
      index == VFIOPCIIRQ.intx ? [.eventfd, .maskable, .automasked] : [.eventfd, .noresize]
    arg.put(flags.rawValue, 4)
    arg.put(Self.irqCounts[Int(index)], 12)
    return 0
  }

  // MARK: SET_IRQS (vfio_pci_ioctl_set_irqs)

  private func setIRQs(_ arg: UnsafeMutableRawPointer) -> Int32 {
    let (argsz, flags, index, start, count) = (
      arg.u32(0), VFIOIRQSetFlags(rawValue: arg.u32(4)), arg.u32(8), arg.u32(12), arg.u32(16)
    )
    // vfio_set_irqs_validate_and_prepare
    let minsz: UInt32 = 20
    guard argsz >= minsz, index < VFIOPCIIRQ.count, count < UInt32.max - start,
      flags.isSubset(of: [.dataTypeMask, .actionTypeMask])
    else { return -EINVAL }
    let max = Self.irqCounts[Int(index)]
    guard start < max, start + count <= max else { return -EINVAL }
    let size: UInt32
    switch flags.dataType {
    case .dataNone: size = 0
    case .dataBool: size = 1
    case .dataEventfd: size = 4
    default: return -EINVAL
    }
    guard argsz - minsz >= count * size else { return -EINVAL }
    let data = arg + Int(minsz)
    // vfio_pci_set_irqs_ioctl: which action each index has.
    switch (index, flags.action) {
    case (VFIOPCIIRQ.intx, .actionMask):
      guard irqType == VFIOPCIIRQ.intx, start == 0, count == 1 else { return -EINVAL }
      return flags.contains(.dataEventfd) ? -ENOTTY : 0
    case (VFIOPCIIRQ.intx, .actionUnmask):
      guard irqType == VFIOPCIIRQ.intx, start == 0, count == 1 else { return -EINVAL }
      if flags.contains(.dataEventfd) {
        let fd = data.s32(0)
        if fd < 0 {
          intxUnmaskFD = nil
        } else {
          switch Self.eventfd(fd) {
          case .success(let id): intxUnmaskFD = id
          case .failure(let e): return -e.rawValue
          }
        }
      }
      return 0
    case (VFIOPCIIRQ.intx, .actionTrigger):
      return intxTrigger(flags, start, count, data)
    case (VFIOPCIIRQ.msi, .actionTrigger),
      (VFIOPCIIRQ.msix, .actionTrigger):
      return msiTrigger(index, flags, start, count, data)
    case (VFIOPCIIRQ.msi, .actionMask),
      (VFIOPCIIRQ.msi, .actionUnmask),
      (VFIOPCIIRQ.msix, .actionMask),
      (VFIOPCIIRQ.msix, .actionUnmask):
      return -ENOTTY  // "XXX Need masking support exported"
    case (VFIOPCIIRQ.err, .actionTrigger),
      (VFIOPCIIRQ.req, .actionTrigger):
      return singleTrigger(index, flags, count, data)
    default:
      return -ENOTTY  // no func for the action (ERR/REQ mask, or no action at all)
    }
  }

  /// vfio_pci_set_intx_trigger.
  private func intxTrigger(
    _ flags: VFIOIRQSetFlags, _ start: UInt32, _ count: UInt32, _ data: UnsafeMutableRawPointer
  ) -> Int32 {
    let intx = VFIOPCIIRQ.intx
    if irqType == intx, count == 0, flags.contains(.dataNone) {
      disable(intx)
      return 0
    }
    guard irqType == intx || irqType == nil, start == 0, count == 1 else { return -EINVAL }
    if flags.contains(.dataEventfd) {
      let fd = data.s32(0)
      var id: String?
      if fd >= 0 {
        switch Self.eventfd(fd) {
        case .success(let found): id = found
        case .failure(let e): return -e.rawValue
        }
      }
      irqType = intx
      triggers[intx] = id.map { [0: $0] } ?? [:]
      return 0
    }
    return irqType == intx ? 0 : -EINVAL
  }

  /// vfio_pci_set_msi_trigger and vfio_msi_set_block.
  private func msiTrigger(
    _ index: UInt32, _ flags: VFIOIRQSetFlags, _ start: UInt32, _ count: UInt32,
    _ data: UnsafeMutableRawPointer
  ) -> Int32 {
    if irqType == index, count == 0, flags.contains(.dataNone) {
      disable(index)
      return 0
    }
    guard irqType == index || irqType == nil else { return -EINVAL }
    guard flags.contains(.dataEventfd) else {
      return irqType == index ? 0 : -EINVAL  // loopback triggers of enabled vectors
    }
    let enabling = irqType == nil
    if enabling {
      // vfio_msi_enable(start + count): the vectors the device has.
      irqType = index
      vectorCount = start + count
    }
    guard start < vectorCount, start + count <= vectorCount else { return -EINVAL }
    var set = triggers[index] ?? [:]
    for j in 0..<count {
      let fd = data.s32(Int(4 * j))
      if fd < 0 {
        set[start + j] = nil
        continue
      }
      switch Self.eventfd(fd) {
      case .success(let id): set[start + j] = id
      case .failure(let e):
        // The vectors set before this one are unwound; a fresh enable is undone.
        if enabling { disable(index) }
        return -e.rawValue
      }
    }
    triggers[index] = set
    return 0
  }

  /// vfio_pci_set_ctx_trigger_single (ERR, REQ).
  private func singleTrigger(
    _ index: UInt32, _ flags: VFIOIRQSetFlags, _ count: UInt32, _ data: UnsafeMutableRawPointer
  ) -> Int32 {
    if flags.contains(.dataNone) {
      guard triggers[index]?[0] != nil else { return -EINVAL }
      if count == 0 { triggers[index] = nil }
      return 0
    }
    guard count > 0 else { return -EINVAL }
    if flags.contains(.dataBool) { return 0 }
    let fd = data.s32(0)
    if fd == -1 {
      triggers[index] = nil
    } else if fd >= 0 {
      switch Self.eventfd(fd) {
      case .success(let id): triggers[index] = [0: id]
      case .failure(let e): return -e.rawValue
      }
    } else {
      return -EINVAL
    }
    return 0
  }

  private func disable(_ index: UInt32) {
    triggers[index] = nil
    if index == VFIOPCIIRQ.intx { intxUnmaskFD = nil }
    irqType = nil
    vectorCount = 0
  }

  /// eventfd_ctx_fdget: EBADF for no descriptor, EINVAL for one that is not an eventfd.
  static func eventfd(_ fd: Int32) -> Result<String, Errno> {
    guard fcntl(fd, F_GETFD) >= 0 else { return .failure(.badFileDescriptor) }
    guard
      let link = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)"),
      link == "anon_inode:[eventfd]"
    else { return .failure(.invalidArgument) }
    let info = POSIX.readText("/proc/self/fdinfo/\(fd)") ?? ""
    return .success(
      info.split(separator: "\n").first { $0.hasPrefix("eventfd-id:") }.map(String.init)
        ?? "eventfd \(fd)")
  }

  // MARK: RESET and DEVICE_FEATURE

  private func reset() -> Int32 {
    switch resetBehaviour {
    case .works: break
    case .none: return -EINVAL
    case .busy: return -EAGAIN
    }
    resets += 1
    // vfio_pci_ioctl_reset resets the function only: the interrupt
    // configuration (irq_type, the eventfds) stays until the user disables it.
    bar0 = [UInt8](repeating: 0, count: Self.bar0Size)
    // A reset returns a migratable device to RUNNING and ends its data_fd.
    endResume()
    migrationState = .running
    return 0
  }

  /// vfio_ioctl_device_feature and vfio_check_feature.
  private func feature(_ arg: UnsafeMutableRawPointer) -> Int32 {
    let (argsz, flags) = (arg.u32(0), arg.u32(4))
    let (get, set, probe) = (
      VFIODeviceFeatureFlags.get, VFIODeviceFeatureFlags.set, VFIODeviceFeatureFlags.probe
    )
    guard argsz >= 8, flags & ~(VFIODeviceFeatureFlags.mask | get | set | probe) == 0 else {
      return -EINVAL
    }
    guard flags & probe != 0 || flags & (get | set) != get | set else { return -EINVAL }
    let data = arg + 8
    let size = Int(argsz) - 8
    func check(_ supported: UInt32, _ minsz: Int) -> Int32 {
      if flags & (get | set) & ~supported != 0 { return -EINVAL }
      if flags & probe != 0 { return 0 }
      if flags & (get | set) == 0 { return -EINVAL }
      return size < minsz ? -EINVAL : 1
    }
    switch flags & VFIODeviceFeatureFlags.mask {
    case VFIODeviceFeature.migration:
      let r = check(get, 8)
      guard r == 1 else { return r }
      data.put(UInt64(MigrationFlags.stopCopy.rawValue), 0)
      return 0
    case VFIODeviceFeature.migDeviceState:
      let r = check(get | set, 8)
      guard r == 1 else { return r }
      if flags & get != 0 {
        data.put(migrationState.rawValue, 0)
        data.put(Int32(-1), 4)
        return 0
      }
      var fd: Int32 = -1
      let result = setMigrationState(data.u32(0), dataFD: &fd)
      data.put(fd, 4)
      return result
    case VFIODeviceFeature.migDataSize:
      let r = check(get, 8)
      guard r == 1 else { return r }
      data.put(UInt64(Self.stateSize), 0)
      return 0
    default:
      return -ENOTTY  // DMA logging (no log_ops) and anything vfio-pci does not have
    }
  }

  /// The driver's migration_set_state: each arc `vfio_mig_get_next_state`
  /// gives (STOP_COPY only: RUNNING ↔ STOP, STOP ↔ STOP_COPY, STOP ↔ RESUMING).
  private func setMigrationState(_ raw: UInt32, dataFD: inout Int32) -> Int32 {
    guard let target = MigrationState(rawValue: raw),
      [.stop, .running, .stopCopy, .resuming].contains(target)
    else { return -EINVAL }
    guard migrationState != .error else { return -EINVAL }
    while migrationState != target {
      let next: MigrationState =
        switch (migrationState, target) {
        case (.running, _): .stop
        case (.stop, _): target
        default: .stop  // STOP_COPY and RESUMING leave through STOP
        }
      switch (migrationState, next) {
      case (.stop, .stopCopy):
        guard let pipe = Self.pipe() else { return -errno }
        let state = bar0 + config
        let written = state.withUnsafeBytes { write(pipe[1], $0.baseAddress, $0.count) }
        close(pipe[1])
        guard written == state.count else {
          close(pipe[0])
          return -EIO
        }
        dataFD = pipe[0]
      case (.stop, .resuming):
        guard let pipe = Self.pipe() else { return -errno }
        // The device's end never blocks; the pipe holds more than any stream a case writes.
        _ = fcntl(pipe[0], F_SETFL, O_NONBLOCK)
        _ = fcntl(pipe[0], 1031, 1 << 20)  // F_SETPIPE_SZ
        endResume()
        resumeSource = pipe[0]
        dataFD = pipe[1]
      case (.resuming, .stop):
        // The driver loads what the stream brought: exactly one state, or the arc fails
        // and the device stays RESUMING.
        var state = [UInt8](repeating: 0, count: Self.stateSize + 1)
        let n = state.withUnsafeMutableBytes { read(resumeSource, $0.baseAddress, $0.count) }
        guard n == Self.stateSize else { return -EINVAL }
        bar0 = Array(state[0..<Self.bar0Size])
        config = Array(state[Self.bar0Size..<Self.stateSize])
        endResume()
      default: break
      }
      migrationState = next
    }
    return 0
  }

  private static func pipe() -> [Int32]? {
    var ends: [Int32] = [-1, -1]
    guard Glibc.pipe(&ends) == 0 else { return nil }
    for fd in ends { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    return ends
  }

  private func endResume() {
    if resumeSource >= 0 { close(resumeSource) }
    resumeSource = -1
  }

  // MARK: pread / pwrite (vfio_pci_rw)

  func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Int {
    access(offset, buffer.count, write: false) { memory, at, n in
      UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: memory[at..<(at + n)]))
    }
  }

  func pwrite(from buffer: UnsafeRawBufferPointer, at offset: Int64) -> Int {
    access(offset, buffer.count, write: true) { memory, at, n in
      UnsafeMutableRawBufferPointer(rebasing: memory[at..<(at + n)]).copyMemory(
        from: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
    }
  }

  /// The region behind `offset`, checked as vfio_pci_rw does: BARs and the
  /// ROM give a short count at their end and EINVAL past it (vfio_pci_bar_rw),
  /// config space EFAULT for an access that does not fit and chunks of at most
  /// a dword (vfio_config_do_rw), the ROM refuses writes, VGA is absent.
  private func access(
    _ offset: Int64, _ count: Int, write: Bool,
    _ move: (UnsafeMutableRawBufferPointer, Int, Int) -> Void
  ) -> Int {
    guard count > 0 else { return 0 }
    let index = UInt64(bitPattern: offset) >> Self.offsetShift
    let position = Int(UInt64(bitPattern: offset) & ((1 << Self.offsetShift) - 1))
    guard index < UInt64(VFIOPCIRegion.count) else { return -Int(EINVAL) }
    func bar(_ memory: inout [UInt8]) -> Int {
      guard position < memory.count else { return -Int(EINVAL) }
      let n = min(count, memory.count - position)
      memory.withUnsafeMutableBytes { move($0, position, n) }
      return n
    }
    // vfio_pci_core_do_io_rw: a BAR whose memory decode is off (COMMAND bit 1) answers EIO.
    let decoding = config[4] & 0x2 != 0
    switch UInt32(index) {
    case VFIOPCIRegion.bar0: return decoding ? bar(&bar0) : -Int(EIO)
    case VFIOPCIRegion.bar2: return decoding ? bar(&bar2) : -Int(EIO)
    case VFIOPCIRegion.rom:
      guard !write else { return -Int(EINVAL) }
      var rom = (0..<Self.romSize).map { UInt8(truncatingIfNeeded: $0) }
      return bar(&rom)
    case VFIOPCIRegion.config:
      guard position + count <= Self.configSize else { return -Int(EFAULT) }
      let n = count >= 4 && position % 4 == 0 ? 4 : count >= 2 && position % 2 == 0 ? 2 : 1
      var scratch = config
      scratch.withUnsafeMutableBytes { move($0, position, n) }
      // Writes to the vendor and device IDs are dropped, as their permission bits say.
      if write { config[4...] = scratch[4...] }
      return n
    default: return -Int(EINVAL)  // an absent BAR (pci_resource_len 0) or VGA
    }
  }
}

/// A type1-like IOMMU domain that records its mappings and checks them as
/// vfio_iommu_type1 does: page alignment, size, overlap, no wrap.
final class FakeIOMMU: IOMMUDomain {
  var mappings: [UInt64: UInt64] = [:]
  let path = "fake type1 IOMMU"
  let iovaRanges: [ClosedRange<UInt64>] = [0...UInt64.max]
  let pageSizes: UInt64 = 4096
  var mappingsAvailable: UInt32? { UInt32(65535 - mappings.count) }

  func map(vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64, readable: Bool, writable: Bool)
    throws(Errno)
  {
    guard size > 0, iova % 4096 == 0, size % 4096 == 0,
      UInt(bitPattern: vaddr) % 4096 == 0, iova <= UInt64.max - (size - 1)
    else { throw .invalidArgument }
    let end = iova + (size - 1)
    guard !mappings.contains(where: { $0.key <= end && iova <= $0.key + ($0.value - 1) }) else {
      throw .fileExists
    }
    mappings[iova] = size
  }

  func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64 {
    guard mappings[iova] == size else { throw .invalidArgument }
    mappings[iova] = nil
    return size
  }
}

extension UnsafeMutableRawPointer {
  fileprivate func u32(_ at: Int) -> UInt32 { loadUnaligned(fromByteOffset: at, as: UInt32.self) }
  fileprivate func s32(_ at: Int) -> Int32 { loadUnaligned(fromByteOffset: at, as: Int32.self) }
  fileprivate func put<T: FixedWidthInteger>(_ value: T, _ at: Int) {
    storeBytes(of: value, toByteOffset: at, as: T.self)
  }
}

private func le16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
private func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
