/// A PCI function address, `DDDD:BB:DD.F` (domain, bus, device, function).
public struct PCIAddress: Sendable, Hashable, Comparable, CustomStringConvertible {
  public var domain: UInt32
  public var bus: UInt8
  public var device: UInt8
  public var function: UInt8

  public init(domain: UInt32 = 0, bus: UInt8, device: UInt8, function: UInt8) {
    self.domain = domain
    self.bus = bus
    self.device = device
    self.function = function
  }

  /// Parses `0000:03:00.1` or `03:00.1` (domain 0), in hex, as lspci prints them.
  public init?(_ text: String) {
    var parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
    guard parts.count == 2 || parts.count == 3 else { return nil }
    if parts.count == 2 { parts.insert("0000", at: 0) }
    let slot = parts[2].split(separator: ".", omittingEmptySubsequences: false)
    guard slot.count == 2, (1...8).contains(parts[0].count), (1...2).contains(parts[1].count),
      (1...2).contains(slot[0].count), slot[1].count == 1,
      let domain = UInt32(parts[0], radix: 16), let bus = UInt8(parts[1], radix: 16),
      let device = UInt8(slot[0], radix: 16), let function = UInt8(slot[1], radix: 16),
      device < 32, function < 8
    else { return nil }
    self.init(domain: domain, bus: bus, device: device, function: function)
  }

  public var description: String {
    func hex<T: BinaryInteger>(_ value: T, _ width: Int) -> String {
      let text = String(value, radix: 16)
      return String(repeating: "0", count: max(0, width - text.count)) + text
    }
    return "\(hex(domain, 4)):\(hex(bus, 2)):\(hex(device, 2)).\(hex(function, 1))"
  }

  public static func < (a: Self, b: Self) -> Bool {
    (a.domain, a.bus, a.device, a.function) < (b.domain, b.bus, b.device, b.function)
  }
}

/// Where the kernel's files are: `/sys`, `/dev` and `/proc` on a real system,
/// directories of a fake tree in the tests.
public struct SystemPaths: Sendable, Equatable {
  public var sys: String
  public var dev: String
  public var proc: String

  public init(sys: String = "/sys", dev: String = "/dev", proc: String = "/proc") {
    self.sys = sys
    self.dev = dev
    self.proc = proc
  }

  public static let live = SystemPaths()

  func pciDevice(_ address: PCIAddress) -> String { "\(sys)/bus/pci/devices/\(address)" }

  /// A user-given absolute path under /sys or /dev, inside this tree.
  func translate(_ path: String) -> String {
    if path == "/sys" || path.hasPrefix("/sys/") { return sys + path.dropFirst(4) }
    if path == "/dev" || path.hasPrefix("/dev/") { return dev + path.dropFirst(4) }
    return path
  }
}
