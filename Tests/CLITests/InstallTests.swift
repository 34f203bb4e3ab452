import Foundation
import Testing

/// The repository root.
let repositoryRoot: String = {
  var dir = URL(fileURLWithPath: #filePath)
  while dir.lastPathComponent != "Tests" { dir.deleteLastPathComponent() }
  return dir.deletingLastPathComponent().path
}()

/// swift-argument-parser's generate-manual, which install.sh needs for the man
/// pages of a given binary; scripts/test.sh builds it next to the binary.
let generateManual: String? = ["debug", "release"].map {
  repositoryRoot + "/.build/\($0)/generate-manual"
}.first { FileManager.default.isExecutableFile(atPath: $0) }

/// Locally a missing generate-manual skips the test (as a missing QEMU does);
/// with CI=true it is a failure, in the test itself.
let installTestRunnable = ConditionTrait.enabled(
  if: generateManual != nil || ProcessInfo.processInfo.environment["CI"] == "true",
  "install test skipped: no .build/*/generate-manual (swift build --product generate-manual)")

/// A command in `PATH` (the test's own, without the installed prefix).
func findTool(_ name: String) -> String? {
  (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map {
    "\($0)/\(name)"
  }.first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// Every path under `directory`, relative to it, sorted.
func tree(_ directory: String) -> [String] {
  ((try? FileManager.default.subpathsOfDirectory(atPath: directory)) ?? []).sorted()
}

@Suite("scripts/install.sh", .serialized, installTestRunnable)
struct InstallTests {
  let script = repositoryRoot + "/scripts/install.sh"

  func shell(_ line: String, environment: [String: String] = [:]) throws -> (
    status: Int32, stdout: String, stderr: String
  ) {
    let assignments = environment.map { "\($0.key)='\($0.value)' " }.joined()
    return try run(["__shell__", assignments + line])
  }

  /// Installs into a prefix under a fresh temporary directory, checks every file
  /// and that the installed pieces work, then uninstalls: nothing is left.
  @Test func installsUnderAPrefixAndUninstallsEverything() throws {
    let tool = try #require(generateManual, "swift build --product generate-manual")
    let analyze = try #require(
      findTool("systemd-analyze"), "systemd-analyze missing: apt-get install systemd")
    let base = NSTemporaryDirectory() + "xvu-install-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: base) }
    let prefix = base + "/prefix"
    // Something of the user's already there, which the uninstall must leave alone.
    try FileManager.default.createDirectory(
      atPath: prefix + "/share/man/man1", withIntermediateDirectories: true)
    try "not ours".write(
      toFile: prefix + "/share/man/man1/other.1", atomically: true, encoding: .utf8)
    let before = tree(base)

    let install = try shell(
      "'\(script)' --prefix '\(prefix)' --binary '\(executable.path)' --no-group",
      environment: ["XE_VFU_GENERATE_MANUAL": tool])
    #expect(install.status == 0, "\(install.stderr)")
    // A page for the command and each subcommand, as the binary describes itself.
    let dump = try run(["--experimental-dump-help"])
    let described = try JSONSerialization.jsonObject(with: Data(dump.stdout.utf8)) as? [String: Any]
    let subcommands =
      ((described?["command"] as? [String: Any])?["subcommands"] as? [[String: Any]] ?? [])
      .compactMap { $0["commandName"] as? String }.filter { $0 != "help" }
    #expect(subcommands.contains("serve") && subcommands.contains("info"), "\(subcommands)")
    let pages = ([""] + subcommands.map { "." + $0 }).map { "share/man/man1/xe-vfio-user\($0).1" }
    #expect(
      install.stderr.contains(
        "installed xe-vfio-user 0.1.0 under \(prefix) (\(pages.count + 7) files)"),
      "\(install.stderr)")
    let expected = Set(
      [
        "bin/xe-vfio-user", "share/bash-completion/completions/xe-vfio-user",
        "share/zsh/site-functions/_xe-vfio-user",
        "share/fish/vendor_completions.d/xe-vfio-user.fish",
        "lib/systemd/system/xe-vfio-user@.service", "lib/systemd/system/xe-vfio-user-vf@.service",
        "share/xe-vfio-user/installed",
        // A prefix outside /usr and /usr/local puts no hook in /etc/libvirt, only this copy.
        "share/xe-vfio-user/libvirt-qemu-hook",
      ] + pages)
    let files = Set(
      tree(prefix).filter {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: prefix + "/" + $0, isDirectory: &isDirectory)
          && !isDirectory.boolValue
      })
    #expect(
      files == expected.union(["share/man/man1/other.1"]), "\(files.symmetricDifference(expected))")

    // The installed binary runs, and is the stripped build.
    let binary = prefix + "/bin/xe-vfio-user"
    let help = try shell("PATH='\(prefix)/bin':\"$PATH\" xe-vfio-user --help")
    #expect(help.status == 0 && help.stdout.contains("USAGE: xe-vfio-user <subcommand>"), "\(help)")
    #expect(try shell("'\(binary)' info --help").stdout.contains("--json"))
    let symbols = try shell("readelf -S '\(binary)' | grep -c '\\.symtab' || true")
    #expect(symbols.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "stripped")

    // Man pages: real mdoc for every command, found through MANPATH.
    let serve = try String(
      contentsOfFile: prefix + "/share/man/man1/xe-vfio-user.serve.1", encoding: .utf8)
    #expect(serve.contains(".Dt XE-VFIO-USER.SERVE 1") && serve.contains("socket-path"))
    let man = try shell("MANPATH='\(prefix)/share/man' man -w xe-vfio-user.info")
    #expect(man.stdout.contains(prefix + "/share/man/man1/xe-vfio-user.info.1"), "\(man)")

    // Completions: what the binary generates, for each shell.
    let bash = try String(
      contentsOfFile: prefix + "/share/bash-completion/completions/xe-vfio-user", encoding: .utf8)
    #expect(bash.contains("complete -o filenames -F _xe-vfio-user xe-vfio-user"))
    #expect(bash.contains("serve") && bash.contains("--socket-path"))
    let syntax = try shell("bash -n '\(prefix)/share/bash-completion/completions/xe-vfio-user'")
    #expect(syntax.status == 0, "\(syntax.stderr)")
    #expect(
      try String(
        contentsOfFile: prefix + "/share/zsh/site-functions/_xe-vfio-user", encoding: .utf8
      )
      .hasPrefix("#compdef xe-vfio-user"))
    #expect(
      try String(
        contentsOfFile: prefix + "/share/fish/vendor_completions.d/xe-vfio-user.fish",
        encoding: .utf8
      ).contains("complete -c 'xe-vfio-user'"))

    // The unit runs the installed binary, and systemd accepts it, man page included.
    let unitDirectory = prefix + "/lib/systemd/system"
    let unit = try String(contentsOfFile: unitDirectory + "/xe-vfio-user@.service", encoding: .utf8)
    #expect(unit.contains("ExecStart=\(binary) serve --socket-path /run/xe-vfio-user/%i.sock"))
    #expect(!unit.contains("/usr/local/bin/xe-vfio-user"))
    #expect(unit.contains("Group=xe-vfio-user") && !unit.contains("Group=kvm"))
    let verify = try shell(
      "MANPATH='\(prefix)/share/man' '\(analyze)' verify '\(unitDirectory)/xe-vfio-user@vf0.service'"
    )
    #expect(verify.status == 0 && verify.stderr.isEmpty, "\(verify)")
    // ...and the check can fail: without the man pages, the unit's Documentation= is unresolved.
    let unresolved = try shell(
      "MANPATH='\(base)' '\(analyze)' verify '\(unitDirectory)/xe-vfio-user@vf0.service'")
    #expect(unresolved.stderr.contains("xe-vfio-user.serve"), "\(unresolved)")

    // Installing again replaces the same files.
    let again = try shell(
      "'\(script)' --prefix '\(prefix)' --binary '\(executable.path)' --no-group",
      environment: ["XE_VFU_GENERATE_MANUAL": tool])
    #expect(again.status == 0, "\(again.stderr)")
    #expect(Set(tree(prefix)).isSuperset(of: expected))

    let uninstall = try shell("'\(script)' --uninstall --prefix '\(prefix)'")
    #expect(uninstall.status == 0, "\(uninstall.stderr)")
    #expect(tree(base) == before, "left behind: \(Set(tree(base)).subtracting(before))")
    let twice = try shell("'\(script)' --uninstall --prefix '\(prefix)'")
    #expect(twice.status != 0 && twice.stderr.contains("nothing installed under \(prefix)"))
  }

  /// --destdir stages the files for packaging: under DESTDIR, with the prefix's
  /// paths inside them; the uninstall with the same arguments empties it.
  @Test func stagesUnderADestdir() throws {
    let tool = try #require(generateManual, "swift build --product generate-manual")
    let base = NSTemporaryDirectory() + "xvu-destdir-\(UUID().uuidString.prefix(8))"
    defer { try? FileManager.default.removeItem(atPath: base) }
    let install = try shell(
      "'\(script)' --destdir '\(base)' --prefix /usr --binary '\(executable.path)'",
      environment: ["XE_VFU_GENERATE_MANUAL": tool])
    #expect(install.status == 0, "\(install.stderr)")
    #expect(!install.stderr.contains("group"), "no group is made when staging")
    #expect(FileManager.default.isExecutableFile(atPath: base + "/usr/bin/xe-vfio-user"))
    let unit = try String(
      contentsOfFile: base + "/usr/lib/systemd/system/xe-vfio-user@.service", encoding: .utf8)
    #expect(unit.contains("ExecStart=/usr/bin/xe-vfio-user serve"))
    let manifest = try String(
      contentsOfFile: base + "/usr/share/xe-vfio-user/installed", encoding: .utf8)
    #expect(manifest.contains("file /usr/bin/xe-vfio-user\n") && !manifest.contains(base))
    // The libvirt hook: where libvirt looks for it (a system prefix), and beside the docs.
    let hook = "/etc/libvirt/hooks/qemu.d/xe-vfio-user"
    #expect(FileManager.default.isExecutableFile(atPath: base + hook))
    #expect(
      FileManager.default.isExecutableFile(
        atPath: base + "/usr/share/xe-vfio-user/libvirt-qemu-hook"))
    #expect(manifest.contains("file \(hook)\n"))
    let uninstall = try shell("'\(script)' --uninstall --destdir '\(base)' --prefix /usr")
    #expect(uninstall.status == 0, "\(uninstall.stderr)")
    #expect(tree(base).isEmpty, "left behind: \(tree(base))")
  }

  /// The man pages install.sh puts in place format without a single warning
  /// (`groff -mandoc -ww -z` prints nothing for each), every page a SEE ALSO
  /// names is one of them (no xe-vfio-user.help(1)), the top page's examples
  /// stand on lines of their own, and no text the pages come from has a
  /// character generate-manual would drop (it keeps only ASCII).
  @Test func manPagesFormatCleanlyAndTheirSeeAlsoResolves() throws {
    let tool = try #require(generateManual, "swift build --product generate-manual")
    let groff = try #require(findTool("groff"), "groff missing: apt-get install groff-base")
    let base = NSTemporaryDirectory() + "xvu-man-\(UUID().uuidString.prefix(8))"
    defer { try? FileManager.default.removeItem(atPath: base) }
    let install = try shell(
      "'\(script)' --destdir '\(base)' --prefix /usr --binary '\(executable.path)'",
      environment: ["XE_VFU_GENERATE_MANUAL": tool])
    #expect(install.status == 0, "\(install.stderr)")
    let directory = base + "/usr/share/man/man1"
    let pages = tree(directory)
    #expect(pages.contains("xe-vfio-user.1") && pages.contains("xe-vfio-user.serve.1"), "\(pages)")
    var references: [String] = []
    for page in pages {
      let path = directory + "/" + page
      let check = try shell("'\(groff)' -mandoc -ww -z '\(path)' 2>&1")
      #expect(check.status == 0 && check.stdout.isEmpty, "\(page): \(check.stdout)")
      let source = try String(contentsOfFile: path, encoding: .utf8)
      for line in source.split(separator: "\n") where line.hasPrefix(".Xr ") {
        let words = line.split(separator: " ")
        let reference = "\(words[1]).\(words[2])"
        references.append(reference)
        #expect(
          pages.contains(reference), "\(page): SEE ALSO \(words[1])(\(words[2])) is not a page")
      }
    }
    #expect(
      Set(references) == Set(pages).subtracting(["xe-vfio-user.1"]),
      "the top page's SEE ALSO names every other page")
    // The top page's examples, each a line of its own (a sentence once ran on after the first).
    let top = try shell("'\(groff)' -mandoc -Tascii -P-cbou '\(directory)/xe-vfio-user.1'")
    let lines = top.stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
    for example in ["serve", "info"] {
      #expect(
        lines.contains("xe-vfio-user \(example) --socket-path /tmp/xe-vf0.sock"), "\(top.stdout)")
    }
    // What the pages are made from: ASCII only (generate-manual drops every other character).
    let dump = try run(["--experimental-dump-help"])
    let outside = dump.stdout.unicodeScalars.filter { !$0.isASCII }
    #expect(
      outside.isEmpty, "dropped from the man pages: \(String(String.UnicodeScalarView(outside)))")
  }

  /// The issue's report: `--prefix DIR` created the system group anyway, and
  /// its hints (`man xe-vfio-user`, `systemctl enable`) did not work for DIR. A
  /// prefix outside /usr and /usr/local makes no group (groupadd, mocked, is
  /// not run), and each next step it prints works as printed: the binary by
  /// its path, the man page through MANPATH, the unit linked and enabled
  /// (systemctl on a scratch root), the uninstall.
  @Test func aPrefixOutsideUsrMakesNoGroupAndPrintsStepsThatWork() throws {
    let tool = try #require(generateManual, "swift build --product generate-manual")
    let base = NSTemporaryDirectory() + "xvu-prefix-\(UUID().uuidString.prefix(8))"
    defer { try? FileManager.default.removeItem(atPath: base) }
    let prefix = base + "/opt/xe-vfio-user"
    let groups = try GroupMocks(in: base)
    let install = try shell(
      "PATH='\(groups.directory)':\"$PATH\" '\(script)' --prefix '\(prefix)' --binary '\(executable.path)'",
      environment: ["XE_VFU_GENERATE_MANUAL": tool])
    #expect(install.status == 0, "\(install.stderr)")
    #expect(groups.calls.isEmpty, "\(groups.calls)")
    #expect(!install.stderr.contains("created the system group"), "\(install.stderr)")

    let steps = nextSteps(install.stderr)
    let unitDirectory = prefix + "/lib/systemd/system"
    #expect(
      steps == [
        "\(prefix)/bin/xe-vfio-user --help", "MANPATH=\(prefix)/share/man man xe-vfio-user",
        "systemctl link \(unitDirectory)/xe-vfio-user@.service",
        "systemctl enable --now xe-vfio-user@vf0", "groupadd --system xe-vfio-user",
        "\(script) --uninstall --prefix \(prefix)",
      ], "\(install.stderr)")
    guard steps.count == 6 else { return }
    let help = try shell(steps[0])
    #expect(help.status == 0 && help.stdout.contains("USAGE: xe-vfio-user <subcommand>"), "\(help)")
    let man = try shell(steps[1].replacingOccurrences(of: " man ", with: " man -w "))
    #expect(man.stdout == prefix + "/share/man/man1/xe-vfio-user.1\n", "\(man)")
    // systemd is not running here: the two systemctl steps on a scratch root
    // that holds the unit at the same path, --now (starting it) left out.
    if findTool("systemctl") != nil {
      let root = base + "/root"
      try FileManager.default.createDirectory(
        atPath: root + unitDirectory, withIntermediateDirectories: true)
      try FileManager.default.copyItem(
        atPath: unitDirectory + "/xe-vfio-user@.service",
        toPath: root + unitDirectory + "/xe-vfio-user@.service")
      for step in steps[2...3] {
        let offline = step.replacingOccurrences(of: "systemctl", with: "systemctl --root='\(root)'")
          .replacingOccurrences(of: " --now", with: "")
        let result = try shell(offline)
        #expect(result.status == 0, "\(offline): \(result)")
      }
      let wanted = root + "/etc/systemd/system/multi-user.target.wants/xe-vfio-user@vf0.service"
      #expect(
        (try? FileManager.default.destinationOfSymbolicLink(atPath: wanted))
          == unitDirectory + "/xe-vfio-user@.service")
    }
    let uninstall = try shell("PATH='\(groups.directory)':\"$PATH\" " + steps[5])
    #expect(uninstall.status == 0, "\(uninstall.stderr)")
    #expect(!FileManager.default.fileExists(atPath: prefix), "left behind: \(tree(prefix))")
    #expect(groups.calls.isEmpty, "\(groups.calls)")
  }

  /// --with-group makes the group for any prefix (groupadd mocked), the steps
  /// then say to add a user to it, and the uninstall removes it.
  @Test(.enabled(if: getuid() == 0, "groupadd is run as root only"))
  func withGroupMakesTheGroupForAnyPrefix() throws {
    let tool = try #require(generateManual, "swift build --product generate-manual")
    let base = NSTemporaryDirectory() + "xvu-prefix-\(UUID().uuidString.prefix(8))"
    defer { try? FileManager.default.removeItem(atPath: base) }
    let prefix = base + "/opt/xe-vfio-user"
    let groups = try GroupMocks(in: base)
    let path = "PATH='\(groups.directory)':\"$PATH\" "
    let install = try shell(
      path + "'\(script)' --prefix '\(prefix)' --binary '\(executable.path)' --with-group",
      environment: ["XE_VFU_GENERATE_MANUAL": tool])
    #expect(install.status == 0, "\(install.stderr)")
    #expect(groups.calls == ["groupadd --system xe-vfio-user"])
    #expect(install.stderr.contains("created the system group xe-vfio-user"), "\(install.stderr)")
    let steps = nextSteps(install.stderr)
    #expect(steps.contains("usermod -aG xe-vfio-user USER"), "\(steps)")
    #expect(!steps.contains("groupadd --system xe-vfio-user"), "\(steps)")
    let uninstall = try shell(path + "'\(script)' --uninstall --prefix '\(prefix)'")
    #expect(uninstall.status == 0, "\(uninstall.stderr)")
    #expect(groups.calls == ["groupadd --system xe-vfio-user", "groupdel xe-vfio-user"])
  }

  /// The commands of install.sh's closing "next:" lines, without their comments.
  func nextSteps(_ stderr: String) -> [String] {
    let lines = stderr.split(separator: "\n").map(String.init)
    guard let start = lines.firstIndex(of: "[install] next:") else { return [] }
    return lines[(start + 1)...].prefix { $0.hasPrefix("  ") }.map { line in
      let command = line.range(of: "  #").map { String(line[..<$0.lowerBound]) } ?? line
      return command.trimmingCharacters(in: .whitespaces)
    }
  }

  @Test func refusesNonsense() throws {
    let relative = try shell("'\(script)' --prefix usr/local --binary /bin/true")
    #expect(relative.status != 0 && relative.stderr.contains("--prefix must be absolute"))
    let missing = try shell("'\(script)' --binary /nonexistent/xe-vfio-user --prefix /tmp/x")
    #expect(missing.status != 0 && missing.stderr.contains("is not an executable file"))
    let unknown = try shell("'\(script)' --frobnicate")
    #expect(unknown.status == 2 && unknown.stderr.contains("unknown argument: --frobnicate"))
  }
}

/// groupadd, groupdel and `getent group xe-vfio-user` as stand-ins in a
/// directory to put first on PATH: the host's groups stay as they are, and the
/// calls are recorded.
struct GroupMocks {
  let directory: String
  var calls: [String] {
    ((try? String(contentsOfFile: directory + "/calls", encoding: .utf8)) ?? "")
      .split(separator: "\n").map(String.init)
  }

  init(in base: String) throws {
    directory = base + "/group-mocks"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let scripts = [
      "groupadd": "echo \"groupadd $*\" >>'\(directory)/calls'; touch '\(directory)/made'",
      "groupdel": "echo \"groupdel $*\" >>'\(directory)/calls'; rm -f '\(directory)/made'",
      "getent": """
      if [ "$1 $2" = "group xe-vfio-user" ]; then
        [ -f '\(directory)/made' ] && echo xe-vfio-user:x:999: && exit 0
        exit 2
      fi
      exec /usr/bin/getent "$@"
      """,
    ]
    for (name, body) in scripts {
      let path = directory + "/" + name
      try ("#!/bin/sh\n" + body + "\n").write(toFile: path, atomically: true, encoding: .utf8)
      chmod(path, 0o755)
    }
  }
}
