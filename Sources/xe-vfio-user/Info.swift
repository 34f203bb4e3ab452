import ArgumentParser
import Foundation
import SystemPackage
import VFIOUser
import VFIOUserClient

/// What a client sees of a vfio-user device, gathered over the socket.
struct DeviceReport: Codable {
  struct Region: Codable {
    var index: UInt32
    var name: String
    var size: UInt64
    var flags: [String]
    var mmapAreas: [[UInt64]]
    var regionType: [UInt32]?
  }
  struct IRQ: Codable {
    var index: UInt32
    var name: String
    var count: UInt32
    var flags: [String]
  }
  struct Capability: Codable {
    var offset: Int
    var id: Int
    var name: String
    var detail: String
  }
  var socket: String
  var protocolVersion: String
  var vendorID: String
  var deviceID: String
  var subsystem: String
  var revision: Int
  var classCode: String
  var deviceFlags: [String]
  var pciCapabilities: [Capability]
  var regions: [Region]
  var irqs: [IRQ]
  var serverCapabilities: [String: String]
}

struct Info: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract:
      "Show a vfio-user device the way a client sees it (IDs, regions, IRQs, capabilities).",
    discussion: "The server serves one client at a time: run this while no VMM is attached.")

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String = defaultSocketPath

  @Flag(help: "Print JSON instead of text.")
  var json = false

  func run() throws {
    let report: DeviceReport
    do {
      report = try Self.gather(socketPath: socketPath)
    } catch let error as VFIOUserClientError {
      if case .server(.resourceBusy, _) = error {
        throw CLIError("\(socketPath): the server already has a client (a VMM is attached)")
      }
      throw CLIError("\(socketPath): \(error)")
    }
    if json {
      let encoder = JSONEncoder()
      encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
      print(String(decoding: try encoder.encode(report), as: UTF8.self))
    } else {
      print(Self.render(report))
    }
  }

  static func gather(socketPath: String) throws -> DeviceReport {
    let client = try VFIOUserClient.connect(path: socketPath)
    let device = try client.deviceInfo()
    var regions: [DeviceReport.Region] = []
    for index in 0..<device.numRegions {
      let (info, fd) = try client.regionInfo(index)
      if let fd { close(fd) }
      var flags: [String] = []
      if info.flags & VFIORegionFlags.read != 0 { flags.append("read") }
      if info.flags & VFIORegionFlags.write != 0 { flags.append("write") }
      if info.flags & VFIORegionFlags.mmap != 0 { flags.append("mmap") }
      var areas: [[UInt64]] = []
      var type: [UInt32]?
      for cap in info.capabilities {
        switch cap {
        case .sparseMmap(let list): areas = list.map { [$0.offset, $0.size] }
        case .type(let t, let s): type = [t, s]
        case .msixMappable: flags.append("msix-mappable")
        }
      }
      regions.append(
        .init(
          index: index, name: VFIOPCIRegion.name(index), size: info.size, flags: flags,
          mmapAreas: areas, regionType: type))
    }
    var irqs: [DeviceReport.IRQ] = []
    for index in 0..<device.numIRQs {
      let info = try client.irqInfo(index)
      var flags: [String] = []
      if info.flags & VFIOIRQInfoFlags.eventfd != 0 { flags.append("eventfd") }
      if info.flags & VFIOIRQInfoFlags.maskable != 0 { flags.append("maskable") }
      if info.flags & VFIOIRQInfoFlags.automasked != 0 { flags.append("automasked") }
      if info.flags & VFIOIRQInfoFlags.noresize != 0 { flags.append("noresize") }
      irqs.append(
        .init(index: index, name: VFIOPCIIRQ.name(index), count: info.count, flags: flags))
    }
    let configSize = regions.first { $0.index == VFIOPCIRegion.config }?.size ?? 0
    let config =
      configSize >= 64
      ? try client.read(region: VFIOPCIRegion.config, offset: 0, count: 256)
      : [UInt8](repeating: 0, count: 256)
    func u16(_ o: Int) -> UInt16 { UInt16(config[o]) | UInt16(config[o + 1]) << 8 }
    func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
    var capabilities: [DeviceReport.Capability] = []
    if u16(6) & 0x10 != 0 {
      var offset = Int(config[0x34] & 0xFC)
      var seen = Set<Int>()
      while offset >= 0x40, offset < 256 - 4, seen.insert(offset).inserted {
        let id = Int(config[offset])
        capabilities.append(describeCapability(id: id, offset: offset, u16: u16, u32: u32))
        offset = Int(config[offset + 1] & 0xFC)
      }
    }
    var deviceFlags: [String] = []
    if device.flags & VFIODeviceFlags.pci != 0 { deviceFlags.append("pci") }
    if device.flags & VFIODeviceFlags.reset != 0 { deviceFlags.append("reset") }
    let caps = client.serverCapabilities
    var serverCaps: [String: String] = [
      "max_msg_fds": "\(caps.effectiveMaxMsgFDs)",
      "max_data_xfer_size": "\(caps.effectiveMaxDataXferSize)",
      "max_dma_maps": "\(caps.effectiveMaxDMAMaps)", "pgsizes": "\(caps.effectivePgsizes)",
    ]
    if let wm = caps.writeMultiple { serverCaps["write_multiple"] = "\(wm)" }
    return DeviceReport(
      socket: socketPath,
      protocolVersion: "\(client.serverVersion.major).\(client.serverVersion.minor)",
      vendorID: hex(u16(0), 4), deviceID: hex(u16(2), 4),
      subsystem: "\(hex(u16(0x2C), 4)):\(hex(u16(0x2E), 4))",
      revision: Int(config[8]), classCode: hex(u32(8) >> 8, 6), deviceFlags: deviceFlags,
      pciCapabilities: capabilities, regions: regions, irqs: irqs, serverCapabilities: serverCaps)
  }

  static func describeCapability(id: Int, offset: Int, u16: (Int) -> UInt16, u32: (Int) -> UInt32)
    -> DeviceReport.Capability
  {
    switch id {
    case 0x01:
      return .init(offset: offset, id: id, name: "Power Management", detail: "")
    case 0x05:
      return .init(
        offset: offset, id: id, name: "MSI", detail: "Enable\(u16(offset + 2) & 1 != 0 ? "+" : "-")"
      )
    case 0x10:
      let devcap = u32(offset + 4)
      let type = (u16(offset + 2) >> 4) & 0xF
      let kind =
        type == 0 ? "Endpoint" : type == 9 ? "Root Complex Integrated Endpoint" : "type \(type)"
      return .init(
        offset: offset, id: id, name: "Express",
        detail: "\(kind), FLReset\(devcap & (1 << 28) != 0 ? "+" : "-")")
    case 0x11:
      let control = u16(offset + 2)
      let table = u32(offset + 4)
      let pba = u32(offset + 8)
      return .init(
        offset: offset, id: id, name: "MSI-X",
        detail:
          "Enable\(control & 0x8000 != 0 ? "+" : "-") Count=\(Int(control & 0x7FF) + 1) Masked\(control & 0x4000 != 0 ? "+" : "-") Vector table: BAR=\(table & 7) offset=\(hex(table & ~7, 8)) PBA: BAR=\(pba & 7) offset=\(hex(pba & ~7, 8))"
      )
    default:
      return .init(offset: offset, id: id, name: "capability \(hex(UInt32(id), 2))", detail: "")
    }
  }

  static func render(_ r: DeviceReport) -> String {
    var out = "vfio-user device at \(r.socket) (protocol \(r.protocolVersion))\n"
    out +=
      "  [\(r.vendorID):\(r.deviceID)] class \(r.classCode) (rev \(hex(UInt32(r.revision), 2)))"
    out += r.vendorID == "8086" ? " Intel Corporation\n" : "\n"
    out += "  Subsystem: \(r.subsystem)\n"
    out += "  Flags: \(r.deviceFlags.joined(separator: ", "))\n"
    out += "  Capabilities:\n"
    for cap in r.pciCapabilities {
      out +=
        "    [\(hex(UInt32(cap.offset), 2))] \(cap.name)\(cap.detail.isEmpty ? "" : ": \(cap.detail)")\n"
    }
    out += "  Regions:\n"
    for region in r.regions where region.size > 0 {
      var line =
        "    \(region.name.padding(toLength: 7, withPad: " ", startingAt: 0)) \(formatBytes(region.size)), \(region.flags.joined(separator: "/"))"
      if !region.mmapAreas.isEmpty {
        line +=
          ", mmap areas "
          + region.mmapAreas.map {
            "[\(hex(UInt32(truncatingIfNeeded: $0[0]), 1))+\(formatBytes($0[1]))]"
          }.joined(separator: " ")
      }
      out += line + "\n"
    }
    out += "  IRQs:\n"
    for irq in r.irqs {
      out +=
        "    \(irq.name.padding(toLength: 7, withPad: " ", startingAt: 0)) \(irq.count) vector\(irq.count == 1 ? "" : "s")\(irq.flags.isEmpty ? "" : " (\(irq.flags.joined(separator: ", ")))")\n"
    }
    out +=
      "  Server: "
      + r.serverCapabilities.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(
        separator: " ")
    return out
  }
}

func hex<T: BinaryInteger>(_ value: T, _ width: Int) -> String {
  let s = String(value, radix: 16)
  return String(repeating: "0", count: max(0, width - s.count)) + s
}
