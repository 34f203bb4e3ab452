import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// The fields of `info --json` the tests read, with the JSON types they must
/// have: decoding fails if a number comes as a string or a flag as a number.
struct InfoJSON: Decodable {
  struct BAR: Decodable {
    var index: Int
    var kind: String
    var is64Bit: Bool
    var prefetchable: Bool
    var address: UInt64
    var size: UInt64
    var enabled: Bool
  }
  struct Capability: Decodable {
    struct Express: Decodable {
      struct DevCap: Decodable {
        var raw: Int
        var maxPayloadBytes: Int
        var functionLevelReset: Bool
        var roleBasedErrorReporting: Bool
        var extendedTag: Bool
      }
      struct DevCtl: Decodable {
        var raw: Int
        var relaxedOrdering: Bool
        var noSnoop: Bool
        var maxPayloadBytes: Int
        var maxReadRequestBytes: Int
      }
      struct LinkCap: Decodable {
        var port: Int
        var maxSpeed: String
        var maxWidth: Int
      }
      struct LinkSta: Decodable {
        var speed: String
        var width: Int
      }
      var version: Int
      var deviceType: Int
      var deviceTypeName: String
      var deviceCapabilities: DevCap
      var deviceControl: DevCtl
      var linkCapabilities: LinkCap
      var linkStatus: LinkSta
    }
    struct MSIX: Decodable {
      struct Location: Decodable {
        var bar: Int
        var offset: Int
      }
      var enabled: Bool
      var functionMasked: Bool
      var tableSize: Int
      var table: Location
      var pba: Location
    }
    var offset: Int
    var id: Int
    var name: String
    var express: Express?
    var msix: MSIX?
  }
  struct Command: Decodable {
    var raw: Int
    var memory: Bool
    var busMaster: Bool
  }
  struct Migration: Decodable {
    struct Flags: Decodable {
      var raw: Int
      var stopCopy: Bool
      var p2p: Bool
      var preCopy: Bool
    }
    var supported: Bool
    var flags: Flags?
    var state: String?
  }
  struct DMALogging: Decodable {
    var supported: Bool
    var error: String?
  }
  var dmaLogging: DMALogging
  struct Server: Decodable {
    var maxDataXferSize: Int
    var maxDMAMaps: Int
    var maxMsgFDs: Int
    var pgsizes: Int
    var writeMultiple: Bool
  }
  struct Region: Decodable {
    struct Flags: Decodable {
      var read: Bool
      var write: Bool
      var mmap: Bool
    }
    var index: Int
    var name: String
    var size: UInt64
    var flags: Flags
  }
  var vendorID: Int
  var deviceID: Int
  var subsystemVendorID: Int
  var subsystemID: Int
  var revision: Int
  var classCode: Int
  var className: String
  var command: Command
  var interruptPin: Int
  var bars: [BAR]
  var capabilities: [Capability]
  var extendedCapabilities: [Capability]?
  var regions: [Region]
  var migration: Migration
  var server: Server
}

@Suite("xe-vfio-user info", .serialized)
struct InfoTests {
  func info(_ socket: String) throws -> (text: String, json: InfoJSON, raw: String) {
    let text = try run(["info", "--socket-path", socket])
    #expect(text.status == 0, "\(text.stderr)")
    let json = try run(["info", "--socket-path", socket, "--json"])
    #expect(json.status == 0, "\(json.stderr)")
    return (
      text.stdout, try JSONDecoder().decode(InfoJSON.self, from: Data(json.stdout.utf8)),
      json.stdout
    )
  }

