import CVFIOUser
import Foundation
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

/// Polls `condition` every `interval` seconds until it holds or `timeout` passes.
@discardableResult
public func waitUntil(timeout: Double, interval: Double = 0.01, _ condition: () throws -> Bool)
  rethrows -> Bool
{
  let deadline = Date().addingTimeInterval(timeout)
  repeat {
    if try condition() { return true }
    usleep(UInt32(interval * 1_000_000))
  } while Date() < deadline
  return try condition()
}

/// A child process that could not be started.
public struct ChildProcessError: Error, CustomStringConvertible {
  public var description: String
  public init(_ description: String) { self.description = description }
}

/// A child process whose stdout and stderr go to files (a pipe nobody drains
/// would stall a chatty child), stopped by PID.
///
/// Spawned with posix_spawn rather than Foundation's Process: the child gets
/// an empty signal mask and default dispositions (test threads block SIGTERM,
/// and a blocked mask is inherited, so QEMU would ignore SIGTERM), and no
/// descriptor of the test process except stdin/stdout/stderr (a leaked client
/// socket would keep a connection open and hide a hang-up).
public class ChildProcess: @unchecked Sendable {
  public let pid: pid_t
  /// Where its stderr goes.
  public let logPath: String
  /// Where its stdout goes.
  public let outputPath: String
  private var exitStatus: Int32?

  /// - Parameters:
  ///   - environment: variables added to the test's own.
  ///   - outputDescriptor: where stdout and stderr both go instead of the
  ///     files (a pipe the test reads), lent: the child gets its own copy.
  public init(
    executable: String, arguments: [String], logPath: String, outputPath: String? = nil,
    environment: [String: String]? = nil, outputDescriptor: Int32? = nil
  ) throws {
    self.logPath = logPath
    self.outputPath = outputPath ?? logPath + ".stdout"
    // Opened here (close-on-exec), placed as 0, 1 and 2 in the child.
    var opened: [Int32] = []
    defer { opened.forEach { close($0) } }
    func open(_ path: String, _ flags: Int32) throws -> Int32 {
      let fd = Glibc.open(path, flags | O_CLOEXEC, 0o644)
      guard fd >= 0 else {
        throw ChildProcessError("cannot open \(path): \(String(cString: strerror(errno)))")
      }
      opened.append(fd)
      return fd
    }
    let input = try open("/dev/null", O_RDONLY)
    let output = try outputDescriptor ?? open(self.outputPath, O_WRONLY | O_CREAT | O_TRUNC)
    let errors = try outputDescriptor ?? open(logPath, O_WRONLY | O_CREAT | O_TRUNC)
    let variables = ProcessInfo.processInfo.environment.merging(environment ?? [:]) { $1 }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp = variables.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
      for pointer in argv + envp { free(pointer) }
    }
    var child: pid_t = 0
    let dups: [Int32] = [input, 0, output, 1, errors, 2]
    let result = cvfu_spawn(&child, executable, argv, envp, dups, 3, 3, 1)
    guard result == 0 else {
      throw ChildProcessError("cannot start \(executable): \(String(cString: strerror(result)))")
    }
    pid = child
  }

  deinit { _ = stop(grace: 2) }

  public var isRunning: Bool {
    guard exitStatus == nil else { return false }
    var status: Int32 = 0
    let reaped = waitpid(pid, &status, WNOHANG)
    if reaped == pid {
      // Exit code, or 128 + signal like a shell.
      exitStatus = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
      return false
    }
    return reaped == 0
  }

  /// The log (stderr) so far.
  public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  /// Its stdout so far.
  public var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }

  public func signal(_ number: Int32) { if isRunning { kill(pid, number) } }

  /// Waits for the process to exit by itself; returns false on timeout.
  public func waitForExit(timeout: Double) -> Bool {
    waitUntil(timeout: timeout, interval: 0.005) { !isRunning }
  }

  /// `signal` (unless it has exited), then SIGKILL after `grace` seconds;
  /// returns the exit status (128 + the signal for a signalled end).
  @discardableResult
  public func stop(signal: Int32 = SIGTERM, grace: Double = 5) -> Int32 {
    if isRunning {
      kill(pid, signal)
      if !waitForExit(timeout: grace) {
        kill(pid, SIGKILL)
        _ = waitForExit(timeout: 10)
      }
    }
    return exitStatus ?? -1
  }

  /// The descriptors it has open.
  public var openFDs: Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
  }
}

/// The built `xe-vfio-user`: `XE_VFU_BIN`, else the one next to the running
/// test bundle (any scratch path), else one in the usual build directories.
public let xeVFIOUserExecutable: String = {
  if let path = ProcessInfo.processInfo.environment["XE_VFU_BIN"] { return path }
  let files = FileManager.default
  if let exe = try? files.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
    let candidate = URL(fileURLWithPath: exe).deletingLastPathComponent()
      .appendingPathComponent("xe-vfio-user").path
    if files.isExecutableFile(atPath: candidate) { return candidate }
  }
  let root = ProtocolFiles.directory.deletingLastPathComponent().path
  for dir in [".build/debug", ".build-qemu/debug", ".build/release"] {
    let candidate = root + "/" + dir + "/xe-vfio-user"
    if files.isExecutableFile(atPath: candidate) { return candidate }
  }
  return root + "/.build/debug/xe-vfio-user"
}()

