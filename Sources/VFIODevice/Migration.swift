import SystemPackage
import VFIOUser

/// The save side of a device's migration data: the kernel's `data_fd` that
/// STOP → STOP_COPY opens (O_RDONLY). Used from the connection's thread.
public protocol MigrationSource: AnyObject {
  /// Reads the next bytes of the device's state into `buffer`; returns how
  /// many. A read may return fewer than asked (the server fills its buffer
  /// from several), and returns 0 only at the end of the stream, and after it
  /// (in PRE_COPY also when the device has nothing more for now, the kernel's
  /// ENOMSG: the reply is then short, as vfio-user's PRE_COPY expects).
  ///
  /// Bounded: a device that must wait for data (a kernel `data_fd` blocks in
  /// read(2) until the PF has produced some, and cannot be polled) waits at
  /// most its own timeout and then throws ETIMEDOUT; it never blocks without
  /// end. That bound is what keeps the connection able to notice a hang-up or
  /// a reset (see `MigrationSession.fill`). A kernel backend gets it by reading
  /// on a thread of its own and waiting for that thread with a timeout.
  ///
  /// Throws ENODEV once a reset invalidated the stream.
  func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int

  /// `read`, except that where the bytes that would complete `buffer` all lie
  /// in memory the device keeps mapped for the stream's life (a VF's VRAM),
  /// it returns them as `span` instead of copying them, consumed as if read:
  /// the server sends them straight from there. `count` bytes were copied
  /// into `buffer` before the span. A device whose state is not in memory (a
  /// kernel `data_fd`) keeps the default, which is `read`.
  func read(gathering buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> (
    count: Int, span: UnsafeRawBufferPointer?
  )

  /// Ends the stream (the kernel: close(data_fd)). Called once, by its owner,
  /// when the device has left STOP_COPY, was reset, or its client left; the
  /// stream is not used after it.
  func close()
}

extension MigrationSource {
  public func read(gathering buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> (
    count: Int, span: UnsafeRawBufferPointer?
  ) {
    (try read(into: buffer), nil)
  }
}

/// Where a restore stream takes its next bytes (`MigrationSink.placement`).
public enum MigrationPlacement {
  /// Straight into this memory, which the device keeps mapped (a VF's VRAM):
  /// the server receives up to its length of the stream there, then reports
  /// them with `MigrationSink.placed`.
  case memory(UnsafeMutableRawBufferPointer)
  /// Through `MigrationSink.write`: the next bytes, at most this many (at least 1).
  case write(Int)
}

/// The restore side: the `data_fd` that STOP → RESUMING opens (O_WRONLY).
public protocol MigrationSink: AnyObject {
  /// Hands the device a prefix of `bytes` and returns its length (at least 1
  /// unless it throws); the caller repeats with the rest. Bounded as
  /// `MigrationSource.read` is: a device whose ring is full waits at most its
  /// timeout. Errors found while restoring surface here or at RESUMING → STOP.
  /// Throws ENODEV once a reset invalidated the stream.
  func write(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int

  /// `write` of `count` zero bytes, for the zero runs of a decoded stream
  /// (`DecodingMigrationSink`); the default writes them out as bytes.
  func writeZeros(_ count: Int) throws(Errno) -> Int

  /// Where the next of `count` stream bytes go, so a server can receive them
  /// there instead of buffering and copying them (MIG_DATA_WRITE's data into
  /// VRAM). Offers memory only where `write` would copy the same bytes to the
  /// same place, with the stream in good standing. A device whose state is not
  /// in memory (a kernel `data_fd`) keeps the default: everything through `write`.
  func placement(ofNext count: Int) -> MigrationPlacement

  /// Takes `count` bytes the server received into the memory `placement`
  /// just returned, as `write` takes bytes: a packet they complete is handed
  /// over, and an error is the one `write` would have thrown for them.
  func placed(_ count: Int) throws(Errno)

  /// Ends the stream, as `MigrationSource.close`.
  func close()
}

extension MigrationSink {
  public func placement(ofNext count: Int) -> MigrationPlacement { .write(count) }

