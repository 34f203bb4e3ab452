import CVFIOUser
import Control
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// `bench --only liveupdate`: how long a live update makes the client's
/// requests wait, for an idle device, one with 60,000 DMA windows and one
/// with 4 GiB of VRAM holding data. A `serve` child of this executable is
/// updated to this executable again while a client thread sends 4-byte
/// REGION_READs back to back; its longest wait is the pause it saw. Beside
/// it: the successor's own figure (from the old server's last served message
/// to its first wait), the old server's (to the successor's ready), and the
/// raw Unix-socket round trip of the same run.
enum LiveUpdateBench {
  struct Figures {
    var name: String
    /// The longest REGION_READ round trip across the update, ms.
    var clientPause: Double
    var successorPause: Int64
    var handover: Int64
  }

  static let rounds = 3

  static func run(vram: UInt64, windows: Int, dataBytes: UInt64, name: String) throws -> Figures {
    let path = "/tmp/xe-vfio-user-lu-\(getpid())-\(windows)-\(vram >> 20).sock"
    let serve = try startServe(path, vram: vram)
    var serving = serve.pid
    defer {
      kill(serving, SIGTERM)
      serve.wait()
      // The last successor is not this process's child: wait for its socket to go.
      for _ in 0..<500 where access(path, F_OK) == 0 { usleep(10_000) }
    }
    var client: VFIOUserClient?
    for _ in 0..<500 where client == nil {
      client = try? VFIOUserClient.connect(path: path)
      if client == nil { usleep(10_000) }
    }
    guard let client else { throw BenchSetupError("`serve` did not start listening on \(path)") }
    let memfd = cvfu_memfd_create("bench-guest", 0)
    defer { close(memfd) }
    if windows > 0 {
      ftruncate(memfd, off_t(windows) * 4096)
      for i in 0..<windows {
        try client.dmaMap(
          address: 1 << 32 + UInt64(i) * 4096, size: 4096, flags: [.read, .write],
          fd: FileDescriptor(rawValue: memfd),
          offset: UInt64(i) * 4096)
      }
    }
    if dataBytes > 0 {
      let chunk = [UInt8](repeating: 0x5A, count: 1 << 20)
      var offset: UInt64 = 0
      while offset < dataBytes {
        try client.write(region: VFIOPCIRegion.bar2, offset: offset, data: chunk)
        offset += UInt64(chunk.count)
      }
    }
    var best = Figures(name: name, clientPause: .infinity, successorPause: 0, handover: 0)
    let control = path + ".control"
    for _ in 0..<rounds {
      let worker = PauseWatcher(client)
      worker.start()
      usleep(20_000)
      let answer = try ControlClient(path: control, timeoutMilliseconds: 60_000).execute(
        "live-update")
      let next = Int32(answer["pid"]?.integer ?? -1)
      var pause: Int64 = -1
      for _ in 0..<500 {
        if let status = try? ControlClient(path: control).execute("query-status"),
          status["server"]?["pid"]?.integer == Int64(next)
        {
          pause = status["server"]?["live-update"]?["pause-ms"]?.integer ?? -1
          break
        }
        usleep(10_000)
      }
      usleep(20_000)
      let seen = worker.stop()
      serving = next
      if seen < best.clientPause {
        best = Figures(
          name: name, clientPause: seen, successorPause: pause,
          handover: answer["handover-ms"]?.integer ?? -1)
      }
    }
    return best
  }
}

/// A thread sending 4-byte REGION_READs back to back, keeping the longest round trip.
private final class PauseWatcher: @unchecked Sendable {
  let client: VFIOUserClient
  let stopping = Locked(false)
  let longest = Locked(0.0)
  let done = VFIODevice.Semaphore(value: 0)
  init(_ client: VFIOUserClient) { self.client = client }

  func start() {
    _ = startThread(name: "bench-pause") { [self] in
      var worst: UInt64 = 0
      while !stopping.withLock({ $0 }) {
        let start = now()
        guard (try? client.read32(region: VFIOPCIRegion.bar0, offset: 0x0D8C)) != nil else { break }
        worst = max(worst, now() - start)
      }
      longest.withLock { $0 = Double(worst) / 1e6 }
      done.signal()
    }
  }

  /// Stops the thread; the longest round trip it saw, in ms.
  func stop() -> Double {
    stopping.withLock { $0 = true }
    done.wait()
    return longest.withLock { $0 }
  }
}

/// A quiet `serve` child of this very executable on `path`, with `vram` of VRAM.
func startServe(_ path: String, vram: UInt64) throws(Errno) -> ChildProcess {
  try ChildProcess(
    currentExecutable(),
    [
      "serve", "--socket-path", path, "--quiet", "--log-level", "error", "--vram-size", "\(vram)",
    ])
}
