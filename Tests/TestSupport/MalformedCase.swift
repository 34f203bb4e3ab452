/// One entry of protocol/malformed.json (protocol/README.md has the format),
/// the one schema of every suite that replays the corpus: the codecs'
/// (VFIOUserTests), the server's over a real socket, with the test device,
/// the simulated VF and the kernel backend (VFIOUserServerTests).
public struct MalformedCase: Decodable, Sendable {
  public var name: String
  public var hex: String
  public var expect: String
  public var layer: String
  public var afterVersion: Bool
  public var note: String
  public var parseError: String?
  /// Valid messages to send first; each must succeed.
  public var setup: [String]?
  /// Descriptors to send with the message (SCM_RIGHTS).
  public var fds: Int?
  /// Eventfds to send with each setup message (by position; none when absent).
  public var setupFDs: [Int]?
  /// `hex` is only the head: pad with zeros up to the header's size.
  public var fillToSize: Bool?
  /// The reaction of a device without migration support, where it differs.
  public var expectNoMigration: String?
  /// The reaction of a device without DMA logging, where it differs.
  public var expectNoDMALogging: String?
  /// The kind of each descriptor, comma-separated (memfd, eventfd, pipe,
  /// socket, directory, device); by default memfds for DMA_MAP, eventfds otherwise.
  public var fdKind: String?
  /// "xe": served by the simulated Xe VF (it migrates), not the test device.
  public var device: String?
  /// The reaction of the kernel backend (a fake vfio-pci device behind
  /// `KernelVFIOBackend`), where it differs from `expect`.
  public var expectKernel: String?
  /// Kernel-backend cases only: not replayed against the simulated devices.
  public var kernelOnly: Bool?
  /// The fake vfio-pci device's reset: "no_reset" or "reset_busy" (default: it works).
  public var kernelDevice: String?
  /// Which backend this replay serves the case with (not in the file).
  public var backend = CorpusBackend.simulated

  public enum CorpusBackend: Sendable { case simulated, kernel }
  /// Server limits other than the defaults.
  public var limits: CorpusLimits?
  /// VERSION offers the sparse migration stream (protocol/sparse-migration.md).
  public var sparseMigration: Bool?

  public struct CorpusLimits: Decodable, Sendable {
    public var maxDMAMaps: UInt32?
    enum CodingKeys: String, CodingKey { case maxDMAMaps = "max_dma_maps" }
  }

  enum CodingKeys: String, CodingKey {
    case name, hex, expect, layer, note, setup, fds, device, limits
    case afterVersion = "after_version"
    case parseError = "parse_error"
    case fillToSize = "fill_to_size"
    case expectNoMigration = "expect_no_migration"
    case expectNoDMALogging = "expect_no_dma_logging"
    case fdKind = "fd_kind"
    case expectKernel = "expect_kernel"
    case kernelOnly = "kernel_only"
    case setupFDs = "setup_fds"
    case kernelDevice = "kernel_device"
    case sparseMigration = "sparse_migration"
  }

  /// This case as replayed against the kernel backend.
  public var onKernel: MalformedCase {
    var copy = self
    copy.backend = .kernel
    return copy
  }

  /// Replayed against the default server and test device (the pipelined burst takes only these).
  public var runsOnDefaultServer: Bool {
    device == nil && limits == nil && kernelOnly != true && sparseMigration == nil
  }

  public var testDescription: String { backend == .kernel ? "\(name) (kernel)" : name }

  /// What this server must do: the test device has neither migration nor DMA
  /// logging; the simulated Xe VF and the kernel backend have both.
  public var expectation: String {
    if backend == .kernel { return expectKernel ?? expect }
    return device == "xe" || device == "migrating"
      ? expect : expectNoMigration ?? expectNoDMALogging ?? expect
  }

  /// "EINVAL+disconnect": an error reply, then the server hangs up.
  public var disconnectsAfterError: Bool { expectation.hasSuffix("+disconnect") }

  /// `hex` as bytes (nil when it is not hex), before any `fill_to_size`.
  public var bytes: [UInt8]? { [UInt8](hex: hex) }

  /// The message as sent: `hex`, zero-padded to the header's size for `fill_to_size`.
  public func message() throws -> [UInt8] {
    guard var bytes = [UInt8](hex: hex) else { throw CorpusError("not hex: \(hex.prefix(32))") }
    if fillToSize == true, let size = RawHeader(bytes).declaredSize, Int(size) > bytes.count {
      bytes += [UInt8](repeating: 0, count: Int(size) - bytes.count)
    }
    return bytes
  }
}

// A release build of the whole package (scripts/test.sh makes one) compiles
// this target without the testing library; the test builds have it.
#if canImport(Testing)
  import Testing

  extension MalformedCase: CustomTestStringConvertible {}
#endif
