import SystemPackage
import TestSupport
import VFIOUser
import VFIOUserSocket

#if canImport(Glibc)
  import Glibc
#endif

/// A framer step copied out of the framer's buffer, to compare.
enum Framed: Equatable, CustomStringConvertible {
  case message(id: UInt16, command: UInt16, payload: [UInt8], descriptors: Int)
  case oversized(id: UInt16, size: UInt32)
  case parted(id: UInt16, head: [UInt8])

  var description: String {
    switch self {
    case .message(let id, let command, let payload, let descriptors):
      "message \(id) cmd \(command) \(payload.count) bytes, \(descriptors) fds"
    case .oversized(let id, let size): "oversized \(id) of \(size)"
    case .parted(let id, let head): "parted \(id) head \(head.count)"
    }
  }
}

/// One step of `framer`, copied out; nil when it asks for a read.
func step(_ framer: inout MessageFramer) throws(Errno) -> Framed? {
  switch try framer.next() {
  case .read: return nil
  case .message(let message):
    return .message(
      id: message.header.messageID, command: message.header.command,
      payload: Array(message.payload), descriptors: message.fds.count)
  case .oversized(let header): return .oversized(id: header.messageID, size: header.size)
  case .parted(let header, let head): return .parted(id: header.messageID, head: Array(head))
  }
}

/// One read's worth of the stream: bytes, and the descriptors that came with them.
struct Chunk {
  var bytes: [UInt8]
  var descriptors: [FileDescriptor] = []
}

/// Drives a framer as a transport would: each `.read` takes the next chunk,
/// as much of it as the space offered holds (the rest stays for the next
/// read; its descriptors come with its first byte, as from a socket).
struct Feeder {
  var chunks: [Chunk]
  /// Parted offers taken (their payload then read and returned as one
  /// message, descriptors 0) rather than declined.
  var takeParted = false

  init(_ chunks: [Chunk], takeParted: Bool = false) {
    self.chunks = chunks
    self.takeParted = takeParted
  }

  init(bytes: [UInt8], cutAt cuts: [Int]) {
    var at = 0
    chunks = []
    for end in cuts + [bytes.count] where end > at {
      chunks.append(Chunk(bytes: Array(bytes[at..<end])))
      at = end
    }
  }

  /// Every step until the chunks run out (declined parted offers are framed whole next).
  mutating func run(_ framer: inout MessageFramer) throws(Errno) -> [Framed] {
    var out: [Framed] = []
    while true {
      switch try framer.next() {
      case .read(let space, _):
        guard feed(&framer, space) else { return out }
      case .message(let message):
        out.append(
          .message(
            id: message.header.messageID, command: message.header.command,
            payload: Array(message.payload), descriptors: message.fds.count))
      case .oversized(let header):
        out.append(.oversized(id: header.messageID, size: header.size))
      case .parted(let header, let head):
        out.append(.parted(id: header.messageID, head: Array(head)))
        guard takeParted else { continue }
        framer.takeParted()
        var payload = Array(head)
        while framer.payloadLeft > 0 {
          var part = [UInt8](repeating: 0, count: framer.payloadLeft)
          let n = part.withUnsafeMutableBytes { framer.takeBufferedPayload(into: $0) }
          payload += part[..<n]
          guard framer.payloadLeft > 0 else { break }
          guard let space = framer.payloadSpace(upTo: 1000) else { continue }
          guard feed(&framer, space, descriptorsAllowed: false) else { return out }
          payload += Array(framer.takePayload(upTo: 1000))
        }
        out.append(
          .message(id: header.messageID, command: header.command, payload: payload, descriptors: 0))
      }
    }
  }

  /// One read into `space`; false when the chunks ran out.
  mutating func feed(
    _ framer: inout MessageFramer, _ space: UnsafeMutableRawBufferPointer,
    descriptorsAllowed: Bool = true
  ) -> Bool {
    guard !chunks.isEmpty, space.count > 0 else { return false }
    let n = min(space.count, chunks[0].bytes.count)
    chunks[0].bytes.withUnsafeBytes {
      space.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: n)
    }
    let descriptors = OwnedFileDescriptors(taking: chunks[0].descriptors)
    chunks[0].descriptors = []
    chunks[0].bytes.removeFirst(n)
    if chunks[0].bytes.isEmpty { chunks.removeFirst() }
    if descriptorsAllowed {
      framer.received(n, descriptors: descriptors)
    } else {
      framer.received(n)  // the descriptors close here, as the kernel closes them
    }
    return true
  }
}

func request(
  _ id: UInt16, _ command: UInt16 = 9, payload count: Int, flags: MessageHeader.Flags = .command
)
  -> [UInt8]
{
  encodeMessage(
    id: id, command: command, flags: flags,
    payload: (0..<count).map { UInt8(truncatingIfNeeded: Int(id) &* 31 &+ $0) })
}

func payload(of bytes: [UInt8]) -> [UInt8] { Array(bytes[MessageHeader.size...]) }

/// What `#expect` may look at of a framer (it takes copyable values only).
struct FramerView {
  var state: FramerState
  var bufferedBytes: [UInt8]
  var bufferedByteCount: Int
  var hasBufferedMessage: Bool
  var heldDescriptorCount: Int
  var payloadLeft: Int
}

extension MessageFramer {
  var view: FramerView {
    FramerView(
      state: state, bufferedBytes: Array(bufferedBytes), bufferedByteCount: bufferedByteCount,
      hasBufferedMessage: hasBufferedMessage, heldDescriptorCount: heldDescriptorCount,
      payloadLeft: payloadLeft)
  }
}
