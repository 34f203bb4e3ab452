import ArgumentParser
import CVFIOUser
import Control
import KernelVFIO
import KernelVFIOBackend
import LiveUpdate
import Logging
import MigrationTools
import Synchronization
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// What a serve process knows of the servers before it (live update).
struct ServeHistory: Sendable {
  /// serve's arguments as first given: each successor parses them again.
  var arguments: [String]
  /// Live updates so far.
  var updates = 0
  /// When the first of them started (seconds since the epoch).
  var firstStarted = Int64(time(nil))
}

/// The serve process's side of `live-update` (the control socket's command):
/// starts the new binary, hands everything over, and tells the control
/// client; on success the control channel ends this process after the reply.
final class LiveUpdater: Sendable {
  let server: VFIOUserServer
  let logger: Logger
  let history: ServeHistory
  /// The control socket, handed on too, and its server (whose accept loop
  /// parks first: a control client accepted by this process after the commit
  /// would be lost with it).
  let control = Locked<(fd: Int32, path: String?)?>(nil)
  let controlServer = Locked<ControlServer?>(nil)
  private let busy = Atomic<Bool>(false)

  init(server: VFIOUserServer, logger: Logger, history: ServeHistory) {
    self.server = server
    self.logger = logger
    self.history = history
  }

  /// This server's executable as installed now: after an upgrade replaced
  /// the file, /proc/self/exe names the old one "(deleted)", and the path is
  /// the new binary's.
  static func installedExecutable() -> String {
    let path = currentExecutable()
    let deleted = " (deleted)"
    return path.hasSuffix(deleted) ? String(path.dropLast(deleted.count)) : path
  }

  func handle(_ binary: String?) -> (ControlProtocol.Answer, exit: Bool) {
    guard !busy.exchange(true, ordering: .acquiringAndReleasing) else {
      return (.failure(.genericError, "a live update is already under way"), false)
    }
    defer { busy.store(false, ordering: .releasing) }
    let path = binary ?? Self.installedExecutable()
    logger.notice("live update: starting \(path)")
    let result: Result<LiveUpdateReport, HandoverRefusal>
    do throws(HandoverRefusal) {
      let successor = try Successor(binary: path, timeoutMilliseconds: 10_000)
      var process = HandoverEncoder()
      process.int(history.arguments.count)
      for argument in history.arguments { process.string(argument) }
      process.int(history.updates + 1)
      process.i64(history.firstStarted)
      process.u32(UInt32(bitPattern: getpid()))
      process.optional(control.withLock { $0 }) { out, control in
        out.descriptor(FileDescriptor(rawValue: control.fd))
        out.optional(control.path) { $0.string($1) }
      }
      let controlServer = controlServer.withLock { $0 }
      if let controlServer, !controlServer.acceptHold.hold(timeoutMilliseconds: 2000) {
        successor.abandon("the control socket's accept loop did not pause")
        throw HandoverRefusal("the control socket's accept loop did not pause")
      }
      result = server.handOver(to: successor, process: process)
      if case .failure = result { controlServer?.acceptHold.release() }
    } catch {
      result = .failure(error)
    }
    switch result {
    case .success(let report):
      // Under systemd the successor becomes the service's main process
      // before this one exits (the unit's NotifyAccess=main).
      let notified = cvfu_sd_notify("MAINPID=\(report.successorPID)")
      if notified < 0 {
        logger.warning(
          "cannot tell the service manager the new main pid: \(Errno(rawValue: -notified))")
      }
      return (
        .value(
          .object([
            ("pid", .int(Int64(report.successorPID))),
            ("version", .string(report.successorVersion)),
            ("handover-ms", .int(report.handoverMilliseconds)),
            ("client", .bool(report.withClient)),
          ])), true
      )
    case .failure(let refusal):
      logger.warning("live update refused: \(refusal.reason); this server carries on")
      return (
        .failure(.genericError, "live update refused: \(refusal.reason); the server carries on"),
        false
      )
    }
  }
}

