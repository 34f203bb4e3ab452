import CVFIOUser
import Foundation
import KernelVFIO
import KernelVFIOBackend
import Logging
import SystemPackage
import Testing
import VFIODevice
import VFIOUser

/// A device fd as vfio-pci answers the questions a backend asks at open
/// (GET_INFO, GET_REGION_INFO, GET_IRQ_INFO, the migration feature), over a
/// memfd standing for the descriptor. A live update hands the memfd over;
/// the new process's file (`adopting`) answers the same, as the same kernel
/// device would.
final class HandoverDeviceFile: VFIODeviceFile {
  let fd: Int32
  /// nil: no migration (ENOTTY, as plain vfio-pci).
  let migration: MigrationFlags?
  var state = MigrationState.running

  /// The memfd's name, unique, to count its descriptors by.
  let name = "handover-device-\(UUID().uuidString.prefix(8))"

  init(migration: MigrationFlags? = nil) {
    fd = cvfu_memfd_create(name, 1)
    precondition(fd >= 0)
    self.migration = migration
  }

  /// The same device through a descriptor handed over (owned from here).
  init(adopting fd: FileDescriptor, like other: HandoverDeviceFile) {
    self.fd = fd.rawValue
    migration = other.migration
    state = other.state
  }

  deinit { close(fd) }

  func ioctl(_ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
    guard let arg = argument else { return -EINVAL }
    func u32(_ at: Int) -> UInt32 { arg.loadUnaligned(fromByteOffset: at, as: UInt32.self) }
    func put<T: FixedWidthInteger>(_ value: T, _ at: Int) {
      arg.storeBytes(of: value, toByteOffset: at, as: T.self)
    }
    switch request {
    case VFIOIoctl.deviceGetInfo:
      put(VFIODeviceFlags([.pci, .reset]).rawValue, 4)
      put(VFIOPCIRegion.count, 8)
      put(VFIOPCIIRQ.count, 12)
    case VFIOIoctl.deviceGetRegionInfo:
      let index = u32(8)
      let bar0 = index == VFIOPCIRegion.bar0
      put(bar0 ? VFIORegionFlags([.read, .write]).rawValue : 0, 4)
      put(UInt32(0), 12)
      put(UInt64(bar0 ? 4096 : 0), 16)
      put(UInt64(index) << 40, 24)
    case VFIOIoctl.deviceGetIRQInfo:
      put(VFIOIRQInfoFlags.eventfd.rawValue, 4)
      put(UInt32(u32(8) == VFIOPCIIRQ.msix ? 8 : 0), 12)
    case VFIOIoctl.deviceFeature:
      guard let migration else { return -ENOTTY }
      switch u32(4) & VFIODeviceFeatureFlags.mask {
      case VFIODeviceFeature.migration: put(migration.rawValue, 8)
      case VFIODeviceFeature.migDeviceState:
        put(state.rawValue, 8)
        put(Int32(-1), 12)
      default: return -ENOTTY
      }
    default:
      return -ENOTTY
    }
    return 0
  }

  func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Int { -Int(EIO) }
  func pwrite(from buffer: UnsafeRawBufferPointer, at offset: Int64) -> Int { -Int(EIO) }
}

/// A type1v2 container as vfio_iommu_type1 treats VFIO_UPDATE_VADDR: each
/// mapping keeps its IOVA while its vaddr is invalid; an invalidation of an
/// invalid vaddr, or a new vaddr for a valid one or another size, is EINVAL;
/// no mapping is ENOENT. Its two descriptors (memfds standing for the
/// container and the group) are what a live update hands over.
final class VaddrIOMMU: IOMMUDomain {
  struct Mapping: Equatable {
    var size: UInt64
    var vaddr: UInt?
  }
  var mappings: [UInt64: Mapping] = [:]
  /// VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR): false as on a kernel before 5.12 or with an mdev.
  var vaddrUpdate = true
  /// Errnos for the next invalidation or update of a given IOVA.
  var refuseInvalidation: [UInt64: Errno] = [:]
  var refuseUpdate: [UInt64: Errno] = [:]
  let name = "handover-iommu-\(UUID().uuidString.prefix(8))"
  lazy var container = cvfu_memfd_create(name + "-container", 1)
  lazy var group = cvfu_memfd_create(name + "-group", 1)
  let path = "fake type1 IOMMU (group 7)"
  let iovaRanges: [ClosedRange<UInt64>] = [0...UInt64.max]
  let pageSizes: UInt64 = 4096
  var mappingsAvailable: UInt32? { UInt32(65535 - mappings.count) }

