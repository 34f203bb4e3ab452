import CVFIOUser
import Checkpoint
import Logging
import MigrationTools
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// What the save file's checksums cost: the same `save` path (pipeline,
/// records, end record) into /dev/null, with and without the CRC-32C, so the
/// checksum is the only difference and no disk hides it; beside it, the
/// CRC-32C and memcpy rates measured in the same run.
struct SaveFigures {
  var vram: UInt64
  var streamBytes: UInt64
  var checksummedSeconds: Double
  var plainSeconds: Double
  var crcRate: Double
  var memcpyRate: Double
}

enum SaveBench {
  static func run(vram: UInt64, logger: Logger) throws -> SaveFigures {
    let device = try SimulatedXeVF(profile: .bmg, vramSize: vram, logger: logger)
    device.withDeviceMemory { memory in
      let words = memory.bindMemory(to: UInt64.self)
      for i in words.indices { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 }
    }
    let (server, client, path) = try serveForBench(device, name: "save", logger: logger)
    defer { server.stop() }
    let quiet = ProgressReporter(label: "", total: 0, enabled: false)

    // Alternate the two, five times each, and keep each one's best: the VM's noise hits both alike.
    var best = (checksummed: Double.infinity, plain: Double.infinity)
    var bytes: UInt64 = 0
    for round in 0..<10 {
      let checksummed = round % 2 == 0
      let out = try SaveOutput(path: "/dev/null")
      let writer = SaveFileWriter()
      writer.checksummed = checksummed
      // Data this bench's VRAM holds does not compress: the CRC is all that differs.
      writer.elideZeros = false
      writer.compress = false
      try client.setMigrationState(.stopCopy)
      let start = now()
      bytes = try writeRecords(
        from: client, end: path, into: out, writer: writer, progress: quiet)
      try writer.finish(to: out)
      let seconds = Double(now() - start) / 1e9
      try client.setMigrationState(.running)
      if checksummed {
        best.checksummed = min(best.checksummed, seconds)
      } else {
        best.plain = min(best.plain, seconds)
      }
    }
    return SaveFigures(
      vram: vram, streamBytes: bytes, checksummedSeconds: best.checksummed,
      plainSeconds: best.plain, crcRate: crc32cRate(),
      memcpyRate: SocketFloor.memcpyRate(
        size: 64 << 20, repeats: 8))
  }

  /// CRC-32C over 64 MiB, eight times, in bytes per second.
  static func crc32cRate() -> Double {
    let size = 64 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
    defer { buffer.deallocate() }
    for i in 0..<size { buffer[i] = UInt8(truncatingIfNeeded: i &* 31) }
    var crc: UInt32 = 0
    let start = now()
    // An opaque C call: the optimizer cannot drop it.
    for _ in 0..<8 { crc = cvfu_crc32c(crc, buffer.baseAddress, size) }
    return Double(8 * size) / (Double(now() - start) / 1e9)
  }
}

/// An in-process server for `device` that keeps its state across clients,
/// and a client connected to it with 4 MiB socket buffers.
func serveForBench(_ device: SimulatedXeVF, name: String, logger: Logger) throws -> (
  VFIOUserServer, VFIOUserClient, String
) {
  var limits = ServerLimits()
  limits.resetOnDisconnect = false
  let server = VFIOUserServer(backend: device, limits: limits, logger: logger)
  let path = "/tmp/xe-vfio-user-\(name)-\(getpid()).sock"
  try server.listen(socketPath: path)
  server.start()
  do {
    return (server, try benchClient(path), path)
  } catch {
    server.stop()
    throw error
  }
}

/// A bench's client of the server at `path`, offering the sparse migration stream or not.
func benchClient(_ path: String, sparse: Bool = false) throws -> VFIOUserClient {
  let client = try VFIOUserClient.connect(
    path: path,
    capabilities: sparse ? VFIOUserClient.sparseCapabilities : VFIOUserClient.defaultCapabilities)
  _ = cvfu_socket_buffers(client.socket.rawValue, 4 << 20)
  return client
}

/// Replaces `client` by one that offers the sparse stream or not, once the
/// server has seen the old one leave (it takes one client at a time).
func switchBenchClient(
  _ client: inout VFIOUserClient?, _ server: VFIOUserServer, _ path: String, sparse: Bool
) throws {
  if let current = client, current.sparseMigration == sparse { return }
  client = nil
  while server.statistics.snapshot.clientConnected { usleep(1000) }
  client = try benchClient(path, sparse: sparse)
}
