#!/usr/bin/env bash
# Starts xe-vfio-user with the simulated Xe VF and a QEMU that attaches it,
# with exactly the command line the README shows (and `serve` prints). Stops the
# server when QEMU exits. When a server already answers on the socket (e.g.
# scripts/serve.sh), QEMU attaches to that one and no server is started.
#
#   examples/qemu-attach.sh [QEMU options...]   e.g. -kernel bzImage -append console=ttyS0 -nographic
#
# Environment: XE_VFU_SOCKET (default /tmp/xe-vfio-user.sock), XE_VFU_BIN
# (default .build/release/xe-vfio-user, built by scripts/build.sh), QEMU (default:
# the QEMU that scripts/install-qemu.sh installed, else qemu-system-x86_64 from
# PATH; it must be 10.1 or later), GUEST_MEMORY (default 4G), XE_VFU_PROFILE
# (default bmg), XE_VFU_LOG_LEVEL (the server's, default info), XE_VFU_ACCEL (below).
#
# Acceleration: KVM (-accel kvm -cpu host, as in the README's line) when /dev/kvm
# can be opened for reading and writing, otherwise TCG (-accel tcg -cpu max: the
# guest is emulated, several times slower), said on stderr. XE_VFU_ACCEL=tcg or
# =kvm forces one: use tcg where /dev/kvm exists but guests stop under it with
# "emulation failure" (seen in nested VMs). XE_VFU_KVM_DEVICE (default /dev/kvm)
# is the device checked.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
socket=${XE_VFU_SOCKET:-/tmp/xe-vfio-user.sock}
server=${XE_VFU_BIN:-$here/.build/release/xe-vfio-user}
if [ -z "${QEMU:-}" ]; then
  QEMU=$(sed -n 's/^XE_VFU_QEMU=//p' "${XE_VFU_CACHE:-/opt/xe-vfio-user}/env" 2>/dev/null || true)
  QEMU=${QEMU:-qemu-system-x86_64}
fi
memory=${GUEST_MEMORY:-4G}
[ -x "$server" ] || { echo "no server at $server: run scripts/build.sh first (or set XE_VFU_BIN)" >&2; exit 1; }

kvm_device=${XE_VFU_KVM_DEVICE:-/dev/kvm}
case "${XE_VFU_ACCEL:-auto}" in
  auto)
    if [ -r "$kvm_device" ] && [ -w "$kvm_device" ]; then
      accel=(-accel kvm -cpu host)
    else
      accel=(-accel tcg -cpu max)
      why="there is no $kvm_device"
      [ -e "$kvm_device" ] && why="$(id -un) cannot open $kvm_device ($(stat -c '%U:%G %A' "$kvm_device")) for reading and writing"
      echo "qemu-attach: no KVM: $why; running the guest under TCG (-accel tcg -cpu max), emulated and several times slower" >&2
    fi
    ;;
  kvm) accel=(-accel kvm -cpu host) ;;
  tcg)
    accel=(-accel tcg -cpu max)
    echo "qemu-attach: XE_VFU_ACCEL=tcg: running the guest under TCG (-accel tcg -cpu max), emulated and several times slower" >&2
    ;;
  *) echo "qemu-attach: XE_VFU_ACCEL must be kvm, tcg or auto, not '$XE_VFU_ACCEL'" >&2; exit 2 ;;
esac

qemu() {
  "$QEMU" \
    -machine q35 "${accel[@]}" -m "$memory" \
    -object memory-backend-memfd,id=mem,size="$memory",share=on -machine memory-backend=mem \
    -device '{"driver":"vfio-user-pci","id":"xevf0","socket":{"path":"'"$socket"'","type":"unix"}}' \
    "$@"
}

# A server already answering there (scripts/serve.sh in another terminal, say) is used as it is.
if [ -S "$socket" ] && "$server" info --socket-path "$socket" >/dev/null 2>&1; then
  echo "qemu-attach: a server is already listening on $socket: attaching QEMU to it" >&2
  qemu "$@"
  exit
fi

# A socket file left by an earlier run is replaced by the server: wait for the new one.
stale=$(stat -c %i "$socket" 2>/dev/null || true)
"$server" serve --socket-path "$socket" --profile "${XE_VFU_PROFILE:-bmg}" --log-level "${XE_VFU_LOG_LEVEL:-info}" --quiet &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null' EXIT
# QEMU connects while it realizes the device: the socket must be listening first.
for _ in $(seq 200); do
  [ -S "$socket" ] && [ "$(stat -c %i "$socket")" != "$stale" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.05
done
[ -S "$socket" ] && [ "$(stat -c %i "$socket")" != "$stale" ] || { echo "xe-vfio-user did not start" >&2; exit 1; }

qemu "$@"
