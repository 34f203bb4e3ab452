import CVFIOUser
import Checkpoint
import Testing
import XeStream

/// The checkpoint format (protocol/save-format.md) in-process: what the
/// writer puts in which record, that the reader gives back exactly the
/// stream, and that it refuses every kind of damage with its message.
@Suite struct CheckpointRoundTripTests {
  @Test(arguments: [[Int.max], [1], [23, 24, 4095, 4097], [65536, 3], [1 << 20]])
  func anySegmentationWritesTheSameFileAndReadsBackTheStream(_ cuts: [Int]) throws {
    let stream = xeStream()
    let whole = try checkpoint(stream)
    let cut = try checkpoint(stream, cuts: cuts)
    #expect(cut == whole)
    for pipe in [false, true] {
      let back = try readBack(cut, pipe: pipe)
      #expect(back.stream == stream)
      #expect(back.json == Array(#"{"test":true}"#.utf8))
      #expect(try readBack(cut, tagged: true, pipe: pipe).stream == stream)
    }
  }

  @Test func zeroPagesOfVRAMBecomeZeroRecordsAndTheRestCompressesWhereItPays() throws {
    let stream = xeStream(vramPages: 256)
    let file = try checkpoint(stream)
    let records = try SaveRecordHeader.records(of: file)
    #expect(records.last?.kind == .end)
    #expect(records.dropLast().reduce(0) { $0 + $1.streamLength } == stream.count)
    #expect(records.contains { $0.kind == .zeros })
    #expect(records.contains { $0.kind == .zstd })
    // Most of the VRAM is zero pages: the file is a fraction of the stream.
    #expect(file.count < stream.count / 4, "\(file.count) of \(stream.count)")
    // Zero records stand for whole pages only.
    #expect(records.filter { $0.kind == .zeros }.allSatisfy { $0.streamLength % 4096 == 0 })
  }

  @Test func withoutElisionOrCompressionEveryRecordIsStored() throws {
    let stream = xeStream()
    let file = try checkpoint(stream) {
      $0.elideZeros = false
      $0.compress = false
    }
    let records = try SaveRecordHeader.records(of: file)
    #expect(records.dropLast().allSatisfy { $0.kind == .stored })
    #expect(try readBack(file).stream == stream)
  }

  @Test func zeroRunsLongerThanARecordAreSplit() throws {
    let stream = packet(.vram, [UInt8](repeating: 0, count: 40 << 20)) + packet(.trailer, [])
    let file = try checkpoint(stream, cuts: [3 << 20])
    let zeros = try SaveRecordHeader.records(of: file).filter { $0.kind == .zeros }
    #expect(zeros.map(\.streamLength) == [SaveFormat.maxRecord, SaveFormat.maxRecord, 8 << 20])
    #expect(try readBack(file).stream == stream)
    #expect(try readBack(file, tagged: true).stream == stream)
  }

  @Test func aStreamTheScannerCannotFollowIsStillCarriedByteForByte() throws {
    // Not Xe packets at all: a header whose size runs past the end, and noise.
    let stream = noise(100_000, seed: 7)
    #expect(try readBack(try checkpoint(stream)).stream == stream)
  }

  @Test func theSparseFormIsTakenAsItsZeroRunsWithNoScan() throws {
    let stream = xeStream(vramPages: 128)
    // The sparse form of the stream, built from its zero pages as the server would cut them.
    var sparse: [UInt8] = []
    var builder = SparseStreamBuilder()
    let scanner = XeStreamScanner()
    stream.withUnsafeBytes { bytes in
      scanner.scan(bytes) { segment in builder.append(segment) { sparse += $0 } }
    }
    if let tail = scanner.flush() { builder.append(.data(tail)) { sparse += $0 } }
    #expect(builder.atBoundary)
    #expect(sparse.count < stream.count / 2)
    let file = try checkpoint(sparse, cuts: [1000, 8, 70_000]) { $0.sparseInput = true }
    #expect(try readBack(file).stream == stream)
    #expect(try SaveRecordHeader.records(of: file).contains { $0.kind == .zeros })
    // Cut inside a packet: the writer says so instead of sealing half a stream.
    #expect(throws: SaveFileError.self) {
      _ = try checkpoint(Array(sparse.dropLast(5))) { $0.sparseInput = true }
    }
    // A malformed segment (kind 3) is refused as such.
    var malformed = sparse
    malformed[firstSegmentOffset(sparse)] = 3
    #expect(throws: MalformedSparseStream.self) {
      _ = try checkpoint(malformed) { $0.sparseInput = true }
    }
  }

  /// Where the first VRAM packet's first segment header is in a sparse stream.
  func firstSegmentOffset(_ sparse: [UInt8]) -> Int {
    var at = 0
    while true {
      let header = try! XePacketHeader(decoding: Array(sparse[at..<(at + XePacketHeader.size)]))
      at += XePacketHeader.size
      if header.type == .vram { return at }
      at += Int(header.size)
    }
  }

  @Test func aWriteErrorComesOutOfTheWriter() throws {
    let writer = SaveFileWriter()
    let out = FullSink(limit: 64 << 10)
    let stream = noise(4 << 20, seed: 3)
    #expect(throws: FullSink.Full.self) {
      try stream.withUnsafeBytes { try writer.append($0, to: out) }
      try writer.finish(to: out)
    }
  }

  @Test func withoutChecksumsOnlyTheEndRecordIsSealed() throws {
    let file = try checkpoint(xeStream()) { $0.checksummed = false }
    // What `bench` measures: such a file is refused at its first record.
    #expect(refusal(file)?.contains("checksum mismatch in the record") == true)
  }
}

