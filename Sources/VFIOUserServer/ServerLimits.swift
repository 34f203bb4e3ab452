import VFIODevice
import VFIOUser

/// The server's own limits, offered in the VERSION reply and enforced on
/// every message. All are configurable (see `xe-vfio-user serve --help`).
public struct ServerLimits: Sendable, Equatable {
  /// Descriptors the server accepts in one message (eventfds for SET_IRQS).
  public var maxMsgFDs: UInt32 = 16
  /// Largest `count` of one REGION_READ / REGION_WRITE / MIG_DATA message.
  public var maxDataXferSize: UInt32 = 1 << 20
  /// DMA windows that may be live at once (fewer if the device takes fewer).
  public var maxDMAMaps: UInt32 = 65535
  /// DMA page sizes the server maps windows with (4 KiB, the host page). The
  /// offer is the device's page sizes no smaller than these (`dma(for:)`).
  public var pgsizes: UInt64 = 4096
  /// How DMA_READ / DMA_WRITE are laid out; `nil` means the spec's layout.
  public var dmaLayout: DMATransferLayout? = nil
  /// Largest data of one DMA_READ / DMA_WRITE the server sends (also bounded by
  /// both sides' max_data_xfer_size). QEMU 11.1 never finishes sending a
  /// DMA_READ reply larger than its socket buffer (about 208 KiB), so the
  /// default stays well under that.
  public var maxDMAMessageData: UInt32 = 128 * 1024
  /// Offer the sparse migration stream to a client that asks for it
  /// (protocol/sparse-migration.md). Off, the server answers as one that
  /// predates it: every client gets the raw Xe stream.
  public var sparseMigration = true
  /// Reset the device when a client hangs up (the default). When false the
  /// device keeps its state for the next client, as the spec suggests, which a
  /// `restore` followed by a VMM needs: a source left in STOP_COPY is resumed
  /// with its state, a device left in STOP stays there, and only an incomplete
  /// restore (RESUMING, ERROR) is reset (README, "What a client leaving does").
  public var resetOnDisconnect = true
  /// When either set is non-empty, only a peer whose uid is in `allowedUIDs`
  /// or whose gid is in `allowedGIDs` (SO_PEERCRED) is served; any other gets
  /// EACCES for its first message and is disconnected.
  public var allowedUIDs: Set<UInt32> = []
  public var allowedGIDs: Set<UInt32> = []
  /// Milliseconds a refused second client gets to send its VERSION before it is dropped.
  public var refusalTimeoutMilliseconds: Int32 = 1000
  /// Milliseconds the rest of a message may take once its first bytes have
  /// arrived; a client still short of it then is disconnected (0: no bound).
  /// Idleness between messages is never bounded: QEMU may send nothing for
  /// hours. QEMU sends each message with one blocking sendmsg, so the rest
  /// follows as soon as the server reads: a minute never cuts it off.
  public var partialMessageTimeoutMilliseconds: Int32 = 60_000
  /// Milliseconds a reply (or a DMA request) may wait without any of it
  /// being taken by a client that stopped reading; the client is then
  /// disconnected (0: no bound). The socket buffer holds two of the largest
  /// messages, so a client that reads at all never gets near it.
  public var sendTimeoutMilliseconds: Int32 = 60_000
  /// How long a client may leave disabled a device that a reset cleared after
  /// the guest had enabled it. A booting guest's firmware enables it within
  /// seconds; a guest restored by a VMM that does not carry the device's state
  /// never does, since its driver believes the VF is still programmed
  /// (Connection+Events, `DEVICE_LEFT_DISABLED`).
  public var enableGraceMilliseconds: Int = 15_000

  /// QEMU refuses a larger max_data_xfer_size (VFIO_USER_MAX_MAX_XFER).
  public static let largestDataXferSize: UInt32 = 64 << 20
  /// The biggest VERSION message (header, version numbers, JSON) taken before negotiation.
  public static let maxVersionMessage = 64 * 1024

  public init() {}

  /// Whether a peer with these credentials may be served.
  public func allows(uid: UInt32, gid: UInt32) -> Bool {
    (allowedUIDs.isEmpty && allowedGIDs.isEmpty) || allowedUIDs.contains(uid)
      || allowedGIDs.contains(gid)
  }

  /// Largest message accepted after negotiation: a REGION_WRITE or MIG_DATA_WRITE of
  /// `maxDataXferSize` bytes, or a full REGION_WRITE_MULTI.
  public var maxMessageSize: Int {
    MessageHeader.size
      + max(16 + Int(maxDataXferSize), 8 + WriteMultiEntry.size * WriteMultiLimits.maxWrites)
  }

  /// The DMA limits of a connection to `device`: the page sizes both can use
  /// (the device's, from the server's smallest page up; the server's own if
  /// the device names none that large), the fewer windows of the two, and
  /// the device's IOVA ranges.
  public func dma(for device: DMALimits) -> DMALimits {
    let smallest = pgsizes & (~pgsizes &+ 1)
    let common = device.pageSizes & ~(smallest &- 1)
    return DMALimits(
      pageSizes: common != 0 ? common : pgsizes, maxWindows: min(maxDMAMaps, device.maxWindows),
      iovaRanges: device.iovaRanges)
  }

  /// The capabilities object of the VERSION reply for a client that proposed
  /// `client`, with the connection's DMA limits `dma`.
  /// `sparseStream`: the device has a transform for the sparse form
  /// (`MigrationCapable.sparseStreamTransform`); without one it is not offered.
  func offer(to client: Capabilities, dma: DMALimits, sparseStream: Bool) -> Capabilities {
    var caps = Capabilities(
      maxMsgFDs: maxMsgFDs, maxDataXferSize: maxDataXferSize, maxDMAMaps: dma.maxWindows,
      pgsizes: dma.pageSizes)
    // Booleans are echoed only when proposed: the reply's list is a subset of the client's.
    if client.writeMultiple == true { caps.writeMultiple = true }
    if client.twinSocket?.supported == true { caps.twinSocket = .init(supported: false) }
    // Echoed only when offered (QEMU's client refuses keys it does not know),
    // at the version both sides speak.
    if sparseMigration, sparseStream, let offered = client.sparseMigration,
      offered >= Capabilities.sparseMigrationVersion
    {
      caps.sparseMigration = Capabilities.sparseMigrationVersion
    }
    return caps
  }
}
