/// Little-endian reads from a config space image; bytes past its end read as 0.
public struct ConfigBytes: Sendable {
  let bytes: [UInt8]

  public init(bytes: [UInt8]) { self.bytes = bytes }

  public func u8(_ offset: Int) -> Int {
    offset >= 0 && offset < bytes.count ? Int(bytes[offset]) : 0
  }
  public func u16(_ offset: Int) -> Int { u8(offset) | u8(offset + 1) << 8 }
  public func u32(_ offset: Int) -> Int { u16(offset) | u16(offset + 2) << 16 }
  func bit(_ value: Int, _ n: Int) -> Bool { value >> n & 1 != 0 }
}

extension DeviceReport {
  /// The PCI header, BARs and capabilities of `config`; `regionSizes[i]` is the size
  /// of region i (BAR i for i < 6).
  ///
  /// Every walk ends: a capability list at an offset seen before, outside its
  /// range, or whose header is past the bytes read; the standard list also at
  /// ID 0xFF, a broken chain or no device (all ones), as Linux's walk and lspci
  /// end it. A capability whose header was read but whose body was cut short
  /// reads the rest as 0.
  public static func decodePCI(_ config: ConfigBytes, regionSizes: [UInt64]) -> (
    header: (command: CommandRegister, status: StatusRegister), bars: [BAR],
    capabilities: [Capability], extended: [ExtendedCapability]
  ) {
    let c = config
    let commandRaw = c.u16(0x04)
    let command = CommandRegister(
      raw: commandRaw, io: c.bit(commandRaw, 0), memory: c.bit(commandRaw, 1),
      busMaster: c.bit(commandRaw, 2), intxDisable: c.bit(commandRaw, 10))
    let statusRaw = c.u16(0x06)
    let status = StatusRegister(
      raw: statusRaw, capabilitiesList: c.bit(statusRaw, 4), interruptPending: c.bit(statusRaw, 3))

    var bars: [BAR] = []
    var index = 0
    while index < 6 {
      let low = c.u32(0x10 + 4 * index)
      let size = index < regionSizes.count ? regionSizes[index] : 0
      let isIO = low & 1 != 0
      let is64Bit = !isIO && (low >> 1) & 3 == 2
      defer { index += is64Bit ? 2 : 1 }
      guard low != 0 || size != 0 else { continue }  // not implemented
      var address = UInt64(low & (isIO ? ~3 : ~0xF) & 0xFFFF_FFFF)
      if is64Bit { address |= UInt64(c.u32(0x10 + 4 * (index + 1))) << 32 }
      bars.append(
        BAR(
          index: index, kind: isIO ? "io" : "memory", is64Bit: is64Bit,
          prefetchable: !isIO && c.bit(low, 3), address: address, size: size,
          enabled: isIO ? command.io : command.memory))
    }

    var capabilities: [Capability] = []
    if status.capabilitiesList {
      var offset = c.u8(0x34) & 0xFC
      var seen = Set<Int>()
      while offset >= 0x40, offset <= 0xFC, offset + 2 <= c.bytes.count, c.u8(offset) != 0xFF,
        seen.insert(offset).inserted
      {
        capabilities.append(capability(c, at: offset))
        offset = c.u8(offset + 1) & 0xFC
      }
    }

    // Extended capabilities from 0x100 (PCIe config space is 4 KiB): id, version, next.
    var extended: [ExtendedCapability] = []
    var offset = 0x100
    var seen = Set<Int>()
    while offset >= 0x100, offset + 4 <= c.bytes.count, seen.insert(offset).inserted {
      let header = c.u32(offset)
      if header == 0 || header == 0xFFFF_FFFF { break }
      let id = header & 0xFFFF
      extended.append(
        ExtendedCapability(
          offset: offset, id: id, version: header >> 16 & 0xF,
          name: PCINames.extendedCapability(id)))
      offset = header >> 20 & 0xFFC
    }
    return ((command, status), bars, capabilities, extended)
  }

