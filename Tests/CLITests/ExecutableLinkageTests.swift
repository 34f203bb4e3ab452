import Foundation
import Testing

/// What must never reach the `xe-vfio-user` executable: the tests' shared
/// target, the test frameworks, and full Foundation, whose
/// FoundationInternationalization brings ICU's data (a merge slip once made
/// the executable depend on TestSupport: 84.6 MB instead of 35.5 MB).
enum ForbiddenInExecutable {
  /// Targets of this package and products of any.
  static let modules: Set = ["TestSupport", "FuzzSupport", "Testing", "XCTest"]
  /// Modules a source file of the executable's closure must not import (it
  /// takes FoundationEssentials where it needs Foundation at all).
  static let imports: Set = [
    "Foundation", "FoundationInternationalization", "_FoundationICU", "Testing", "XCTest",
    "TestSupport",
  ]
  /// Shared libraries the executable must not need (a debug build links the
  /// toolchain's dynamically).
  static let libraries = [
    "libFoundation.so", "libFoundationInternationalization.so", "lib_FoundationICU.so",
    "libTesting.so", "libXCTest.so",
  ]
  /// Mangled module prefixes and ICU's data symbol, which no symbol of a
  /// statically linked build may carry either.
  static let symbolMarks = [
    "$s11TestSupport", "$s7Testing", "$s30FoundationInternationalization", "icudt",
  ]
}

@Suite("the xe-vfio-user executable's linkage")
struct ExecutableLinkageTests {
  /// The package's targets as `swift package dump-package` reads Package.swift,
  /// by name: their dependencies, whether each is a test target, and their sources.
  struct Manifest {
    struct Target {
      var dependencies: [String]
      var isTest: Bool
      var path: String
    }
    var targets: [String: Target] = [:]

    init() throws {
      // Its own scratch path, so that it never waits for the lock of the build running these tests.
      let scratch = NSTemporaryDirectory() + "xvu-manifest-\(UUID().uuidString.prefix(8))"
      defer { try? FileManager.default.removeItem(atPath: scratch) }
      let dump = try run([
        "__shell__",
        "cd '\(repositoryRoot)' && swift package --scratch-path '\(scratch)' dump-package",
      ])
      guard dump.status == 0,
        let json = try JSONSerialization.jsonObject(with: Data(dump.stdout.utf8))
          as? [String: Any],
        let list = json["targets"] as? [[String: Any]]
      else {
        throw ManifestError(description: "swift package dump-package failed:\n\(dump.stderr)")
      }
      for target in list {
        guard let name = target["name"] as? String else { continue }
        let type = target["type"] as? String ?? ""
        // Each dependency is {"byName": [name, condition]}, {"target": [...]} or
        // {"product": [name, package, moduleAliases, condition]}: its first element is the name.
        let dependencies = (target["dependencies"] as? [[String: Any]] ?? []).compactMap {
          ($0.values.first as? [Any])?.first as? String
        }
        let defaultRoot = type == "test" ? "Tests" : "Sources"
        targets[name] = Target(
          dependencies: dependencies, isTest: type == "test",
          path: repositoryRoot + "/" + ((target["path"] as? String) ?? "\(defaultRoot)/\(name)"))
      }
    }

    /// `name` and every target and product it depends on, directly or not.
    func closure(of name: String) -> Set<String> {
      var seen: Set<String> = []
      var pending = [name]
      while let next = pending.popLast() {
        guard seen.insert(next).inserted else { continue }
        pending += targets[next]?.dependencies ?? []
      }
      return seen
    }
  }

  struct ManifestError: Error, CustomStringConvertible { var description: String }

  static let importKinds: Set = [
    "struct", "class", "enum", "protocol", "typealias", "func", "var", "let",
  ]

