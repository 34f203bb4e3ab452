import SystemPackage

// Interrupt payloads (offsets from the end of the header).

/// DEVICE_GET_IRQ_INFO request and reply.
public struct IRQInfoPayload: WirePayload {
  public static let size = 16
  public var argsz: UInt32
  public var flags: VFIOIRQInfoFlags
  public var index: UInt32
  public var count: UInt32

  public init(argsz: UInt32 = 16, flags: VFIOIRQInfoFlags = [], index: UInt32, count: UInt32 = 0) {
    self.argsz = argsz
    self.flags = flags
    self.index = index
    self.count = count
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count == Self.size else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = VFIOIRQInfoFlags(rawValue: try r.u32(at: 4))
    index = try r.u32(at: 8)
    count = try r.u32(at: 12)
  }

  public var encodedSize: Int { Self.size }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags.rawValue, at: 4)
    bytes.put(index, at: 8)
    bytes.put(count, at: 12)
  }
}

/// DEVICE_SET_IRQS request (the reply has no payload). Eventfds travel as SCM_RIGHTS.
public struct IRQSetPayload: WirePayload {
  public static let fixedSize = 20
  public var argsz: UInt32
  public var flags: VFIOIRQSetFlags
  public var index: UInt32
  public var start: UInt32
  public var count: UInt32
  /// The DATA_BOOL array, one byte per vector; empty for the other data types.
  public var bools: [UInt8]

  public init(
    argsz: UInt32? = nil, flags: VFIOIRQSetFlags, index: UInt32, start: UInt32, count: UInt32,
    bools: [UInt8] = []
  ) {
    self.argsz = argsz ?? UInt32(Self.fixedSize + bools.count)
    self.flags = flags
    self.index = index
    self.start = start
    self.count = count
    self.bools = bools
  }

  public init(decoding bytes: UnsafeRawBufferPointer) throws(Errno) {
    let r = ByteReader(bytes)
    guard bytes.count >= Self.fixedSize else { throw .invalidArgument }
    argsz = try r.u32(at: 0)
    flags = VFIOIRQSetFlags(rawValue: try r.u32(at: 4))
    index = try r.u32(at: 8)
    start = try r.u32(at: 12)
    count = try r.u32(at: 16)
    guard argsz >= UInt32(Self.fixedSize) else { throw .invalidArgument }
    // Exactly one data type and one action, nothing else.
    guard flags.isSubset(of: [.dataTypeMask, .actionTypeMask]),
      flags.dataType.rawValue.nonzeroBitCount == 1, flags.action.rawValue.nonzeroBitCount == 1
    else { throw .invalidArgument }
    guard start.addingReportingOverflow(count).overflow == false else { throw .invalidArgument }
    let extra = bytes.count - Self.fixedSize
    if flags.dataType == .dataBool {
      guard extra == Int(count) else { throw .invalidArgument }
      bools = Array(try r.rest(from: Self.fixedSize))
    } else {
      guard extra == 0 else { throw .invalidArgument }
      bools = []
    }
  }

  public var encodedSize: Int { Self.fixedSize + bools.count }
  public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    bytes.put(argsz, at: 0)
    bytes.put(flags.rawValue, at: 4)
    bytes.put(index, at: 8)
    bytes.put(start, at: 12)
    bytes.put(count, at: 16)
    for (i, b) in bools.enumerated() { bytes[Self.fixedSize + i] = b }
  }
}
