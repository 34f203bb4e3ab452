import ArgumentParser

@main
struct XeVFIOUser: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "xe-vfio-user",
    abstract: "A vfio-user server for Intel Xe SR-IOV Virtual Functions (PTL, WCL, BMG).",
    discussion: """
      Serves one Xe VF on a Unix socket to a vfio-user client such as QEMU's
      `-device vfio-user-pci`. Without hardware it serves a simulated VF. Start
      a server (it prints the QEMU command line that attaches it), then look at
      the device from a client's side:
        xe-vfio-user serve --socket-path /tmp/xe-vf0.sock
        xe-vfio-user info --socket-path /tmp/xe-vf0.sock
      """,
    version: "0.1.0",
    subcommands: [
      Serve.self, Info.self, List.self, Top.self, Metrics.self, Migrate.self, Save.self,
      Restore.self, Resume.self, LiveUpdateCommand.self, Bench.self,
    ],
    defaultSubcommand: Serve.self)
}