/// A live update's successor: `serve --handover-fd N`.
enum TakeOver {
  /// Says hello on `fd`, takes the state, rebuilds the server from it with
  /// the old server's own options, and serves once the old one committed
  /// and exited. Anything that fails before the commit is said to the old
  /// server, which carries on, and this process exits touching nothing.
  static func run(fd: Int32) throws {
    let link = HandoverLink(OwnedFileDescriptor(taking: FileDescriptor(rawValue: fd)))
    do throws(HandoverRefusal) {
      try link.send(
        .hello,
        HandoverHello(
          minimumVersion: HandoverRecord.version, maximumVersion: HandoverRecord.version,
          pid: getpid(), version: XeVFIOUser.configuration.version
        ).encoded())
      var message = try link.receive(timeoutMilliseconds: 60_000)
      guard message.kind == .state else {
        if message.kind == .abort { _exit(1) }
        throw HandoverRefusal("expected the state, got \(message.kind)")
      }
      var descriptors = OwnedFileDescriptors()
      var received = message.descriptors.takeAll()
      swap(&descriptors, &received)
      let record = try HandoverRecord(decoding: message.payload)
      var process = HandoverDecoder(record.section(.process) ?? [], what: "process")
      var arguments: [String] = []
      for _ in 0..<(try process.count(itemBytes: 8)) { arguments.append(try process.string()) }
      let updates = try process.int()
      let firstStarted = try process.i64()
      let previous = Int32(bitPattern: try process.u32())
      let controlSocket = try process.optional { input throws(HandoverRefusal) in
        (
          try input.descriptor(count: descriptors.count),
          try input.optional { input throws(HandoverRefusal) in try input.string() }
        )
      }
      try process.finish()
      let options: Serve
      do { options = try Serve.parse(arguments) } catch {
        throw HandoverRefusal(
          "this binary does not accept the old server's options (\(arguments.joined(separator: " "))): \(Serve.message(for: error))"
        )
      }
      var control: (fd: Int32, path: String?)?
      if let controlSocket {
        guard let socket = descriptors.take(controlSocket.0) else { throw process.corrupt() }
        control = (socket.release().rawValue, controlSocket.1)
      }
      try options.takeOver(
        link: link, record: record, descriptors: &descriptors,
        history: ServeHistory(arguments: arguments, updates: updates, firstStarted: firstStarted),
        previous: previous, control: control)
    } catch {
      FileHandleLog.write("xe-vfio-user (live update successor): refusing: \(error.reason)\n")
      try? link.send(.refused, Array(error.reason.utf8))
      _exit(1)
    }
  }
}

/// A line to standard error before logging is set up.
enum FileHandleLog {
  static func write(_ line: String) {
    _ = Array(line.utf8).withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
  }
}

