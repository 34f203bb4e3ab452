import DeviceReport
import VFIOUser
import XeVF

/// The simulated VF as `info` sees it: its whole config space read through the
/// region interface, and every region's size, BARs first.
struct SimulatedConfig {
  let vf: SimulatedXeVF
  var bytes: [UInt8]
  var regionSizes: [UInt64]

  init(profile: XeProfile, vramSize: UInt64? = nil) throws {
    let vf = try SimulatedXeVF(profile: profile, vramSize: vramSize)
    self.vf = vf
    bytes = []
    regionSizes = (0..<vf.regionCount).map { vf.region($0)?.size ?? 0 }
    try reread()
  }

  /// Reads the config space again, after writes.
  mutating func reread() throws {
    let size = Int(regionSizes[Int(VFIOPCIRegion.config)])
    var image = [UInt8](repeating: 0, count: size)
    try image.withUnsafeMutableBytes { buffer throws in
      try vf.read(region: VFIOPCIRegion.config, offset: 0, into: buffer)
    }
    bytes = image
  }

  func write<T: FixedWidthInteger>(_ value: T, at offset: Int) throws {
    try withUnsafeBytes(of: value.littleEndian) { buffer throws in
      try vf.write(region: VFIOPCIRegion.config, offset: UInt64(offset), from: buffer)
    }
  }

  func decode() -> DecodedPCI { DecodedPCI(bytes, regionSizes: regionSizes) }
}

/// `DeviceReport.decodePCI`'s answer, with the header fields `info` reads itself.
struct DecodedPCI {
  let config: ConfigBytes
  let command: DeviceReport.CommandRegister
  let status: DeviceReport.StatusRegister
  let bars: [DeviceReport.BAR]
  let capabilities: [DeviceReport.Capability]
  let extended: [DeviceReport.ExtendedCapability]

  init(_ bytes: [UInt8], regionSizes: [UInt64] = []) {
    config = ConfigBytes(bytes: bytes)
    let pci = DeviceReport.decodePCI(config, regionSizes: regionSizes)
    command = pci.header.command
    status = pci.header.status
    bars = pci.bars
    capabilities = pci.capabilities
    extended = pci.extended
  }

  var vendorID: Int { config.u16(0x00) }
  var deviceID: Int { config.u16(0x02) }
  /// Base class and subclass, as lspci prints it ([0380]).
  var classCode: Int { config.u32(0x08) >> 16 }
  var className: String { PCINames.class(config.u32(0x08) >> 8) }
}

/// A config space built byte by byte, little-endian, zeros elsewhere.
struct ConfigImage {
  var bytes: [UInt8]

  init(size: Int = 4096, filledWith fill: UInt8 = 0) {
    bytes = [UInt8](repeating: fill, count: size)
  }

  mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    for i in 0..<MemoryLayout<T>.size {
      bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i))
    }
  }

  /// A standard capability at `offset`: ID, next pointer, and the word after them
  /// (MSI's message control, Express's flags, PM's capabilities).
  mutating func capability(_ id: UInt8, at offset: Int, next: Int, control: UInt16 = 0) {
    put(id, at: offset)
    put(UInt8(next), at: offset + 1)
    put(control, at: offset + 2)
  }

  /// An extended capability header: ID, version, next offset.
  mutating func extended(_ id: UInt16, version: UInt32 = 1, at offset: Int, next: Int) {
    put(UInt32(id) | version << 16 | UInt32(next) << 20, at: offset)
  }

  /// A type 0 header with a capability list starting at `first` (0: none).
  static func header(capabilitiesAt first: Int = 0, size: Int = 4096) -> ConfigImage {
    var image = ConfigImage(size: size)
    image.put(UInt16(0x8086), at: 0x00)
    image.put(UInt16(0x1234), at: 0x02)
    image.put(UInt32(0x0200_0001), at: 0x08)  // Ethernet, revision 1
    if first != 0 {
      image.put(UInt16(1 << 4), at: 0x06)
      image.put(UInt8(first), at: 0x34)
    }
    return image
  }
}