  static func capability(_ c: ConfigBytes, at offset: Int) -> Capability {
    let id = c.u8(offset)
    var capability = Capability(
      offset: offset, id: id, name: PCINames.capability(id))
    switch id {
    case 0x01:
      capability.powerManagement = PowerManagement(version: c.u16(offset + 2) & 7)
    case 0x05:
      let control = c.u16(offset + 2)
      capability.msi = MSI(
        enabled: c.bit(control, 0), vectorsCapable: 1 << (control >> 1 & 7),
        vectorsEnabled: 1 << (control >> 4 & 7), is64Bit: c.bit(control, 7),
        perVectorMasking: c.bit(control, 8))
    case 0x10:
      capability.express = express(c, at: offset)
    case 0x11:
      let control = c.u16(offset + 2)
      let table = c.u32(offset + 4)
      let pba = c.u32(offset + 8)
      capability.msix = MSIX(
        enabled: c.bit(control, 15), functionMasked: c.bit(control, 14),
        tableSize: (control & 0x7FF) + 1, table: .init(bar: table & 7, offset: table & ~7),
        pba: .init(bar: pba & 7, offset: pba & ~7))
    default:
      break
    }
    return capability
  }

  static func express(_ c: ConfigBytes, at offset: Int) -> Express {
    let flags = c.u16(offset + 2)
    let type = flags >> 4 & 0xF
    let devCap = c.u32(offset + 4)
    let devCtl = c.u16(offset + 8)
    let devSta = c.u16(offset + 0x0A)
    let lnkCap = c.u32(offset + 0x0C)
    let lnkCtl = c.u16(offset + 0x10)
    let lnkSta = c.u16(offset + 0x12)
    return Express(
      version: flags & 0xF, deviceType: type, deviceTypeName: PCINames.expressType(type),
      interruptMessageNumber: flags >> 9 & 0x1F,
      deviceCapabilities: .init(
        raw: devCap, maxPayloadBytes: 128 << (devCap & 7), phantomFunctions: devCap >> 3 & 3,
        extendedTag: c.bit(devCap, 5), roleBasedErrorReporting: c.bit(devCap, 15),
        functionLevelReset: c.bit(devCap, 28)),
      deviceControl: .init(
        raw: devCtl, correctableErrorReporting: c.bit(devCtl, 0),
        nonFatalErrorReporting: c.bit(devCtl, 1), fatalErrorReporting: c.bit(devCtl, 2),
        unsupportedRequestReporting: c.bit(devCtl, 3), relaxedOrdering: c.bit(devCtl, 4),
        extendedTag: c.bit(devCtl, 8), phantomFunctions: c.bit(devCtl, 9),
        auxPower: c.bit(devCtl, 10), noSnoop: c.bit(devCtl, 11),
        maxPayloadBytes: 128 << (devCtl >> 5 & 7), maxReadRequestBytes: 128 << (devCtl >> 12 & 7)),
      deviceStatus: .init(
        raw: devSta, correctableError: c.bit(devSta, 0), nonFatalError: c.bit(devSta, 1),
        fatalError: c.bit(devSta, 2), unsupportedRequest: c.bit(devSta, 3),
        auxPower: c.bit(devSta, 4), transactionsPending: c.bit(devSta, 5)),
      linkCapabilities: .init(
        raw: lnkCap, port: lnkCap >> 24 & 0xFF, maxSpeed: PCINames.linkSpeed(lnkCap & 0xF),
        maxWidth: lnkCap >> 4 & 0x3F,
        aspm: ["not supported", "L0s", "L1", "L0s L1"][lnkCap >> 10 & 3]),
      linkControl: .init(
        raw: lnkCtl, aspm: ["Disabled", "L0s Enabled", "L1 Enabled", "L0s L1 Enabled"][lnkCtl & 3],
        readCompletionBoundaryBytes: c.bit(lnkCtl, 3) ? 128 : 64, disabled: c.bit(lnkCtl, 4),
        commonClock: c.bit(lnkCtl, 6)),
      linkStatus: .init(
        raw: lnkSta, speed: PCINames.linkSpeed(lnkSta & 0xF), width: lnkSta >> 4 & 0x3F))
  }
}