  deinit {
    close(container)
    close(group)
  }

  func map(vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64, readable: Bool, writable: Bool)
    throws(Errno)
  {
    guard mappings[iova] == nil else { throw .fileExists }
    mappings[iova] = Mapping(size: size, vaddr: UInt(bitPattern: vaddr))
  }

  func unmap(iova: UInt64, size: UInt64) throws(Errno) -> UInt64 {
    guard mappings[iova]?.size == size else { throw .invalidArgument }
    mappings[iova] = nil
    return size
  }

  var vaddrUpdateRefusal: String? {
    Type1Container.vaddrUpdateRefusal(.success(vaddrUpdate ? 1 : 0))
  }

  func invalidateVaddr(iova: UInt64, size: UInt64) throws(Errno) {
    if let error = refuseInvalidation.removeValue(forKey: iova) { throw error }
    guard var mapping = mappings[iova], mapping.size == size else { throw .noSuchFileOrDirectory }
    guard mapping.vaddr != nil else { throw .invalidArgument }
    mapping.vaddr = nil
    mappings[iova] = mapping
  }

  func updateVaddr(_ vaddr: UnsafeRawPointer, iova: UInt64, size: UInt64) throws(Errno) {
    if let error = refuseUpdate.removeValue(forKey: iova) { throw error }
    guard var mapping = mappings[iova] else { throw .noSuchFileOrDirectory }
    guard mapping.vaddr == nil, mapping.size == size else { throw .invalidArgument }
    mapping.vaddr = UInt(bitPattern: vaddr)
    mappings[iova] = mapping
  }

  var handover: IOMMUHandover? {
    IOMMUHandover(
      kind: .type1,
      descriptors: [FileDescriptor(rawValue: container), FileDescriptor(rawValue: group)],
      group: 7)
  }

  /// The vaddr of each mapping (nil: invalid), by IOVA.
  var vaddrs: [UInt64: UInt?] { mappings.mapValues(\.vaddr) }
}

/// Memory standing for one process's mapping of the client's file.
final class ProcessMemory {
  let base: UnsafeMutableRawPointer
  let size: Int
  init(_ size: Int) {
    self.size = size
    base = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
  }
  deinit { munmap(base, size) }
  func address(_ offset: Int) -> UInt { UInt(bitPattern: base + offset) }
}

/// The kernel backend's live update over fakes of the device fd and of a
/// type1 container with VFIO_UPDATE_VADDR: the blob and the descriptors it
/// names, the windows' addresses invalidated and named again, the call-off,
/// and each refusal (protocol/live-update-device.md, "The kernel backend").
@Suite("Kernel VFIO: live update (handover)")
struct KernelHandoverTests {
  static let base: UInt64 = 0x1_0000_0000
  static var logger: Logger {
    var logger = Logger(label: "kernel-handover")
    logger.logLevel = .critical
    return logger
  }

  struct Rig {
    let file: HandoverDeviceFile
    let iommu = VaddrIOMMU()
    let backend: KernelVFIOBackend
    let old = ProcessMemory(1 << 20)
    let new = ProcessMemory(1 << 20)

    init(
      migration: MigrationFlags? = nil, plan: MigrationPlan? = .none("--migration none"),
      windows: Int = 2
    ) throws {
      file = HandoverDeviceFile(migration: migration)
      backend = KernelVFIOBackend.make(
        try KernelVFIODevice.adopt(file, iommu: iommu), logger: KernelHandoverTests.logger,
        plan: plan)
      for k in 0..<windows { try backend.dmaMap(window(k, in: old), file: nil) }
    }

    /// Window `k`: 64 KiB at 4 GiB + k MiB, reached through `memory` at k × 64 KiB.
    func window(_ k: Int, in memory: ProcessMemory) -> DMAWindow {
      var window = DMAWindow(
        address: KernelHandoverTests.base + UInt64(k) << 20, size: 0x1_0000, readable: true,
        writable: k != 1)
      window.mapping = UnsafeMutableRawPointer(bitPattern: memory.address(k * 0x1_0000))
      return window
    }

