import SystemPackage
import TestSupport
import Testing
import VFIOUser

// Every vector of protocol/messages.json: decode the header and the payload with
// the matching codec, compare every field, then build the message again from the
// vector's fields and compare it byte for byte with the vector.

/// The codec a message must be decoded with, from its command, kind and layout.
func expectedCodec(_ vector: Vector) -> String {
  if vector.kind == "error" { return "none" }
  let reply = vector.kind == "reply"
  let qemuLayout = (try? vector.payload.string("layout")) == DMATransferLayout.qemu.rawValue
  switch Command(rawValue: vector.command) {
  case .version: return "VersionPayload"
  case .dmaMap: return reply ? "none" : "DMAMapRequest"
  case .dmaUnmap: return "DMAUnmapPayload"
  case .deviceGetInfo: return "DeviceInfoPayload"
  case .deviceGetRegionInfo: return "RegionInfoPayload"
  case .deviceGetRegionIOFDs: return "RegionIOFDsPayload"
  case .deviceGetIRQInfo: return "IRQInfoPayload"
  case .deviceSetIRQs: return reply ? "none" : "IRQSetPayload"
  case .regionRead, .regionWrite: return "RegionAccessHeader"
  case .dmaRead: return "DMAAccessHeader"
  case .dmaWrite: return reply && qemuLayout ? "none" : "DMAAccessHeader"
  case .deviceReset: return "none"
  case .regionWriteMulti: return reply ? "WriteMultiReply" : "WriteMultiPayload"
  case .deviceFeature: return "DeviceFeaturePayload"
  case .migDataRead: return "MigDataHeader"
  case .migDataWrite: return reply ? "none" : "MigDataHeader"
  case nil: return "none"
  }
}

@Test("golden vector decodes and re-encodes", arguments: ProtocolFiles.vectors)
func goldenVector(_ vector: Vector) throws {
  let bytes = try #require(vector.bytes, "hex is not hex")
  #expect(vector.hex == bytes.hexString, "hex is lowercase without separators")

  // Header.
  let header = try decodeHeader(bytes)
  let fields = vector.header
  #expect(header.messageID == (try fields.u16("messageID")))
  #expect(header.command == (try fields.u16("command")))
  #expect(header.size == (try fields.u32("size")))
  #expect(header.flags.rawValue == (try fields.u32("flags")))
  #expect(header.error == (try fields.u32("error")))
  #expect(header.command == vector.command)
  #expect(Int(header.size) == bytes.count, "size covers the whole message")

  // Kind and direction agree with the header and the command table.
  switch vector.kind {
  case "request":
    #expect(header.isCommand && !header.isError && header.error == 0)
  case "reply":
    #expect(header.isReply && !header.isError && header.error == 0)
  case "error":
    #expect(header.isReply && header.isError && header.error != 0)
    #expect(header.payloadSize == 0, "an error reply is the header alone")
  default:
    Issue.record("unknown kind \(vector.kind)")
  }
  let serverToClientCommand = header.knownCommand == .dmaRead || header.knownCommand == .dmaWrite
  let requestDirection = serverToClientCommand ? "server->client" : "client->server"
  let replyDirection = serverToClientCommand ? "client->server" : "server->client"
  #expect(vector.direction == (vector.kind == "request" ? requestDirection : replyDirection))
  #expect(vector.codec == expectedCodec(vector))
  #expect(vector.fds >= 0)

  // Payload: decode, compare with the fields, rebuild from the fields.
  let payload = Array(bytes[MessageHeader.size...])
  let rebuilt = try decodeAndRebuildPayload(vector, payload)
  #expect(rebuilt == payload, "payload re-encodes to the vector's bytes")

  let message = encodeMessage(
    id: try fields.u16("messageID"), command: try fields.u16("command"),
    flags: MessageHeader.Flags(rawValue: try fields.u32("flags")),
    error: try fields.u32("error"), payload: rebuilt)
  #expect(message == bytes, "whole message re-encodes to the vector's bytes")
}

