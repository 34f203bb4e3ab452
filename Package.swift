// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]
/// The request path's modules: dynamic exclusivity checks on class properties
/// cost about 700 of 2300 instructions per 4-byte REGION_READ (callgrind), and
/// each connection's state is touched by one thread only (see Connection), so
/// release builds check exclusivity statically only.
let hotPath: [SwiftSetting] =
  strict + [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

/// How release executables are linked, so that an idle `serve` stays small
/// (BENCHMARKS.md, "Idle memory"): lld with compact relative relocations
/// (DT_RELR, glibc 2.36 or later) instead of a megabyte of RELA entries read
/// at every start; no dynamic export of every symbol (the static standard
/// library's link arguments ask for it, nothing here looks symbols up); and
/// libstdc++ taken from its archive (link/static-libstdc++) rather than
/// loaded as a shared library; and the functions an idle `serve` runs laid
/// out together (link/startup-order.txt, from scripts/startup-order.sh), as
/// the kernel maps code around each page fault 64 KiB at a time.
let leanExecutable: [LinkerSetting] = [
  .unsafeFlags(
    [
      "-use-ld=lld", "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs", "-Xlinker",
      "--no-export-dynamic", "-L", Context.packageDirectory + "/link/static-libstdc++",
      "-Xlinker", "--symbol-ordering-file=" + Context.packageDirectory + "/link/startup-order.txt",
      "-Xlinker", "--no-warn-symbol-ordering",
    ], .when(platforms: [.linux], configuration: .release))
]

let package = Package(
  name: "xe-vfio-user",
  platforms: [.macOS(.v14)],
  products: [
    .executable(name: "xe-vfio-user", targets: ["xe-vfio-user"]),
    .executable(name: "xe-vfio-user-idle-floor", targets: ["IdleFloor"]),
    .library(name: "VFIOUser", targets: ["VFIOUser"]),
    .library(name: "VFIODevice", targets: ["VFIODevice"]),
    .library(name: "VFIOUserServer", targets: ["VFIOUserServer"]),
    .library(name: "VFIOUserClient", targets: ["VFIOUserClient"]),
    .library(name: "XeVF", targets: ["XeVF"]),
    .library(name: "XeStream", targets: ["XeStream"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    // log(event:) (Control.RuntimeLogLevel) is 1.16's.
    .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
  ],
  targets: [
    // linux/vfio.h structs, ioctl and SCM_RIGHTS wrappers Swift cannot express.
    .target(name: "CVFIOUser"),
    // json-c, the declared C dependency (Debian: libjson-c-dev).
    .systemLibrary(
      name: "CJSONC", pkgConfig: "json-c",
      providers: [.apt(["libjson-c-dev"])]),
    // zstd, for checkpoints that compress what pays (Debian: libzstd-dev).
    .systemLibrary(
      name: "CZstd", pkgConfig: "libzstd",
      providers: [.apt(["libzstd-dev"])]),
    // Wire format only: header, commands, payload codecs, capability JSON. No I/O
    // but closing: the owning descriptor types live here, below both the socket
    // layer and the device interface.
    .target(
      name: "VFIOUser",
      dependencies: ["CJSONC", .product(name: "SystemPackage", package: "swift-system")],
      swiftSettings: hotPath),
    // The message framer (no I/O) and the transports it is fed by: a Unix stream
    // socket with fd passing, or memory for tests. Shared by server and client.
    .target(
      name: "VFIOUserSocket",
      dependencies: [
        "VFIOUser", "CVFIOUser", .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: hotPath),
    // The device interface the server engine and every backend share: regions,
    // interrupts, DMA windows, reset, migration arcs and streams, and the helpers
    // a software device uses (interrupt emulation, threads). No server, no socket.
    .target(
      name: "VFIODevice",
      dependencies: [
        "VFIOUser", "CVFIOUser", .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: hotPath),
    // The Xe migration stream, no I/O: packet header and framing, the sparse form's
    // encoder and decoder, the zero-page scan; devices offer its transform to the engine.
    .target(
      name: "XeStream",
      dependencies: [
        "VFIOUser", "VFIODevice", "CVFIOUser",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: hotPath),
    // Live update's handover (protocol/live-update.md): the private socket
    // between an old server and its successor, the versioned state record,
    // starting the successor. No knowledge of the engine or the device.
    .target(
      name: "LiveUpdate",
      dependencies: [
        "VFIOUser", "VFIODevice", "CVFIOUser",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The engine: accept loop, connection dispatcher, DMA table, limits; it walks migrations
    // with VFIODevice's MigrationSession.
    .target(
      name: "VFIOUserServer",
      dependencies: [
        "VFIOUser", "VFIODevice", "VFIOUserSocket", "CVFIOUser", "LiveUpdate",
        .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: hotPath),
    // The control channel beside the engine (protocol/control.md): a QMP-like
    // JSON socket, through json-c, that reads what the engine publishes. The
    // engine knows nothing of it.
    .target(
      name: "Control",
      dependencies: [
        "VFIOUserServer", "VFIOUserSocket", "VFIODevice", "VFIOUser", "CJSONC", "CVFIOUser",
        .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    .target(
      name: "VFIOUserClient",
      dependencies: [
        "VFIOUser", "VFIOUserSocket", "CVFIOUser",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: hotPath),
    // Xe knowledge and the simulated VF and PF: a backend, beside the engine.
    .target(
      name: "XeVF",
      dependencies: [
        "VFIOUser", "VFIODevice", "XeStream", "CVFIOUser",
        .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The kernel's VFIO uAPI (group/container and iommufd cdev): opening a device
    // with actionable errors, regions, interrupts, IOMMU mappings, migration data_fd.
    // Knows nothing of the server; takes its threads and condition lock from VFIODevice.
    .target(
      name: "KernelVFIO",
      dependencies: [
        "VFIOUser", "CVFIOUser", "VFIODevice", "XeStream",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The thin adapter from KernelVFIO to the device interface: a backend beside the
    // simulated VF, knowing nothing of the server engine.
    .target(
      name: "KernelVFIOBackend",
      dependencies: [
        "KernelVFIO", "VFIOUser", "VFIODevice", "XeStream",
        .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The checkpoint file (protocol/save-format.md): CRC-chained records of the stream, zero
    // runs and zstd frames; its writer and its reader, which verifies before it hands on.
    .target(
      name: "Checkpoint",
      dependencies: [
        "XeStream", "VFIOUser", "CVFIOUser", "CZstd",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The client side of save, restore and migrate, below both the CLI and bench: device
    // identity, the checkpoint header (its JSON through Foundation's encoder), the copy
    // pipeline, progress, the MIG_DATA writer, the save output file, the records between a
    // device and a checkpoint, the commands' errors and signals, and the POSIX helpers (files,
    // child processes, printf) the CLI uses instead of Foundation.
    .target(
      name: "MigrationTools",
      dependencies: [
        "VFIOUser", "VFIODevice", "VFIOUserClient", "XeStream", "Checkpoint", "CVFIOUser",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // `bench`'s measurements, each beside its raw limit taken in the same run (BENCHMARKS.md):
    // in-process servers, the socket floor, DMA, migration, save and checkpoint figures.
    .target(
      name: "Bench",
      dependencies: [
        "MigrationTools", "VFIOUser", "VFIODevice", "VFIOUserServer", "VFIOUserClient", "XeVF",
        "Control", "Checkpoint", "CVFIOUser", .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // What `info` reports (the report's model, encoded as JSON) and the PCI config-space
    // decoder it fills the model with: header, BARs, capability lists, lspci's names.
    .target(name: "DeviceReport", dependencies: ["VFIOUser"], swiftSettings: strict),
    .executableTarget(
      name: "xe-vfio-user",
      dependencies: [
        "VFIOUser", "VFIODevice", "VFIOUserServer", "VFIOUserClient", "XeVF", "XeStream",
        "CVFIOUser", "KernelVFIO", "KernelVFIOBackend", "CZstd", "Control", "Checkpoint",
        "MigrationTools", "Bench", "LiveUpdate", "DeviceReport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict, linkerSettings: leanExecutable),
    // `bench`'s floor for idle memory: a program that only listens on a socket,
    // linked as xe-vfio-user is.
    .executableTarget(
      name: "IdleFloor", dependencies: ["CVFIOUser"], swiftSettings: strict,
      linkerSettings: leanExecutable),
    // What the test suites share: the protocol/ files, the malformed corpus's one
    // schema, the one hex decoder, and `serve` and other child processes started
    // the one way.
    .target(
      name: "TestSupport", dependencies: ["VFIOUserClient", "CVFIOUser"], path: "Tests/TestSupport",
      swiftSettings: strict),
    // The live-update record and handover socket on their own.
    .testTarget(
      name: "HandoverCodecTests",
      dependencies: [
        "LiveUpdate", "VFIODevice", "VFIOUser", "CVFIOUser", "TestSupport",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    .testTarget(
      name: "VFIOUserTests", dependencies: ["VFIOUser", "TestSupport"],
      swiftSettings: strict),
    // The framer on byte arrays and the channel over memory: no sockets, no threads.
    .testTarget(
      name: "VFIOUserSocketTests",
      dependencies: [
        "VFIOUserSocket", "VFIOUser", "CVFIOUser", "TestSupport",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The device interface's helpers on their own: interrupt emulation, SET_IRQS
    // checks, the migration walk and its stream handling.
    .testTarget(
      name: "VFIODeviceTests",
      dependencies: ["VFIODevice", "VFIOUser", "CVFIOUser", "TestSupport"],
      swiftSettings: strict),
    // The client the kernel-backed guest test runs inside its guest (built static
    // in release and copied into the initramfs; see KernelGuestTests).
    .executableTarget(
      name: "xe-vfu-guest-check",
      dependencies: [
        "VFIOUser", "VFIOUserClient", "CVFIOUser",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      path: "Tests/KernelGuestCheck", swiftSettings: strict),
    .testTarget(
      name: "KernelVFIOTests",
      dependencies: [
        "KernelVFIO", "KernelVFIOBackend", "CVFIOUser", "VFIOUser", "VFIODevice", "XeVF",
        "VFIOUserServer",
        "VFIOUserClient", .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: strict),
    .testTarget(
      name: "VFIOUserServerTests",
      dependencies: [
        "VFIOUser", "VFIODevice", "VFIOUserServer", "VFIOUserClient", "XeVF", "XeStream",
        "TestSupport",
        "CVFIOUser", "VFIOUserSocket", "KernelVFIO", "KernelVFIOBackend",
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: strict),
    // The control channel over real sockets, in-process with the simulated VF.
    .testTarget(
      name: "ControlTests",
      dependencies: [
        "Control", "VFIOUser", "VFIODevice", "VFIOUserServer", "VFIOUserClient", "XeVF",
        "CVFIOUser", .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    .testTarget(
      name: "XeVFTests",
      dependencies: ["XeVF", "XeStream", "VFIOUser", "VFIODevice", "TestSupport"],
      swiftSettings: strict),
    // The checkpoint format in-process: writer and reader round trips, every refusal.
    .testTarget(
      name: "CheckpointTests",
      dependencies: ["Checkpoint", "XeStream", "CVFIOUser", "CZstd"],
      swiftSettings: strict),
    // The migration commands' plumbing in-process: the save output file's staging, the copy
    // pipeline, the figures and the header's JSON.
    .testTarget(
      name: "MigrationToolsTests",
      dependencies: [
        "MigrationTools", "Checkpoint", "VFIODevice",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      swiftSettings: strict),
    // The config-space decoder on the simulated VF's real config space and on broken ones.
    .testTarget(
      name: "DeviceReportTests", dependencies: ["DeviceReport", "XeVF", "VFIOUser"],
      swiftSettings: strict),
    // bench's table and summaries, and its checkpoint figures on a small VF in-process.
    .testTarget(
      name: "BenchTests",
      dependencies: ["Bench", .product(name: "Logging", package: "swift-log")],
      swiftSettings: strict),
    // Runs the built `xe-vfio-user` as a process, as a user would, and the scripts.
    // Scripts/ holds the stand-ins InstallQEMUTests runs scripts/install-qemu.sh with.
    .testTarget(
      name: "CLITests",
      dependencies: [
        "VFIOUser", "VFIODevice", "VFIOUserClient", "CVFIOUser", "XeVF", "Control", "Checkpoint",
        "TestSupport", .product(name: "SystemPackage", package: "swift-system"),
      ],
      exclude: ["Scripts"], swiftSettings: strict),
    // libFuzzer targets (scripts/fuzz.sh builds them with -sanitize=fuzzer,address
    // and -D XE_VFU_LIBFUZZER, in .build/fuzz). A normal build makes each a
    // replayer of its corpus or of a crash file, and writes its seeds from protocol/.
    .systemLibrary(name: "CLibFuzzer", path: "Tests/Fuzz/CLibFuzzer"),
    .target(
      name: "FuzzSupport", dependencies: ["CJSONC", "CLibFuzzer"], path: "Tests/Fuzz/Support",
      swiftSettings: strict),
    .executableTarget(
      name: "fuzz-wire", dependencies: ["FuzzSupport", "VFIOUser"], path: "Tests/Fuzz/Wire",
      swiftSettings: strict),
    .executableTarget(
      name: "fuzz-dispatch",
      dependencies: [
        "FuzzSupport", "VFIOUser", "VFIODevice", "VFIOUserServer", "XeVF", "CVFIOUser",
        .product(name: "Logging", package: "swift-log"),
      ],
      path: "Tests/Fuzz/Dispatch", swiftSettings: strict),
    .executableTarget(
      name: "fuzz-xe-stream",
      dependencies: [
        "FuzzSupport", "VFIOUser", "VFIODevice", "XeVF", "XeStream",
        .product(name: "Logging", package: "swift-log"),
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      path: "Tests/Fuzz/XeStream", swiftSettings: strict),
    .executableTarget(
      name: "fuzz-checkpoint",
      dependencies: [
        "FuzzSupport", "Checkpoint", "XeStream", "CVFIOUser",
        .product(name: "SystemPackage", package: "swift-system"),
      ],
      path: "Tests/Fuzz/Checkpoint", swiftSettings: strict),
    // Real QEMU (qtest, and a Linux guest under TCG) attached to the built `xe-vfio-user`.
    // Guest/ holds the C program the vIOMMU guest runs; the tests build it with gcc -static.
    .testTarget(
      name: "QEMUInteropTests",
      dependencies: [
        "VFIOUser", "VFIOUserClient", "XeVF", "CVFIOUser", "TestSupport", "VFIODevice",
      ],
      exclude: ["Guest"], swiftSettings: strict),
  ]
)
