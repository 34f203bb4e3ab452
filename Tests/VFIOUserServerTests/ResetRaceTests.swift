import Foundation
import Synchronization
import Testing
import VFIODevice
import VFIOUser
import VFIOUserClient
import VFIOUserServer
import XeVF

/// Issue 10, lifecycle stress for the sanitizer builds (scripts/sanitize.sh):
/// DEVICE_RESET racing migration data commands and state changes on two
/// servers at once, while a third thread keeps trying to connect to both.
/// Each server serves one client at a time (a second one gets EBUSY), so the
/// races are the ones the protocol allows: the connection threads of two
/// servers, the PF workers of two VFs saving and restoring, resets (FLRs)
/// landing in the middle of their work, hang-ups mid-migration with the
/// clean-up that follows, and the refusing thread beside an active client.
@Suite("DEVICE_RESET racing migration")
struct ResetRaceTests {
  static let iterations = 60

  /// Connects, waiting out a previous client's teardown or the intruder.
  static func connect(_ server: RunningServer) throws -> VFIOUserClient {
    var lastError: (any Error)?
    for _ in 0..<500 {
      do { return try server.connect() } catch {
        lastError = error
        usleep(2000)
      }
    }
    throw lastError!
  }

  static func run(_ threads: [@Sendable () -> Void]) {
    let done = VFIODevice.Semaphore()
    for body in threads {
      let failed = startThread(name: "race") {
        body()
        done.signal()
      }
      #expect(failed == nil)
    }
    for _ in threads { done.wait() }
  }

  @Test func resetRacesMigrationDataAndStateChanges() throws {
    let vram = StreamCorruptionTests.vram
    let source = try StreamCorruptionTests.bmg(vram: vram)
    let destination = try StreamCorruptionTests.bmg(vram: vram)
    try withServer(source) { src, _ in
      try withServer(destination) { dst, _ in
        let (stream, sourceState) = try {
          let a = try src.connect()
          try StreamCorruptionTests.fill(a, vram: vram, salt: 0x7100)
          return (
            try StreamCorruptionTests.save(a), try StreamCorruptionTests.snapshot(a, vram: vram)
          )
        }()
        let problems = Locked<[String]>([])
        let finished = Atomic<Int>(0)
        @Sendable func note(_ problem: String) { problems.withLock { $0.append(problem) } }

        Self.run([
          {  // The source: saves cut short by a reset, a return to RUNNING, or a hang-up.
            defer { finished.add(1, ordering: .sequentiallyConsistent) }
            for i in 0..<Self.iterations {
              do {
                let a = try Self.connect(src)
                try a.setMigrationState(.stopCopy)
                for _ in 0..<(i % 4) { _ = try a.migDataRead(size: 64 << 10) }
                switch i % 3 {
                case 0:
                  try a.reset()
                  if try a.migrationState() != .running { note("source not RUNNING after a reset") }
                case 1: try a.setMigrationState(.running)
                default: break  // hang up in STOP_COPY: the server resumes the VF
                }
              } catch { note("source iteration \(i): \(error)") }
            }
          },
          {  // The destination: partial and whole restores, reset mid-stream or after.
            defer { finished.add(1, ordering: .sequentiallyConsistent) }
            for i in 0..<Self.iterations {
              do {
                let b = try Self.connect(dst)
                try b.setMigrationState(.resuming)
                let length = i % 5 == 4 ? stream.count : (i &* 7919) % stream.count
                var at = 0
                while at < length {
                  let end = min(at + (256 << 10), length)
                  try b.migDataWrite(Array(stream[at..<end]))
                  at = end
                }
                switch i % 3 {
                case 0:
                  try b.reset()
                  if try b.migrationState() != .running {
                    note("destination not RUNNING after a reset")
                  }
                case 1:
                  do {
                    try b.setMigrationState(.running)
                    if length != stream.count { note("a restore of \(length) bytes ran") }
                  } catch {
                    if length == stream.count { note("the whole stream was refused: \(error)") }
                    if try b.migrationState() != .error { note("a failed restore is not ERROR") }
                    try b.reset()
                  }
                default: break  // hang up in RESUMING: the server resets the VF
                }
              } catch { note("destination iteration \(i): \(error)") }
            }
          },
          {  // Others knocking on both sockets all along.
            var turn = 0
            while finished.load(ordering: .sequentiallyConsistent) < 2 {
              turn += 1
              if let c = try? (turn % 2 == 0 ? src : dst).connect() {
                _ = try? c.migrationState()
              }
              usleep(500)
            }
          },
        ])
        let seen = problems.withLock { $0 }
        #expect(seen.isEmpty, "\(seen)")

        // Both still work: a whole restore gives the source's state.
        let b = try Self.connect(dst)
        try b.setMigrationState(.resuming)
        for start in stride(from: 0, to: stream.count, by: 1 << 20) {
          try b.migDataWrite(Array(stream[start..<min(start + (1 << 20), stream.count)]))
        }
        try b.setMigrationState(.running)
        #expect(try StreamCorruptionTests.snapshot(b, vram: vram) == sourceState)
        let a = try Self.connect(src)
        #expect(try a.migrationState() == .running)
      }
    }
  }
}
