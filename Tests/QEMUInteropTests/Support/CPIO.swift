import Foundation

/// Writes a cpio archive in the "newc" format the kernel unpacks as an initramfs.
struct CPIOArchive {
  private(set) var bytes: [UInt8] = []
  private var inode: UInt32 = 1

  mutating func directory(_ name: String) { entry(name, mode: 0o040755, data: []) }
  mutating func file(_ name: String, _ data: [UInt8], mode: UInt32 = 0o100644) {
    entry(name, mode: mode, data: data)
  }
  mutating func symlink(_ name: String, to target: String) {
    entry(name, mode: 0o120777, data: Array(target.utf8))
  }
  mutating func characterDevice(_ name: String, major: UInt32, minor: UInt32) {
    entry(name, mode: 0o020600, data: [], rdev: (major, minor))
  }

  /// Ends the archive.
  mutating func finish() -> [UInt8] {
    entry("TRAILER!!!", mode: 0, data: [], isTrailer: true)
    return bytes
  }

  private mutating func entry(
    _ name: String, mode: UInt32, data: [UInt8], rdev: (UInt32, UInt32) = (0, 0),
    isTrailer: Bool = false
  ) {
    let nameBytes = Array(name.utf8) + [0]
    let fields: [UInt32] = [
      isTrailer ? 0 : inode, mode, 0, 0, mode & 0o040000 != 0 ? 2 : 1, 0, UInt32(data.count), 0, 0,
      rdev.0, rdev.1,
      UInt32(nameBytes.count), 0,
    ]
    inode += 1
    bytes += Array("070701".utf8)
    for field in fields {
      let text = String(field, radix: 16, uppercase: true)
      bytes += Array((String(repeating: "0", count: 8 - text.count) + text).utf8)
    }
    bytes += nameBytes
    pad()
    bytes += data
    pad()
  }

  private mutating func pad() {
    while bytes.count % 4 != 0 { bytes.append(0) }
  }
}
