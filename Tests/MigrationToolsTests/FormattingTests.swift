import MigrationTools
import Testing

/// The figures and identities the migration commands print, without Foundation's formatters.
@Suite struct FormattingTests {
  @Test func figures() {
    #expect(fixed(3.14159, 2) == "3.14")
    #expect(fixed(-0.5, 1) == "-0.5")
    #expect(fixed(2, 0) == "2")
    #expect(fixed(0.05, 3) == "0.050")
    #expect(formatRate(512) == "512 B")
    #expect(formatRate(3 << 19) == "1.5 MiB")
    #expect(formatRate(1 << 30) == "1.00 GiB")
    #expect(formatBytes(256 << 20) == "256 MiB")
    #expect(formatBytes(4097) == "4097 bytes")
    #expect(percent(1, of: 8) == "12.5%")
    #expect(percent(1, of: 0) == "-")
    #expect(gigabytesPerSecond(2_000_000_000, 2) == "1.00 GB/s")
    #expect(hex(0xE2, 4) == "00e2")
  }

  @Test func migrationVolumeSaysWhatWasSeenAndWhatWasEstimated() {
    let seen = MigrationVolume(wire: 1 << 20, state: 2 << 20, estimate: 0, sparse: true)
    #expect(
      seen.summary(seconds: 0.5)
        == "2.0 MiB of state in 0.500 s (0.00 GB/s), 1.0 MiB on the wire (sparse stream: zero VRAM pages not sent)"
    )
    let unknown = MigrationVolume(wire: 10, state: nil, estimate: 0, sparse: false)
    #expect(
      unknown.summary(seconds: 1)
        == "state of unknown size (the source gave no estimate) in 1.000 s, 10 B on the wire")
  }

  @Test func identitiesSayWhyTheyDoNotMatch() {
    let a = DeviceIdentity(
      vendorID: 0x8086, deviceID: 0xE211, revision: 1, subsystemVendorID: 0x8086,
      subsystemID: 0x1000, vramSize: 1 << 30)
    #expect(a.description == "[8086:e211] rev 01, subsystem 8086:1000, VRAM 1 GiB")
    #expect(a.incompatibility(with: a) == nil)
    var b = a
    b.revision = 2
    #expect(
      a.incompatibility(with: b) == "revision 01 ≠ 02 (the PF would refuse it with ENODEV)")
    b = a
    b.vramSize = 2 << 30
    #expect(
      a.incompatibility(with: b)
        == "VRAM 1 GiB ≠ 2 GiB (provision the destination with the same quota)")
  }

  @Test func theHeadersJSONHasOneKeyOrderAndReadsBack() throws {
    let identity = DeviceIdentity(
      vendorID: 1, deviceID: 2, revision: 3, subsystemVendorID: 4, subsystemID: 5, vramSize: 6)
    let header = SaveFileHeader(
      identity: identity, estimatedBytes: 7, created: "1970-01-02T00:00:00Z", source: "s")
    let json = try header.json()
    #expect(
      String(decoding: json, as: UTF8.self)
        == #"{"created":"1970-01-02T00:00:00Z","estimatedBytes":7,"identity":{"deviceID":2,"revision":3,"subsystemID":5,"subsystemVendorID":4,"vendorID":1,"vramSize":6},"source":"s"}"#
    )
    let back = try SaveFileHeader(json: json, name: "f")
    #expect(back.identity == identity)
    #expect(back.created == header.created)
    #expect {
      _ = try SaveFileHeader(json: Array("{}".utf8), name: "f")
    } throws: {
      "\($0)" == "f: the header's description of the device is unreadable"
    }
  }

  @Test func sourceDateEpochFixesTheTimestamp() throws {
    #expect(try checkpointTimestamp(environment: "86400") == "1970-01-02T00:00:00Z")
    #expect {
      _ = try checkpointTimestamp(environment: "yesterday")
    } throws: {
      "\($0)"
        == "SOURCE_DATE_EPOCH=yesterday is not a number of seconds since 1970; unset it or give one"
    }
  }
}
