import SystemPackage
import VFIOUser

/// What the server needs to know about one interrupt index.
public struct IRQDescription: Sendable, Equatable {
  public var index: UInt32
  public var count: UInt32
  public var flags: VFIOIRQInfoFlags
  public init(index: UInt32, count: UInt32, flags: VFIOIRQInfoFlags) {
    self.index = index
    self.count = count
    self.flags = flags
  }
  public var maskable: Bool { flags.contains(.maskable) }
  public var automasked: Bool { flags.contains(.automasked) }
}

/// One DEVICE_SET_IRQS, decoded (`IRQSetPayload`) and checked against the
/// index it names, with the eventfds that came with it. It owns them: a
/// backend takes those it keeps (`eventFDs.take(_:)`), and the rest are
/// closed with the request.
///
/// The checks are VFIO's own (`vfio_set_irqs_validate_and_prepare`): the
/// index exists and has vectors, start + count stays within them,
/// descriptors come only with DATA_EVENTFD (one per vector, or none), and a
/// count of 0 only with TRIGGER and DATA_NONE, which disables the index. The
/// rules of a PCI function (which actions an index takes) are the device's:
/// vfio-pci's in the kernel, `IRQEmulation`'s in software.
public struct IRQSetRequest: ~Copyable {
  public enum Action: Sendable, Equatable { case trigger, mask, unmask }
  public enum DataType: Sendable, Equatable { case none, bool, eventFD }

  public let index: UInt32
  public let start: UInt32
  /// Vectors from `start`; 0 disables the whole index (`disablesIndex`).
  public let count: UInt32
  public let action: Action
  public let dataType: DataType
  /// DATA_BOOL: one byte per vector of the range, non-zero where it applies.
  public let bools: [UInt8]
  /// DATA_EVENTFD: one eventfd per vector of the range, or none, which
  /// de-assigns the range (VFIO_DEVICE_SET_IRQS writes -1 for each vector).
  public var eventFDs: OwnedFileDescriptors

  /// Checks `payload` against `irq`, the description of the index it names
  /// (nil when the device has no such index). Takes `descriptors` on every
  /// path: a refused request closes them. Throws EINVAL, or EBADF for a
  /// descriptor that is not an eventfd.
  public init(
    _ payload: IRQSetPayload, descriptors: consuming OwnedFileDescriptors, irq: IRQDescription?
  ) throws(Errno) {
    guard let irq, irq.count > 0 else { throw .invalidArgument }
    let action: Action
    switch payload.flags.action {
    case .actionTrigger: action = .trigger
    case .actionMask: action = .mask
    case .actionUnmask: action = .unmask
    default: throw .invalidArgument
    }
    let dataType: DataType
    switch payload.flags.dataType {
    case .dataNone: dataType = .none
    case .dataBool: dataType = .bool
    case .dataEventfd: dataType = .eventFD
    default: throw .invalidArgument
    }
    if dataType != .eventFD, !descriptors.isEmpty { throw .invalidArgument }
    if payload.count == 0 {
      // Disables the index (for any action the kernel would take, TRIGGER is the one).
      guard dataType == .none, action == .trigger, payload.start == 0 else {
        throw .invalidArgument
      }
    } else {
      guard UInt64(payload.start) + UInt64(payload.count) <= UInt64(irq.count) else {
        throw .invalidArgument
      }
      if dataType == .eventFD {
        guard descriptors.isEmpty || descriptors.count == Int(payload.count) else {
          throw .invalidArgument
        }
        // Only an eventfd can be signalled: a pipe or socket here is refused before use.
        for i in 0..<descriptors.count {
          guard let fd = descriptors[i], try DescriptorKind(of: fd) == .eventFD else {
            throw .badFileDescriptor
          }
        }
      }
    }
    index = payload.index
    start = payload.start
    count = payload.count
    self.action = action
    self.dataType = dataType
    bools = payload.bools
    eventFDs = descriptors
  }

  /// A request that disables `index`: TRIGGER, DATA_NONE, count 0.
  public static func disable(_ index: UInt32) -> IRQSetRequest {
    IRQSetRequest(disabling: index)
  }

  private init(disabling index: UInt32) {
    self.index = index
    start = 0
    count = 0
    action = .trigger
    dataType = .none
    bools = []
    eventFDs = OwnedFileDescriptors()
  }

  /// True for count 0: every vector of the index loses its eventfd, its mask and its pending bit.
  public var disablesIndex: Bool { count == 0 }

  /// The vectors it names.
  public var vectors: Range<Int> { Int(start)..<Int(start + count) }

  /// The VFIO_IRQ_SET_* flags, as `struct vfio_irq_set` carries them.
  public var flags: VFIOIRQSetFlags {
    let data: VFIOIRQSetFlags =
      switch dataType {
      case .none: .dataNone
      case .bool: .dataBool
      case .eventFD: .dataEventfd
      }
    let act: VFIOIRQSetFlags =
      switch action {
      case .trigger: .actionTrigger
      case .mask: .actionMask
      case .unmask: .actionUnmask
      }
    return [data, act]
  }

  /// Whether vector `k` of the range (0-based from `start`) is selected:
  /// always for DATA_NONE and DATA_EVENTFD, by its byte for DATA_BOOL.
  public func selects(_ k: Int) -> Bool { dataType != .bool || bools[k] != 0 }
}

/// The interrupt state of one index as `IRQEmulation` holds it (inspection).
public struct IRQConfiguration: Sendable, Equatable {
  public var index: UInt32
  /// The trigger eventfd of each vector, nil where none is set (lent).
  public var triggerFDs: [FileDescriptor?]
  /// INTx only: the eventfd that unmasks when signalled (irqfd resample), or nil.
  public var unmaskFD: FileDescriptor?
  public var masked: [Bool]
  public var pending: [Bool]
}