@Suite struct CheckpointRefusalTests {
  let file: [UInt8] = try! checkpoint(xeStream())

  func expectRefused(
    _ bytes: [UInt8], _ message: String, sourceLocation: SourceLocation = #_sourceLocation
  ) {
    for pipe in [false, true] {
      let why = refusal(bytes, pipe: pipe)
      #expect(
        why?.contains(message) == true, "\(why ?? "read whole")", sourceLocation: sourceLocation)
    }
  }

  @Test func anEmptyOrForeignFileIsNamedAsSuch() {
    expectRefused([], "test.xesave is empty (0 bytes), not an xe-vfio-user save file")
    expectRefused(
      Array("not a checkpoint at all".utf8), "is not an xe-vfio-user save file (bad magic)")
  }

  @Test func otherVersionsAreRefusedWithWhatThisReads() {
    var v1 = file
    v1[8] = 1
    expectRefused(v1, "save file format 1 is not supported (this reads 2 to 3)")
    var v4 = file
    v4[8] = 4
    expectRefused(v4, "save file format 4 is not supported")
  }

  @Test func aDamagedHeaderIsRefused() {
    var json = file
    json[SaveFormat.fixedHeaderSize + 2] ^= 0x20
    expectRefused(json, "header checksum mismatch; the file is damaged")
    var length = file
    length.replaceSubrange(12..<16, with: le32(UInt32(SaveFormat.maxHeaderJSON + 1)))
    expectRefused(length, "the header is damaged (JSON length")
  }

  @Test func everyFlippedBitOfARecordIsACheckumMismatch() throws {
    let records = try SaveRecordHeader.records(of: file)
    for record in records.dropLast() {
      // In the header's CRC-covered part (stream length's low byte), and in the body.
      var header = file
      header[Int(record.start) + 9] ^= 0x01
      let why = refusal(header)
      #expect(
        why?.contains("checksum mismatch in the record") == true
          || why?.contains("damaged record header") == true, "\(why ?? "read whole")")
      guard record.bodyLength > 0 else { continue }
      var body = file
      body[Int(record.start) + 16 + record.bodyLength / 2] ^= 0x10
      #expect(
        refusal(body)?.contains("checksum mismatch in the record at bytes \(record.start)") == true)
    }
  }

  @Test func damagedRecordHeadersAreRefusedBeforeTheirBody() throws {
    let records = try SaveRecordHeader.records(of: file)
    let zeros = try #require(records.first { $0.kind == .zeros })
    var unknown = file
    unknown[Int(zeros.start) + 12] = 9
    expectRefused(unknown, "damaged record header at byte \(zeros.start) (kind 9")
    var reserved = file
    reserved[Int(zeros.start) + 14] = 1
    expectRefused(reserved, "damaged record header at byte \(zeros.start)")
    var body = file
    body.replaceSubrange(Int(zeros.start)..<Int(zeros.start) + 4, with: le32(4))
    expectRefused(body, "damaged record header at byte \(zeros.start) (kind 2, 4 bytes for")
    #expect(throws: SaveFileError.self) { try SaveRecordHeader.records(of: unknown) }
  }

  @Test func reorderedRecordsBreakTheChain() throws {
    let records = try SaveRecordHeader.records(of: file)
    let (a, b) = (records[0], records[1])
    let first = file[Int(a.start)..<Int(b.start)]
    let second = file[Int(b.start)..<(Int(b.start) + 16 + b.bodyLength)]
    var swapped = Array(file[..<Int(a.start)]) + second + first
    swapped += file[(Int(b.start) + 16 + b.bodyLength)...]
    expectRefused(swapped, "checksum mismatch in the record")
  }

  @Test func aFileCutShortOrWithMoreAfterItsEndIsRefused() throws {
    expectRefused(Array(file.dropLast(1)), "input truncated at byte")
    expectRefused(Array(file.prefix(SaveFormat.fixedHeaderSize + 5)), "input truncated at byte")
    expectRefused(file + [0], "unexpected data after the end record at byte \(file.count)")
    // A file that states its length is refused at once when it is shorter.
    var stated = file
    stated.replaceSubrange(24..<32, with: SaveFormat.fileLengthField(UInt64(file.count + 10)))
    #expect(
      refusal(stated)?.contains("input truncated at byte \(file.count) of \(file.count + 10)")
        == true)
  }

  @Test func theEndRecordMustAgreeWithTheRecords() throws {
    let end = try #require(try SaveRecordHeader.records(of: file).last)
    var count = file
    count[Int(end.start) + 16 + 16] ^= 1
    expectRefused(count, "checksum mismatch in the end record")
  }

  @Test func aCompressedRecordMustExpandToItsLength() throws {
    // A stored record relabelled as zstd: refused by the chain before zstd sees it.
    let plain = try checkpoint(xeStream()) { $0.compress = false }
    let stored = try #require(try SaveRecordHeader.records(of: plain).first { $0.kind == .stored })
    var relabelled = plain
    relabelled[Int(stored.start) + 12] = SaveRecordKind.zstd.rawValue
    expectRefused(relabelled, "checksum mismatch in the record")
  }
}