  /// Hands the device `count` zero bytes of the stream; returns how many it
  /// took (at least 1 unless it throws), as `write` does. The default writes
  /// them out (a kernel `data_fd` takes bytes); a device that can zero its
  /// memory without them (the simulated VF's memfd VRAM) does that instead.
  public func writeZeros(_ count: Int) throws(Errno) -> Int { try writeZerosAsBytes(count) }

  /// `writeZeros` as bytes: for a sink that zeroes some runs itself and writes the rest.
  public func writeZerosAsBytes(_ count: Int) throws(Errno) -> Int {
    try write(
      UnsafeRawBufferPointer(rebasing: ZeroMemory.chunk[0..<min(count, ZeroMemory.chunk.count)]))
  }

  /// A sink that never offers memory has nothing placed in it.
  public func placed(_ count: Int) throws(Errno) { throw .invalidArgument }
}

/// The data stream a migration arc opened.
public enum MigrationStream {
  /// STOP → STOP_COPY (and PRE_COPY on devices that have it): the device's state to read.
  case source(any MigrationSource)
  /// STOP → RESUMING: a state to write into the device.
  case sink(any MigrationSink)

  /// Ends the stream.
  public func close() {
    switch self {
    case .source(let source): source.close()
    case .sink(let sink): sink.close()
    }
  }

  /// Whether a device in `state` still serves this stream.
  public func isServed(in state: MigrationState) -> Bool {
    switch self {
    case .source: [.stopCopy, .preCopy, .preCopyP2P].contains(state)
    case .sink: state == .resuming
    }
  }
}

/// A device that migrates: the kernel's `vfio_migration_ops`, one arc at a time.
///
/// The device owns its migration state; there is no other copy. GET
/// MIG_DEVICE_STATE reads `migrationState`, and `MigrationSession` walks a SET
/// one direct arc at a time with `vfio_mig_get_next_state()`, calling
/// `migrationStep` for each. A kernel backend implements an arc as one
/// VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE with the arc's end (the kernel
/// takes a direct arc as it takes any other), and its data_fd as the stream.
/// `VFIODeviceBackend.reset()` returns the device to RUNNING and invalidates
/// any stream it opened.
public protocol MigrationCapable: AnyObject {
  /// STOP_COPY, plus P2P and PRE_COPY where the device has them.
  var migrationFlags: MigrationFlags { get }

  /// Where the device is: RUNNING after creation and after every reset; moved
  /// by `migrationStep`, and to ERROR by `migrationFailed`.
  var migrationState: MigrationState { get throws(Errno) }

  /// Performs the direct arc `from` → `to`, where `from` is `migrationState`.
  /// Returns the data stream that STOP → STOP_COPY (a source) and
  /// STOP → RESUMING (a sink) open, nil for every other arc. On failure the
  /// device is still in `from`.
  func migrationStep(from: MigrationState, to: MigrationState) throws(Errno) -> MigrationStream?

  /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the device's estimate of the stop-copy bytes.
  func stopCopySize() throws(Errno) -> UInt64

  /// The server gave up on this migration: a restored state did not validate
  /// (RESUMING → STOP failed), or `vfio_mig_get_next_state()` found no arc
  /// mid-walk. The device must stop (the PF's `xe_sriov_vfio_error`) and
  /// report ERROR from `migrationState` until a reset: it must never look
  /// healthy with half a state. (The kernel's xe-vfio-pci stays in RESUMING
  /// there; a kernel backend keeps that ERROR in its own state.)
  func migrationFailed()

