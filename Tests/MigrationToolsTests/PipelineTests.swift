import MigrationTools
import Testing
import VFIODevice

#if canImport(Glibc)
  import Glibc
#endif

/// The copy pipeline the migration commands move their streams through, in-process.
@Suite struct PipelineTests {
  struct Failure: Error, Equatable { var side: String }

  /// A stream of `count` bytes in `piece`-byte reads, each byte its offset's low bits.
  final class Source: @unchecked Sendable {
    let count: Int
    let piece: Int
    var offset = 0
    init(count: Int, piece: Int) {
      self.count = count
      self.piece = piece
    }
    func read(into buffer: UnsafeMutableRawBufferPointer) -> (count: Int, last: Bool) {
      let n = min(piece, buffer.count, count - offset)
      for i in 0..<n { buffer[i] = UInt8(truncatingIfNeeded: offset + i) }
      offset += n
      return (n, offset == count)
    }
  }

  @Test(arguments: [(0, 64), (1, 64), (4096, 64), (100_003, 4096), (1 << 20, 1 << 16)])
  func theStreamArrivesWholeAndInOrder(_ count: Int, _ bufferSize: Int) throws {
    let source = Source(count: count, piece: bufferSize - 3)
    var received: [UInt8] = []
    let total = try pipeline(bufferSize: bufferSize, slots: 3) { buffer in
      source.read(into: buffer)
    } consume: { data in
      received += data
    }
    #expect(total == UInt64(count))
    #expect(received.count == count)
    #expect(received.enumerated().allSatisfy { $0.element == UInt8(truncatingIfNeeded: $0.offset) })
  }

  @Test func theProducersErrorIsRethrownAfterWhatItMadeBefore() throws {
    let reads = Locked(0)
    var consumed = 0
    #expect(throws: Failure(side: "produce")) {
      _ = try pipeline(bufferSize: 16) { buffer in
        let n = reads.withLock {
          $0 += 1
          return $0
        }
        if n == 5 { throw Failure(side: "produce") }
        return (buffer.count, false)
      } consume: { _ in
        consumed += 1
      }
    }
    #expect(consumed == 4)
  }

  @Test func theConsumersErrorStopsTheProducer() throws {
    let reads = Locked(0)
    #expect(throws: Failure(side: "consume")) {
      _ = try pipeline(bufferSize: 16, slots: 2) { buffer in
        reads.withLock { $0 += 1 }
        return (buffer.count, false)
      } consume: { _ in
        throw Failure(side: "consume")
      }
    }
    // Stopped, and waited for: at most the pool's buffers and the one it was filling.
    let made = reads.withLock { $0 }
    #expect(made <= 3)
    usleep(20_000)
    #expect(reads.withLock { $0 } == made)
  }
}
