import CVFIOUser
import Checkpoint
import Logging
import MigrationTools
import SystemPackage
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

#if canImport(Glibc)
  import Glibc
#endif

/// What the checkpoint container gives one VRAM content: its size and save
/// and restore times beside the raw stream's (the same bytes with no
/// container: written as they come, read back and written to the device as
/// they are), all through the same pipeline `save` and `restore` use, into
/// files in /dev/shm (else /tmp); and a plain Unix-socket stream of the
/// stream's bytes measured in the same run.
struct CheckpointFigures {
  var content: String
  var streamBytes: UInt64
  var containerBytes: UInt64
  var containerSave: Double
  var rawSave: Double
  var containerRestore: Double
  /// The container restored as before the sparse stream: expanded, every byte sent.
  var expandedRestore: Double
  var rawRestore: Double
  var socketSeconds: Double
  /// Bytes of VRAM's memfd backed by memory before the saves and after them:
  /// a save reads the never-written pages without allocating them.
  var allocatedBeforeSaves: UInt64
  var allocatedAfterSaves: UInt64
}

enum CheckpointBench {
  /// The VRAM contents measured: 10% of the pages holding random data, every page random, none.
  enum Content: String, CaseIterable {
    case sparse = "10% data"
    case random = "random"
    case empty = "empty"
  }

  static func run(vram: UInt64, content: Content, logger: Logger) throws -> CheckpointFigures {
    let device = try SimulatedXeVF(profile: .bmg, vramSize: vram, logger: logger)
    device.withDeviceMemory { fill($0, content) }
    let (server, path) = try {
      let served = try serveForBench(device, name: "checkpoint", logger: logger)
      return (served.0, served.2)
    }()
    defer { server.stop() }
    // The container's rounds go over a client that negotiated the sparse stream, the raw
    // stream's (and the expanded restore's) over one that did not.
    var current: VFIOUserClient?
    func use(sparse: Bool) throws -> VFIOUserClient {
      try switchBenchClient(&current, server, path, sparse: sparse)
      return current!
    }
    let quiet = ProgressReporter(label: "", total: 0, enabled: false)
    // In memory (tmpfs) where there is one: a disk's writeback would be measured, not the format.
    let directory = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    let containerPath = "\(directory)/xe-vfio-user-bench-\(getpid()).xesave"
    let rawPath = "\(directory)/xe-vfio-user-bench-\(getpid()).raw"
    let identity = try DeviceIdentity.read(from: use(sparse: false))
    defer {
      unlink(containerPath)
      unlink(rawPath)
    }
    // VRAM's memfd, read with pread (which reads a hole as zeros without
    // allocating it, where the mapping would allocate it).
    var bar2 = try current!.regionInfo(VFIOPCIRegion.bar2)
    guard let vramFD = bar2.fd.take()?.release().rawValue else {
      throw CLIError("checkpoint bench: BAR2 came without its fd")
    }
    defer { close(vramFD) }
    let before = try vramChecksum(vramFD, size: vram)
    let allocatedBefore = allocatedBytes(vramFD)

    // Saves, alternating container and raw, best of three each: the VM's noise hits both alike.
    var best = (container: Double.infinity, raw: Double.infinity)
    var streamBytes: UInt64 = 0
    var containerBytes: UInt64 = 0
    for round in 0..<6 {
      let container = round % 2 == 0
      let client = try use(sparse: container)
      let out = try SaveOutput(path: container ? containerPath : rawPath)
      try client.setMigrationState(.stopCopy)
      let start = now()
      if container {
        let writer = SaveFileWriter()
        writer.sparseInput = client.sparseMigration
        try out.write(
          writer.header(
            json: try SaveFileHeader(
              identity: identity, estimatedBytes: vram, created: nil, source: path
            ).json()))
        streamBytes = try writeRecords(
          from: client, end: path, into: out, writer: writer, progress: quiet)
        try writer.finish(to: out)
      } else {
        streamBytes = try pipeline(bufferSize: migrationChunk(client)) { buffer in
          let n = try client.migDataRead(into: buffer)
          return (n, n < buffer.count)
        } consume: {
          try out.write($0)
        }
      }
      try out.commit()
      let seconds = Double(now() - start) / 1e9
      try client.setMigrationState(.running)
      if container {
        containerBytes = out.bytesWritten
        best.container = min(best.container, seconds)
      } else {
        best.raw = min(best.raw, seconds)
      }
    }

    let allocatedAfter = allocatedBytes(vramFD)
    guard try vramChecksum(vramFD, size: vram) == before else {
      throw CLIError("checkpoint bench: saving changed VRAM")
    }

    // Restores of each file into the same VF, each checked against the VRAM it was saved from.
    var restored = (container: Double.infinity, expanded: Double.infinity, raw: Double.infinity)
    for round in 0..<6 {
      let container = round % 3 != 2
      let client = try use(sparse: round % 3 == 0)
      _ = device.withDeviceMemory { $0.initializeMemory(as: UInt8.self, repeating: 0xEE) }
      let fd = try FileDescriptor.open(container ? containerPath : rawPath, .readOnly)
      defer { try? fd.close() }
      try client.setMigrationState(.resuming)
      let start = now()
      if container {
        let reader = SaveFileReader(input: fd, name: containerPath)
        _ = try reader.readHeader()
        _ = try restoreRecords(from: reader, into: client, end: path, progress: quiet)
      } else {
        let chunk = migrationChunk(client)
        let input = Handoff(fd)
        _ = try pipeline(bufferSize: SaveFormat.maxRecord) { buffer in
          var got = 0
          while got < buffer.count {
            let n = try input.value.read(
              into: UnsafeMutableRawBufferPointer(rebasing: buffer[got...]))
            if n == 0 { return (got, true) }
            got += n
          }
          return (got, false)
        } consume: {
          try client.migDataWrite(from: $0, chunk: chunk, depth: 2)
        }
      }
      try client.setMigrationState(.running)
      let seconds = Double(now() - start) / 1e9
      guard try vramChecksum(vramFD, size: vram) == before else {
        throw CLIError("checkpoint bench: the \(container ? "container" : "raw") restore lost VRAM")
      }
      if container {
        if client.sparseMigration {
          restored.container = min(restored.container, seconds)
        } else {
          restored.expanded = min(restored.expanded, seconds)
        }
      } else {
        restored.raw = min(restored.raw, seconds)
      }
    }
    return CheckpointFigures(
      content: content.rawValue, streamBytes: streamBytes, containerBytes: containerBytes,
      containerSave: best.container, rawSave: best.raw, containerRestore: restored.container,
      expandedRestore: restored.expanded, rawRestore: restored.raw,
      socketSeconds: SocketFloor.streamSeconds(
        bytes: Int(streamBytes), chunk: 1 << 20, serverCPU: nil),
      allocatedBeforeSaves: allocatedBefore, allocatedAfterSaves: allocatedAfter)
  }