  /// The text and the JSON match the BMG profile the server was started with,
  /// the server's limits included.
  @Test func bmgProfileLikeLspci() throws {
    let serve = try ServeProcess([
      "--profile", "bmg", "--vram-size", "512M", "--max-data-xfer-size", "4M", "--max-dma-maps",
      "1000", "--max-msg-fds", "8",
    ])
    defer { _ = serve.stop() }
    _ = try serve.connect()
    usleep(50_000)
    let (text, json, raw) = try info(serve.socketPath)
    let lines = text.split(separator: "\n").map(String.init)
    for line in [
      "Display controller [0380]: Intel Corporation Device [8086:e211] (rev 00)",
      "\tSubsystem: Intel Corporation Device [8086:e211]",
      "\tControl: I/O- Mem- BusMaster- DisINTx-",
      "\tInterrupt: none (no INTx pin)",
      "\tRegion 0: Memory at <unassigned> (64-bit, non-prefetchable) [disabled] [size=16M]",
      "\tRegion 2: Memory at <unassigned> (64-bit, prefetchable) [disabled] [size=512M]",
      "\tCapabilities: [40] Express (v2) Endpoint, MSI 00",
      "\t\tDevCap:\tMaxPayload 128 bytes, PhantFunc 0",
      "\t\t\tExtTag- RBE+ FLReset+",
      "\t\tDevCtl:\tCorrErr- NonFatalErr- FatalErr- UnsupReq-",
      "\t\t\tRlxdOrd+ ExtTag- PhantFunc- AuxPwr- NoSnoop+",
      "\t\t\tMaxPayload 128 bytes, MaxReadReq 512 bytes",
      "\t\tLnkCap:\tPort #0, Speed unknown, Width x0, ASPM not supported",
      "\t\tLnkSta:\tSpeed unknown, Width x0",
      "\tCapabilities: [80] MSI-X: Enable- Count=16 Masked-",
      "\t\tVector table: BAR=0 offset=003f8000",
      "\t\tPBA: BAR=0 offset=003f9000",
      "\tDevice flags: PCI | RESET",
      "\tRegion BAR2    512 MiB, read/write/mmap, mmap areas [0+512 MiB]",
      "\tIRQ MSI-X 16 vectors (eventfd)",
      "\tMigration: STOP_COPY | P2P (flags 0x3), state RUNNING",
      "\tDMA logging: START | STOP | REPORT (how the device knows its pages: the server's log)",
      "\tServer limits: max_data_xfer_size 4 MiB, max_dma_maps 1000, max_msg_fds 8, pgsizes 0x1000, write_multiple yes",
    ] {
      #expect(lines.contains(line), "missing \(line.debugDescription) in:\n\(text)")
    }
    // The VF has no PM, MSI, INTx pin or extended capability.
    #expect(!text.contains("Power Management") && !text.contains("MSI:"))
    #expect(!lines.contains { $0.hasPrefix("\tRegion 1") || $0.hasPrefix("\tRegion 3") })

    #expect(json.vendorID == 0x8086 && json.deviceID == 0xE211)
    #expect(json.subsystemVendorID == 0x8086 && json.subsystemID == 0xE211)
    #expect(json.classCode == 0x03_8000 && json.className == "Display controller")
    #expect(json.revision == 0 && json.interruptPin == 0)
    #expect(json.bars.map(\.index) == [0, 2])
    #expect(json.bars.map(\.size) == [16 << 20, 512 << 20])
    #expect(json.bars.map(\.prefetchable) == [false, true])
    #expect(
      json.bars.allSatisfy { $0.kind == "memory" && $0.is64Bit && !$0.enabled && $0.address == 0 })
    #expect(json.capabilities.map(\.offset) == [0x40, 0x80])
    #expect(json.capabilities.map(\.name) == ["Express", "MSI-X"])
    let express = try #require(json.capabilities.first?.express)
    #expect(express.version == 2 && express.deviceType == 0 && express.deviceTypeName == "Endpoint")
    #expect(express.deviceCapabilities.functionLevelReset)
    #expect(express.deviceCapabilities.roleBasedErrorReporting)
    #expect(!express.deviceCapabilities.extendedTag)
    #expect(express.deviceCapabilities.raw == 1 << 28 | 1 << 15)
    #expect(express.deviceCapabilities.maxPayloadBytes == 128)
    #expect(express.deviceControl.raw == 0x2810)
    #expect(express.deviceControl.relaxedOrdering && express.deviceControl.noSnoop)
    #expect(express.deviceControl.maxReadRequestBytes == 512)
    #expect(
      express.linkCapabilities.maxSpeed == "unknown" && express.linkCapabilities.maxWidth == 0)
    let msix = try #require(json.capabilities.last?.msix)
    #expect(msix.tableSize == 16 && !msix.enabled && !msix.functionMasked)
    #expect(msix.table.bar == 0 && msix.table.offset == 0x3F_8000)
    #expect(msix.pba.bar == 0 && msix.pba.offset == 0x3F_9000)
    #expect(json.extendedCapabilities?.isEmpty == true)
    #expect(json.regions.count == 9)
    #expect(json.regions.first { $0.name == "BAR2" }?.flags.mmap == true)
    #expect(json.regions.first { $0.name == "config" }?.size == 4096)
    let flags = try #require(json.migration.flags)
    #expect(json.migration.supported && json.migration.state == "RUNNING")
    #expect(json.dmaLogging.supported && json.dmaLogging.error == nil)
    #expect(flags.raw == 3 && flags.stopCopy && flags.p2p && !flags.preCopy)
    #expect(json.server.maxDataXferSize == 4 << 20 && json.server.maxDMAMaps == 1000)
    #expect(json.server.maxMsgFDs == 8 && json.server.pgsizes == 4096 && json.server.writeMultiple)

    // The literal JSON: IDs are numbers, flags are booleans.
    for fragment in [
      #""vendorID" : 32902"#, #""deviceID" : 57873"#, #""functionLevelReset" : true"#,
      #""enabled" : false"#, #""tableSize" : 16"#, #""state" : "RUNNING""#,
      #""writeMultiple" : true"#,
    ] {
      #expect(raw.contains(fragment), "\(fragment) in\n\(raw)")
    }
    #expect(!raw.contains(#""8086""#) && !raw.contains(#""true""#))
  }

  /// What the client programmed (BAR addresses, decoding, MSI-X enable and mask)
  /// is what `info` shows: it decodes the live config space.
  @Test func programmedStateIsDecoded() throws {
    let serve = try ServeProcess(["--on-disconnect", "keep"])
    defer { _ = serve.stop() }
    do {
      let client = try serve.connect()
      let config = VFIOPCIRegion.config
      try client.write32(region: config, offset: 0x10, 0xE000_0000)
      try client.write32(region: config, offset: 0x14, 0)
      try client.write32(region: config, offset: 0x18, 0)
      try client.write32(region: config, offset: 0x1C, 0x8)
      try client.write(region: config, offset: 0x04, data: [0x06, 0x00])  // Mem, BusMaster
      try client.write(region: config, offset: 0x82, data: [0x0F, 0xC0])  // MSI-X enable + mask
    }
    usleep(50_000)
    let (text, json, _) = try info(serve.socketPath)
    let lines = text.split(separator: "\n").map(String.init)
    for line in [
      "\tControl: I/O- Mem+ BusMaster+ DisINTx-",
      "\tRegion 0: Memory at e0000000 (64-bit, non-prefetchable) [size=16M]",
      "\tRegion 2: Memory at 800000000 (64-bit, prefetchable) [size=256M]",
      "\tCapabilities: [80] MSI-X: Enable+ Count=16 Masked+",
    ] {
      #expect(lines.contains(line), "missing \(line.debugDescription) in:\n\(text)")
    }
    #expect(json.command.raw == 6 && json.command.memory && json.command.busMaster)
    #expect(json.bars.map(\.address) == [0xE000_0000, 0x8_0000_0000])
    #expect(json.bars.allSatisfy { $0.enabled })
    let msix = try #require(json.capabilities.compactMap(\.msix).first)
    #expect(msix.enabled && msix.functionMasked)
  }

  /// The migration state is read from the device (GET MIG_DEVICE_STATE): a VF
  /// a client left in STOP under `--on-disconnect keep` shows as STOP.
  @Test func migrationStateIsReadFromTheDevice() throws {
    let serve = try ServeProcess(["--on-disconnect", "keep"])
    defer { _ = serve.stop() }
    do {
      let client = try serve.connect()
      try client.setMigrationState(.stop)
      #expect(try client.migrationState() == .stop)
    }
    usleep(50_000)
    let (text, json, _) = try info(serve.socketPath)
    #expect(text.contains("\tMigration: STOP_COPY | P2P (flags 0x3), state STOP\n"), "\(text)")
    #expect(json.migration.state == "STOP")
    let resume = try run(["resume", "--socket-path", serve.socketPath])
    #expect(resume.status == 0, "\(resume.stderr)")
    #expect(try info(serve.socketPath).json.migration.state == "RUNNING")
  }

  /// An integrated profile: other IDs, no VRAM BAR.
  @Test func ptlProfileHasNoBAR2() throws {
    let serve = try ServeProcess(["--profile", "ptl"])
    defer { _ = serve.stop() }
    _ = try serve.connect()
    usleep(50_000)
    let (text, json, _) = try info(serve.socketPath)
    #expect(text.contains("Intel Corporation Device [8086:b080]"), "\(text)")
    #expect(!text.contains("\tRegion 2:"))
    #expect(json.deviceID == 0xB080 && json.bars.map(\.index) == [0])
    #expect(json.regions.first { $0.name == "BAR2" }?.size == 0)
  }

  /// Without a control socket, a busy server can only say it is busy.
  @Test func busyServerAndMissingSocketGiveClearErrors() throws {
    let serve = try ServeProcess(["--control-socket", "none"])
    defer { _ = serve.stop() }
    let holder = try serve.connect()
    let busy = try run(["info", "--socket-path", serve.socketPath])
    #expect(busy.status != 0)
    #expect(busy.stderr.contains("the server is busy with another client (EBUSY)"), "\(busy)")
    #expect(busy.stderr.contains("--control-socket none"), "\(busy)")
    _ = holder
    let nobody = try run(["info", "--socket-path", "/tmp/xvu-nobody-\(getpid()).sock"])
    #expect(nobody.status != 0 && nobody.stderr.contains("xvu-nobody"))
  }
}