    /// What the next process receives: a copy of each descriptor lent, as SCM_RIGHTS makes.
    func received(_ state: HandoverState) -> OwnedFileDescriptors {
      OwnedFileDescriptors(
        taking: state.descriptors.map {
          FileDescriptor(rawValue: fcntl($0.rawValue, F_DUPFD_CLOEXEC, 0))
        })
    }

    /// The next process's backend over the same (fake) kernel objects.
    func importing(_ state: HandoverState, paths: SystemPaths = .live) throws(HandoverRefusal)
      -> KernelVFIOBackend
    {
      let file = self.file
      let iommu = self.iommu
      return try KernelVFIOBackend.importHandover(
        state.bytes, descriptors: received(state), logger: KernelHandoverTests.logger,
        adoption: KernelHandoverAdoption(
          deviceFile: { HandoverDeviceFile(adopting: $0, like: file) },
          iommu: { (kind, descriptors, group) throws(KernelVFIOError) -> IOMMUDomain in
            precondition(kind == .type1 && descriptors.count == 2 && group == 7)
            for fd in descriptors { close(fd.rawValue) }
            return iommu
          }, paths: paths))
    }
  }

  /// Windows 0 and 2 (64 KiB each) in the IOMMU with `memory`'s addresses.
  func addresses(_ rig: Rig, _ memory: ProcessMemory, windows: [Int] = [0, 1]) -> [UInt64: UInt?] {
    Dictionary(
      uniqueKeysWithValues: windows.map { k in
        (Self.base + UInt64(k) << 20, Optional(memory.address(k * 0x1_0000)))
      })
  }

  /// Descriptors of this process open on memfds whose name starts with `prefix`.
  static func openDescriptors(_ prefix: String) -> Int {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return entries.filter { entry in
      let target = try? FileManager.default.destinationOfSymbolicLink(
        atPath: "/proc/self/fd/" + entry)
      return target?.hasPrefix("/memfd:\(prefix)") == true
    }.count
  }

