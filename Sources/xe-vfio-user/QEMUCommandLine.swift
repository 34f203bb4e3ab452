/// The QEMU invocation that attaches a vfio-user server at `socketPath`.
/// Guest RAM comes from a shared memfd so the server maps it and the device
/// DMAs straight into it (without `share=on` QEMU's private copy diverges).
/// The last line, a shell comment, is for hosts where KVM cannot be used (no
/// /dev/kvm, or a nested VM where guests stop with "emulation failure").
func qemuCommandLine(socketPath: String, memory: String = "4G", id: String = "xevf0") -> String {
  """
  qemu-system-x86_64 \\
    -machine q35 -accel kvm -cpu host -m \(memory) \\
    -object memory-backend-memfd,id=mem,size=\(memory),share=on -machine memory-backend=mem \\
    -device '{"driver":"vfio-user-pci","id":"\(id)","socket":{"path":"\(socketPath)","type":"unix"}}' \\
    ...   # your disk, network and display options
  # No usable KVM? Replace -accel kvm -cpu host with -accel tcg -cpu max (emulated, slower).
  """
}
