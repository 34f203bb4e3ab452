import SystemPackage
import VFIODevice

/// The simulated PF's per-VF debugfs files, `sriov/vf<N>/{pause, resume,
/// stop, reset, save, restore, migration_data, migration_size}`, with the
/// kernel's semantics (protocol/xe-kernel-facts.md §8, §15): the controls take a boolean
/// (`kstrtobool`) at position 0 (EINVAL otherwise, a false value does
/// nothing); `save` and `restore` are read to finish; `migration_data`
/// answers ESPIPE away from position 0, blocks until the PF's workers have
/// data, and reads short only at the end; `migration_size` is "%zd\n".
/// The PF's errnos come back as the calls' errors.
///
/// A test's fake debugfs tree hands its files' reads and writes to this, so
/// the one model of the PF (`SimulatedPF`) drives both the simulated VF's own
/// migration and the debugfs path. Calls may come from several threads (a
/// stream's blocking reads run on a worker): the open streams are kept under
/// a lock that is not held while a call blocks in the PF.
public final class SimulatedPFDebugfs: @unchecked Sendable {
  let vf: SimulatedXeVF
  private let lock = ConditionLock()
  private var save: XeSaveStream?
  private var restore: XeRestoreStream?

  public init(vf: SimulatedXeVF) { self.vf = vf }

  /// The names of the files.
  public static let files = [
    "pause", "resume", "stop", "reset", "save", "restore", "migration_data", "migration_size",
  ]

  public func write(_ file: String, _ bytes: UnsafeRawBufferPointer, at offset: Int64)
    throws(Errno) -> Int
  {
    switch file {
    case "migration_data":
      guard offset == 0 else { throw .illegalSeek }
      guard let sink = lock.withLock({ restore }) else { throw .operationNotSupportedByDevice }
      return try sink.write(bytes)
    case "migration_size":
      throw .invalidArgument  // no write op
    default:
      guard offset == 0 else { throw .invalidArgument }
      guard try Self.parseBool(bytes) else { return bytes.count }
      try control(file)
      return bytes.count
    }
  }

  public func read(_ file: String, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64)
    throws(Errno) -> Int
  {
    switch file {
    case "migration_data":
      guard offset == 0 else { throw .illegalSeek }
      guard let source = lock.withLock({ save }) else { throw .operationNotSupportedByDevice }
      return try source.read(into: buffer)
    case "migration_size":
      let text = Array("\(try vf.pf.stopCopySize())\n".utf8)
      guard offset >= 0, offset < text.count else { return 0 }
      let n = min(buffer.count, text.count - Int(offset))
      buffer.copyBytes(from: text[Int(offset)..<Int(offset) + n])
      return n
    case "save":
      // The data stays readable while the save is still in progress (EIO):
      // the kernel's migration_data reads the PF's rings, which only a
      // finished save (or a reset) frees.
      try vf.pf.finishSaveVF()
      endStreams()
      return 0
    case "restore":
      endStreams()
      vf.apply(try vf.pf.finishRestoreVF())
      return 0
    default:
      throw .invalidArgument  // write-only: no read op
    }
  }

  private func control(_ file: String) throws(Errno) {
    let pf = vf.pf
    switch file {
    case "pause": try pf.pauseVF()
    case "resume":
      try pf.resumeVF()
      vf.releaseHeldWork()
    case "stop": try pf.stopVF()
    case "reset":
      endStreams()
      try pf.resetVF()
    case "save":
      try pf.triggerSaveVF(vf.saveContent())
      let stream = XeSaveStream(
        pf: pf, memory: vf.vramSize > 0 ? vf.memory : nil, id: pf.openStream())
      lock.withLock { save = stream }
    case "restore":
      try pf.triggerRestoreVF()
      let stream = XeRestoreStream(
        pf: pf, memory: vf.vramSize > 0 ? vf.memory : nil, id: pf.openStream())
      lock.withLock { restore = stream }
    default:
      throw .noSuchFileOrDirectory
    }
  }

  /// The finish (or a reset) ends the data stream: later data calls fail ENODEV.
  private func endStreams() {
    vf.pf.closeStream()
    lock.withLock {
      save?.close()
      restore?.close()
      save = nil
      restore = nil
    }
  }

  /// `kstrtobool`: 1/y/Y/t/T/on is true, 0/n/N/f/F/off false, else EINVAL.
  static func parseBool(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Bool {
    guard let first = bytes.first else { throw .invalidArgument }
    switch UInt8(ascii: "A") <= first && first <= UInt8(ascii: "Z") ? first + 32 : first {
    case UInt8(ascii: "1"), UInt8(ascii: "y"), UInt8(ascii: "t"): return true
    case UInt8(ascii: "0"), UInt8(ascii: "n"), UInt8(ascii: "f"): return false
    case UInt8(ascii: "o") where bytes.count > 1:
      switch bytes[1] | 0x20 {
      case UInt8(ascii: "n"): return true
      case UInt8(ascii: "f"): return false
      default: throw .invalidArgument
      }
    default: throw .invalidArgument
    }
  }
}

extension SimulatedPF {
  /// `xe_sriov_pf_control_reset_vf` (debugfs `reset`): the PF's FLR handling
  /// started on every GT (a GT already in an FLR keeps it), then waited for.
  public func resetVF() throws(Errno) {
    locked {
      startWorkers()
      for g in gts.indices where enter(g, .flrWIP) {
        enterWIP(g)
        enterExpecting(g, .flrSendStart)
        queue(g)
      }
    }
    closeStream()
    try waitFLRVF()
  }
}
