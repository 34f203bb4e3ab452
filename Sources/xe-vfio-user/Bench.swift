import ArgumentParser
import Bench

extension CPUPlacement: ExpressibleByArgument {}

struct Bench: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Measure the server against the raw Unix-socket limit, in one run.",
    discussion: """
      Runs an in-process server with the simulated BMG VF and a client on
      another thread, and prints each figure next to the same measurement
      over a plain Unix socket (three system calls per request: receive
      header, receive body, send reply) taken in the same run.
      """)

  @Option(help: "Round trips per latency figure.")
  var iterations = 100_000

  @Option(
    help:
      "CPU placement: same (server and client on CPU 0), split (server CPU 1, client CPU 0), none.")
  var cpus: CPUPlacement = .same

  @Option(help: "VRAM of the simulated VF.")
  var vramSize: ByteSize = ByteSize(256 << 20)

  @Option(help: "Live DMA windows for the large DMA_MAP figure.")
  var liveMappings = 60_000

  @Flag(help: "Also count user-space instructions per 4-byte REGION_READ with valgrind (slow).")
  var instructions = false

  @Option(
    help:
      "Comma-separated subset: read,write,inflight,large,dma,dmalog,rss,liveupdate,migration,save,checkpoint,counters (default all)."
  )
  var only: String?

  @Option(help: "VRAM sizes for the migration figures.")
  var migrationVRAM: [ByteSize] = [ByteSize(256 << 20), ByteSize(1 << 30), ByteSize(4 << 30)]

  func run() throws {
    let configuration = BenchConfiguration(
      iterations: iterations, cpus: cpus, vramSize: vramSize.bytes, liveMappings: liveMappings,
      instructions: instructions, only: only, migrationVRAM: migrationVRAM.map(\.bytes))
    do { try configuration.run() } catch let error as BenchSetupError {
      throw ValidationError(error.description)
    }
  }
}