  @Test func packageSwiftKeepsTestCodeAndFullFoundationOutOfTheExecutable() throws {
    let manifest = try Manifest()
    let closure = manifest.closure(of: "xe-vfio-user")
    #expect(closure.count > 10, "the executable's dependencies were read: \(closure.sorted())")
    #expect(closure.isDisjoint(with: ForbiddenInExecutable.modules), "\(closure.sorted())")
    let tests = closure.filter { manifest.targets[$0]?.isTest == true }
    #expect(tests.isEmpty, "test targets in the executable: \(tests.sorted())")
    // The targets of this package that it links: none imports what it must not.
    for name in closure.sorted() {
      guard let target = manifest.targets[name] else { continue }
      let files = (FileManager.default.enumerator(atPath: target.path)?.allObjects as? [String])?
        .filter { $0.hasSuffix(".swift") }
      for file in files ?? [] {
        let text = try String(contentsOfFile: target.path + "/" + file, encoding: .utf8)
        let imported = Set(
          text.split(separator: "\n").compactMap { line -> String? in
            // `@preconcurrency import M`, `import struct M.Type`, `import M.Submodule`: M.
            var words = line.split(separator: " ").filter { !$0.hasPrefix("@") }
            guard words.first == "import", words.count >= 2 else { return nil }
            if Self.importKinds.contains(String(words[1])), words.count >= 3 { words.remove(at: 1) }
            return words[1].split(separator: ".").first.map(String.init)
          })
        #expect(
          imported.isDisjoint(with: ForbiddenInExecutable.imports),
          "\(name)/\(file) imports \(imported.intersection(ForbiddenInExecutable.imports).sorted())"
        )
      }
    }
  }

  /// The binary itself (debug or release, whichever `swift build` left):
  /// what it needs from the dynamic linker and the symbols it carries.
  @Test func theBuiltExecutableLinksNoTestCodeNorICU() throws {
    let elf = try ELFFile(path: executable.path)
    let needed = elf.neededLibraries
    #expect(
      needed.contains { $0.hasPrefix("libc.so") }, "the dynamic section was read: \(needed)")
    for library in ForbiddenInExecutable.libraries {
      #expect(!needed.contains(library), "\(executable.path) needs \(library)")
    }
    let symbols = elf.symbolNames
    #expect(symbols.count > 1000, "the symbol table was read")
    for mark in ForbiddenInExecutable.symbolMarks {
      let found = symbols.filter { $0.hasPrefix(mark) }
      let count = found.count
      #expect(count == 0, "\(count) symbols of \(mark), e.g. \(found.prefix(3))")
    }
  }
}

/// Just enough of a 64-bit little-endian ELF file: DT_NEEDED entries and
/// the names in the symbol tables (.symtab and .dynsym).
struct ELFFile {
  struct FormatError: Error, CustomStringConvertible { var description: String }

  let bytes: Data
  private struct Section {
    var type: UInt32
    var offset: Int
    var size: Int
    var link: Int
    var entrySize: Int
  }
  private let sections: [Section]

  init(path: String) throws {
    bytes = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped)
    guard bytes.count > 64, bytes.prefix(4) == Data([0x7F, 0x45, 0x4C, 0x46]), bytes[4] == 2,
      bytes[5] == 1
    else { throw FormatError(description: "\(path) is not a 64-bit little-endian ELF file") }
    let bytes = self.bytes
    func u(_ offset: Int, _ size: Int) -> Int {
      (0..<size).reduce(0) { $0 | Int(bytes[bytes.startIndex + offset + $1]) << (8 * $1) }
    }
    let (start, entrySize, count) = (u(0x28, 8), u(0x3A, 2), u(0x3C, 2))
    guard start + entrySize * count <= bytes.count else {
      throw FormatError(description: "\(path): section headers past the end")
    }
    sections = (0..<count).map { i in
      let at = start + i * entrySize
      return Section(
        type: UInt32(u(at + 4, 4)), offset: u(at + 0x18, 8), size: u(at + 0x20, 8),
        link: u(at + 0x28, 4), entrySize: u(at + 0x38, 8))
    }
  }

  private func u(_ offset: Int, _ size: Int) -> Int {
    (0..<size).reduce(0) { $0 | Int(bytes[bytes.startIndex + offset + $1]) << (8 * $1) }
  }

  /// The NUL-terminated string at `offset` of string table section `table`.
  private func string(in table: Int, at offset: Int) -> String {
    guard table < sections.count else { return "" }
    let start = bytes.startIndex + sections[table].offset + offset
    let end = bytes[start...].firstIndex(of: 0) ?? bytes.endIndex
    return String(decoding: bytes[start..<end], as: UTF8.self)
  }

  /// SHT_DYNAMIC's DT_NEEDED entries.
  var neededLibraries: [String] {
    sections.filter { $0.type == 6 }.flatMap { dynamic in
      stride(from: 0, to: dynamic.size, by: 16).compactMap { entry in
        u(dynamic.offset + entry, 8) == 1
          ? string(in: dynamic.link, at: u(dynamic.offset + entry + 8, 8)) : nil
      }
    }
  }

  /// Every name in SHT_SYMTAB and SHT_DYNSYM.
  var symbolNames: [String] {
    sections.filter { $0.type == 2 || $0.type == 11 }.flatMap { table in
      stride(from: 0, to: table.size, by: max(table.entrySize, 24)).map { entry in
        string(in: table.link, at: u(table.offset + entry, 4))
      }
    }
  }
}
