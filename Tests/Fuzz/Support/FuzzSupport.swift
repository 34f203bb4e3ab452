import CJSONC
import CLibFuzzer

#if canImport(Glibc)
  import Glibc
#endif

// What the three fuzz targets share: the entry point (libFuzzer's driver in a
// fuzzing build, a corpus replayer in a normal one), the seed corpus read from
// protocol/, and a failure that every build reports the same way.

/// Writes a line to stderr (the C `stderr` is a global Swift 6 cannot share).
public func printError(_ line: String) {
  var text = line + "\n"
  text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Stops the process with `message`: libFuzzer (and a replay) report an abort
/// as a crash and keep the input that caused it.
public func fuzzFailure(_ message: String) -> Never {
  printError("fuzz property violated: \(message)")
  abort()
}

/// The input function of the target running (set once, before any input).
nonisolated(unsafe) private var targetInput: (UnsafeRawBufferPointer) -> Void = { _ in }

/// libFuzzer's entry, for every target. (libFuzzer's own main, linked though
/// the executable's main replaces it, needs the name too.)
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
  targetInput(UnsafeRawBufferPointer(start: data, count: size))
  return 0
}

/// The fuzz target's `main`: libFuzzer's driver over `testOneInput` in a
/// fuzzing build (-D XE_VFU_LIBFUZZER), else `replayMain`. (SwiftPM gives
/// every executable its own main, so libFuzzer's is not used.)
public func fuzzTargetMain(
  seeds: (String) -> [[UInt8]], _ testOneInput: @escaping (UnsafeRawBufferPointer) -> Void
) -> Never {
  targetInput = testOneInput
  #if XE_VFU_LIBFUZZER
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv, fuzzerTestOneInput))
  #else
    exit(
      replayMain(arguments: Array(CommandLine.arguments.dropFirst()), seeds: seeds) { bytes in
        bytes.withUnsafeBytes { testOneInput($0) }
      })
  #endif
}

/// Runs `body` on every input named on the command line (files, or
/// directories of files), or writes the target's seed corpus with
/// `--write-seeds OUT-DIR PROTOCOL-DIR`. A normal (non-fuzzing) build of a
/// target is this program: it replays a corpus or a crash file under the
/// same code the fuzzer runs.
public func replayMain(
  arguments: [String], seeds: (String) -> [[UInt8]], _ body: ([UInt8]) -> Void
) -> Int32 {
  if arguments.count == 3, arguments[0] == "--write-seeds" {
    let corpus = seeds(arguments[2])
    guard !corpus.isEmpty else {
      printError("no seeds found under \(arguments[2])")
      return 1
    }
    mkdir(arguments[1], 0o755)
    for (i, seed) in corpus.enumerated() {
      writeFile(arguments[1] + "/seed-\(i)", seed)
    }
    print("\(corpus.count) seeds in \(arguments[1])")
    return 0
  }
  guard !arguments.isEmpty, !arguments[0].hasPrefix("-") else {
    printError(
      "usage: (FILE|DIR)... replays inputs; --write-seeds OUT-DIR PROTOCOL-DIR writes the seed corpus\n"
        + "(built with -sanitize=fuzzer this program is a libFuzzer target: scripts/fuzz.sh)")
    return 2
  }
  var count = 0
  for path in arguments {
    for file in filesUnder(path) {
      guard let bytes = readFile(file) else {
        printError("cannot read \(file)")
        return 1
      }
      body(bytes)
      count += 1
    }
  }
  print("\(count) inputs replayed")
  return 0
}

/// The regular files at `path`: itself, or the entries of a directory.
private func filesUnder(_ path: String) -> [String] {
  guard let directory = opendir(path) else { return [path] }
  defer { closedir(directory) }
  var files: [String] = []
  while let entry = readdir(directory) {
    let name = withUnsafeBytes(of: entry.pointee.d_name) {
      String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
    }
    if name.hasPrefix(".") { continue }
    files.append(path + "/" + name)
  }
  return files.sorted()
}

public func readFile(_ path: String) -> [UInt8]? {
  guard let file = fopen(path, "rb") else { return nil }
  defer { fclose(file) }
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 65536)
  while true {
    let n = fread(&chunk, 1, chunk.count, file)
    bytes += chunk[..<n]
    if n < chunk.count { break }
  }
  return bytes
}

func writeFile(_ path: String, _ bytes: [UInt8]) {
  guard let file = fopen(path, "wb") else { fuzzFailure("cannot write \(path)") }
  _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
  fclose(file)
}

/// One object of a protocol/ fixture array, read with json-c.
public struct FixtureObject {
  let object: OpaquePointer

  public func string(_ key: String) -> String? {
    var value: OpaquePointer?
    guard json_object_object_get_ex(object, key, &value) != 0, let value,
      json_object_get_type(value) == json_type_string
    else { return nil }
    return String(cString: json_object_get_string(value))
  }

  public func integer(_ key: String) -> Int? {
    var value: OpaquePointer?
    guard json_object_object_get_ex(object, key, &value) != 0, let value,
      json_object_get_type(value) == json_type_int
    else { return nil }
    return Int(json_object_get_int64(value))
  }

  public func bool(_ key: String) -> Bool? {
    var value: OpaquePointer?
    guard json_object_object_get_ex(object, key, &value) != 0, let value,
      json_object_get_type(value) == json_type_boolean
    else { return nil }
    return json_object_get_boolean(value) != 0
  }

  /// A lowercase hex string as bytes.
  public func hex(_ key: String) -> [UInt8]? {
    guard let text = string(key), text.utf8.count % 2 == 0 else { return nil }
    var bytes: [UInt8] = []
    var high: UInt8?
    for c in text.utf8 {
      let nibble: UInt8
      switch c {
      case UInt8(ascii: "0")...UInt8(ascii: "9"): nibble = c - UInt8(ascii: "0")
      case UInt8(ascii: "a")...UInt8(ascii: "f"): nibble = c - UInt8(ascii: "a") + 10
      default: return nil
      }
      if let h = high {
        bytes.append(h << 4 | nibble)
        high = nil
      } else {
        high = nibble
      }
    }
    return bytes
  }
}

/// Runs `body` on each object of the array at the top of `path` (or under
/// `key` in the top object); nothing when the file is missing or unreadable.
public func forEachFixture(_ path: String, key: String? = nil, _ body: (FixtureObject) -> Void) {
  guard let root = json_object_from_file(path) else { return }
  defer { json_object_put(root) }
  var array: OpaquePointer? = root
  if let key {
    array = nil
    guard json_object_object_get_ex(root, key, &array) != 0 else { return }
  }
  guard let array, json_object_get_type(array) == json_type_array else { return }
  for i in 0..<json_object_array_length(array) {
    guard let object = json_object_array_get_idx(array, i),
      json_object_get_type(object) == json_type_object
    else { continue }
    body(FixtureObject(object: object))
  }
}

/// The inputs of `target` in protocol/fuzz-regressions.json: what the fuzzers
/// found once, replayed by every run.
public func regressionInputs(_ protocolDirectory: String, target: String) -> [[UInt8]] {
  var inputs: [[UInt8]] = []
  forEachFixture(protocolDirectory + "/fuzz-regressions.json", key: "cases") { object in
    if object.string("target") == target, let bytes = object.hex("hex") { inputs.append(bytes) }
  }
  return inputs
}
