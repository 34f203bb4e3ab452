import DeviceReport
import Testing
import XeVF

/// Config spaces a server might send that no sane device has: each decodes to
/// what its bytes say, and every walk ends.
@Suite("decodePCI on broken config spaces")
struct BrokenConfigTests {
  static func vfBytes() throws -> [UInt8] {
    try SimulatedConfig(profile: .bmg, vramSize: 256 << 20).bytes
  }

  /// `info` takes as little as 64 bytes: the header decodes, and the capability
  /// list, whose pointer is past the end, is empty rather than a phantom
  /// capability of ID 0 read from bytes that are not there.
  @Test func truncatedTo64Bytes() throws {
    let pci = DecodedPCI(Array(try Self.vfBytes().prefix(64)), regionSizes: [16 << 20])
    #expect(pci.vendorID == 0x8086 && pci.deviceID == 0xE211 && pci.classCode == 0x0380)
    #expect(pci.status.capabilitiesList)
    #expect(pci.bars.map(\.index) == [0, 2])
    #expect(pci.capabilities.isEmpty)
    #expect(pci.extended.isEmpty)
  }

  /// Cut between the two capabilities: the first is whole, the second's header is gone.
  @Test func truncatedInsideTheList() throws {
    let pci = DecodedPCI(Array(try Self.vfBytes().prefix(0x80)))
    #expect(pci.capabilities.map(\.id) == [0x10])
    #expect(pci.capabilities.first?.express?.deviceCapabilities.functionLevelReset == true)
  }

  @Test func noBytesAtAll() {
    let pci = DecodedPCI([])
    #expect(pci.vendorID == 0 && pci.command.raw == 0 && pci.status.raw == 0)
    #expect(pci.bars.isEmpty && pci.capabilities.isEmpty && pci.extended.isEmpty)
  }

  @Test(arguments: [
    (0x81, 0x80, [0x40, 0x80]),  // MSI-X points at itself
    (0x81, 0x40, [0x40, 0x80]),  // MSI-X points back at Express
    (0x41, 0x40, [0x40]),  // Express points at itself
  ])
  func loopingCapabilityListEnds(at pointer: Int, to target: Int, offsets: [Int]) throws {
    var bytes = try Self.vfBytes()
    bytes[pointer] = UInt8(target)
    #expect(DecodedPCI(bytes).capabilities.map(\.offset) == offsets)
  }

  /// The longest list there can be: every dword from 0x40 to 0xFC, then back to 0x40.
  @Test func longestLoopEnds() {
    var image = ConfigImage.header(capabilitiesAt: 0x40)
    for offset in stride(from: 0x40, through: 0xFC, by: 4) {
      image.capability(0x09, at: offset, next: offset == 0xFC ? 0x40 : offset + 4)
    }
    #expect(DecodedPCI(image.bytes).capabilities.count == 48)
  }

  @Test(arguments: [
    (0x00, [Int]()),  // none
    (0x20, []),  // into the header
    (0x3C, []),  // still the header
    (0x43, [0x40, 0x80]),  // reserved low bits ignored
  ])
  func capabilityPointerOutOfRange(pointer: Int, offsets: [Int]) throws {
    var bytes = try Self.vfBytes()
    bytes[0x34] = UInt8(pointer)
    #expect(DecodedPCI(bytes).capabilities.map(\.offset) == offsets)
  }

  @Test func nextPointerIntoTheHeaderEndsTheList() throws {
    var bytes = try Self.vfBytes()
    bytes[0x41] = 0x3C
    #expect(DecodedPCI(bytes).capabilities.map(\.offset) == [0x40])
  }

  /// ID 0xFF ends the list, as in Linux's walk and lspci ("chain broken").
  @Test func capabilityIDFFEndsTheList() {
    var image = ConfigImage.header(capabilitiesAt: 0x40)
    image.capability(0x05, at: 0x40, next: 0x50)
    image.capability(0xFF, at: 0x50, next: 0x60)
    image.capability(0x11, at: 0x60, next: 0)
    #expect(DecodedPCI(image.bytes).capabilities.map(\.id) == [0x05])
  }

  @Test func loopingExtendedListEnds() {
    var image = ConfigImage.header()
    image.extended(0x0001, at: 0x100, next: 0x100)
    #expect(DecodedPCI(image.bytes).extended.map(\.offset) == [0x100])
    image.extended(0x0001, at: 0x100, next: 0x200)
    image.extended(0x000E, at: 0x200, next: 0x100)
    #expect(DecodedPCI(image.bytes).extended.map(\.offset) == [0x100, 0x200])
  }

  @Test func extendedNextOutOfRangeEnds() {
    var image = ConfigImage.header()
    image.extended(0x0001, at: 0x100, next: 0x0F0)  // below 0x100
    #expect(DecodedPCI(image.bytes).extended.map(\.offset) == [0x100])
    image.extended(0x0001, at: 0x100, next: 0x200)  // past a 0x180-byte space
    #expect(DecodedPCI(Array(image.bytes.prefix(0x180))).extended.map(\.offset) == [0x100])
    // A 256-byte (conventional PCI) space has no extended capabilities at all.
    #expect(DecodedPCI(Array(image.bytes.prefix(0x100))).extended.isEmpty)
  }

  /// What a read from no device returns: all ones. Vendor 0xFFFF; the capability
  /// list (0xFC, ID 0xFF) and the extended list (header all ones) are empty.
  @Test(arguments: [256, 4096])
  func allOnesIsNoDevice(size: Int) {
    let pci = DecodedPCI(ConfigImage(size: size, filledWith: 0xFF).bytes)
    #expect(pci.vendorID == 0xFFFF && pci.deviceID == 0xFFFF)
    #expect(pci.command.raw == 0xFFFF && pci.status.capabilitiesList)
    #expect(pci.capabilities.isEmpty)
    #expect(pci.extended.isEmpty)
    #expect(pci.bars.count == 6)  // each dword reads as an I/O BAR
  }
}
