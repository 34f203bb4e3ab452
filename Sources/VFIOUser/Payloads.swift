import SystemPackage

// Payload codecs, one per message layout of docs/interop/vfio-user.rst. Offsets
// are from the end of the 16-byte header.

/// VERSION request and reply: major, minor, optional NUL-terminated JSON.
public struct VersionPayload: WirePayload {
  public var major: UInt16
  public var minor: UInt16
  /// The capabilities JSON without its terminating NUL, or nil when absent.
  public var json: String?

  public init(major: UInt16, minor: UInt16, json: String?) {
    self.major = major
    self.minor = minor
    self.json = json
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count >= 4 else { throw .invalidArgument }
    major = try r.u16(at: 0)
    minor = try r.u16(at: 2)
    guard bytes.count > 4 else {
      json = nil
      return
    }
    let text = try r.rest(from: 4)
    // The JSON must end with its NUL and hold no other.
    guard text.last == 0, text.firstIndex(of: 0) == text.count - 1 else { throw .invalidArgument }
    guard let string = String(validating: text.dropLast(), as: UTF8.self) else {
      throw .invalidArgument
    }
    json = string
  }

  public var encodedSize: Int { 4 + (json.map { $0.utf8.count + 1 } ?? 0) }

  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(major, at: 0)
    bytes.put(minor, at: 2)
    if let json {
      var offset = 4
      for byte in json.utf8 {
        bytes[offset] = byte
        offset += 1
      }
      bytes[offset] = 0
    }
  }
}

/// DEVICE_GET_INFO request and reply.
public struct DeviceInfoPayload: WirePayload {
  public static let size = 16
  public var argsz: UInt32
  public var flags: VFIODeviceFlags
  public var numRegions: UInt32
  public var numIRQs: UInt32

  public init(
    argsz: UInt32 = 16, flags: VFIODeviceFlags = [], numRegions: UInt32 = 0, numIRQs: UInt32 = 0
  ) {
    self.argsz = argsz
    self.flags = flags
    self.numRegions = numRegions
    self.numIRQs = numIRQs
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = VFIODeviceFlags(rawValue: try r.u32(at: 4))
    numRegions = try r.u32(at: 8)
    numIRQs = try r.u32(at: 12)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags.rawValue, at: 4)
    bytes.put(numRegions, at: 8)
    bytes.put(numIRQs, at: 12)
  }
}
