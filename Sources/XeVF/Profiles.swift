/// The identity and provisioning of one simulated Xe VF flavour.
///
/// The VF reports the PF's device id (the xe-vfio-pci id table lists PF ids,
/// protocol/xe-kernel-facts.md §12). No `lspci` dump of a real VF was available, so the
/// subsystem id simply mirrors the device id and the revision defaults to 0;
/// both are plain fields so a test or the CLI can change them.
public struct XeProfile: Sendable, Equatable {
  public static let vendorID: UInt16 = 0x8086

  public var name: String
  public var deviceID: UInt16
  public var revisionID: UInt8
  /// Display controller, other (0x0380), programming interface 0.
  public var classCode: UInt32
  public var subsystemVendorID: UInt16
  public var subsystemID: UInt16
  /// Discrete parts expose their VRAM quota as BAR2; integrated ones have none.
  public var hasVRAM: Bool
  /// Size of BAR2 when the caller does not pick one (0 without VRAM).
  public var defaultVRAMSize: UInt64
  /// Primary and media GT.
  public var gtCount: Int
  /// Bytes of GGTT address space provisioned to the VF (one 8-byte PTE per 4 KiB page).
  public var ggttQuota: UInt64
  /// GMD_ID of the primary GT: architecture in bits 31:22, release in 21:14,
  /// revision in 5:0 (values from the xe driver's IP tables, not read from hardware).
  public var gmdID: UInt32
  /// GMD_ID of the media GT, same encoding.
  public var mediaGMDID: UInt32

  public init(
    name: String, deviceID: UInt16, revisionID: UInt8 = 0, classCode: UInt32 = 0x03_8000,
    subsystemVendorID: UInt16 = XeProfile.vendorID, subsystemID: UInt16? = nil, hasVRAM: Bool,
    defaultVRAMSize: UInt64, gtCount: Int = 2, ggttQuota: UInt64 = 64 << 20, gmdID: UInt32,
    mediaGMDID: UInt32
  ) {
    self.name = name
    self.deviceID = deviceID
    self.revisionID = revisionID
    self.classCode = classCode
    self.subsystemVendorID = subsystemVendorID
    self.subsystemID = subsystemID ?? deviceID
    self.hasVRAM = hasVRAM
    self.defaultVRAMSize = defaultVRAMSize
    self.gtCount = gtCount
    self.ggttQuota = ggttQuota
    self.gmdID = gmdID
    self.mediaGMDID = mediaGMDID
  }

  public var vendorID: UInt16 { Self.vendorID }
  /// Number of 8-byte GGTT PTEs the VF owns.
  public var ggttPTECount: Int { Int(ggttQuota / 4096) }

  /// Encodes a GMD_ID value from an IP version such as 20.01.
  public static func gmdID(architecture: UInt32, release: UInt32, revision: UInt32 = 0) -> UInt32 {
    architecture << 22 | release << 14 | revision
  }

  /// Battlemage G21 "Arc Pro B60", the SR-IOV capable discrete part (graphics 20.01, media 13.01).
  public static let bmg = XeProfile(
    name: "bmg", deviceID: 0xE211, hasVRAM: true, defaultVRAMSize: 256 << 20,
    gmdID: gmdID(architecture: 20, release: 1), mediaGMDID: gmdID(architecture: 13, release: 1))
  /// Panther Lake, integrated (graphics 30.00, media 30.00).
  public static let ptl = XeProfile(
    name: "ptl", deviceID: 0xB080, hasVRAM: false, defaultVRAMSize: 0,
    gmdID: gmdID(architecture: 30, release: 0), mediaGMDID: gmdID(architecture: 30, release: 0))
  /// Wildcat Lake, integrated (graphics 30.03, media 30.02).
  public static let wcl = XeProfile(
    name: "wcl", deviceID: 0xFD80, hasVRAM: false, defaultVRAMSize: 0,
    gmdID: gmdID(architecture: 30, release: 3), mediaGMDID: gmdID(architecture: 30, release: 2))

  public static let allProfiles: [XeProfile] = [.bmg, .ptl, .wcl]
  public static let `default` = bmg

  /// The profile called `name` (case-insensitive), or nil.
  public static func named(_ name: String) -> XeProfile? {
    allProfiles.first { $0.name == name.lowercased() }
  }
}
