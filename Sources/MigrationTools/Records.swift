import Checkpoint
import VFIOUser
import VFIOUserClient
import XeStream

// The checkpoint's records between a device and a file, shared by `save`,
// `restore` and the checkpoint benchmark.

/// Streams the device's STOP_COPY data into `out` as checksummed records
/// (the caller writes the end with `writer.finish`).
public func writeRecords(
  from client: VFIOUserClient, end: String, into out: SaveOutput, writer: SaveFileWriter,
  progress: ProgressReporter, interruption: Interruption? = nil
) throws -> UInt64 {
  let chunk = min(migrationChunk(client), SaveFormat.maxRecord)
  _ = try pipeline(bufferSize: chunk) { buffer in
    try interruption?.check()
    let n = try on(end) { try client.migDataRead(into: buffer) }
    return (n, n < buffer.count)
  } consume: { data in
    try writer.append(data, to: out)
    progress.update(state: writer.appendedBytes, wire: out.bytesWritten)
  }
  return writer.appendedBytes
}

/// Streams a save file's records, expanded and verified, into a device in
/// RESUMING; returns the stream bytes written. The file is read on a thread
/// of its own while the previous record is being written.
public func restoreRecords(
  from reader: SaveFileReader, into client: VFIOUserClient, end: String,
  progress: ProgressReporter
) throws -> UInt64 {
  let chunk = migrationChunk(client)
  let job = Handoff(reader)
  var total: UInt64 = 0
  if client.sparseMigration {
    return try restoreSparse(from: job, into: client, end: end, chunk: chunk) {
      total += UInt64($0)
      progress.update(state: total, wire: reader.bytesRead.load(ordering: .relaxed))
    }
  }
  return try pipeline(bufferSize: SaveFormat.maxRecord) { buffer in
    try job.value.readRecords(into: buffer)
  } consume: { data in
    try on(end) { try client.migDataWrite(from: data, chunk: chunk, depth: 2) }
    total += UInt64(data.count)
    progress.update(state: total, wire: reader.bytesRead.load(ordering: .relaxed))
  }
}

/// `restoreRecords` on a connection that negotiated the sparse stream: the
/// file's zero records cross the socket as zero segments, never as bytes.
/// The reader thread tags each record (`readTaggedRecords`); this thread
/// builds the sparse stream from them and sends it in `chunk`-byte writes.
/// Returns the expanded stream bytes restored.
private func restoreSparse(
  from job: Handoff<SaveFileReader>, into client: VFIOUserClient, end: String, chunk: Int,
  progress: (Int) -> Void
) throws -> UInt64 {
  let writer = BufferedMigDataWriter(client, end: end, chunk: chunk)
  let send = writer.send
  var builder = SparseStreamBuilder()
  var total: UInt64 = 0
  // On a failure the acknowledgements still due are read, so the reset that follows gets its own.
  defer { writer.collectAll() }
  _ = try pipeline(bufferSize: SaveFormat.maxRecord + SparseMigration.segmentHeaderSize) {
    buffer in
    try job.value.readTaggedRecords(into: buffer)
  } consume: { tagged in
    var at = 0
    while at < tagged.count {
      let word = UInt64(
        littleEndian: tagged.loadUnaligned(fromByteOffset: at, as: UInt64.self))
      let length = Int(word >> 32)
      at += SparseMigration.segmentHeaderSize
      if UInt8(truncatingIfNeeded: word) == SparseMigration.SegmentKind.zeros.rawValue {
        try builder.append(.zeros(length), send)
      } else {
        try builder.append(
          .data(UnsafeRawBufferPointer(rebasing: tagged[at..<(at + length)])), send)
        at += length
      }
      total += UInt64(length)
      progress(length)
    }
  }
  try writer.flush()
  return total
}
