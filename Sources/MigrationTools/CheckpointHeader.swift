import Checkpoint
// The one file of MigrationTools with Foundation (its essentials): JSONEncoder and
// JSONDecoder for the header, and the ISO 8601 timestamp, as the CLI had them.
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// The header's JSON part (protocol/save-format.md): what identifies the
/// device, for the checkpoint container (`Checkpoint`) to carry.
public struct SaveFileHeader: Codable {
  public var identity: DeviceIdentity
  public var estimatedBytes: UInt64
  /// ISO 8601; absent with `save --no-timestamp`.
  public var created: String?
  public var source: String

  public init(identity: DeviceIdentity, estimatedBytes: UInt64, created: String?, source: String) {
    self.identity = identity
    self.estimatedBytes = estimatedBytes
    self.created = created
    self.source = source
  }

  /// Decodes the JSON a `SaveFileReader` verified, from the file `name`.
  public init(json: [UInt8], name: String) throws {
    do {
      self = try JSONDecoder().decode(SaveFileHeader.self, from: Data(json))
    } catch {
      throw SaveFileError("\(name): the header's description of the device is unreadable")
    }
  }

  /// The JSON for `SaveFileWriter.header(json:)`: keys in one order, so two
  /// saves of one state differ only in `created`.
  public func json() throws -> [UInt8] {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return Array(try encoder.encode(self))
  }
}

/// When a checkpoint was made: now, or SOURCE_DATE_EPOCH when it is set
/// (the reproducible-builds convention), so a save can be made byte for byte again.
public func checkpointTimestamp(
  environment: String? = getenv("SOURCE_DATE_EPOCH").map { String(cString: $0) }
)
  throws -> String
{
  guard let environment else { return Date.now.formatted(.iso8601) }
  guard let seconds = Int64(environment), seconds >= 0 else {
    throw CLIError(
      "SOURCE_DATE_EPOCH=\(environment) is not a number of seconds since 1970; unset it or give one"
    )
  }
  return Date(timeIntervalSince1970: Double(seconds)).formatted(.iso8601)
}
