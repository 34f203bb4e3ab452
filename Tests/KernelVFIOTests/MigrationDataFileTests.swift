import Foundation
import KernelVFIO
import SystemPackage
import Testing

/// The bounded data_fd, with a pipe standing in for the kernel's migration
/// file: a read blocks until the other end writes, a write once the pipe is full.
@Suite("Kernel VFIO: bounded migration data_fd")
struct MigrationDataFileTests {
  func pipe() -> (read: Int32, write: Int32) {
    var fds: [Int32] = [-1, -1]
    #expect(Glibc.pipe(&fds) == 0)
    return (fds[0], fds[1])
  }

  func read(_ file: MigrationDataFile, _ count: Int) -> Result<[UInt8], Errno> {
    var buffer = [UInt8](repeating: 0, count: count)
    let result: Result<Int, Errno> = buffer.withUnsafeMutableBytes { raw in
      do throws(Errno) { return .success(try file.read(into: raw)) } catch {
        return .failure(error)
      }
    }
    return result.map { Array(buffer[0..<$0]) }
  }

  func feed(_ fd: Int32, _ bytes: [UInt8]) {
    #expect(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count)
  }

  @Test func aReadThatWaitsTooLongTimesOutAndLosesNothing() throws {
    let (r, w) = pipe()
    defer { close(w) }
    let file = MigrationDataFile(fd: r, timeout: .milliseconds(200))
    let started = Date()
    #expect(read(file, 8) == .failure(.timedOut))
    #expect(Date().timeIntervalSince(started) < 5, "bounded")
    // Bytes arrive while the timed-out read(2) is still in flight: they come out, in order.
    feed(w, [1, 2, 3])
    feed(w, [4, 5, 6, 7, 8, 9])
    var got: [UInt8] = []
    while got.count < 9 {
      switch read(file, 9 - got.count) {
      case .success(let bytes): got += bytes
      case .failure(.timedOut): continue
      case .failure(let error):
        Issue.record("\(error)")
        return
      }
    }
    #expect(got == [1, 2, 3, 4, 5, 6, 7, 8, 9])
  }

  @Test func aShortReadMeansTheEndAndBytesGatheredBeforeATimeOutAreKept() throws {
    let (r, w) = pipe()
    let file = MigrationDataFile(fd: r, timeout: .milliseconds(200))
    feed(w, [1, 2, 3, 4])
    // 4 bytes now, then nothing: the read times out; those 4 must not be lost.
    #expect(read(file, 8) == .failure(.timedOut))
    feed(w, [5, 6])
    close(w)  // end of stream
    var got: [UInt8] = []
    var ended = false
    for _ in 0..<20 where !ended {
      switch read(file, 16) {
      case .success(let bytes):
        got += bytes
        ended = true  // short: the end
      case .failure(.timedOut): continue
      case .failure(let error):
        Issue.record("\(error)")
        return
      }
    }
    #expect(got == [1, 2, 3, 4, 5, 6])
    #expect(read(file, 16) == .success([]), "0 after the end")
  }

  @Test func fullBuffersNeedSeveralSystemCalls() throws {
    let (r, w) = pipe()
    let file = MigrationDataFile(fd: r, timeout: .seconds(5))
    let writer = Thread {
      for chunk in 0..<4 {
        let bytes = [UInt8](repeating: UInt8(chunk), count: 1000)
        _ = bytes.withUnsafeBytes { Glibc.write(w, $0.baseAddress, $0.count) }
        usleep(20_000)
      }
      close(w)
    }
    writer.start()
    let first = read(file, 3000)
    #expect((try? first.get().count) == 3000, "a read returns short only at the end")
    #expect((try? read(file, 3000).get().count) == 1000)
  }

  @Test func aWriteThatWaitsTooLongPoisonsTheStream() throws {
    let (r, w) = pipe()
    let file = MigrationDataFile(fd: w, timeout: .milliseconds(200))
    let page = [UInt8](repeating: 7, count: 4096)
    var accepted = 0
    var outcome: Errno?
    while outcome == nil {
      let result: Result<Int, Errno> = page.withUnsafeBytes { raw in
        do throws(Errno) { return .success(try file.write(raw)) } catch { return .failure(error) }
      }
      switch result {
      case .success(let n): accepted += n
      case .failure(let error): outcome = error
      }
    }
    #expect(outcome == .timedOut, "the pipe filled up")
    #expect(accepted >= 4096)
    #expect(throws: Errno.ioError) { _ = try page.withUnsafeBytes { try file.write($0) } }
    // Let the write in flight finish before the reader goes (no SIGPIPE).
    var sink = [UInt8](repeating: 0, count: 1 << 17)
    _ = sink.withUnsafeMutableBytes { Glibc.read(r, $0.baseAddress, $0.count) }
    file.invalidate()
    usleep(50_000)
    close(r)
  }

  @Test func invalidatedStreamsAnswerENODEVEvenMidRead() throws {
    let (r, w) = pipe()
    let file = MigrationDataFile(fd: r, timeout: .seconds(30))
    let done = DispatchSemaphore(value: 0)
    nonisolated(unsafe) var outcome: Result<[UInt8], Errno>?
    let reader = Thread {
      outcome = read(file, 8)
      done.signal()
    }
    reader.start()
    usleep(100_000)
    file.invalidate()  // a reset while the device is producing nothing
    #expect(done.wait(timeout: .now() + 5) == .success, "the waiting read is released")
    #expect(outcome == .failure(Errno(rawValue: ENODEV)))
    #expect(read(file, 8) == .failure(Errno(rawValue: ENODEV)))
    close(w)  // the worker's read(2) returns; it then closes the read end
  }
}