/// Version 2 (8-byte record headers, the CRC over the data only), as saved
/// before version 3: still read, with the same checks.
@Suite struct CheckpointVersionTwoTests {
  @Test func versionTwoFilesReadBackTheirStream() throws {
    let stream = xeStream()
    let v3 = try checkpoint(stream) {
      $0.elideZeros = false
      $0.compress = false
    }
    let v2 = try SaveFormat.versionTwo(of: v3)
    for pipe in [false, true] {
      #expect(try readBack(v2, pipe: pipe).stream == stream)
      #expect(try readBack(v2, tagged: true, pipe: pipe).stream == stream)
    }
    #expect(try SaveRecordHeader.records(of: v2).dropLast().allSatisfy { $0.kind == .stored })
    var damaged = v2
    damaged[damaged.count - 30] ^= 4
    #expect(refusal(damaged) != nil)
  }
}

@Suite struct RecordHeaderTests {
  @Test func versionThreeHeadersDecodeAndCheckTheirKind() throws {
    let stored = le32(100) + le32(0xABCD) + le32(100) + [1, 0, 0, 0]
    let header = try SaveRecordHeader(decoding: stored, version: 3, at: 40, name: "f")
    #expect(
      header
        == SaveRecordHeader(
          kind: .stored, bodyLength: 100, streamLength: 100, crc: 0xABCD, start: 40))
    let cases: [[UInt8]] = [
      le32(99) + le32(0) + le32(100) + [1, 0, 0, 0],  // stored, lengths differ
      le32(1) + le32(0) + le32(100) + [2, 0, 0, 0],  // zeros with a body
      le32(0) + le32(0) + le32(100) + [3, 0, 0, 0],  // zstd without one
      le32(200) + le32(0) + le32(100) + [3, 0, 0, 0],  // zstd longer than its stream
      le32(24) + le32(0) + le32(1) + [4, 0, 0, 0],  // end with a stream length
      le32(0) + le32(0) + le32(0) + [2, 0, 0, 0],  // zeros standing for nothing
      le32(0) + le32(0) + le32(UInt32(SaveFormat.maxRecord + 1)) + [2, 0, 0, 0],
      le32(0) + le32(0) + le32(4096) + [2, 0, 1, 0],  // reserved byte
    ]
    for bytes in cases {
      #expect(throws: SaveFileError.self) {
        try SaveRecordHeader(decoding: bytes, version: 3, at: 0, name: "f")
      }
    }
  }

  @Test func versionTwoHeadersAreLengthAndCRC() throws {
    let end = try SaveRecordHeader(decoding: le32(0) + le32(7), version: 2, at: 0, name: "f")
    #expect(end.kind == .end && end.crc == 7)
    let data = try SaveRecordHeader(decoding: le32(10) + le32(7), version: 2, at: 0, name: "f")
    #expect(data.kind == .stored && data.streamLength == 10)
    #expect(throws: SaveFileError.self) {
      try SaveRecordHeader(
        decoding: le32(UInt32(SaveFormat.maxRecord + 1)) + le32(0), version: 2, at: 0, name: "f")
    }
  }
}
