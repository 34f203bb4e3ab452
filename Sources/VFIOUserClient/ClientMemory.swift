/// Client memory the server may reach with DMA_READ / DMA_WRITE messages
/// (windows mapped without an fd). The client owns the bytes.
public struct ClientMemory {
  public struct Window {
    public var address: UInt64
    public var buffer: UnsafeMutableRawBufferPointer
    public var writable: Bool
  }

  public private(set) var windows: [Window] = []
  public init() {}

  public mutating func add(
    address: UInt64, buffer: UnsafeMutableRawBufferPointer, writable: Bool = true
  ) {
    windows.append(Window(address: address, buffer: buffer, writable: writable))
  }

  public mutating func remove(address: UInt64) {
    windows.removeAll { $0.address == address }
  }

  /// The bytes at [address, address+count) if one window holds them all.
  func span(_ address: UInt64, _ count: Int) -> (UnsafeMutableRawBufferPointer, writable: Bool)? {
    for w in windows
    where address >= w.address && address - w.address + UInt64(count) <= UInt64(w.buffer.count) {
      let start = Int(address - w.address)
      return (
        UnsafeMutableRawBufferPointer(rebasing: w.buffer[start..<(start + count)]), w.writable
      )
    }
    return nil
  }
}
