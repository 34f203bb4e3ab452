import ArgumentParser
import Foundation
import VFIOUser
import VFIOUserClient
import VFIOUserServer

struct Migrate: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Move a VF's state from one server to another (vfio-user migration v2).",
    discussion: """
      Acts as the client of both servers: puts the destination in RESUMING,
      stops the source (STOP_COPY), streams its state across, completes both
      arcs and starts the destination. On any failure the step and errno are
      reported, the destination is reset, and the source goes back to RUNNING
      so the workload keeps going. Neither server may have another client.
      """)

  @Option(help: "Source server socket.") var from: String
  @Option(help: "Destination server socket.") var to: String
  @Flag(help: "Leave the destination stopped (STOP) instead of RUNNING.") var noStart = false
  @Flag(help: "No progress output.") var quiet = false

  func run() throws {
    let source = try step(.connect) { try VFIOUserClient.connect(path: from) }
    let destination = try step(.connect) { try VFIOUserClient.connect(path: to) }
    // RESUMING → STOP may wait for the PF up to 20 s per GT (the kernel's restore timeout).
    for client in [source, destination] { client.timeoutMilliseconds = migrationTimeout }
    let result: (bytes: UInt64, seconds: Double, downtime: Double)
    do {
      result = try migrate(source, destination)
    } catch {
      FileHandle.standardError.write(Data("migration failed: \(error)\n".utf8))
      rollback(source, destination)
      throw ExitCode.failure
    }
    print(
      String(
        format: "migrated %@ in %.3f s (%.2f GB/s); downtime %.3f s; destination %@",
        formatRate(result.bytes),
        result.seconds, Double(result.bytes) / result.seconds / 1e9, result.downtime,
        noStart ? "STOP" : "RUNNING"))
  }

  private func migrate(_ source: VFIOUserClient, _ destination: VFIOUserClient) throws -> (
    UInt64, Double, Double
  ) {
    let start = now()
    for client in [source, destination] {
      let flags = try step(.probe) { try client.migrationFlags() }
      guard flags.contains(.stopCopy) else {
        throw StepError(step: .probe, underlying: CLIError("the device does not support STOP_COPY"))
      }
    }
    let (a, b) = try step(.identity) {
      (try DeviceIdentity.read(from: source), try DeviceIdentity.read(from: destination))
    }
    if let why = a.incompatibility(with: b) {
      throw StepError(step: .identity, underlying: CLIError(why))
    }
    let estimate = (try? source.stopCopySize()) ?? 0
    try step(.resuming) { try destination.setMigrationState(.resuming) }
    let downtimeStart = now()
    try step(.stopCopy) { try source.setMigrationState(.stopCopy) }
    let progress = ProgressReporter(label: "migrating", total: estimate, enabled: !quiet)
    let bytes = try step(.stream) {
      try pumpStream(from: source, chunk: migrationChunk(source, destination), progress: progress) {
        data in
        try destination.migDataWrite(from: data)
      }
    }
    try step(.finishSave) { try source.setMigrationState(.stop) }
    try step(.finishRestore) { try destination.setMigrationState(noStart ? .stop : .running) }
    let end = now()
    return (bytes, Double(end - start) / 1e9, Double(end - downtimeStart) / 1e9)
  }

  /// The source keeps its workload; the destination must not look healthy with half a state.
  private func rollback(_ source: VFIOUserClient, _ destination: VFIOUserClient) {
    if (try? destination.reset()) == nil {
      FileHandle.standardError.write(Data("warning: could not reset the destination\n".utf8))
    }
    do {
      try source.setMigrationState(.running)
      FileHandle.standardError.write(Data("source is RUNNING again\n".utf8))
    } catch {
      // A source stuck in ERROR is revived by reset (which returns it to RUNNING).
      if (try? source.reset()) != nil {
        FileHandle.standardError.write(Data("source reset to RUNNING (\(error))\n".utf8))
      } else {
        FileHandle.standardError.write(
          Data("warning: could not return the source to RUNNING: \(error)\n".utf8))
      }
    }
  }
}