/// `xe-vfio-user serve` as a child process: the one way the suites start it.
/// Its socket is in `directory`, which it makes under the temporary directory
/// unless given one; its stderr and stdout go to files (`log`, `output`).
public final class ServeProcess: @unchecked Sendable {
  public let process: ChildProcess
  public let socketPath: String
  public let directory: String
  /// The log files are this value's (beside its directory), removed when it stops.
  private let ownsLogs: Bool

  /// - Parameters:
  ///   - arguments: after `serve --socket-path <socket>` (and the tracing options).
  ///   - directory: where the socket goes; nil makes a fresh one, which
  ///     `stop` removes (unless asked to keep it).
  ///   - directoryMode: the socket directory's mode (01777 lets a server that
  ///     dropped root remove its socket there).
  ///   - environment: variables added to the test's own for the server.
  ///   - logPath: where stderr goes (stdout to `logPath.stdout`); nil puts
  ///     both beside the directory, never in it.
  ///   - outputDescriptor: where stdout and stderr both go instead (lent).
  ///   - tracing: `--log-level trace --quiet`: every message it receives is
  ///     a line "<- COMMAND id=N size=N fds=N" in its log (`received`), and
  ///     the QEMU command line is not printed.
  ///   - waitUntilServing: returns once it serves (throws if it never does).
  public init(
    _ arguments: [String] = [], directory: String? = nil, socketName: String = "vf0.sock",
    directoryMode: mode_t? = nil, environment: [String: String] = [:], logPath: String? = nil,
    outputDescriptor: Int32? = nil, tracing: Bool = false, waitUntilServing: Bool = false
  ) throws {
    let directory =
      directory ?? NSTemporaryDirectory() + "xvu-serve-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    if let directoryMode { chmod(directory, directoryMode) }
    self.directory = directory
    socketPath = directory + "/" + socketName
    ownsLogs = logPath == nil
    process = try ChildProcess(
      executable: xeVFIOUserExecutable,
      arguments: ["serve", "--socket-path", socketPath]
        + (tracing ? ["--log-level", "trace", "--quiet"] : []) + arguments,
      logPath: logPath ?? directory + ".log", environment: environment,
      outputDescriptor: outputDescriptor)
    if waitUntilServing {
      let process = process
      guard
        waitUntil(timeout: 10, { process.log.contains("serving simulated Xe VF") || !isRunning }),
        isRunning
      else {
        throw ChildProcessError("xe-vfio-user serve did not start:\n\(log)")
      }
    }
  }

  deinit {
    process.stop()
    if ownsLogs { removeLogs() }
  }

  public var pid: pid_t { process.pid }
  public var isRunning: Bool { process.isRunning }
  /// Its stderr so far.
  public var log: String { process.log }
  /// Its stdout so far.
  public var output: String { process.output }
  public var logPath: String { process.logPath }
  public func signal(_ number: Int32) { process.signal(number) }
  public var openFDs: Int { process.openFDs }

  /// Mappings of client memory (a client's memfd, such as QEMU's guest RAM) it still has.
  public var clientMappings: Int {
    let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
    return maps.split(separator: "\n").filter { $0.contains("memfd:") && !$0.contains("xe-vf-") }
      .count
  }

  /// Connects once the socket is up.
  public func connect() throws -> VFIOUserClient {
    for _ in 0..<500 {
      if let client = try? VFIOUserClient.connect(path: socketPath) { return client }
      usleep(10_000)
    }
    return try VFIOUserClient.connect(path: socketPath)
  }

  /// Signals the server (unless it has exited; SIGKILL after `grace` seconds)
  /// and collects its output; the socket directory is removed afterwards
  /// unless `keepDirectory`.
  @discardableResult
  public func stop(signal: Int32 = SIGTERM, grace: Double = 30, keepDirectory: Bool = false)
    -> (status: Int32, stdout: String, stderr: String)
  {
    let status = process.stop(signal: signal, grace: grace)
    let result = (status, output, log)
    if !keepDirectory { try? FileManager.default.removeItem(atPath: directory) }
    if ownsLogs { removeLogs() }
    return result
  }

  private func removeLogs() {
    try? FileManager.default.removeItem(atPath: process.logPath)
    try? FileManager.default.removeItem(atPath: process.outputPath)
  }

  // MARK: The trace log (`tracing`)

  /// A position in the log, to look only at what came after it.
  public var mark: Int {
    (try? FileManager.default.attributesOfItem(atPath: logPath)[.size] as? Int) ?? 0
  }

  public func log(since mark: Int) -> String {
    guard let handle = FileHandle(forReadingAtPath: logPath) else { return "" }
    defer { try? handle.close() }
    try? handle.seek(toOffset: UInt64(mark))
    return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
  }

  /// The received messages of `command` (e.g. "REGION_WRITE") in `text`.
  public static func received(_ command: String, in text: String) -> [String] {
    text.split(separator: "\n").filter { $0.contains("<- \(command) id=") }.map(String.init)
  }

  public func received(_ command: String, since mark: Int = 0) -> [String] {
    Self.received(command, in: log(since: mark))
  }

  /// The `fds=N` of a trace line.
  public static func fds(_ line: String) -> Int {
    line.split(separator: " ").first { $0.hasPrefix("fds=") }.flatMap { Int($0.dropFirst(4)) } ?? -1
  }

  /// Waits until the log has `count` lines containing `text`.
  public func waitForLog(_ text: String, count: Int = 1, timeout: Double = 10) -> Bool {
    waitUntil(timeout: timeout) { log.components(separatedBy: text).count - 1 >= count }
  }
}