  /// How a connection that negotiated the sparse migration stream
  /// (protocol/sparse-migration.md) carries this device's stream, or nil
  /// where the stream must pass as it is and the form is not offered. The
  /// device knows its stream's framing (an Xe VF's is the PF's packet
  /// stream, whose VRAM packets the form cuts into segments); the engine
  /// only applies the transform. Any other device's stream (mtty's, say) has none.
  var sparseStreamTransform: (any MigrationStreamTransform)? { get }
}

extension MigrationCapable {
  public var sparseStreamTransform: (any MigrationStreamTransform)? { nil }
}

/// Another form of a device's migration stream that a connection may carry
/// instead of its bytes: the engine reads the device's save stream through
/// `encoding` and writes its restore stream through `decoding`, knowing
/// nothing of the form. The device's streams see exactly their own bytes.
public protocol MigrationStreamTransform: Sendable {
  /// `source` read in the transformed form.
  func encoding(_ source: any MigrationSource) -> any EncodingMigrationSource
  /// A sink taking the transformed form, handing `sink` the device's bytes.
  func decoding(into sink: any MigrationSink) -> any DecodingMigrationSink
}

/// A save stream in a transformed form; `inner` is the device's own.
public protocol EncodingMigrationSource: MigrationSource {
  var inner: any MigrationSource { get }
}

/// A restore stream taking a transformed form; `inner` is the device's own.
public protocol DecodingMigrationSink: MigrationSink {
  var inner: any MigrationSink { get }
}

/// The kernel's migration state machine: `vfio_mig_get_next_state()` and the
/// flags each state needs (`drivers/vfio/vfio_main.c`), shared by the server,
/// which walks composite transitions one arc at a time, and by backends and
/// tests.
public enum MigrationTransitions {
  private static let order: [MigrationState] = [
    .stop, .running, .stopCopy, .resuming, .runningP2P, .preCopy, .preCopyP2P, .error,
  ]

  /// `vfio_from_fsm_table`, rows and columns in `order`.
  private static let table: [[MigrationState]] = [
    // from STOP
    [
      .stop, .runningP2P, .stopCopy, .resuming, .runningP2P, .runningP2P, .runningP2P, .error,
    ],
    // from RUNNING
    [
      .runningP2P, .running, .runningP2P, .runningP2P, .runningP2P, .preCopy, .runningP2P, .error,
    ],
    // from STOP_COPY
    [.stop, .stop, .stopCopy, .stop, .stop, .error, .error, .error],
    // from RESUMING
    [.stop, .stop, .stop, .resuming, .stop, .stop, .stop, .error],
    // from RUNNING_P2P
    [.stop, .running, .stop, .stop, .runningP2P, .running, .preCopyP2P, .error],
    // from PRE_COPY
    [
      .running, .running, .preCopyP2P, .running, .running, .preCopy, .preCopyP2P, .error,
    ],
    // from PRE_COPY_P2P
    [
      .runningP2P, .runningP2P, .stopCopy, .runningP2P, .runningP2P, .preCopy, .preCopyP2P, .error,
    ],
    // from ERROR
    Array(repeating: .error, count: 8),
  ]

  /// `state_flags_table`: the flags a state needs (ERROR needs all, so no device has it).
  public static func required(_ state: MigrationState) -> MigrationFlags {
    switch state {
    case .running, .stop, .stopCopy, .resuming: [.stopCopy]
    case .runningP2P: [.stopCopy, .p2p]
    case .preCopy: [.stopCopy, .preCopy]
    case .preCopyP2P: [.stopCopy, .p2p, .preCopy]
    case .error: MigrationFlags(rawValue: ~0)
    }
  }

  public static func supported(_ state: MigrationState, _ flags: MigrationFlags) -> Bool {
    flags.isSuperset(of: required(state))
  }

  /// The next direct arc from `current` towards `target`, or nil where the
  /// kernel answers -EINVAL (unsupported state, ERROR, STOP_COPY → PRE_COPY…).
  public static func nextState(
    from current: MigrationState, to target: MigrationState, flags: MigrationFlags
  )
    -> MigrationState?
  {
    guard supported(current, flags), supported(target, flags) else { return nil }
    let column = order.firstIndex(of: target)!
    var next = table[order.firstIndex(of: current)!][column]
    while next != .error, !supported(next, flags) {
      next = table[order.firstIndex(of: next)!][column]
    }
    return next == .error ? nil : next
  }
}
