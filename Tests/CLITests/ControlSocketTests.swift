import CVFIOUser
import Control
import Foundation
import TestSupport
import Testing
import VFIOUser
import VFIOUserClient

/// `serve`'s control socket and `info` on a live server, as a user runs them.
@Suite("serve's control socket and info on a live server", .serialized)
struct ControlSocketTests {
  /// Waits for a socket file to appear (the server creates its two sockets in turn).
  func waitFor(_ path: String) {
    for _ in 0..<500 where !FileManager.default.fileExists(atPath: path) { usleep(10_000) }
  }

  /// With the test process attached as the client, `info` shows its pid,
  /// in text and in JSON, from the control socket.
  @Test func infoOnABusyServerShowsTheClientsPid() throws {
    let serve = try ServeProcess()
    defer { _ = serve.stop() }
    let client = try serve.connect()
    try client.dmaMap(address: 1 << 30, size: 2 << 20, flags: [.read, .write])
    let text = try run(["info", "--socket-path", serve.socketPath])
    #expect(text.status == 0, "\(text.stderr)")
    #expect(text.stdout.contains("a client is attached"), "\(text.stdout)")
    #expect(
      text.stdout.contains("Client: pid \(getpid()), uid \(getuid()), gid \(getgid())"),
      "\(text.stdout)")
    #expect(text.stdout.contains("Server: pid \(serve.pid)"))
    #expect(text.stdout.contains("Migration: state RUNNING"))
    #expect(text.stdout.contains("DMA: 1 window, 2 MiB, dirty logging off"), "\(text.stdout)")
    #expect(text.stdout.contains("simulated Xe VF bmg [8086:e211], 256 MiB VRAM"))

    let json = try run(["info", "--socket-path", serve.socketPath, "--json"])
    #expect(json.status == 0, "\(json.stderr)")
    let parsed = try JSON.parse(Array(json.stdout.utf8))
    #expect(parsed["clientAttached"] == .bool(true))
    #expect(parsed["controlSocket"] == .string(serve.socketPath + ".control"))
    #expect(parsed["live"]?["client"]?["pid"] == .int(Int64(getpid())))
    #expect(parsed["live"]?["dma"]?["windows"] == .int(1))
    _ = client
  }

  /// With no client attached, `info` is the full device view it always was.
  @Test func infoWithoutAClientIsTheDeviceView() throws {
    let serve = try ServeProcess()
    defer { _ = serve.stop() }
    _ = try serve.connect()
    usleep(100_000)
    let text = try run(["info", "--socket-path", serve.socketPath])
    #expect(text.status == 0 && text.stdout.contains("Capabilities: ["), "\(text.stderr)")
    #expect(!text.stdout.contains("a client is attached"))
  }

  /// The control socket gets the device socket's mode and group, answers
  /// the protocol, and goes with a clean stop.
  @Test func theControlSocketHasTheSocketsModeAndGroupAndGoesAway() throws {
    let serve = try ServeProcess(["--socket-group", "1", "--socket-mode", "0660"])
    let control = serve.socketPath + ".control"
    _ = try serve.connect()
    waitFor(control)
    var st = stat()
    #expect(stat(control, &st) == 0)
    #expect(st.st_mode & 0o170000 == 0o140000, "a socket")
    #expect(st.st_gid == 1 && st.st_mode & 0o777 == 0o660)
    let client = try ControlClient(path: control)
    #expect(try client.execute("query-status")["device"]?["socket"] == .string(serve.socketPath))
    let result = serve.stop(keepDirectory: true)
    #expect(result.status == 0)
    #expect(result.stderr.contains("control socket: \(control)"))
    #expect(!FileManager.default.fileExists(atPath: control))
    #expect(!FileManager.default.fileExists(atPath: serve.socketPath))
    try? FileManager.default.removeItem(atPath: serve.directory)
  }

  /// --control-socket names another path (which info takes too), or none.
  @Test func controlSocketOption() throws {
    let elsewhere =
      NSTemporaryDirectory() + "xvu-ctl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let serve = try ServeProcess(["--control-socket", elsewhere])
    defer { _ = serve.stop() }
    let holder = try serve.connect()
    waitFor(elsewhere)
    #expect(!FileManager.default.fileExists(atPath: serve.socketPath + ".control"))
    let missing = try run(["info", "--socket-path", serve.socketPath])
    #expect(missing.status != 0 && missing.stderr.contains("ENOENT"), "\(missing.stderr)")
    let found = try run([
      "info", "--socket-path", serve.socketPath, "--control-socket", elsewhere,
    ])
    #expect(found.status == 0 && found.stdout.contains("Client: pid \(getpid())"), "\(found)")
    _ = holder

    let none = try ServeProcess(["--control-socket", "none"])
    defer { _ = none.stop() }
    _ = try none.connect()
    #expect(!FileManager.default.fileExists(atPath: none.socketPath + ".control"))
    let same = try run([
      "serve", "--socket-path", "/tmp/xvu-same.sock", "--control-socket", "/tmp/xvu-same.sock",
    ])
    #expect(same.status != 0 && same.stderr.contains("must differ"), "\(same.stderr)")
  }

  /// --allow-uid and --allow-gid hold for the control socket as for the device socket.
  @Test func thePeerPolicyHoldsOnTheControlSocket() throws {
    let strict = try ServeProcess(["--allow-uid", "65534"])
    defer { _ = strict.stop() }
    let control = strict.socketPath + ".control"
    waitFor(control)
    #expect(throws: ControlClientError.self) { _ = try ControlClient(path: control) }
    do {
      _ = try ControlClient(path: control)
    } catch {
      #expect("\(error)".contains("permission denied"), "\(error)")
    }
  }
}