struct Save: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Save a VF's migration stream to a file or stdout (a checkpoint).",
    discussion: """
      Stops the device (STOP_COPY), writes a header that identifies the device
      followed by the raw stream, then returns the device to RUNNING (or leaves
      it stopped with --keep-stopped). `save --output - | ssh host xe-vfio-user
      restore --input -` moves a VF between hosts.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String
  @Option(name: [.short, .long], help: "File to write, or - for stdout.") var output: String
  @Flag(help: "Leave the device stopped after saving.") var keepStopped = false
  @Flag(help: "No progress output.") var quiet = false

  func run() throws {
    let client = try step(.connect) { try VFIOUserClient.connect(path: socketPath) }
    client.timeoutMilliseconds = migrationTimeout
    let handle: FileHandle
    if output == "-" {
      handle = .standardOutput
    } else {
      guard FileManager.default.createFile(atPath: output, contents: nil) else {
        throw CLIError("cannot create \(output)")
      }
      handle = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
    }
    do {
      _ = try step(.probe) { try client.migrationFlags() }
      let identity = try step(.identity) { try DeviceIdentity.read(from: client) }
      let estimate = (try? client.stopCopySize()) ?? 0
      let header = SaveFileHeader(
        identity: identity, estimatedBytes: estimate,
        created: ISO8601DateFormatter().string(from: Date()), source: socketPath)
      try handle.write(contentsOf: try header.encoded())
      try step(.stopCopy) { try client.setMigrationState(.stopCopy) }
      let progress = ProgressReporter(label: "saving", total: estimate, enabled: !quiet)
      let bytes = try step(.stream) {
        try pumpStream(from: client, chunk: migrationChunk(client), progress: progress) { data in
          try handle.write(
            contentsOf: Data(
              bytesNoCopy: UnsafeMutableRawPointer(mutating: data.baseAddress!), count: data.count,
              deallocator: .none))
        }
      }
      try step(.finishSave) { try client.setMigrationState(keepStopped ? .stop : .running) }
      try handle.synchronize()
      FileHandle.standardError.write(
        Data(
          "saved \(formatRate(bytes)) of \(identity) state\(keepStopped ? "; device left in STOP" : "")\n"
            .utf8))
    } catch {
      FileHandle.standardError.write(Data("save failed: \(error)\n".utf8))
      if (try? client.setMigrationState(.running)) == nil { try? client.reset() }
      if output != "-" { try? FileManager.default.removeItem(atPath: output) }
      throw ExitCode.failure
    }
  }
}

struct Restore: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Restore a saved migration stream into a VF.",
    discussion: """
      Refuses a stream saved from an incompatible device (IDs, revision, VRAM
      size) before touching the device. On failure the device is reset so it
      never runs with half a state.
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String
  @Option(name: [.short, .long], help: "File to read, or - for stdin.") var input: String
  @Flag(help: "Leave the device stopped (STOP) instead of RUNNING.") var noStart = false
  @Flag(help: "No progress output.") var quiet = false

  func run() throws {
    let handle =
      input == "-"
      ? FileHandle.standardInput : try FileHandle(forReadingFrom: URL(fileURLWithPath: input))
    let header = try SaveFileHeader.read(from: handle)
    let client = try step(.connect) { try VFIOUserClient.connect(path: socketPath) }
    client.timeoutMilliseconds = migrationTimeout
    let identity = try step(.identity) { try DeviceIdentity.read(from: client) }
    if let why = header.identity.incompatibility(with: identity) {
      throw CLIError(
        "refusing to restore: the stream is from \(header.identity), this device is \(identity): \(why)"
      )
    }
    do {
      _ = try step(.probe) { try client.migrationFlags() }
      try step(.resuming) { try client.setMigrationState(.resuming) }
      let progress = ProgressReporter(
        label: "restoring", total: header.estimatedBytes, enabled: !quiet)
      let chunk = migrationChunk(client)
      var total: UInt64 = 0
      try step(.stream) {
        while let data = try handle.read(upToCount: chunk), !data.isEmpty {
          try data.withUnsafeBytes { try client.migDataWrite(from: $0) }
          total += UInt64(data.count)
          progress.update(total)
        }
      }
      progress.update(total, final: true)
      try step(.finishRestore) { try client.setMigrationState(noStart ? .stop : .running) }
      FileHandle.standardError.write(
        Data("restored \(formatRate(total)); device \(noStart ? "STOP" : "RUNNING")\n".utf8))
    } catch {
      FileHandle.standardError.write(Data("restore failed: \(error)\n".utf8))
      if (try? client.reset()) != nil {
        FileHandle.standardError.write(Data("device reset to a clean RUNNING state\n".utf8))
      }
      throw ExitCode.failure
    }
  }
}
