import CVFIOUser
import MigrationTools
import VFIODevice
import VFIOUserServer

#if canImport(Glibc)
  import Glibc
#endif

/// The raw limit every figure is compared with: the same message sizes over
/// a plain Unix stream socket between two threads, with the classic server
/// pattern of three system calls per request (receive header, receive body,
/// send reply) and no protocol work at all.
enum SocketFloor {
  /// Round trips of `requestSize`-byte requests answered with `replySize` bytes.
  static func roundTrips(
    requestSize: Int, replySize: Int, count: Int, inFlight: Int = 1, serverCPU: Int32?
  ) -> [UInt64] {
    var pair: [Int32] = [-1, -1]
    precondition(cvfu_socketpair(&pair) == 0)
    _ = cvfu_socket_buffers(pair[0], 8 << 20)
    _ = cvfu_socket_buffers(pair[1], 8 << 20)
    let serverFD = pair[1]
    let total = count + inFlight
    let done = Semaphore(value: 0)
    let failed = startThread(name: "socket-floor") {
      if let serverCPU { _ = cvfu_pin_to_cpu(serverCPU) }
      let buffer = UnsafeMutableRawBufferPointer.allocate(
        byteCount: max(requestSize, replySize), alignment: 16)
      buffer.initializeMemory(as: UInt8.self, repeating: 0x5A)
      defer { buffer.deallocate() }
      for _ in 0..<total {
        guard readFully(serverFD, buffer.baseAddress!, 16),
          readFully(serverFD, buffer.baseAddress! + 16, requestSize - 16),
          writeFully(serverFD, buffer.baseAddress!, replySize)
        else { break }
      }
      done.signal()
    }
    precondition(failed == nil, "cannot start the floor's server thread: \(failed!)")
    let request = UnsafeMutableRawBufferPointer.allocate(byteCount: requestSize, alignment: 16)
    let reply = UnsafeMutableRawBufferPointer.allocate(byteCount: replySize, alignment: 16)
    request.initializeMemory(as: UInt8.self, repeating: 1)
    defer {
      request.deallocate()
      reply.deallocate()
    }
    var samples = [UInt64](repeating: 0, count: count)
    for _ in 0..<inFlight { _ = writeFully(pair[0], request.baseAddress!, requestSize) }
    for i in 0..<count {
      let start = now()
      _ = writeFully(pair[0], request.baseAddress!, requestSize)
      _ = readFully(pair[0], reply.baseAddress!, replySize)
      samples[i] = now() - start
    }
    for _ in 0..<inFlight { _ = readFully(pair[0], reply.baseAddress!, replySize) }
    done.wait()
    close(pair[0])
    close(pair[1])
    return samples
  }

  static func readFully(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Bool {
    var got = 0
    while got < n {
      let r = read(fd, p + got, n - got)
      if r <= 0 { return false }
      got += r
    }
    return true
  }

  static func writeFully(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Bool {
    var sent = 0
    while sent < n {
      let r = write(fd, p + sent, n - sent)
      if r <= 0 { return false }
      sent += r
    }
    return true
  }

  /// Bytes per second of a plain memory copy of `size` bytes (warm buffers).
  static func memcpyRate(size: Int, repeats: Int) -> Double {
    let a = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
    let b = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
    a.initializeMemory(as: UInt8.self, repeating: 1)
    b.initializeMemory(as: UInt8.self, repeating: 2)
    defer {
      a.deallocate()
      b.deallocate()
    }
    let start = now()
    for _ in 0..<repeats { b.baseAddress!.copyMemory(from: a.baseAddress!, byteCount: size) }
    return Double(size * repeats) / (Double(now() - start) / 1e9)
  }
}

struct LatencySummary {
  var p50: Double
  var p99: Double
  var opsPerSecond: Double

  init(_ samples: [UInt64]) {
    let sorted = samples.sorted()
    p50 = Double(sorted[sorted.count / 2]) / 1000
    p99 = Double(sorted[min(sorted.count - 1, sorted.count * 99 / 100)]) / 1000
    opsPerSecond = Double(samples.count) / (Double(samples.reduce(0, +)) / 1e9)
  }
}
