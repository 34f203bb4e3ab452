import Logging
import Testing

@testable import Bench

/// `bench`'s pieces in-process: its table and summaries, and the checkpoint
/// figures on a small VF, which go through `save`'s and `restore`'s own
/// plumbing and check that every restore gives back the VRAM it saved.
@Suite(.serialized) struct BenchTests {
  @Test func theTableAlignsItsColumns() {
    var table = ReportTable()
    table.plain("x", "1", target: "t")
    #expect(
      table.render().split(separator: "\n") == [
        "figure  xe-vfio-user  raw socket  ratio  target  ",
        "x       1             -           -      t       ",
      ])
  }

  @Test func latencySummaries() {
    let summary = LatencySummary((1...100).map { UInt64($0) * 1000 })
    #expect(summary.p50 == 51)
    #expect(summary.p99 == 100)
    #expect(abs(summary.opsPerSecond - 100 / 0.00505) < 1e-6)
  }

  @Test func aTenthOfThePagesHoldDataInTheSparseContent() {
    let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096 * 1000, alignment: 4096)
    defer { memory.deallocate() }
    for content in CheckpointBench.Content.allCases {
      memory.initializeMemory(as: UInt8.self, repeating: 0)
      CheckpointBench.fill(memory, content)
      let pages = (0..<1000).filter { page in
        memory[(page * 4096)..<((page + 1) * 4096)].contains { $0 != 0 }
      }.count
      switch content {
      case .empty: #expect(pages == 0)
      case .random: #expect(pages == 1000)
      case .sparse: #expect(pages > 50 && pages < 150, "\(pages)")
      }
    }
  }

  @Test func checkpointsOfASmallVFRestoreWhatTheySaved() throws {
    var logger = Logger(label: "bench-test")
    logger.logLevel = .critical
    let vram: UInt64 = 4 << 20
    for content in CheckpointBench.Content.allCases {
      // run() throws when a restore does not give back the VRAM it saved.
      let f = try CheckpointBench.run(vram: vram, content: content, logger: logger)
      #expect(f.streamBytes > vram)
      switch content {
      case .empty: #expect(f.containerBytes < 4096)
      case .sparse: #expect(f.containerBytes < f.streamBytes / 4)
      case .random: #expect(f.containerBytes > vram)
      }
      #expect(f.allocatedAfterSaves == f.allocatedBeforeSaves)
    }
  }
}
