import FuzzSupport
import SystemPackage
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

// libFuzzer target: the wire decoder. An input is one message as it arrives
// on the socket, in either direction. The header is decoded as the reader
// does; the payload with every codec its command uses, request or reply. A
// payload that decodes must encode to bytes that decode to the same value,
// and a VERSION's JSON goes through the capabilities parser (json-c).

func fuzzWire(_ input: UnsafeRawBufferPointer) {
  guard let header = try? MessageHeader(framing: input) else { return }
  _ = try? MessageHeader(decoding: input)
  // The reader hands on at most `size` bytes; past the input it has none.
  let end = min(Int(header.size), input.count)
  let payload = UnsafeRawBufferPointer(rebasing: input[MessageHeader.size..<end])
  let reply = header.isReply
  switch header.knownCommand {
  case .version:
    if let version = roundTrip(VersionPayload.self, payload), let json = version.json {
      if let capabilities = try? Capabilities.parse(json: json) {
        guard let again = try? Capabilities.parse(json: capabilities.json()) else {
          fuzzFailure("capabilities JSON it wrote does not parse again")
        }
        guard again.maxMsgFDs == capabilities.maxMsgFDs,
          again.maxDataXferSize == capabilities.maxDataXferSize,
          again.maxDMAMaps == capabilities.maxDMAMaps, again.pgsizes == capabilities.pgsizes,
          again.writeMultiple == capabilities.writeMultiple
        else { fuzzFailure("capabilities differ after a JSON round trip") }
      }
    }
  case .dmaMap:
    if !reply { roundTrip(DMAMapRequest.self, payload) }
  case .dmaUnmap:
    roundTrip(DMAUnmapPayload.self, payload)
  case .deviceGetInfo:
    roundTrip(DeviceInfoPayload.self, payload)
  case .deviceGetRegionInfo:
    // A chain is re-encoded right after the fixed part, wherever it was.
    roundTrip(RegionInfoPayload.self, payload) {
      if !$0.capabilities.isEmpty { $0.capOffset = UInt32(RegionInfoPayload.fixedSize) }
    }
  case .deviceGetRegionIOFDs:
    roundTrip(RegionIOFDsPayload.self, payload)
  case .deviceGetIRQInfo:
    roundTrip(IRQInfoPayload.self, payload)
  case .deviceSetIRQs:
    if !reply, let set = roundTrip(IRQSetPayload.self, payload) {
      _ = (set.flags.dataType, set.flags.action)
    }
  case .regionRead, .regionWrite:
    if let access = try? RegionAccessHeader(decoding: payload) {
      var out = [UInt8](repeating: 0, count: RegionAccessHeader.size)
      out.withUnsafeMutableBytes { access.encode(into: $0) }
      guard out.elementsEqual(payload[..<RegionAccessHeader.size]) else {
        fuzzFailure("REGION access head re-encodes differently")
      }
    }
  case .dmaRead, .dmaWrite:
    for layout in DMATransferLayout.allCases {
      guard let access = try? DMAAccessHeader(decoding: payload, layout: layout) else { continue }
      var out = [UInt8](repeating: 0, count: layout.overhead)
      out.withUnsafeMutableBytes { access.encode(into: $0, layout: layout) }
      let again = out.withUnsafeBytes { try? DMAAccessHeader(decoding: $0, layout: layout) }
      guard again == access else { fuzzFailure("DMA access head (\(layout)) round trip differs") }
    }
  case .regionWriteMulti:
    if reply {
      roundTrip(WriteMultiReply.self, payload)
    } else if let count = try? WriteMultiPayload.validate(payload) {
      for i in 0..<count {
        guard let entry = try? WriteMultiPayload.entry(i, in: payload) else {
          fuzzFailure("a validated entry does not decode")
        }
        let n = entry.withData { $0.count }
        guard n == min(Int(entry.count), 8) else { fuzzFailure("write-multi data length") }
      }
      roundTrip(WriteMultiPayload.self, payload)
    }
  case .deviceFeature:
    if let feature = roundTrip(DeviceFeaturePayload.self, payload) {
      feature.data.withUnsafeBytes { data in
        roundTrip(MigrationFeatureData.self, data)
        if let state = roundTrip(MigDeviceStateData.self, data) { _ = state.state }
        roundTrip(MigDataSizeData.self, data)
      }
    }
  case .migDataRead, .migDataWrite:
    if let head = try? MigDataHeader(decoding: payload) {
      var out = [UInt8](repeating: 0, count: 8)
      out.withUnsafeMutableBytes { head.encode(into: $0) }
      let again = out.withUnsafeBytes { try? MigDataHeader(decoding: $0) }
      guard again == head else { fuzzFailure("MIG_DATA head round trip differs") }
    }
  case .deviceReset, nil:
    break
  }
}

/// Decodes `bytes` as `T`; a value that decodes must survive encode → decode
/// (after `normalize`, for what the encoding does not keep by design).
@discardableResult
func roundTrip<T: WirePayload>(
  _ type: T.Type, _ bytes: UnsafeRawBufferPointer, normalize: (inout T) -> Void = { _ in }
) -> T? {
  guard var value = try? T(decoding: bytes) else { return nil }
  normalize(&value)
  let encoded = value.encoded()
  guard encoded.count == value.encodedSize else { fuzzFailure("\(T.self) encodedSize is wrong") }
  let again: T
  do { again = try T(decoding: encoded) } catch {
    fuzzFailure("\(T.self) \(value) encodes to bytes it refuses (\(error))")
  }
  guard again == value else { fuzzFailure("\(T.self) \(value) decodes again as \(again)") }
  return value
}

/// Every message of protocol/messages.json and protocol/malformed.json.
func wireSeeds(_ protocolDirectory: String) -> [[UInt8]] {
  var seeds: [[UInt8]] = []
  for file in ["messages.json", "malformed.json"] {
    forEachFixture(protocolDirectory + "/" + file) { object in
      if let bytes = object.hex("hex") { seeds.append(bytes) }
    }
  }
  seeds += regressionInputs(protocolDirectory, target: "wire")
  return seeds
}

@main
enum FuzzWireTarget {
  static func main() { fuzzTargetMain(seeds: wireSeeds) { fuzzWire($0) } }
}
