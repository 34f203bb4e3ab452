import SystemPackage
import TestSupport
import Testing
import VFIOUser

// protocol/malformed.json against the codecs. Each entry names the layer that
// refuses it:
//   header       MessageHeader(decoding:) throws (framing: size < 16, type bits)
//   payload      the command's payload codec throws EINVAL
//   capabilities VersionPayload decodes, Capabilities.parse throws `parse_error`
//   server       the codecs accept it; only the server's checks refuse it
//   framing      the bytes on the wire disagree with the header's size
// The server-level expectations are tested by the server's integration tests.

let knownExpectations: Set<String> = [
  "EINVAL", "ENOSYS", "E2BIG", "EEXIST", "ENOTTY", "EBUSY", "ENOSPC", "EBADF", "ENODATA",
  "EOVERFLOW", "disconnect", "EINVAL+disconnect", "no-reply", "ok", "EAGAIN", "EIO",
]

/// The errno an `expect` value names, if it names one.
func expectedErrno(_ expect: String) -> Errno? {
  guard let name = expect.split(separator: "+").first, name.hasPrefix("E") else { return nil }
  return Errno(name: String(name))
}

@Test("malformed message is refused at its layer", arguments: ProtocolFiles.malformed)
func malformedMessage(_ entry: MalformedCase) throws {
  let hex = try #require(entry.bytes, "hex is not hex")
  #expect(entry.hex == hex.hexString, "hex is lowercase without separators")
  #expect(knownExpectations.contains(entry.expect), "unknown expect \(entry.expect)")
  if let other = entry.expectNoMigration { #expect(knownExpectations.contains(other)) }
  if let other = entry.expectNoDMALogging { #expect(knownExpectations.contains(other)) }
  if let other = entry.expectKernel { #expect(knownExpectations.contains(other)) }
  #expect((entry.fds ?? 0) >= 0)
  let bytes = try entry.message()

  switch entry.layer {
  case "header":
    #expect(throws: Errno.invalidArgument) { try decodeHeader(bytes) }

  case "payload":
    let header = try decodeHeader(bytes)
    #expect(Int(header.size) == bytes.count)
    #expect(entry.expect.hasPrefix("EINVAL"), "payload-layout errors are EINVAL")
    let payload = Array(bytes[MessageHeader.size...])
    #expect(throws: Errno.invalidArgument) {
      try decodeRequestPayload(command: header.command, payload)
    }

  case "capabilities":
    let header = try decodeHeader(bytes)
    #expect(header.knownCommand == .version)
    #expect(entry.expect == "EINVAL+disconnect")
    let version = try VersionPayload(decoding: Array(bytes[MessageHeader.size...]))
    let json = try #require(version.json)
    let expected = try #require(entry.parseError, "a capabilities case names its parse_error")
    do {
      let caps = try Capabilities.parse(json: json)
      Issue.record("parsed as \(caps)")
    } catch {
      #expect(error.caseName == expected, "\(error)")
    }

  case "server", "framing":
    // The codecs accept these: the refusal is the server's (or the reader's).
    let header = try decodeHeader(bytes)
    if Int(header.size) == bytes.count {
      try decodeRequestPayload(command: header.command, Array(bytes[MessageHeader.size...]))
      if header.knownCommand == .version,
        let json = try VersionPayload(decoding: Array(bytes[16...])).json
      {
        _ = try Capabilities.parse(json: json)
      }
    } else {
      #expect(Int(header.size) > bytes.count, "a framing case announces more bytes than it sends")
    }

  default:
    Issue.record("unknown layer \(entry.layer)")
  }

  // Messages a case needs in place first are themselves valid.
  for setup in entry.setup ?? [] {
    let message = try #require([UInt8](hex: setup))
    let header = try decodeHeader(message)
    #expect(Int(header.size) == message.count)
    try decodeRequestPayload(command: header.command, Array(message[MessageHeader.size...]))
  }
}

@Test func malformedCorpusIsConsistent() throws {
  let corpus = ProtocolFiles.malformed
  for entry in corpus where entry.expect.hasPrefix("E") {
    #expect(
      expectedErrno(entry.expect) != nil, "\(entry.name): \(entry.expect) is not an errno name")
  }
  // Message IDs (the first two bytes) tell the cases apart in a server log.
  let ids = try corpus.map { entry -> UInt16 in
    let bytes = try #require(entry.bytes)
    return UInt16(bytes[0]) | UInt16(bytes[1]) << 8
  }
  #expect(Set(ids).count == corpus.count, "message IDs are distinct")

  // Only VERSION cases and the commands-before-VERSION cases run before VERSION.
  for entry in corpus where !entry.afterVersion {
    let bytes = try #require(entry.bytes)
    let command = UInt16(bytes[2]) | UInt16(bytes[3]) << 8
    #expect(
      command == Command.version.rawValue || entry.name.contains("before-version"),
      "\(entry.name)")
  }
  #expect(corpus.count >= 250, "the catalogue covers at least 250 cases")

  // Every request command (and the header checks) has at least one case.
  let layers = Set(corpus.map(\.layer))
  #expect(layers.isSuperset(of: ["header", "payload", "capabilities", "server"]))
  let commands = Set(
    corpus.compactMap { entry -> UInt16? in
      guard let bytes = entry.bytes, bytes.count >= 4 else { return nil }
      return UInt16(bytes[2]) | UInt16(bytes[3]) << 8
    })
  for command in Command.allCases where command != .deviceReset {
    #expect(commands.contains(command.rawValue), "no malformed case for \(command)")
  }
}

@Test func headerRejectsShortBuffersAndBadTypes() {
  var bytes = [UInt8](repeating: 0, count: MessageHeader.size)
  bytes.withUnsafeMutableBytes {
    MessageHeader(messageID: 1, command: .deviceGetInfo, size: 16).encode(into: $0)
  }
  #expect(throws: Never.self) { try decodeHeader(bytes) }
  for count in 0..<MessageHeader.size {
    #expect(throws: Errno.invalidArgument) { try decodeHeader(Array(bytes[..<count])) }
  }
  for size: UInt32 in [0, 1, 15] {
    var short = bytes
    short.withUnsafeMutableBytes { $0.storeBytes(of: size, toByteOffset: 4, as: UInt32.self) }
    #expect(throws: Errno.invalidArgument) { try decodeHeader(short) }
  }
  for type: UInt32 in 2...15 {
    var typed = bytes
    typed.withUnsafeMutableBytes {
      $0.storeBytes(of: type | 0x10, toByteOffset: 8, as: UInt32.self)
    }
    #expect(throws: Errno.invalidArgument) { try decodeHeader(typed) }
  }
}
