import Checkpoint
import MigrationTools
import SystemPackage
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// `save`'s output file in-process: a regular file is staged beside its path
/// and renamed over it only when complete; anything else is written in place.
@Suite struct SaveOutputTests {
  @Test func aNewFileIsStagedPrivatelyAndAppearsOnlyOnCommit() throws {
    let directory = try TemporaryDirectory()
    let path = directory.path + "/vf.xesave"
    let out = try SaveOutput(path: path)
    let partial = try #require(out.temporaryPath)
    #expect(partial == "\(directory.path)/.vf.xesave.\(getpid()).partial")
    #expect(out.seekable)
    try out.write([1, 2, 3])
    #expect(exists(partial))
    #expect(!exists(path))
    #expect(out.bytesWritten == 3)
    #expect(mode(partial) == 0o600)
    try out.commit()
    #expect(out.committed)
    #expect(out.temporaryPath == nil)
    #expect(!exists(partial))
    #expect(try contents(path) == [1, 2, 3])
  }

  @Test func abandoningLeavesTheOldFileAsItWas() throws {
    let directory = try TemporaryDirectory()
    let path = directory.path + "/vf.xesave"
    try write(path, [9, 9], mode: 0o640)
    let out = try SaveOutput(path: path)
    let partial = try #require(out.temporaryPath)
    // An existing file's mode is kept for its replacement.
    #expect(mode(partial) == 0o640)
    try out.write([1, 2, 3, 4])
    out.abandon()
    #expect(!out.committed)
    #expect(!exists(partial))
    #expect(try contents(path) == [9, 9])
    #expect(try directory.entries() == ["vf.xesave"])
  }

  @Test func leftoversOfADeadSaveAreRemovedAndALiveOnesKept() throws {
    let directory = try TemporaryDirectory()
    // A process that has ended: its pid names no process (until reused).
    let child = try ChildProcess("/bin/true", [])
    child.wait()
    let dead = "\(directory.path)/.vf.xesave.\(child.pid).partial"
    let live = "\(directory.path)/.vf.xesave.\(getppid()).partial"
    let other = "\(directory.path)/.other.xesave.\(child.pid).partial"
    for file in [dead, live, other] { try write(file, [0], mode: 0o600) }
    let out = try SaveOutput(path: directory.path + "/vf.xesave")
    defer { out.abandon() }
    #expect(!exists(dead))
    #expect(exists(live))
    #expect(exists(other))
  }

  @Test func aSymlinkIsFollowedAndKept() throws {
    let directory = try TemporaryDirectory()
    let target = directory.path + "/target.xesave"
    let link = directory.path + "/link.xesave"
    #expect(symlink("target.xesave", link) == 0)
    let out = try SaveOutput(path: link)
    #expect(out.temporaryPath == "\(directory.path)/.target.xesave.\(getpid()).partial")
    try out.write([7])
    try out.commit()
    #expect(try contents(target) == [7])
    var st = stat()
    #expect(lstat(link, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK)
  }

  @Test func aDeviceIsWrittenInPlaceAndNeverStaged() throws {
    let out = try SaveOutput(path: "/dev/null")
    #expect(out.temporaryPath == nil)
    #expect(!out.seekable)
    try out.write([1, 2])
    try out.commit()
    #expect(!out.committed)
    out.abandon()
    #expect(exists("/dev/null"))
  }

  @Test func aDirectoryIsRefusedWithWhatToDo() throws {
    let directory = try TemporaryDirectory()
    #expect {
      _ = try SaveOutput(path: directory.path)
    } throws: {
      "\($0)" == "\(directory.path) is a directory; name a file to write the checkpoint to"
    }
  }

  @Test func aCheckpointWrittenThroughItVerifies() throws {
    let directory = try TemporaryDirectory()
    let path = directory.path + "/vf.xesave"
    let out = try SaveOutput(path: path)
    let writer = SaveFileWriter()
    let identity = DeviceIdentity(
      vendorID: 0x8086, deviceID: 0xE211, revision: 0, subsystemVendorID: 0x8086,
      subsystemID: 0, vramSize: 1 << 20)
    try out.write(
      writer.header(
        json: try SaveFileHeader(
          identity: identity, estimatedBytes: 8192, created: nil, source: "test"
        ).json()))
    let stream = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) }
    try stream.withUnsafeBytes { try writer.append($0, to: out) }
    try writer.finish(to: out)
    try out.patch(SaveFormat.fileLengthField(out.bytesWritten), at: SaveFormat.fileLengthOffset)
    try out.commit()
    try SaveFileReader.verifyWholeFile(at: path, name: path)
    let fd = try FileDescriptor.open(path, .readOnly)
    defer { try? fd.close() }
    let header = try SaveFileHeader(
      json: SaveFileReader(input: fd, name: path).readHeader(), name: path)
    #expect(header.identity == identity)
    #expect(header.created == nil)
  }
}

/// A directory under /tmp, removed with what it holds when the test ends.
final class TemporaryDirectory {
  let path: String

  init() throws {
    var template = Array("/tmp/migration-tools-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw Errno(rawValue: errno) }
    path = String(cString: made)
  }

  func entries() throws -> [String] {
    guard let dir = opendir(path) else { throw Errno(rawValue: errno) }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) {
        String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
      }
      if name != ".", name != ".." { names.append(name) }
    }
    return names.sorted()
  }

  deinit {
    for name in (try? entries()) ?? [] { unlink("\(path)/\(name)") }
    rmdir(path)
  }
}

func exists(_ path: String) -> Bool {
  var st = stat()
  return lstat(path, &st) == 0
}

func mode(_ path: String) -> UInt32 {
  var st = stat()
  return stat(path, &st) == 0 ? UInt32(st.st_mode & 0o7777) : 0
}

func contents(_ path: String) throws -> [UInt8] {
  Array(try readTextFile(path).utf8)
}

func write(_ path: String, _ bytes: [UInt8], mode: CModeT) throws {
  let fd = try FileDescriptor.open(
    path, .writeOnly, options: [.create, .truncate], permissions: FilePermissions(rawValue: mode))
  try fd.closeAfter { _ = try fd.writeAll(bytes) }
}
