import ArgumentParser
import Control
import DeviceReport
import FoundationEssentials
import MigrationTools
import SystemPackage
import VFIOUser
import VFIOUserClient

#if canImport(Glibc)
  import Glibc
#endif

struct Info: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract:
      "Show a vfio-user device the way a client sees it, like `lspci -vv`.",
    discussion: """
      Connects to the server and prints the device's class, BARs (type, address, \
      size), PCI and PCIe capabilities (DevCap, DevCtl, link, MSI-X table and \
      PBA), all decoded from the config space read through the socket; then the \
      vfio-user view: device flags, regions, IRQs, migration support and state \
      (DEVICE_FEATURE), and the limits the server advertised. With --json, the \
      same as JSON: numbers are numbers and flags booleans. The server serves \
      one client at a time: while a VMM is attached, this asks the server's \
      control socket instead and prints the live state (the client's pid, \
      the device's migration state, DMA windows, interrupts, errors).
      """)

  @Option(
    name: [.customLong("socket-path"), .customShort("s"), .customLong("socket")],
    help: "The server's socket.")
  var socketPath: String = defaultSocketPath

  @Option(
    help: ArgumentHelp(
      "The server's control socket, asked while a client is attached (default: the socket path with .control appended).",
      valueName: "path"))
  var controlSocket: String?

  @Flag(help: "Print JSON instead of text.")
  var json = false

  func run() throws {
    let client: VFIOUserClient
    do {
      client = try connectServer(socketPath, option: "-s")
    } catch let busy as BusyServerError {
      try showLive(busy)
      return
    }
    let report: DeviceReport
    do throws(VFIOUserClientError) {
      report = try Self.gather(client, socketPath: socketPath)
    } catch {
      throw EndError(end: "-s \(socketPath)", underlying: error)
    }
    if json {
      let encoder = JSONEncoder()
      encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
      print(String(decoding: try encoder.encode(report), as: UTF8.self))
    } else {
      print(Self.render(report), terminator: "")
    }
  }

  static func gather(_ client: VFIOUserClient, socketPath: String) throws(VFIOUserClientError)
    -> DeviceReport
  {
    let device = try client.deviceInfo()
    var regions: [DeviceReport.Region] = []
    for index in 0..<device.numRegions {
      let info = try client.regionInfo(index).info  // its descriptor closes with the reply
      var areas: [DeviceReport.Region.Area] = []
      var type: DeviceReport.Region.RegionType?
      var msixMappable = false
      for cap in info.capabilities {
        switch cap {
        case .sparseMmap(let list): areas = list.map { .init(offset: $0.offset, size: $0.size) }
        case .type(let t, let s): type = .init(type: Int(t), subtype: Int(s))
        case .msixMappable: msixMappable = true
        }
      }
      regions.append(
        .init(
          index: Int(index), name: VFIOPCIRegion.name(index), size: info.size,
          flags: .init(info.flags, msixMappable: msixMappable), mmapAreas: areas, type: type))
    }
    var irqs: [DeviceReport.IRQ] = []
    for index in 0..<device.numIRQs {
      let info = try client.irqInfo(index)
      irqs.append(
        .init(
          index: Int(index), name: VFIOPCIIRQ.name(index), count: Int(info.count),
          flags: .init(info.flags)))
    }

    // The whole config space (4 KiB for PCIe) in reads the server accepts.
    let configSize = Int(
      min(regions.first { $0.index == Int(VFIOPCIRegion.config) }?.size ?? 0, 4096))
    var bytes: [UInt8] = []
    let chunk = Int(min(client.serverCapabilities.effectiveMaxDataXferSize, 4096))
    while bytes.count < configSize {
      let count = min(chunk, configSize - bytes.count)
      bytes += try client.read(
        region: VFIOPCIRegion.config, offset: UInt64(bytes.count), count: count)
    }
    guard bytes.count >= 64 else {
      throw .protocolViolation("config space of \(bytes.count) bytes: not a PCI device")
    }
    let config = ConfigBytes(bytes: bytes)
    let pci = DeviceReport.decodePCI(
      config, regionSizes: regions.sorted { $0.index < $1.index }.map(\.size))

    // Migration: VFIO_DEVICE_FEATURE_MIGRATION, then the current MIG_DEVICE_STATE.
    var migration = DeviceReport.Migration(supported: false)
    do {
      migration.flags = .init(try client.migrationFlags())
      migration.supported = true
      migration.state = try client.migrationState().description
    } catch let error {
      guard let errno = error.errno else { throw error }
      migration.error = errno.name
    }

    // DMA logging: a PROBE of START (SET), STOP (SET) and REPORT (GET).
    var dmaLogging = DeviceReport.DMALogging(supported: false)
    do {
      dmaLogging.supported = try client.supportsDMALogging()
      if !dmaLogging.supported { dmaLogging.error = Errno.inappropriateIOCTLForDevice.name }
    } catch let error {
      guard let errno = error.errno else { throw error }
      dmaLogging.error = errno.name
    }

    let caps = client.serverCapabilities
    let classCode = config.u32(0x08) >> 8
    return DeviceReport(
      socket: socketPath,
      protocolVersion: .init(
        major: Int(client.serverVersion.major), minor: Int(client.serverVersion.minor)),
      vendorID: config.u16(0x00), deviceID: config.u16(0x02),
      vendorName: PCINames.vendor(config.u16(0x00)), subsystemVendorID: config.u16(0x2C),
      subsystemID: config.u16(0x2E), revision: config.u8(0x08), classCode: classCode,
      className: PCINames.class(classCode), headerType: config.u8(0x0E),
      command: pci.header.command, status: pci.header.status, interruptPin: config.u8(0x3D),
      bars: pci.bars, capabilities: pci.capabilities, extendedCapabilities: pci.extended,
      deviceFlags: .init(device.flags),
      regions: regions, irqs: irqs, migration: migration, dmaLogging: dmaLogging,
      server: .init(
        maxDataXferSize: Int(caps.effectiveMaxDataXferSize),
        maxDMAMaps: Int(caps.effectiveMaxDMAMaps),
        maxMsgFDs: Int(caps.effectiveMaxMsgFDs), pgsizes: caps.effectivePgsizes,
        writeMultiple: caps.writeMultiple ?? false),
      kernelDevice: ServedRecord.serving(socket: socketPath).map {
        .init(address: $0.device, pid: $0.pid, migration: $0.migration, opened: $0.opened)
      })
  }

  /// `lspci -vv`'s layout for the PCI part, then the vfio-user view.
  static func render(_ r: DeviceReport) -> String {
    func flag(_ name: String, _ on: Bool) -> String { name + (on ? "+" : "-") }
    let vendor = r.vendorName.map { $0 + " " } ?? ""
    var out =
      "vfio-user device at \(r.socket) (protocol \(r.protocolVersion.major).\(r.protocolVersion.minor))\n"
    out +=
      "\(r.className) [\(hex(r.classCode >> 8, 4))]: \(vendor)Device [\(hex(r.vendorID, 4)):\(hex(r.deviceID, 4))] (rev \(hex(r.revision, 2)))\n"
    out +=
      "\tSubsystem: \(PCINames.vendor(r.subsystemVendorID).map { $0 + " " } ?? "")Device [\(hex(r.subsystemVendorID, 4)):\(hex(r.subsystemID, 4))]\n"
    let c = r.command
    out +=
      "\tControl: \(flag("I/O", c.io)) \(flag("Mem", c.memory)) \(flag("BusMaster", c.busMaster)) \(flag("DisINTx", c.intxDisable))\n"
    out +=
      "\tStatus: \(flag("Cap", r.status.capabilitiesList)) \(flag("INTx", r.status.interruptPending))\n"
    out +=
      "\tInterrupt: \(r.interruptPin == 0 ? "none (no INTx pin)" : "pin \(["A", "B", "C", "D"][(r.interruptPin - 1) & 3])")\n"
    for bar in r.bars {
      let address = bar.address == 0 ? "<unassigned>" : hex(bar.address, 1)
      let kind = bar.kind == "io" ? "I/O ports at \(address)" : "Memory at \(address)"
      let traits =
        bar.kind == "io"
        ? ""
        : " (\(bar.is64Bit ? "64-bit" : "32-bit"), \(bar.prefetchable ? "prefetchable" : "non-prefetchable"))"
      out +=
        "\tRegion \(bar.index): \(kind)\(traits)\(bar.enabled ? "" : " [disabled]") [size=\(lspciSize(bar.size))]\n"
    }
    for cap in r.capabilities {
      out += "\tCapabilities: [\(hex(cap.offset, 2))] "
      if let e = cap.express {
        out +=
          "Express (v\(e.version)) \(e.deviceTypeName), MSI \(hex(e.interruptMessageNumber, 2))\n"
        let dc = e.deviceCapabilities
        out +=
          "\t\tDevCap:\tMaxPayload \(dc.maxPayloadBytes) bytes, PhantFunc \(dc.phantomFunctions)\n"
        out +=
          "\t\t\t\(flag("ExtTag", dc.extendedTag)) \(flag("RBE", dc.roleBasedErrorReporting)) \(flag("FLReset", dc.functionLevelReset))\n"
        let dl = e.deviceControl
        out +=
          "\t\tDevCtl:\t\(flag("CorrErr", dl.correctableErrorReporting)) \(flag("NonFatalErr", dl.nonFatalErrorReporting)) \(flag("FatalErr", dl.fatalErrorReporting)) \(flag("UnsupReq", dl.unsupportedRequestReporting))\n"
        out +=
          "\t\t\t\(flag("RlxdOrd", dl.relaxedOrdering)) \(flag("ExtTag", dl.extendedTag)) \(flag("PhantFunc", dl.phantomFunctions)) \(flag("AuxPwr", dl.auxPower)) \(flag("NoSnoop", dl.noSnoop))\n"
        out +=
          "\t\t\tMaxPayload \(dl.maxPayloadBytes) bytes, MaxReadReq \(dl.maxReadRequestBytes) bytes\n"
        let ds = e.deviceStatus
        out +=
          "\t\tDevSta:\t\(flag("CorrErr", ds.correctableError)) \(flag("NonFatalErr", ds.nonFatalError)) \(flag("FatalErr", ds.fatalError)) \(flag("UnsupReq", ds.unsupportedRequest)) \(flag("AuxPwr", ds.auxPower)) \(flag("TransPend", ds.transactionsPending))\n"
        let lc = e.linkCapabilities
        out +=
          "\t\tLnkCap:\tPort #\(lc.port), Speed \(lc.maxSpeed), Width x\(lc.maxWidth), ASPM \(lc.aspm)\n"
        let ll = e.linkControl
        out +=
          "\t\tLnkCtl:\tASPM \(ll.aspm); RCB \(ll.readCompletionBoundaryBytes) bytes, \(flag("Disabled", ll.disabled)) \(flag("CommClk", ll.commonClock))\n"
        out += "\t\tLnkSta:\tSpeed \(e.linkStatus.speed), Width x\(e.linkStatus.width)\n"
      } else if let m = cap.msix {
        out +=
          "MSI-X: \(flag("Enable", m.enabled)) Count=\(m.tableSize) \(flag("Masked", m.functionMasked))\n"
        out += "\t\tVector table: BAR=\(m.table.bar) offset=\(hex(m.table.offset, 8))\n"
        out += "\t\tPBA: BAR=\(m.pba.bar) offset=\(hex(m.pba.offset, 8))\n"
      } else if let m = cap.msi {
        out +=
          "MSI: \(flag("Enable", m.enabled)) Count=\(m.vectorsEnabled)/\(m.vectorsCapable) \(flag("Maskable", m.perVectorMasking)) \(flag("64bit", m.is64Bit))\n"
      } else if let p = cap.powerManagement {
        out += "Power Management version \(p.version)\n"
      } else {
        out += "\(cap.name)\n"
      }
    }
    for cap in r.extendedCapabilities {
      out += "\tCapabilities: [\(hex(cap.offset, 3)) v\(cap.version)] \(cap.name)\n"
    }

    out += "vfio-user:\n"
    let flags = [r.deviceFlags.pci ? "PCI" : nil, r.deviceFlags.reset ? "RESET" : nil].compactMap {
      $0
    }
    out += "\tDevice flags: \(flags.isEmpty ? "none" : flags.joined(separator: " | "))\n"
    for region in r.regions where region.size > 0 {
      let f = region.flags
      let access = [f.read ? "read" : nil, f.write ? "write" : nil, f.mmap ? "mmap" : nil]
        .compactMap { $0 }
      var line =
        "\tRegion \(padded(region.name, 7)) \(formatBytes(region.size)), \(access.joined(separator: "/"))"
      if f.msixMappable { line += ", MSI-X mappable" }
      if !region.mmapAreas.isEmpty {
        line +=
          ", mmap areas "
          + region.mmapAreas.map { "[\(hex($0.offset, 1))+\(formatBytes($0.size))]" }.joined(
            separator: " ")
      }
      out += line + "\n"
    }
    for irq in r.irqs {
      let f = irq.flags
      let traits = [
        f.eventfd ? "eventfd" : nil, f.maskable ? "maskable" : nil,
        f.automasked ? "automasked" : nil,
        f.noresize ? "noresize" : nil,
      ].compactMap { $0 }
      out +=
        "\tIRQ \(padded(irq.name, 5)) \(irq.count) vector\(irq.count == 1 ? "" : "s")\(traits.isEmpty ? "" : " (\(traits.joined(separator: ", ")))")\n"
    }
    let m = r.migration
    if let flags = m.flags, m.supported {
      let names = [
        flags.stopCopy ? "STOP_COPY" : nil, flags.p2p ? "P2P" : nil,
        flags.preCopy ? "PRE_COPY" : nil,
      ]
      .compactMap { $0 }
      out +=
        "\tMigration: \(names.joined(separator: " | ")) (flags 0x\(hex(flags.raw, 1))), state \(m.state ?? "?")\n"
    } else {
      out += "\tMigration: not supported (\(m.error ?? "no MIGRATION feature"))\n"
    }
    out +=
      r.dmaLogging.supported
      ? "\tDMA logging: START | STOP | REPORT (how the device knows its pages: the server's log)\n"
      : "\tDMA logging: not supported (\(r.dmaLogging.error ?? "?"))\n"
    if let k = r.kernelDevice {
      out +=
        "\tKernel device: \(k.opened ?? k.address) (server pid \(k.pid)), migration path \(k.migrationDetail)\n"
    }
    let s = r.server
    out +=
      "\tServer limits: max_data_xfer_size \(formatBytes(UInt64(s.maxDataXferSize))), max_dma_maps \(s.maxDMAMaps), max_msg_fds \(s.maxMsgFDs), pgsizes 0x\(hex(s.pgsizes, 1)), write_multiple \(s.writeMultiple ? "yes" : "no")\n"
    return out
  }

  /// Sizes the way lspci prints them: 16M, 256M, 4K, 8G.
  static func lspciSize(_ bytes: UInt64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")]
    where bytes >= 1 << shift && bytes % (1 << shift) == 0 {
      return "\(bytes >> shift)\(unit)"
    }
    return "\(bytes)"
  }
}

/// `text` padded with spaces to `width` characters (Foundation's `padding` would link it whole).
func padded(_ text: String, _ width: Int) -> String {
  text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
}
