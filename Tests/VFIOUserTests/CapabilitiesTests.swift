import TestSupport
import Testing
import VFIOUser

// Capabilities.parse(json:) and json() against the VERSION vectors and the
// malformed documents the server must refuse.

/// QEMU's exact capabilities JSON (reference/qemu-vfio-user.md), as the
/// version-request-qemu vector carries it.
let qemuCapabilitiesJSON =
  #"{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true}}"#

/// What the server offers by default (protocol/README.md).
let serverDefaultCapabilities = Capabilities(
  maxMsgFDs: 16, maxDataXferSize: 1_048_576, maxDMAMaps: 65535, pgsizes: 4096, writeMultiple: true)

@Test func parsesQEMUCapabilities() throws {
  let vector = try ProtocolFiles.vector("version-request-qemu")
  #expect(try vector.payload.optionalString("json") == qemuCapabilitiesJSON)

  let caps = try Capabilities.parse(json: qemuCapabilitiesJSON)
  #expect(caps.maxMsgFDs == 16)
  #expect(caps.maxDataXferSize == 1_048_576)
  #expect(caps.maxDMAMaps == 65535)
  #expect(caps.pgsizes == 4096)
  #expect(caps.writeMultiple == true)
  #expect(caps.twinSocket == nil)
  #expect(caps.migration == Capabilities.LegacyMigration(pgsize: 4096, maxBitmapSize: 268_435_456))
  #expect(caps.unknownKeys.isEmpty)
}

@Test func serverCapabilitiesRoundTrip() throws {
  let vector = try ProtocolFiles.vector("version-reply-server")
  let json = try #require(try vector.payload.optionalString("json"))
  #expect(
    serverDefaultCapabilities.json() == json,
    "the server's default JSON is the vector's, byte for byte")

  let parsed = try Capabilities.parse(json: json)
  #expect(parsed == serverDefaultCapabilities)
  #expect(parsed.json() == json)
  #expect(parsed.twinSocket == nil, "twin_socket is not offered")
}