  /// CRC32C of the `size` bytes of `fd`, read with pread.
  static func vramChecksum(_ fd: Int32, size: UInt64) throws -> UInt32 {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buffer.deallocate() }
    var crc: UInt32 = 0
    var offset: UInt64 = 0
    while offset < size {
      let n = Int(min(UInt64(buffer.count), size - offset))
      let status = cvfu_pread_all(fd, buffer.baseAddress, n, Int64(offset))
      guard status == 0 else {
        throw CLIError("checkpoint bench: reading VRAM: \(describe(Errno(rawValue: -status)))")
      }
      crc = cvfu_crc32c(crc, buffer.baseAddress, n)
      offset += UInt64(n)
    }
    return crc
  }

  /// Bytes of `fd` backed by memory.
  static func allocatedBytes(_ fd: Int32) -> UInt64 {
    var status = stat()
    guard fstat(fd, &status) == 0 else { return 0 }
    return UInt64(status.st_blocks) * 512
  }

  /// Random words (splitmix64) in every page, in one page of ten, or nowhere.
  static func fill(_ memory: UnsafeMutableRawBufferPointer, _ content: Content) {
    guard content != .empty else { return }
    let words = memory.bindMemory(to: UInt64.self)
    let perPage = 4096 / 8
    for page in 0..<(words.count / perPage) {
      if content == .sparse, splitmix(UInt64(page)) % 10 != 0 { continue }
      var state = UInt64(page) &* 0x9E37_79B9_7F4A_7C15
      for i in (page * perPage)..<((page + 1) * perPage) {
        state = splitmix(state)
        words[i] = state
      }
    }
  }

  @inline(__always)
  static func splitmix(_ x: UInt64) -> UInt64 {
    var z = x &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}
