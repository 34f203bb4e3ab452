import SystemPackage

/// The VF's 4 KiB PCIe config space: the bytes, a per-byte mask of the bits
/// software may change, and the reset image.
///
/// A write keeps the read-only bits and takes the writable ones, which gives
/// BAR sizing for free: the BAR's low address bits and type bits are read-only,
/// so writing all ones reads back the size mask with the type bits.
struct ConfigSpace {
  /// What a write asks the device to do besides storing bits.
  struct Effects: OptionSet {
    let rawValue: Int
    /// Device Control "Initiate Function Level Reset" was written as 1.
    static let flr = Effects(rawValue: 1)
    /// MSI-X enable or function mask may have changed.
    static let msixControl = Effects(rawValue: 2)
  }

  private(set) var bytes: [UInt8]
  private let writable: [UInt8]
  private let initial: [UInt8]

  init(profile: XeProfile, bar2Size: UInt64) {
    var image = Image()
    image.put(profile.vendorID, at: 0x00)
    image.put(profile.deviceID, at: 0x02)
    // IO space stays 0: the VF has no IO BAR.
    image.put(
      UInt16(0), at: 0x04,
      writable: XePCIConfig.commandMemory | XePCIConfig.commandBusMaster
        | XePCIConfig.commandINTxDisable)
    image.put(XePCIConfig.statusCapList, at: 0x06)
    image.put(profile.revisionID, at: 0x08)
    image.put(UInt8(profile.classCode & 0xFF), at: 0x09)
    image.put(UInt16(profile.classCode >> 8), at: 0x0A)
    image.put(UInt8(0), at: 0x0C, writable: 0xFF)  // cache line size: storage only
    image.put(UInt8(0), at: 0x0E)  // header type 0, single function
    image.bar64(at: 0x10, size: XeSimRegisters.bar0Size, prefetchable: false)
    if bar2Size > 0 { image.bar64(at: 0x18, size: bar2Size, prefetchable: true) }
    image.put(profile.subsystemVendorID, at: 0x2C)
    image.put(profile.subsystemID, at: 0x2E)
    image.put(UInt8(XePCIConfig.pcieCap), at: 0x34)
    image.put(UInt8(0), at: 0x3C, writable: 0xFF)  // interrupt line
    image.put(UInt8(0), at: 0x3D)  // interrupt pin: VFs have no INTx

    // PCI Express capability, version 2, endpoint (0x3C bytes).
    let pcie = XePCIConfig.pcieCap
    image.put(XePCIConfig.capPCIe, at: pcie)
    image.put(UInt8(XePCIConfig.msixCap), at: pcie + 1)
    image.put(UInt16(0x0002), at: pcie + 2)
    // Device Capabilities: role-based error reporting, FLR; 128-byte max payload.
    image.put(XePCIConfig.devCapFLR | 1 << 15, at: pcie + 4)
    // Device Control: error reporting, relaxed ordering, max payload, extended
    // tag, no snoop and max read request are storage; bit 15 is handled by write().
    image.put(UInt16(0x2810), at: pcie + XePCIConfig.devCtl, writable: 0x79FF)

    // MSI-X capability: table and PBA in BAR0.
    let msix = XePCIConfig.msixCap
    image.put(XePCIConfig.capMSIX, at: msix)
    image.put(UInt8(0), at: msix + 1)
    image.put(
      UInt16(XeSimRegisters.msixVectors - 1), at: msix + 2,
      writable: XePCIConfig.msixEnable | XePCIConfig.msixFunctionMask)
    image.put(UInt32(XeSimRegisters.msixTable), at: msix + 4)  // BIR 0
    image.put(UInt32(XeSimRegisters.msixPBA), at: msix + 8)  // BIR 0

    bytes = image.bytes
    writable = image.writable
    initial = image.bytes
  }

  /// Accepts 1, 2 or 4 naturally aligned bytes; reads may also be whole
  /// dwords in bulk, as QEMU's vfio-pci reads the entire space at realize.
  static func validate(offset: UInt64, count: Int, isWrite: Bool) throws(Errno) {
    let fits =
      offset <= UInt64(XePCIConfig.size) && UInt64(count) <= UInt64(XePCIConfig.size) - offset
    let single = (count == 1 || count == 2 || count == 4) && offset % UInt64(count) == 0
    let bulk = !isWrite && count > 4 && count % 4 == 0 && offset % 4 == 0
    guard fits, single || bulk else { throw .invalidArgument }
  }

  func read(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
    bytes.withUnsafeBytes {
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count]))
    }
  }

  mutating func write(offset: Int, from data: UnsafeRawBufferPointer) -> Effects {
    var effects: Effects = []
    for (i, value) in data.enumerated() {
      let at = offset + i
      bytes[at] = bytes[at] & ~writable[at] | value & writable[at]
      if at == XePCIConfig.msixCap + 3 { effects.insert(.msixControl) }
      if at == XePCIConfig.pcieCap + XePCIConfig.devCtl + 1, value & 0x80 != 0 {
        effects.insert(.flr)
      }
    }
    return effects
  }

  mutating func reset() { bytes = initial }

  /// Takes the bytes a live update carried over and returns nil; or, when
  /// they cannot be this function's, leaves the space alone and returns the
  /// first offset whose read-only bits differ from its image (only writes
  /// change bytes, and writes change only writable bits).
  mutating func load(handover saved: UnsafeRawBufferPointer) -> Int? {
    guard saved.count == bytes.count else { return min(saved.count, bytes.count) }
    for i in 0..<saved.count where (saved[i] ^ initial[i]) & ~writable[i] != 0 { return i }
    bytes = Array(saved)
    return nil
  }

  func u16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }

  var command: UInt16 { u16(0x04) }
  var busMasterEnabled: Bool { command & XePCIConfig.commandBusMaster != 0 }
  var msixControl: UInt16 { u16(XePCIConfig.msixCap + 2) }
  /// MSI-X is enabled and the function is not masked.
  var msixOpen: Bool {
    msixControl & XePCIConfig.msixEnable != 0 && msixControl & XePCIConfig.msixFunctionMask == 0
  }
}

/// Builds the reset image and write masks, little-endian.
private struct Image {
  var bytes = [UInt8](repeating: 0, count: XePCIConfig.size)
  var writable = [UInt8](repeating: 0, count: XePCIConfig.size)

  mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int, writable mask: T = 0) {
    for i in 0..<MemoryLayout<T>.size {
      bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i))
      writable[offset + i] = UInt8(truncatingIfNeeded: mask >> (8 * i))
    }
  }

  /// A 64-bit memory BAR of `size` bytes (a power of two) over two dwords.
  mutating func bar64(at offset: Int, size: UInt64, prefetchable: Bool) {
    let addressMask = ~(size - 1)
    let type: UInt32 = 0b100 | (prefetchable ? 0b1000 : 0)
    put(type, at: offset, writable: UInt32(truncatingIfNeeded: addressMask) & 0xFFFF_FFF0)
    put(UInt32(0), at: offset + 4, writable: UInt32(truncatingIfNeeded: addressMask >> 32))
  }
}