@Test func otherServerRepliesMatchJSON() throws {
  var limitsOnly = serverDefaultCapabilities
  limitsOnly.writeMultiple = nil
  let noJSON = try ProtocolFiles.vector("version-reply-server-no-json")
  #expect(limitsOnly.json() == (try noJSON.payload.optionalString("json")))

  var declined = limitsOnly
  declined.twinSocket = Capabilities.TwinSocket(supported: false)
  let twin = try ProtocolFiles.vector("version-reply-server-twin-declined")
  #expect(declined.json() == (try twin.payload.optionalString("json")))

  let proposal = try ProtocolFiles.vector("version-request-twin-socket")
  let proposed = try Capabilities.parse(
    json: try #require(try proposal.payload.optionalString("json")))
  #expect(proposed.twinSocket == Capabilities.TwinSocket(supported: true))
  #expect(proposed.maxMsgFDs == 8)
}

@Test func parsesLibvfioUserReplyWithWhitespace() throws {
  let vector = try ProtocolFiles.vector("version-reply-libvfio-user")
  let caps = try Capabilities.parse(json: try #require(try vector.payload.optionalString("json")))
  #expect(caps.maxMsgFDs == 8)
  #expect(caps.maxDataXferSize == 1_048_576)
  #expect(caps.migration == Capabilities.LegacyMigration(pgsize: 4096))
  #expect(caps.unknownKeys.isEmpty)
}

@Test(
  "every VERSION vector's JSON survives parse -> json() -> parse", arguments: ProtocolFiles.vectors)
func versionJSONRoundTrip(_ vector: Vector) throws {
  guard vector.codec == "VersionPayload", let json = try vector.payload.optionalString("json")
  else { return }
  let caps = try Capabilities.parse(json: json)
  #expect(try Capabilities.parse(json: caps.json()) == caps)
}

@Test func missingCapabilitiesTakeSpecDefaults() throws {
  for json in [#"{}"#, #"{"capabilities":{}}"#, #"{"other":1}"#] {
    let caps = try Capabilities.parse(json: json)
    #expect(caps == Capabilities(), "\(json)")
    #expect(caps.effectiveMaxMsgFDs == 1)
    #expect(caps.effectiveMaxDataXferSize == 1_048_576)
    #expect(caps.effectiveMaxDMAMaps == 65535)
    #expect(caps.effectivePgsizes == 4096)
  }
  #expect(Capabilities().json() == #"{"capabilities":{}}"#)
}

@Test func unknownKeysAreCollected() throws {
  let caps = try Capabilities.parse(
    json:
      #"{"capabilities":{"max_msg_fds":4,"foo":1,"twin_socket":{"supported":true,"bar":[]},"migration":{"baz":"x"},"qux":{"a":1}}}"#
  )
  #expect(caps.maxMsgFDs == 4)
  #expect(caps.twinSocket == Capabilities.TwinSocket(supported: true))
  #expect(caps.migration == Capabilities.LegacyMigration())
  #expect(Set(caps.unknownKeys) == ["foo", "twin_socket.bar", "migration.baz", "qux"])
}

@Test func twinSocketParsesAndRoundTrips() throws {
  let json = #"{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}"#
  let caps = try Capabilities.parse(json: json)
  #expect(caps.twinSocket == Capabilities.TwinSocket(supported: true, fdIndex: 0))
  #expect(caps.json() == json)
  let declined = try Capabilities.parse(json: #"{"capabilities":{"twin_socket":{}}}"#)
  #expect(declined.twinSocket == Capabilities.TwinSocket(supported: false))
}

@Test func boundaryValuesAreAccepted() throws {
  let caps = try Capabilities.parse(
    json:
      #"{"capabilities":{"max_msg_fds":0,"max_data_xfer_size":4294967295,"max_dma_maps":4294967295,"pgsizes":9223372036854775807}}"#
  )
  #expect(caps.maxMsgFDs == 0)
  #expect(caps.maxDataXferSize == UInt32.max)
  #expect(caps.maxDMAMaps == UInt32.max)
  #expect(caps.pgsizes == UInt64(Int64.max))
  #expect(try Capabilities.parse(json: caps.json()) == caps)
}

/// An emulated IOMMU (an mdev's type1 container) offers every page size from
/// 4 KiB: bits above 2^63 must survive both ways (the server once trapped
/// converting them to Int64 while encoding its VERSION reply).
@Test func pgsizesIsAWhole64BitBitmap() throws {
  let every4KAndUp: UInt64 = 0xFFFF_FFFF_FFFF_F000
  let caps = Capabilities(pgsizes: every4KAndUp)
  #expect(caps.json() == #"{"capabilities":{"pgsizes":18446744073709547520}}"#)
  #expect(try Capabilities.parse(json: caps.json()).pgsizes == every4KAndUp)
  #expect(
    try Capabilities.parse(json: #"{"capabilities":{"pgsizes":18446744073709551615}}"#).pgsizes
      == UInt64.max)
}

struct BadCapabilities: Sendable, CustomTestStringConvertible {
  var json: String
  var error: Capabilities.ParseError
  var testDescription: String { json.isEmpty ? "(empty)" : json }
}

let badCapabilities: [BadCapabilities] = [
  // Wrong types.
  .init(
    json: #"{"capabilities":{"max_msg_fds":"8"}}"#,
    error: .wrongType(key: "max_msg_fds", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"max_msg_fds":1.5}}"#,
    error: .wrongType(key: "max_msg_fds", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"max_msg_fds":null}}"#,
    error: .wrongType(key: "max_msg_fds", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"max_msg_fds":true}}"#,
    error: .wrongType(key: "max_msg_fds", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"max_data_xfer_size":"1048576"}}"#,
    error: .wrongType(key: "max_data_xfer_size", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"max_dma_maps":[1]}}"#,
    error: .wrongType(key: "max_dma_maps", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"pgsizes":4096.0}}"#,
    error: .wrongType(key: "pgsizes", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"write_multiple":1}}"#,
    error: .wrongType(key: "write_multiple", expected: "a boolean")),
  .init(
    json: #"{"capabilities":{"write_multiple":"true"}}"#,
    error: .wrongType(key: "write_multiple", expected: "a boolean")),
  .init(
    json: #"{"capabilities":{"twin_socket":{"supported":1}}}"#,
    error: .wrongType(key: "twin_socket.supported", expected: "a boolean")),
  .init(
    json: #"{"capabilities":{"twin_socket":{"fd_index":"0"}}}"#,
    error: .wrongType(key: "twin_socket.fd_index", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"migration":{"pgsize":"4096"}}}"#,
    error: .wrongType(key: "migration.pgsize", expected: "an integer")),
  .init(
    json: #"{"capabilities":{"migration":{"max_bitmap_size":false}}}"#,
    error: .wrongType(key: "migration.max_bitmap_size", expected: "an integer")),
  // Negative and out of range.
  .init(json: #"{"capabilities":{"max_msg_fds":-1}}"#, error: .outOfRange(key: "max_msg_fds")),
  .init(
    json: #"{"capabilities":{"max_msg_fds":4294967296}}"#, error: .outOfRange(key: "max_msg_fds")),
  .init(
    json: #"{"capabilities":{"max_data_xfer_size":-1}}"#,
    error: .outOfRange(key: "max_data_xfer_size")),
  .init(
    json: #"{"capabilities":{"max_data_xfer_size":0}}"#,
    error: .outOfRange(key: "max_data_xfer_size")),
  .init(
    json: #"{"capabilities":{"max_data_xfer_size":4294967296}}"#,
    error: .outOfRange(key: "max_data_xfer_size")),
  .init(json: #"{"capabilities":{"max_dma_maps":-5}}"#, error: .outOfRange(key: "max_dma_maps")),
  .init(
    json: #"{"capabilities":{"max_dma_maps":4294967296}}"#, error: .outOfRange(key: "max_dma_maps")),
  .init(json: #"{"capabilities":{"pgsizes":0}}"#, error: .outOfRange(key: "pgsizes")),
  .init(json: #"{"capabilities":{"pgsizes":-4096}}"#, error: .outOfRange(key: "pgsizes")),
  .init(
    json: #"{"capabilities":{"twin_socket":{"supported":true,"fd_index":253}}}"#,
    error: .outOfRange(key: "twin_socket.fd_index")),
  .init(
    json: #"{"capabilities":{"twin_socket":{"fd_index":-1}}}"#,
    error: .outOfRange(key: "twin_socket.fd_index")),
  .init(
    json: #"{"capabilities":{"migration":{"pgsize":-1}}}"#,
    error: .outOfRange(key: "migration.pgsize")),
  // Not objects.
  .init(json: #"[1,2]"#, error: .notAnObject("version data")),
  .init(json: #""capabilities""#, error: .notAnObject("version data")),
  .init(json: #"42 "#, error: .notAnObject("version data")),
  .init(json: #"true "#, error: .notAnObject("version data")),
  .init(json: #"{"capabilities":5}"#, error: .notAnObject("capabilities")),
  .init(json: #"{"capabilities":[]}"#, error: .notAnObject("capabilities")),
  .init(json: #"{"capabilities":{"twin_socket":true}}"#, error: .notAnObject("twin_socket")),
  .init(json: #"{"capabilities":{"migration":1}}"#, error: .notAnObject("migration")),
  // Malformed and trailing garbage.
  .init(json: #"{"capabilities":{"#, error: .malformedJSON("truncated")),
  .init(json: #"{"capabilities":{"max_msg_fds":16"#, error: .malformedJSON("truncated")),
  .init(
    json: #"{"capabilities":{}} {}"#, error: .malformedJSON("trailing bytes after the JSON value")),
  .init(
    json: #"{"capabilities":{}}x"#, error: .malformedJSON("trailing bytes after the JSON value")),
  .init(
    json: #"{"capabilities":{}}}"#, error: .malformedJSON("trailing bytes after the JSON value")),
]

@Test("malformed capabilities throw the right ParseError", arguments: badCapabilities)
func badCapabilitiesThrow(_ bad: BadCapabilities) {
  #expect(throws: bad.error) { try Capabilities.parse(json: bad.json) }
}

/// json-c cannot tell that a top-level number or literal has ended when the
/// buffer ends right after it (the codec strips the NUL), so it reports such a
/// document as truncated rather than as "not an object". Either way it is refused.
@Test("a bare scalar document is refused", arguments: ["42", "null", "true", "-1"])
func bareScalarThrows(_ text: String) {
  do {
    let caps = try Capabilities.parse(json: text)
    Issue.record("parsed \(text) as \(caps)")
  } catch {
    #expect(["notAnObject", "malformedJSON"].contains(error.caseName), "\(error)")
  }
}

@Test(
  "documents that are not JSON throw malformedJSON",
  arguments: ["", "capabilities", "{capabilities:{}}", "{\"a\":}", "}"])
func notJSONThrows(_ text: String) {
  do {
    let caps = try Capabilities.parse(json: text)
    Issue.record("parsed \(text.debugDescription) as \(caps)")
  } catch {
    #expect(error.caseName == "malformedJSON", "\(text.debugDescription): \(error)")
  }
}

/// json-c runs in strict mode: forms its default mode tolerates are refused.
@Test(arguments: [
  #"{"capabilities":{"max_msg_fds":8,}}"#,
  #"{"capabilities":{/* c */"max_msg_fds":8}}"#,
  #"{"capabilities":{"max_msg_fds":016}}"#,
  #"{"capabilities":{"write_multiple":True}}"#,
])
func lenientJSONIsRefused(_ json: String) {
  #expect(throws: Capabilities.ParseError.self) { try Capabilities.parse(json: json) }
}

/// Found by fuzz-wire (protocol/fuzz-regressions.json): a region-info reply
/// whose chain starts after a gap re-encoded with the old cap_offset, though
/// the encoder writes the chain right after the fixed part.
@Test func regionInfoChainAfterAGapReencodesWhereItIs() throws {
  var bytes = [UInt8](repeating: 0, count: 40 + 16)
  bytes.withUnsafeMutableBytes { raw in
    raw.put(UInt32(raw.count), at: 0)
    raw.put(([.caps, .read] as VFIORegionFlags).rawValue, at: 4)
    raw.put(UInt32(2), at: 8)
    raw.put(UInt32(40), at: 12)  // an 8-byte gap after the 32-byte fixed part
    raw.put(VFIORegionCapID.sparseMmap, at: 40)
    raw.put(UInt16(1), at: 42)
  }
  let decoded = try RegionInfoPayload(decoding: bytes)
  #expect(decoded.capabilities == [.sparseMmap([])])
  let again = try RegionInfoPayload(decoding: decoded.encoded())
  #expect(again.capabilities == decoded.capabilities)
  #expect(again.capOffset == UInt32(RegionInfoPayload.fixedSize))
}