extension Serve {
  /// The successor's serve: the device, the listeners and the client's
  /// connection from the record, then ready, the commit, the old process
  /// gone, and serving as `run` does.
  func takeOver(
    link: HandoverLink, record: HandoverRecord, descriptors: inout OwnedFileDescriptors,
    history: ServeHistory, previous: Int32, control controlSocket: (fd: Int32, path: String?)?
  ) throws(HandoverRefusal) {
    let logger = bootstrapLogging(level: logLevel)
    var state = try record.deviceState(descriptors: &descriptors)
    let backend: any VFIODeviceBackend
    let served: String
    let kernel: KernelVFIOBackend?
    if let kernelDevice {
      // Open already, through the old process's descriptors: taken, not opened again.
      let imported = try importKernelDevice(
        kernelDevice, state.bytes, descriptors: state.descriptors.takeAll(), logger: logger)
      (backend, served, kernel) = (imported.backend, imported.description, imported.backend)
    } else {
      let device = try SimulatedXeVF.importHandover(
        state.bytes, descriptors: state.descriptors.takeAll(), logger: logger)
      let vram = device.vramSize > 0 ? ", \(formatBytes(device.vramSize)) VRAM" : ""
      backend = device
      served =
        "simulated Xe VF \(device.profile.name) [8086:\(String(device.profile.deviceID, radix: 16))]\(vram)"
      kernel = nil
    }
    let limits = makeLimits()
    let server = VFIOUserServer(backend: backend, limits: limits, logger: logger)
    let (pausedAt, client) = try server.adopt(record, descriptors: &descriptors)
    let updater = LiveUpdater(server: server, logger: logger, history: history)
    var controlServer: ControlServer?
    if let controlSocket {
      let made = ControlServer(
        server: server,
        identity: ControlIdentity(
          device: served, backend: kernel == nil ? "simulated" : "kernel",
          socket: fd.map { "fd \($0)" }
            ?? ServedRecord.absolutePath(socketPath ?? defaultSocketPath),
          version: XeVFIOUser.configuration.version),
        logger: logger, logLevel: runtimeLogLevel, liveUpdate: updater.handle)
      made.listen(fd: controlSocket.fd, socketPath: controlSocket.path)
      updater.control.withLock { $0 = controlSocket }
      updater.controlServer.withLock { $0 = made }
      controlServer = made
    }
    // No signal handling before the commit: a SIGTERM now ends this process
    // by default, before it touched anything shared, and the old server
    // carries on (a stop would shut down the listener the old one still uses).
    try link.send(.ready)
    let answer = try link.receive(timeoutMilliseconds: 30_000)
    guard answer.kind == .commit else {
      logger.notice("live update called off by the old server: it carries on")
      _exit(1)
    }
    // The old process exits right after the commit; nothing is served before it has.
    if !link.waitForClose(timeoutMilliseconds: 5000) {
      logger.warning("the old server (pid \(previous)) has not exited 5 s after the commit")
    }
    link.close()
    do {
      try takeSignals(Interruption.signals) { number in
        logger.info("signal \(number): shutting down")
        server.stop()
      }
    } catch {
      logger.error("cannot take SIGINT, SIGTERM and SIGHUP: \(error); they end the server abruptly")
    }
    let socket = fd.map { "fd \($0)" } ?? ServedRecord.absolutePath(socketPath ?? defaultSocketPath)
    let control = controlSocket?.path.map(ServedRecord.absolutePath)
    let record: ServedRecord
    if let kernel {
      // The device's record, under its name as `run` writes it: the old
      // process's lock went with it (a moment after its end of the link).
      record = ServedRecord(
        device: kernel.device.name, pid: Int(getpid()), socket: socket,
        migration: kernel.plan.summary, opened: kernel.device.reach, control: control,
        served: served)
      claimAfter(previous: previous, record, logger: logger)
    } else {
      record = ServedRecord(
        device: ServedRecord.simulatedName(pid: getpid()), pid: Int(getpid()), socket: socket,
        migration: "simulated: the simulated PF's stream", control: control, served: served)
      if let warning = try? record.claim() { logger.notice("\(warning)") }
    }
    let pause = cvfu_monotonic_ms() - pausedAt
    server.statistics.recordLiveUpdate(
      LiveUpdateInfo(
        count: history.updates, at: Int64(time(nil)), firstStarted: history.firstStarted,
        previousPID: previous, pauseMilliseconds: pause))
    logger.notice(
      "live update: took over from pid \(previous) (update \(history.updates)) serving \(served)\(client.map { " with client pid \($0)" } ?? ""); requests paused \(pause) ms"
    )
    controlServer?.start()
    server.start()
    server.wait()
    controlServer?.stop()
    record.release()
  }

  /// Claims the record `previous` held: its lock goes when that process has
  /// gone, which may be a moment after its end of the handover socket closed.
  private func claimAfter(previous: Int32, _ record: ServedRecord, logger: Logger) {
    for attempt in 0..<100 {
      do {
        if let warning = try record.claim() { logger.notice("\(warning)") }
        return
      } catch {
        if attempt == 99 {
          logger.warning("\(error) (pid \(previous) served it before this process)")
        }
        usleep(20_000)
      }
    }
  }
}
