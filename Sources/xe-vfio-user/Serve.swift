import ArgumentParser
import CVFIOUser
import Control
import KernelVFIO
import Logging
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

struct Serve: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Serve an Xe VF (the simulated one by default) on a vfio-user socket.",
    discussion: """
      Listens on the socket, prints the QEMU command line that attaches the
      device, and serves one client at a time until SIGINT, SIGTERM or SIGHUP,
      which disconnect the client cleanly and remove the socket. Whatever reads
      its log may go away (`serve 2>&1 | head`): a line it cannot write is
      dropped, never fatal. A client that
      hangs up loses its DMA mappings and eventfds and the device is reset for
      the next one.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s")],
    help: "Unix socket to listen on (default: \(defaultSocketPath)).")
  var socketPath: String?

  @Option(help: "Serve on this already-listening socket descriptor instead (vfio-user convention).")
  var fd: Int32?

  @Option(
    help: ArgumentHelp(
      "The control socket (protocol/control.md), with the socket's mode, group and --allow-uid/--allow-gid: default the socket path with .control appended (none with --fd); none for no control socket.",
      valueName: "path|none"))
  var controlSocket: String?

  @Option(
    name: .customLong("device"),
    help: ArgumentHelp(
      "Serve a real device through the kernel's VFIO instead of the simulated VF: vfio:DDDD:BB:DD.F (bound to vfio-pci), its /sys/bus/pci/devices path, a /dev/vfio/devices/vfioN cdev, or an mdev as mdev:UUID.",
      valueName: "vfio:address|path"))
  var kernelDevice: String?

  @Option(
    help: ArgumentHelp(
      "How --device migrates: auto (the VF driver's data_fd if it has one, else the PF's debugfs controls), vfio, pf-debugfs or none.",
      valueName: "auto|vfio|pf-debugfs|none"))
  var migration: MigrationChoice = .auto

  @Option(help: "Device profile: bmg (discrete, with VRAM), ptl or wcl (integrated).")
  var profile: XeProfile = .bmg

  @Option(help: "VRAM (BAR2) size for bmg: a power of two such as 256M or 4G.")
  var vramSize: ByteSize?

  @Option(help: "Largest REGION_READ/WRITE or migration data message (up to 64M).")
  var maxDataXferSize: ByteSize = ByteSize(1 << 20)

  @Option(help: "DMA windows a client may have at once.")
  var maxDMAMaps: UInt32 = 65535

  @Option(name: .customLong("max-msg-fds"), help: "Descriptors accepted per message.")
  var maxMsgFDs: UInt32 = 16

  @Option(
    help:
      "DMA_READ/DMA_WRITE layout: spec (the default, what QEMU 11.1 speaks) or qemu (the `count u32, data@12` layout of some QEMU trees)."
  )
  var dmaLayout: DMATransferLayout?

  @Option(
    help: ArgumentHelp(
      "What a client's hang-up does to the device: reset (an FLR: a clean device, VRAM cleared, for the next client) or keep (its state stays, e.g. after `restore`: a source left in STOP_COPY is resumed, a device left in STOP stays stopped, only an incomplete restore is reset).",
      valueName: "reset|keep"))
  var onDisconnect: DisconnectPolicy = .reset

  @Option(help: "Permissions of the socket file, in octal (created 0600, then widened to this).")
  var socketMode: String = "0600"

  @Option(help: "Group of the socket file (a name or a number), e.g. the group QEMU runs as.")
  var socketGroup: String?

  @Option(
    help:
      "After opening the device and the socket as root, run as this user (name or number); its group too unless --group names another."
  )
  var user: String?

  @Option(help: "After opening everything, run as this group (name or number).")
  var group: String?

  @Option(
    name: .customLong("allow-uid"),
    help: "Serve only peers with this user (name or number); repeatable. Others get EACCES.")
  var allowUID: [String] = []

  @Option(
    name: .customLong("allow-gid"),
    help: "Serve only peers with this primary group (name or number); repeatable.")
  var allowGID: [String] = []

  @Option(
    help: ArgumentHelp(
      "Seconds the rest of a message may take once its first bytes arrived; a client still short of it is disconnected (0: wait forever). Idleness between messages is never bounded.",
      valueName: "seconds"))
  var partialMessageTimeout: Double = 60

  @Option(
    help: ArgumentHelp(
      "Seconds a reply may wait for a client that stopped reading before it is disconnected (0: wait forever).",
      valueName: "seconds"))
  var sendTimeout: Double = 60

  @Flag(
    help:
      "Do not offer save, restore and migrate the sparse migration stream: they then move every byte of the raw Xe stream, as with a server that predates it."
  )
  var noSparseMigration = false

  @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
  var logLevel: Logger.Level = .info

  @Flag(help: "Do not print the QEMU command line.")
  var quiet = false

  /// A live update's successor: take over from the server at the other end
  /// of this descriptor (`xe-vfio-user live-update` starts it so).
  @Option(help: .hidden)
  var handoverFd: Int32?

  func validate() throws {
    if socketPath != nil, fd != nil {
      throw ValidationError("--socket-path and --fd are exclusive")
    }
    guard maxDataXferSize.bytes >= 4096,
      maxDataXferSize.bytes <= UInt64(ServerLimits.largestDataXferSize)
    else {
      throw ValidationError("--max-data-xfer-size must be between 4K and 64M")
    }
    if kernelDevice == nil, migration != .auto {
      throw ValidationError(
        "--migration is for --device: the simulated VF migrates through its simulated PF")
    }
    if kernelDevice != nil, vramSize != nil {
      throw ValidationError("--vram-size is for the simulated VF; --device serves a real one")
    }
    if let vramSize {
      guard profile == .bmg else {
        throw ValidationError("--vram-size is for bmg only (\(profile.name) has no VRAM)")
      }
      guard vramSize.bytes >= 1 << 20, vramSize.bytes & (vramSize.bytes - 1) == 0 else {
        throw ValidationError(
          "--vram-size must be a power of two of at least 1M, such as 256M or 4G")
      }
    }
    for user in allowUID where userID(user) == nil {
      throw ValidationError("--allow-uid: no user '\(user)'")
    }
    for group in allowGID + [socketGroup, group].compactMap({ $0 }) where groupID(group) == nil {
      throw ValidationError("no group '\(group)'")
    }
    if let user, userID(user) == nil { throw ValidationError("--user: no user '\(user)'") }
    if user == nil, group != nil {
      throw ValidationError("--group goes with --user (the server keeps root's uid otherwise)")
    }
    for (name, seconds) in [
      ("--partial-message-timeout", partialMessageTimeout), ("--send-timeout", sendTimeout),
    ] where !(seconds >= 0 && seconds <= 86_400) {
      throw ValidationError("\(name) is a number of seconds from 0 to 86400")
    }
    guard UInt32(socketMode, radix: 8) != nil else {
      throw ValidationError("--socket-mode must be octal, e.g. 0660")
    }
    if let controlPath, controlPath == (socketPath ?? defaultSocketPath) {
      throw ValidationError("--control-socket must differ from the device socket")
    }
  }

  /// The engine's limits, from the options.
  func makeLimits() -> ServerLimits {
    var limits = ServerLimits()
    limits.maxDataXferSize = UInt32(maxDataXferSize.bytes)
    limits.maxDMAMaps = maxDMAMaps
    limits.maxMsgFDs = maxMsgFDs
    limits.dmaLayout = dmaLayout
    limits.resetOnDisconnect = onDisconnect == .reset
    limits.sparseMigration = !noSparseMigration
    limits.allowedUIDs = Set(allowUID.compactMap(userID))
    limits.allowedGIDs = Set(allowGID.compactMap(groupID))
    limits.partialMessageTimeoutMilliseconds = Int32((partialMessageTimeout * 1000).rounded(.up))
    limits.sendTimeoutMilliseconds = Int32((sendTimeout * 1000).rounded(.up))
    return limits
  }

  /// Where the control socket listens, or nil for none.
  var controlPath: String? {
    switch controlSocket {
    case "none": nil
    case let path?: path
    case nil: fd == nil ? (socketPath ?? defaultSocketPath) + ".control" : nil
    }
  }

  func run() throws {
    if let handoverFd { return try TakeOver.run(fd: handoverFd) }
    let logger = bootstrapLogging(level: logLevel)
    let limits = makeLimits()
    let backend: any VFIODeviceBackend
    let served: String
    var record: ServedRecord?
    if let kernelDevice {
      let opened = try openKernelDevice(
        kernelDevice, migration: migration, logger: logger,
        limits: limits)
      (backend, served) = (opened.backend, opened.description)
      record = ServedRecord(
        device: opened.backend.device.name, pid: Int(getpid()),
        socket: fd.map { "fd \($0)" } ?? ServedRecord.absolutePath(socketPath ?? defaultSocketPath),
        migration: opened.plan.summary,
        opened: opened.backend.device.reach, control: controlPath.map(ServedRecord.absolutePath),
        served: opened.description)
      // Before listening: a second server of the device stops here.
      if let warning = try record!.claim() { logger.warning("\(warning)") }
    } else {
      let device: SimulatedXeVF
      do {
        device = try SimulatedXeVF(profile: profile, vramSize: vramSize?.bytes, logger: logger)
      } catch {
        throw ValidationError(
          "cannot create the simulated \(profile.name) VF: \(error.name) (VRAM must be a power of two ≥ 1M, bmg only)"
        )
      }
      let vram = device.vramSize > 0 ? ", \(formatBytes(device.vramSize)) VRAM" : ""
      (backend, served) = (
        device,
        "simulated Xe VF \(profile.name) [8086:\(String(profile.deviceID, radix: 16))]\(vram)"
      )
    }
    let server = VFIOUserServer(backend: backend, limits: limits, logger: logger)
    // SIGINT, SIGTERM and SIGHUP (the terminal or ssh session went away):
    // one sent as soon as the socket (or the printed command line) appears
    // waits pending instead of being lost, as it could be while a dispatch
    // signal source is still registering. Each stops the server cleanly: the
    // client disconnected, the socket removed (a repeated one finds it stopping).
    try takeSignals(Interruption.signals) { number in
      logger.info("signal \(number): shutting down")
      server.stop()
    }
    let path = socketPath ?? defaultSocketPath
    if let fd {
      server.listen(fd: fd)
    } else {
      try makeSocket(path) { path throws(Errno) in try server.listen(socketPath: path) }
    }
    let updater = LiveUpdater(
      server: server, logger: logger,
      history: ServeHistory(
        arguments: Array(CommandLine.arguments.drop { $0 != "serve" }.dropFirst())))
    let control = controlPath.map { _ in
      ControlServer(
        server: server,
        identity: ControlIdentity(
          device: served, backend: kernelDevice == nil ? "simulated" : "kernel",
          socket: fd.map { "fd \($0)" } ?? ServedRecord.absolutePath(path),
          version: XeVFIOUser.configuration.version),
        logger: logger, logLevel: runtimeLogLevel, liveUpdate: updater.handle)
    }
    if let control, let controlPath {
      do {
        try makeSocket(controlPath) { path throws(Errno) in try control.listen(socketPath: path) }
      } catch {
        if fd == nil { unlink(path) }
        throw error
      }
      updater.control.withLock { $0 = (control.listeningDescriptor, controlPath) }
      updater.controlServer.withLock { $0 = control }
    }
    // Everything that needs root is open by now: the device (with a kernel
    // backend, its VFIO and IOMMU descriptors, and for the pf-debugfs path
    // the PF's control files, which openKernelDevice opens up front and keeps)
    // and the socket.
    if record == nil {
      // A record for the simulated VF too, so that `list`, `top` and `metrics` find it.
      record = ServedRecord(
        device: ServedRecord.simulatedName(pid: getpid()), pid: Int(getpid()),
        socket: fd.map { "fd \($0)" } ?? ServedRecord.absolutePath(path),
        migration: "simulated: the simulated PF's stream",
        control: controlPath.map(ServedRecord.absolutePath), served: served)
      // Only `list`, `top` and `metrics` miss it (a user who may not write /run).
      if let warning = try record!.claim() { logger.notice("\(warning)") }
    }
    if let user {
      let identity = try unprivilegedIdentity(user: user, group: group)
      // The socket becomes the server's, so it can still remove it at exit.
      for owned in (fd == nil ? [path] : []) + (controlPath.map { [$0] } ?? [])
      where chown(owned, identity.uid, socketGroup.flatMap(groupID) ?? identity.gid) != 0 {
        throw CLIError("cannot give \(owned) to \(user): \(describe(Errno(rawValue: errno)))")
      }
      try dropPrivileges(to: identity)
      logger.info("running as uid \(identity.uid) gid \(identity.gid) (--user, --group)")
    }
    if !limits.allowedUIDs.isEmpty || !limits.allowedGIDs.isEmpty {
      logger.info(
        "serving only uids \(limits.allowedUIDs.sorted()) and gids \(limits.allowedGIDs.sorted())")
    }
    logger.info("serving \(served) on \(fd.map { "fd \($0)" } ?? path)")
    if let controlPath { logger.info("control socket: \(controlPath)") }
    if let logging = backend as? any DMALoggingCapable {
      logger.info("DMA logging: \(logging.dmaLoggingMethod)")
    }
    if !quiet, fd == nil {
      print("Attach it to QEMU (10.1 or later) with:\n\n\(qemuCommandLine(socketPath: path))\n")
      fflush(nil)
    }
    control?.start()
    server.start()
    server.wait()
    control?.stop()
    record?.release()
  }

  /// Creates a socket at `path` with `listen`, owner-only so that no one
  /// else can connect before its mode and group are set, then gives it
  /// --socket-group and --socket-mode: the device socket and the control
  /// socket alike.
  func makeSocket(_ path: String, listen: (String) throws(Errno) -> Void) throws {
    do {
      let mask = umask(0o177)
      defer { umask(mask) }
      try listen(path)
    } catch {
      switch error {
      case .addressInUse:
        throw CLIError("\(path): another server is listening there (EADDRINUSE)")
      case .isDirectory:
        throw CLIError("\(path) is a directory; name a socket path such as \(path)/vf0.sock")
      case .tooManySymbolicLinkLevels:
        throw CLIError(
          "\(path) is a symbolic link; a socket path is never followed through one: remove it or choose another path"
        )
      case .notSocket:
        throw CLIError(
          "\(path) exists and is not a socket; refusing to replace it: remove it or choose another path"
        )
      default: throw CLIError("cannot listen on \(path): \(describe(error))")
      }
    }
    if let group = socketGroup.flatMap(groupID), chown(path, UInt32.max, group) != 0 {
      throw CLIError(
        "cannot give \(path) to group \(socketGroup!): \(describe(Errno(rawValue: errno)))")
    }
    chmod(path, mode_t(UInt32(socketMode, radix: 8)!))
  }
}

/// Switches the process to `identity` for good: supplementary groups
/// dropped, gid then uid set, and checked that root cannot be regained. Throws if any step fails: a server that meant to
/// drop root must not go on serving as root.
func dropPrivileges(to identity: (uid: uid_t, gid: gid_t)) throws {
  let (uid, gid) = identity
  var groups = [gid]
  guard setgroups(1, &groups) == 0 else {
    throw CLIError("cannot drop supplementary groups: \(describe(Errno(rawValue: errno)))")
  }
  guard setgid(gid) == 0 else {
    throw CLIError("cannot switch to group \(gid): \(describe(Errno(rawValue: errno)))")
  }
  guard setuid(uid) == 0 else {
    throw CLIError("cannot switch to user \(uid): \(describe(Errno(rawValue: errno)))")
  }
  // Real, effective and saved ids all changed, and root out of reach.
  var uids: [uid_t] = [0, 0, 0]
  var gids: [gid_t] = [0, 0, 0]
  let read = cvfu_get_credentials(&uids, &gids)
  let regained = uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)
  guard read == 0, uids.allSatisfy({ $0 == uid }), gids.allSatisfy({ $0 == gid }), !regained
  else {
    throw CLIError("privileges not dropped: uids \(uids), gids \(gids)")
  }
}

/// The uid of `user` and the gid of `group`, else the user's own group.
func unprivilegedIdentity(user: String, group: String?) throws -> (uid: uid_t, gid: gid_t) {
  guard let uid = userID(user) else { throw CLIError("--user: no user '\(user)'") }
  let ownGroup = getpwuid(uid).map { $0.pointee.pw_gid }
  guard let gid = group.flatMap(groupID) ?? ownGroup else {
    throw CLIError("--user \(user) has no group of its own: name one with --group")
  }
  return (uid, gid)
}

/// A user name or number as a uid.
func userID(_ name: String) -> UInt32? {
  if let number = UInt32(name) { return number }
  return getpwnam(name).map { $0.pointee.pw_uid }
}

/// A group name or number as a gid.
func groupID(_ name: String) -> UInt32? {
  if let number = UInt32(name) { return number }
  return getgrnam(name).map { $0.pointee.gr_gid }
}