/// Decodes `payload` with the vector's codec, checks every field, and returns
/// the payload encoded again from a value built from the vector's fields.
func decodeAndRebuildPayload(_ vector: Vector, _ payload: [UInt8]) throws -> [UInt8] {
  let p = vector.payload
  switch vector.codec {
  case "none":
    #expect(payload.isEmpty)
    return []

  case "VersionPayload":
    let decoded = try VersionPayload(decoding: payload)
    let expected = VersionPayload(
      major: try p.u16("major"), minor: try p.u16("minor"), json: try p.optionalString("json"))
    #expect(decoded == expected)
    if let json = expected.json {
      // Every VERSION JSON in the contract is a valid capabilities document.
      _ = try Capabilities.parse(json: json)
    }
    return expected.encoded()

  case "DMAMapRequest":
    let decoded = try DMAMapRequest(decoding: payload)
    let expected = DMAMapRequest(
      flags: .init(rawValue: try p.u32("flags")), offset: try p.u64("offset"),
      address: try p.u64("address"),
      size: try p.u64("size"), argsz: try p.u32("argsz"))
    #expect(decoded == expected)
    return expected.encoded()

  case "DMAUnmapPayload":
    let decoded = try DMAUnmapPayload(decoding: payload)
    let expected = DMAUnmapPayload(
      flags: .init(rawValue: try p.u32("flags")), address: try p.u64("address"),
      size: try p.u64("size"),
      argsz: try p.u32("argsz"))
    #expect(decoded == expected)
    return expected.encoded()

  case "DeviceInfoPayload":
    let decoded = try DeviceInfoPayload(decoding: payload)
    let expected = DeviceInfoPayload(
      argsz: try p.u32("argsz"), flags: .init(rawValue: try p.u32("flags")),
      numRegions: try p.u32("numRegions"),
      numIRQs: try p.u32("numIRQs"))
    #expect(decoded == expected)
    return expected.encoded()

  case "RegionInfoPayload":
    let decoded = try RegionInfoPayload(decoding: payload)
    let capabilities = try p.objects("capabilities").map(regionCapability)
    let expected = RegionInfoPayload(
      argsz: try p.u32("argsz"), flags: .init(rawValue: try p.u32("flags")),
      index: try p.u32("index"),
      capOffset: try p.u32("capOffset"), size: try p.u64("size"), offset: try p.u64("offset"),
      capabilities: capabilities)
    #expect(decoded == expected)
    if !capabilities.isEmpty {
      #expect(expected.fullSize == payload.count)
      #expect(Int(expected.argsz) == payload.count, "a full reply's argsz is its payload size")
    }
    return expected.encoded()

  case "RegionIOFDsPayload":
    let decoded = try RegionIOFDsPayload(decoding: payload)
    let subRegions = try p.objects("subRegions").map { s in
      IOFDSubRegion(
        offset: try s.u64("offset"), size: try s.u64("size"), fdIndex: try s.u32("fdIndex"),
        type: try s.u32("type"), flags: try s.u32("flags"), value: try s.u64("value"))
    }
    let expected = RegionIOFDsPayload(
      argsz: try p.u32("argsz"), flags: try p.u32("flags"), index: try p.u32("index"),
      count: try p.u32("count"), subRegions: subRegions)
    #expect(decoded == expected)
    return expected.encoded()

  case "IRQInfoPayload":
    let decoded = try IRQInfoPayload(decoding: payload)
    let expected = IRQInfoPayload(
      argsz: try p.u32("argsz"), flags: .init(rawValue: try p.u32("flags")),
      index: try p.u32("index"),
      count: try p.u32("count"))
    #expect(decoded == expected)
    return expected.encoded()

  case "IRQSetPayload":
    let decoded = try IRQSetPayload(decoding: payload)
    let expected = IRQSetPayload(
      argsz: try p.u32("argsz"), flags: .init(rawValue: try p.u32("flags")),
      index: try p.u32("index"),
      start: try p.u32("start"), count: try p.u32("count"),
      bools: try p.integers("bools", as: UInt8.self))
    #expect(decoded == expected)
    #expect(
      decoded.flags.dataType.rawValue.nonzeroBitCount == 1
        && decoded.flags.action.rawValue.nonzeroBitCount == 1)
    return expected.encoded()

  case "RegionAccessHeader":
    let decoded = try decodeRegionAccess(payload)
    let expected = RegionAccessHeader(
      offset: try p.u64("offset"), region: try p.u32("region"), count: try p.u32("count"))
    let data = try p.bytes("data")
    #expect(decoded == expected)
    #expect(Array(payload[RegionAccessHeader.size...]) == data)
    if !data.isEmpty { #expect(data.count == Int(expected.count), "data carries count bytes") }
    return expected.encoded(data: data)

  case "DMAAccessHeader":
    let layout = try #require(DMATransferLayout(rawValue: try p.string("layout")))
    let decoded = try decodeDMAAccess(payload, layout: layout)
    let expected = DMAAccessHeader(address: try p.u64("address"), count: try p.u64("count"))
    let data = try p.bytes("data")
    #expect(decoded == expected)
    // Both layouts carry 16 bytes beyond the data: spec = head of 16, QEMU =
    // head of 12 plus 4 zero bytes after the data.
    #expect(payload.count == layout.overhead + data.count)
    #expect(Array(payload[layout.dataOffset..<(layout.dataOffset + data.count)]) == data)
    if layout == .qemu {
      #expect(payload[(layout.dataOffset + data.count)...].allSatisfy { $0 == 0 })
    }
    var out = [UInt8](repeating: 0, count: layout.overhead + data.count)
    out.withUnsafeMutableBytes { expected.encode(into: $0, layout: layout) }
    out.replaceSubrange(layout.dataOffset..<(layout.dataOffset + data.count), with: data)
    return out

  case "WriteMultiPayload":
    let decoded = try WriteMultiPayload(decoding: payload)
    let entries = try p.objects("entries").map { e in
      WriteMultiEntry(
        offset: try e.u64("offset"), region: try e.u32("region"), count: try e.u32("count"),
        data: try e.u64("data"))
    }
    let expected = WriteMultiPayload(entries: entries)
    #expect(decoded == expected)
    #expect(UInt64(entries.count) == (try p.u64("wrCnt")))
    let validated = try payload.withUnsafeBytes { try WriteMultiPayload.validate($0) }
    #expect(validated == entries.count)
    return expected.encoded()

  case "WriteMultiReply":
    // The reply is a bare u64 wr_cnt.
    let wrCnt = try p.u64("wrCnt")
    #expect(payload.count == WriteMultiReply.size)
    let decoded = try WriteMultiReply(decoding: payload)
    #expect(decoded.wrCnt == wrCnt)
    return WriteMultiReply(wrCnt: wrCnt).encoded()

  case "DeviceFeaturePayload":
    let decoded = try DeviceFeaturePayload(decoding: payload)
    let expected = DeviceFeaturePayload(
      argsz: try p.u32("argsz"), flags: try p.u32("flags"), data: try p.bytes("data"))
    #expect(decoded == expected)
    #expect(decoded.feature == (try p.u32("feature")))
    if !decoded.data.isEmpty {
      // The feature's own data, through its codec, byte for byte.
      let again: [UInt8]
      switch decoded.feature {
      case VFIODeviceFeature.migration:
        again = try MigrationFeatureData(decoding: decoded.data).encoded()
      case VFIODeviceFeature.migDeviceState:
        let state = try MigDeviceStateData(decoding: decoded.data)
        #expect(state.state != nil && state.dataFD == -1)
        again = state.encoded()
      case VFIODeviceFeature.migDataSize:
        again = try MigDataSizeData(decoding: decoded.data).encoded()
      case VFIODeviceFeature.dmaLoggingStart:
        let start = try DMALoggingStartData(decoding: decoded.data)
        #expect(!start.ranges.isEmpty)
        again = start.encoded()
      case VFIODeviceFeature.dmaLoggingReport:
        let report = try DMALoggingReportData(decoding: decoded.data)
        if vector.kind == "reply" {
          #expect(
            report.bitmap.count
              == DMALoggingReportData.bitmapSize(length: report.length, pageSize: report.pageSize))
        }
        again = report.encoded()
      default:
        again = decoded.data
        Issue.record("feature \(decoded.feature) has no codec for its data")
      }
      #expect(again == decoded.data)
    }
    return expected.encoded()

  case "MigDataHeader":
    let decoded = try decodeMigData(payload)
    let expected = MigDataHeader(argsz: try p.u32("argsz"), size: try p.u32("size"))
    let data = try p.bytes("data")
    #expect(decoded == expected)
    #expect(Array(payload[MigDataHeader.size...]) == data)
    var out = [UInt8](repeating: 0, count: MigDataHeader.size)
    out.withUnsafeMutableBytes { expected.encode(into: $0) }
    return out + data

  default:
    Issue.record("unknown codec \(vector.codec)")
    return payload
  }
}