  /// The whole way: the blob and its descriptors, the windows invalidated
  /// (never unmapped), the new backend over the same device with the plan
  /// and the dirty page log, the new addresses named, and the windows
  /// usable from the new backend (an unmap reaches the IOMMU).
  @Test func aDeviceWithWindowsCrossesToTheNextProcess() throws {
    let rig = try Rig()
    try rig.backend.startDMALogging(
      pageSize: 4096, ranges: [DMALoggingRange(iova: Self.base, length: 4 << 20)])
    #expect(rig.backend.handoverRefusal == nil)
    let state = try rig.backend.exportHandover()
    #expect(Array(state.bytes.prefix(16)) == Array("xe-vf kernel".utf8) + [0, 0, 0, 0])
    #expect(state.bytes[16..<20].elementsEqual([1, 0, 0, 0]), "format version 1")
    #expect(
      state.descriptors.map(\.rawValue) == [rig.file.fd, rig.iommu.container, rig.iommu.group],
      "the device fd, then the container and the group, lent")
    #expect(
      rig.iommu.vaddrs == [Self.base: nil, Self.base + (1 << 20): nil], "kept, vaddr invalid")

    let next = try rig.importing(state)
    #expect(next.plan.name == "none" && next.plan.summary == "none: --migration none")
    #expect(!(next is MigratableKernelVFIOBackend) && next.regionCount == 9)
    #expect(next.device.iommu === rig.iommu)
    // The server's windows in its order, one without a file (reached by messages) among them.
    let messages = DMAWindow(address: 8 << 30, size: 4096, readable: true, writable: true)
    try next.adoptDMAWindows([rig.window(1, in: rig.new), messages, rig.window(0, in: rig.new)])
    #expect(rig.iommu.vaddrs == addresses(rig, rig.new), "the new process's addresses")
    // The dirty page log came along: what the unmap marks is reported.
    try next.dmaUnmap([rig.window(0, in: rig.new)])
    #expect(rig.iommu.mappings.keys.sorted() == [Self.base + (1 << 20)])
    var bitmap = [UInt8](repeating: 0, count: 128)
    let reported: Result<Void, Errno> = bitmap.withUnsafeMutableBytes { raw in
      Result { () throws(Errno) in
        try next.reportDMALog(iova: Self.base, length: 4 << 20, pageSize: 4096, into: raw)
      }
    }
    try reported.get()
    #expect(bitmap[0] == 0xFF && bitmap[1] == 0xFF && bitmap[2] == 0, "window 0's 16 pages")
  }

  /// Called off after the export: this process's addresses are named again,
  /// also for a window whose address a successor named before it died.
  @Test func aCalledOffUpdateNamesTheOldAddressesAgain() throws {
    let rig = try Rig()
    _ = try rig.backend.exportHandover()
    rig.backend.handoverAbandoned()
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
    // Again, with a successor that named window 1's new address and died.
    _ = try rig.backend.exportHandover()
    try rig.iommu.updateVaddr(
      rig.window(1, in: rig.new).mapping!, iova: Self.base + (1 << 20), size: 0x1_0000)
    rig.backend.handoverAbandoned()
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
    // A second call-off has nothing to undo.
    rig.backend.handoverAbandoned()
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
  }

  /// Without VFIO_UPDATE_VADDR (an old kernel, or a container with an mdev)
  /// windows cannot stay mapped: refused up front, nothing touched; without
  /// windows there is nothing to keep, and the update goes ahead.
  @Test func withoutVaddrUpdatesMappedWindowsAreRefused() throws {
    let rig = try Rig()
    rig.iommu.vaddrUpdate = false
    let refusal = try #require(rig.backend.handoverRefusal)
    #expect(refusal.contains("VFIO_UPDATE_VADDR") && refusal.contains("mdev"), "\(refusal)")
    #expect(refusal.contains("2 DMA windows are mapped"), "\(refusal)")
    #expect(throws: HandoverRefusal(refusal)) { try rig.backend.exportHandover() }
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
    let idle = try Rig(windows: 0)
    idle.iommu.vaddrUpdate = false
    #expect(idle.backend.handoverRefusal == nil)
    let state = try idle.backend.exportHandover()
    try idle.importing(state).adoptDMAWindows([])
  }

  /// VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR)'s answers, as the refusal says them.
  @Test func theExtensionsAnswers() {
    #expect(Type1Container.vaddrUpdateRefusal(.success(1)) == nil)
    let absent = Type1Container.vaddrUpdateRefusal(.success(0)) ?? ""
    #expect(absent.contains("VFIO_UPDATE_VADDR") && absent.contains("5.12"), "\(absent)")
    let failed = Type1Container.vaddrUpdateRefusal(.failure(.invalidArgument)) ?? ""
    #expect(failed.contains("EINVAL"), "\(failed)")
  }

  /// An invalidation the kernel refuses (EBUSY: an mdev joined the
  /// container) undoes those made before it, and refuses the update.
  @Test func aRefusedInvalidationUndoesTheOthers() throws {
    let rig = try Rig()
    rig.iommu.refuseInvalidation[Self.base + (1 << 20)] = .resourceBusy
    do {
      _ = try rig.backend.exportHandover()
      Issue.record("exported")
    } catch {
      #expect(error.reason.contains("EBUSY") && error.reason.contains("mediated"), "\(error)")
    }
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
    rig.backend.handoverAbandoned()  // nothing left to undo
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
  }

  /// The next process's windows must be the IOMMU's; one the kernel will
  /// not take leaves every window invalid again, for the old process.
  @Test func windowsThatDoNotMatchAreRefused() throws {
    let rig = try Rig()
    let state = try rig.backend.exportHandover()
    let next = try rig.importing(state)
    #expect(throws: HandoverRefusal.self) {
      try next.adoptDMAWindows([rig.window(0, in: rig.new)])
    }
    var wider = rig.window(1, in: rig.new)
    wider.size *= 2
    #expect(throws: HandoverRefusal.self) {
      try next.adoptDMAWindows([rig.window(0, in: rig.new), wider])
    }
    #expect(rig.iommu.vaddrs.values.allSatisfy { $0 == nil })
    rig.iommu.refuseUpdate[Self.base + (1 << 20)] = .noMemory
    do {
      try next.adoptDMAWindows([rig.window(0, in: rig.new), rig.window(1, in: rig.new)])
      Issue.record("adopted")
    } catch {
      #expect(error.reason.contains("ENOMEM"), "\(error)")
    }
    #expect(rig.iommu.vaddrs.values.allSatisfy { $0 == nil }, "all invalid again")
    rig.backend.handoverAbandoned()
    #expect(rig.iommu.vaddrs == addresses(rig, rig.old))
  }

  /// A blob of another kind or version, cut short or with bytes after it:
  /// refused, and every descriptor that came with it closed.
  @Test func aBadBlobIsRefusedAndItsDescriptorsClosed() throws {
    let rig = try Rig(windows: 1)
    let state = try rig.backend.exportHandover()
    var otherKind = state.bytes
    otherKind[0] = UInt8(ascii: "y")
    var otherVersion = state.bytes
    otherVersion[16] = 2
    let cases: [([UInt8], String)] = [
      (otherKind, "not a kernel VFIO device's"),
      (otherVersion, "format version 2; this server reads version 1"),
      (Array(state.bytes.dropLast()), "truncated"),
      (state.bytes + [0], "follow the last section"),
    ]
    let names = [rig.file.name, rig.iommu.name]
    for (bytes, expected) in cases {
      let descriptors = rig.received(state)
      #expect(names.map(Self.openDescriptors) == [2, 4])
      do {
        _ = try KernelVFIOBackend.importHandover(
          bytes, descriptors: descriptors, logger: Self.logger,
          adoption: KernelHandoverAdoption(
            deviceFile: { HandoverDeviceFile(adopting: $0, like: rig.file) },
            iommu: { (_, descriptors, _) throws(KernelVFIOError) -> IOMMUDomain in
              for fd in descriptors { close(fd.rawValue) }
              return rig.iommu
            }))
        Issue.record("imported: \(expected)")
      } catch {
        #expect(error.reason.contains(expected), "\(error)")
      }
      #expect(names.map(Self.openDescriptors) == [1, 2], "\(expected): descriptors left open")
    }
  }

  /// VFIO migration: refused while the kernel keeps a stream (STOP_COPY),
  /// carried at rest with the failed flag.
  @Test func theKernelsMigrationIsCarriedAtRest() throws {
    let rig = try Rig(migration: .stopCopy, plan: nil, windows: 0)
    let vfio = try #require(rig.backend as? MigratableKernelVFIOBackend)
    rig.file.state = .stopCopy
    #expect(rig.backend.handoverRefusal?.contains("STOP_COPY") == true)
    rig.file.state = .stop
    vfio.migrationFailed()
    let next = try rig.importing(try rig.backend.exportHandover())
    let imported = try #require(next as? MigratableKernelVFIOBackend)
    #expect(imported.migrationFlags == .stopCopy)
    #expect(try imported.migrationState == .error, "failed, ERROR until a reset")
  }

  /// The PF's debugfs controls travel as their descriptors, with the
  /// migration's state; the new process reads the PF through them.
  @Test func thePFsControlsTravelAsDescriptors() throws {
    let system = try FakeSystem()
    let pf = "0000:03:00.0"
    let vfs = try system.addSRIOVPF(pf, vfs: 1, vfDrivers: ["vfio-pci"])
    try system.addPFDebugfs(pf, vfs: 1)
    try system.write("sys/kernel/debug/dri/\(pf)/sriov/vf1/migration_size", "4096\n")
    let plan = try MigrationPlan.decide(
      .pfDebugfs, address: PCIAddress(vfs[0]), driver: "vfio-pci", kernelFlags: nil,
      kernelAbsence: nil, paths: system.paths, files: POSIXControlFiles())
    let rig = try Rig(plan: plan, windows: 1)
    let migrated = try #require(rig.backend as? PFMigratedKernelVFIOBackend)
    _ = try migrated.migrationStep(from: .running, to: .runningP2P)
    _ = try migrated.migrationStep(from: .runningP2P, to: .stop)
    let state = try rig.backend.exportHandover()
    #expect(state.descriptors.count == 3 + PFControl.allCases.count)
    let next = try #require(try rig.importing(state) as? PFMigratedKernelVFIOBackend)
    #expect(try next.migrationState == .stop)
    #expect(next.pfMigration.controls.location == migrated.pfMigration.controls.location)
    #expect(try next.stopCopySize() == 4096, "read through the descriptor handed over")
    #expect(next.plan.summary.hasPrefix("pf-debugfs: the PF's controls in "))
    try next.adoptDMAWindows([rig.window(0, in: rig.new)])
    // Mid-save it is refused (the stream is this process's).
    rig.backend.handoverAbandoned()
    _ = try migrated.migrationStep(from: .stop, to: .stopCopy)
    #expect(migrated.handoverRefusal?.contains("STOP_COPY") == true)
    _ = try migrated.migrationStep(from: .stopCopy, to: .stop)
  }
}
