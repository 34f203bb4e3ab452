import CVFIOUser
import Foundation
import SystemPackage
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// The built executable (TestSupport finds it), for running it directly.
let executable = URL(fileURLWithPath: xeVFIOUserExecutable)

/// Runs the executable with `arguments` (or a shell line given as `["__shell__", line]`).
func run(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
  let process = Process()
  let out = Pipe()
  let err = Pipe()
  if arguments.first == "__shell__" {
    process.executableURL = URL(fileURLWithPath: "/bin/bash")
    process.arguments = ["-c", "set -o pipefail; " + arguments[1]]
  } else {
    process.executableURL = executable
    process.arguments = arguments
  }
  process.standardOutput = out
  process.standardError = err
  try process.run()
  let stdout = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
  let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
  process.waitUntilExit()
  return (process.terminationStatus, stdout, stderr)
}

@Suite("xe-vfio-user as a process", .serialized)
struct ServeProcessTests {
  @Test func servePrintsTheQEMUCommandLineAndStopsCleanlyOnSIGTERM() throws {
    let serve = try ServeProcess()
    let client = try serve.connect()
    #expect(try client.deviceInfo().numRegions == 9)
    let socket = serve.socketPath
    let result = serve.stop()
    #expect(result.status == 0)
    #expect(
      result.stdout.contains(
        #"-device '{"driver":"vfio-user-pci","id":"xevf0","socket":{"path":"\#(socket)","type":"unix"}}'"#
      ))
    #expect(result.stdout.contains("memory-backend-memfd,id=mem,size=4G,share=on"))
    #expect(result.stderr.contains("serving simulated Xe VF bmg [8086:e211], 256 MiB VRAM"))
    #expect(result.stderr.contains("server stopped"))
    #expect(!FileManager.default.fileExists(atPath: socket))
  }

  @Test func socketGroupAndAllowedPeers() throws {
    // Group 1 (daemon on Debian) stands for the group QEMU runs as.
    let serve = try ServeProcess([
      "--socket-group", "1", "--socket-mode", "0660", "--allow-uid", "0",
    ])
    _ = try serve.connect()
    var st = stat()
    #expect(stat(serve.socketPath, &st) == 0)
    #expect(st.st_gid == 1 && st.st_mode & 0o777 == 0o660)
    #expect(serve.stop().stderr.contains("serving only uids [0]"))
    // Root is not user 65534 (nobody): refused with EACCES, and the command says so.
    let strict = try ServeProcess(["--allow-uid", "65534"])
    defer { _ = strict.stop() }
    for _ in 0..<500 where !FileManager.default.fileExists(atPath: strict.socketPath) {
      usleep(10_000)
    }
    let refused = try run(["info", "-s", strict.socketPath])
    #expect(
      refused.status != 0
        && refused.stderr.contains("the server does not serve this user (EACCES)"),
      "\(refused.stderr)")
    let badGroup = try run(["serve", "--socket-group", "no-such-group-xvu"])
    #expect(badGroup.status != 0 && badGroup.stderr.contains("no group 'no-such-group-xvu'"))
  }

  @Test func sigintAlsoStopsAndTheSocketModeIsApplied() throws {
    let serve = try ServeProcess(["--socket-mode", "0640"])
    _ = try serve.connect()
    let attributes = try FileManager.default.attributesOfItem(atPath: serve.socketPath)
    #expect((attributes[.posixPermissions] as? Int) == 0o640)
    #expect(serve.stop(signal: SIGINT).status == 0)
  }

  /// Everything a client hands over is released when it hangs up: no fd is left behind.
  @Test func hangUpLeaksNoDescriptor() throws {
    let serve = try ServeProcess()
    defer { _ = serve.stop() }
    do { _ = try serve.connect() }  // warm up: first connection creates lazily allocated state
    usleep(100_000)
    let idle = serve.openFDs
    for round in 0..<3 {
      let client = try serve.connect()
      let memfd = cvfu_memfd_create("guest", 0)
      ftruncate(memfd, 1 << 20)
      try client.dmaMap(
        address: 1 << 30, size: 1 << 20, flags: [.read, .write], fd: FileDescriptor(rawValue: memfd)
      )
      try client.dmaMap(address: 2 << 30, size: 1 << 20, flags: [.read, .write])
      let eventfds = (0..<16).map { _ in cvfu_eventfd(0, 0) }
      try client.setIRQEventfds(
        index: VFIOPCIIRQ.msix, start: 0, fds: eventfds.map(FileDescriptor.init(rawValue:)),
        chunk: 8)
      try client.setIRQs(
        IRQSetPayload(
          flags: [.dataEventfd, .actionTrigger], index: 3, start: 0,
          count: 1),
        fds: [FileDescriptor(rawValue: eventfds[0])])
      var region = try client.regionInfo(2)
      #expect(region.descriptor != nil)
      region.fd.take()?.close()
      #expect(serve.openFDs > idle, "round \(round): the server holds the client's eventfds")
      close(memfd)
      eventfds.forEach { close($0) }
    }
    var settled = false
    for _ in 0..<200 where !settled {
      settled = serve.openFDs == idle
      if !settled { usleep(10_000) }
    }
    #expect(serve.openFDs == idle)
  }

  @Test func integratedProfilesHaveNoVRAM() throws {
    let serve = try ServeProcess(["--profile", "ptl"])
    defer { _ = serve.stop() }
    let client = try serve.connect()
    #expect(try client.regionInfo(2).info.size == 0)
    #expect(try client.read32(region: VFIOPCIRegion.config, offset: 0) == 0xB080_8086)
  }

  @Test func badArgumentsGiveAClearError() throws {
    let profile = try run(["serve", "--profile", "xyz"])
    #expect(profile.status != 0)
    // The parser names the value, the option and every profile.
    #expect(profile.stderr.contains("The value 'xyz' is invalid for '--profile <profile>'"))
    #expect(profile.stderr.contains("Please provide one of 'bmg', 'ptl' or 'wcl'"))
    let vram = try run(["serve", "--socket-path", "/tmp/xvu-bad.sock", "--vram-size", "300M"])
    #expect(vram.status != 0)
    #expect(vram.stderr.contains("power of two"))
    let nobody = try run(["info", "--socket-path", "/tmp/xvu-nobody-\(getpid()).sock"])
    #expect(nobody.status != 0)
    #expect(nobody.stderr.contains("xvu-nobody"))
  }

  @Test func secondServerOnALiveSocketIsRefused() throws {
    let serve = try ServeProcess()
    defer { _ = serve.stop() }
    _ = try serve.connect()
    let second = try run(["serve", "--socket-path", serve.socketPath])
    #expect(second.status != 0)
    #expect(second.stderr.contains("another server is listening there"))
  }

  /// Where `serve` listens without --socket-path is in its --help (the option has no default
  /// value of its own, so argument-parser shows none), next to the option.
  @Test func serveHelpShowsTheDefaultSocketPath() throws {
    let help = try run(["serve", "--help"])
    #expect(help.status == 0)
    let lines = help.stdout.split(separator: "\n")
    let option = try #require(lines.firstIndex { $0.contains("--socket-path <socket-path>") })
    // As wrapped to the terminal's width, read as words.
    let text = lines[option...].prefix(3).joined(separator: " ").split(separator: " ")
      .joined(separator: " ")
    #expect(text.contains("Unix socket to listen on (default: /tmp/xe-vfio-user.sock)"), "\(text)")
  }

  @Test func helpListsEveryCommand() throws {
    let help = try run(["--help"])
    for command in ["serve", "info", "bench"] { #expect(help.stdout.contains(command)) }
    let serve = try run(["serve", "--help"])
    for option in [
      "--socket-path", "--fd", "--profile", "--vram-size", "--max-data-xfer-size", "--log-level",
    ] {
      #expect(serve.stdout.contains(option))
    }
  }
}