func regionCapability(_ c: Fields) throws -> RegionCapability {
  let kind = try c.string("kind")
  let id = try c.u16("id")
  #expect(try c.u16("version") == 1)
  switch kind {
  case "sparseMmap":
    #expect(id == VFIORegionCapID.sparseMmap)
    return .sparseMmap(
      try c.objects("areas").map {
        SparseMmapArea(offset: try $0.u64("offset"), size: try $0.u64("size"))
      })
  case "type":
    #expect(id == VFIORegionCapID.type)
    return .type(type: try c.u32("type"), subtype: try c.u32("subtype"))
  case "msixMappable":
    #expect(id == VFIORegionCapID.msixMappable)
    return .msixMappable
  default:
    throw FixtureError("unknown region capability kind \(kind)")
  }
}

@Test(
  "reply and error headers match MessageHeader.reply / errorReply", arguments: ProtocolFiles.vectors
)
func replyHeaderHelpers(_ vector: Vector) throws {
  guard vector.kind != "request" else { return }
  let header = try decodeHeader(try #require(vector.bytes))
  let request = MessageHeader(messageID: header.messageID, command: header.command, size: 0)
  if vector.kind == "error" {
    #expect(request.errorReply(Errno(rawValue: Int32(bitPattern: header.error))) == header)
  } else {
    #expect(request.reply(payloadSize: header.payloadSize) == header)
  }
}

@Test func everyCommandHasRequestAndReplyVectors() {
  let vectors = ProtocolFiles.vectors
  for command in Command.allCases {
    #expect(
      vectors.contains { $0.command == command.rawValue && $0.kind == "request" },
      "no request vector for \(command)")
    #expect(
      vectors.contains { $0.command == command.rawValue && $0.kind == "reply" },
      "no reply vector for \(command)")
  }
  // DMA_READ / DMA_WRITE: request and reply in both layouts.
  for command in [Command.dmaRead, .dmaWrite] {
    for layout in DMATransferLayout.allCases {
      for kind in ["request", "reply"] {
        #expect(
          vectors.contains {
            $0.command == command.rawValue && $0.kind == kind
              && (try? $0.payload.string("layout")) == layout.rawValue
          }, "no \(layout) \(kind) vector for \(command)")
      }
    }
  }
  #expect(vectors.contains { $0.kind == "error" }, "no error reply vector")
  #expect(
    vectors.contains {
      $0.header.values["flags"] == .integer(UInt64(MessageHeader.Flags.noReply.rawValue))
    })
}

@Test func headerRoundTripsEveryFlagCombination() throws {
  for flags: UInt32 in [0, 1, 0x10, 0x11, 0x20, 0x21, 0x30, 0x31, 0xFFFF_FFF0, 0xFFFF_FFF1] {
    let header = MessageHeader(
      messageID: 0xBEEF, command: 0x1234, size: 0xFFFF_FFFF, flags: .init(rawValue: flags),
      error: 0xDEAD_BEEF)
    var bytes = [UInt8](repeating: 0, count: MessageHeader.size)
    bytes.withUnsafeMutableBytes { header.encode(into: $0) }
    #expect(try decodeHeader(bytes) == header)
    #expect(
      bytes == [0xEF, 0xBE, 0x34, 0x12, 0xFF, 0xFF, 0xFF, 0xFF] + flags.littleEndianBytes + [
        0xEF, 0xBE, 0xAD, 0xDE,
      ])
  }
}

extension UInt32 {
  fileprivate var littleEndianBytes: [UInt8] { withUnsafeBytes(of: littleEndian) { Array($0) } }
}
