#!/usr/bin/env bash
# Starts xe-vfio-user with the simulated Xe VF and a QEMU that attaches it,
# exactly as the README shows. Stops the server when QEMU exits.
#
#   examples/qemu-attach.sh [QEMU options...]   e.g. -kernel bzImage -append console=ttyS0 -nographic
#
# Environment: XE_VFU_SOCKET (default /tmp/xe-vfio-user.sock), XE_VFU_BIN
# (default .build/release/xe-vfio-user), QEMU (default qemu-system-x86_64),
# GUEST_MEMORY (default 4G), XE_VFU_PROFILE (default bmg).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
socket=${XE_VFU_SOCKET:-/tmp/xe-vfio-user.sock}
server=${XE_VFU_BIN:-$here/.build/release/xe-vfio-user}
qemu=${QEMU:-qemu-system-x86_64}
memory=${GUEST_MEMORY:-4G}

"$server" serve --socket-path "$socket" --profile "${XE_VFU_PROFILE:-bmg}" --quiet &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null' EXIT
# QEMU connects while it realizes the device: the socket must be listening first.
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
[ -S "$socket" ] || { echo "xe-vfio-user did not start" >&2; exit 1; }

"$qemu" \
  -machine q35 -m "$memory" \
  -object memory-backend-memfd,id=mem,size="$memory",share=on -machine memory-backend=mem \
  -device '{"driver":"vfio-user-pci","id":"xevf0","socket":{"path":"'"$socket"'","type":"unix"}}' \
  "$@"
