#!/usr/bin/env bash
# A small Linux guest to try the device with: serves the simulated Xe VF and
# boots Debian's cloud kernel with a busybox initramfs in QEMU, through
# examples/qemu-attach.sh. The guest finds the VF, prints what it sees in the
# style of `lspci -v`, enables it, reads and writes BAR0 registers (served by
# xe-vfio-user over the socket) and BAR2 VRAM (mapped, no message), then gives
# you a shell on the console (`poweroff -f` ends the guest and QEMU; Ctrl-A X
# quits QEMU at any time).
#
#   scripts/guest.sh [--shell | --poweroff] [QEMU options...]
#
# --poweroff ends the guest after the checks (the default when stdin is not a
# terminal); --shell keeps it (the default on a terminal).
#
# The first run installs QEMU and downloads the guest kernel and busybox through
# `scripts/install-qemu.sh --guest-only` (about 127 MB, cached in /opt/xe-vfio-user: only
# what this guest needs, not what the test suite adds), and builds
# the server with scripts/build.sh. The initramfs is rebuilt each run (a second),
# in the cache's guest directory, or under /tmp when that is not writable.
#
# Environment: as examples/qemu-attach.sh (XE_VFU_ACCEL: tcg by default here, kvm to try KVM,
# XE_VFU_SOCKET, XE_VFU_PROFILE, XE_VFU_BIN to skip the build, QEMU), and
# GUEST_MEMORY (default 512M here), XE_VFU_LOG_LEVEL (the server's, default warning
# here), XE_VFU_CACHE (default /opt/xe-vfio-user).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${XE_VFU_CACHE:-/opt/xe-vfio-user}

mode=poweroff
[ -t 0 ] && mode=shell
case "${1:-}" in
  --shell) mode=shell; shift ;;
  --poweroff) mode=poweroff; shift ;;
  -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

setting() { sed -n "s/^$1=//p" "$cache/env" 2>/dev/null || true; }
kernel=${XE_VFU_GUEST_KERNEL:-$(setting XE_VFU_GUEST_KERNEL)}
busybox=${XE_VFU_GUEST_BUSYBOX:-$(setting XE_VFU_GUEST_BUSYBOX)}
if [ ! -s "$kernel" ] || [ ! -x "$busybox" ]; then
  echo "guest: no guest kernel and busybox yet: running scripts/install-qemu.sh --guest-only" >&2
  "$here/scripts/install-qemu.sh" --guest-only
  kernel=$(setting XE_VFU_GUEST_KERNEL)
  busybox=$(setting XE_VFU_GUEST_BUSYBOX)
fi
[ -s "$kernel" ] && [ -x "$busybox" ] || { echo "guest: no kernel or busybox in $cache/env" >&2; exit 1; }
[ -n "${XE_VFU_BIN:-}" ] || XE_VFU_BIN=$("$here/scripts/build.sh")
export XE_VFU_BIN

work=$(dirname "$kernel")
[ -w "$work" ] || work=/tmp/xe-vfio-user-guest-$(id -u)
mkdir -p "$work"
initrd=$work/xevf-initrd.cpio

# The guest's /init. Only busybox is there: sysfs gives the IDs and resources,
# the config file the capability list, devmem the BAR accesses.
init=$(mktemp /tmp/xevf-init.XXXXXX)
trap 'rm -f "$init" "$initrd.$$"' EXIT
cat >"$init" <<'INIT_EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "xevf: $*"; }
mode=$(sed -n 's/.* xevf=\([a-z]*\).*/\1/p' /proc/cmdline)
finish() {
  if [ "$mode" = shell ]; then
    say "a shell on the console: 'poweroff -f' ends the guest and QEMU (Ctrl-A X quits QEMU)"
    setsid cttyhack sh
  fi
  say "powering off"
  poweroff -f
}
hex() { printf '%x' "$1"; }
cfg8() { od -An -tu1 -j "$1" -N1 "$dev/config" | tr -d ' '; }
cfg16() { echo $(( $(cfg8 "$1") | $(cfg8 $(($1 + 1))) << 8 )); }
# The Xe VF: an Intel display-class function (q35's own devices are bridges, SATA, SMBus).
dev=""
for d in /sys/bus/pci/devices/*; do
  case "$(cat $d/vendor) $(cat $d/class)" in "0x8086 0x03"*) dev=$d ;; esac
done
if [ -z "$dev" ]; then
  say "no Intel display function found; PCI functions:"
  for d in /sys/bus/pci/devices/*; do say "  ${d##*/} $(cat $d/vendor):$(cat $d/device) class $(cat $d/class)"; done
  finish
fi
vendor=$(cat $dev/vendor) device=$(cat $dev/device) class=$(cat $dev/class)
say "found ${dev##*/} [${vendor#0x}:${device#0x}] class ${class#0x} (rev $(printf %02x $(cfg8 8)))"
say "  Subsystem: [$(cat $dev/subsystem_vendor | sed s/0x//):$(cat $dev/subsystem_device | sed s/0x//)]"
n=0
while read start end flags; do
  if [ $((end)) -gt 0 ] && [ $n -le 5 ]; then
    kind="I/O ports"
    [ $((flags & 0x200)) -ne 0 ] && kind="Memory"
    bits=32-bit; [ $((flags & 0x100000)) -ne 0 ] && bits=64-bit
    pf=non-prefetchable; [ $((flags & 0x2000)) -ne 0 ] && pf=prefetchable
    size=$((end - start + 1))
    if [ $size -ge $((1 << 20)) ]; then human="$((size >> 20))M"; else human="$((size >> 10))K"; fi
    say "  Region $n: $kind at $(hex $start) ($bits, $pf) [size=$human]"
  fi
  n=$((n + 1))
done <$dev/resource
cap=$(($(cfg8 52) & 0xfc))
while [ $cap -ge 64 ]; do
  id=$(cfg8 $cap)
  case $id in
    1) name="Power Management" ;;
    5) name="MSI" ;;
    16) name="Express (v$(($(cfg16 $((cap + 2))) & 15)))" ;;
    17) name="MSI-X: Count=$((($(cfg16 $((cap + 2))) & 0x7ff) + 1))" ;;
    *) name="capability $(hex $id)" ;;
  esac
  say "  Capabilities: [$(hex $cap)] $name"
  cap=$(($(cfg8 $((cap + 1))) & 0xfc))
done
echo 1 >$dev/enable
bar0=$(sed -n 1p $dev/resource | cut -d' ' -f1)
bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
bar2end=$(sed -n 3p $dev/resource | cut -d' ' -f2)
say "BAR0 GMD_ID (+0xd8c) = $(devmem $((bar0 + 0xd8c)) 32)   (a REGION_READ to xe-vfio-user)"
devmem $((bar0 + 0x190240)) 32 0x600dcafe
say "BAR0 scratch (+0x190240) wrote 0x600DCAFE, read $(devmem $((bar0 + 0x190240)) 32)"
if [ $((bar2end)) -gt 0 ]; then
  devmem $((bar2 + 0x1000)) 32 0xa5a55a5a
  say "BAR2 VRAM (+0x1000) wrote 0xA5A55A5A, read $(devmem $((bar2 + 0x1000)) 32)   (through the mapping, no message)"
else
  say "BAR2: none (an integrated profile has no VRAM)"
fi
say "checks done"
finish
INIT_EOF

# A newc cpio archive, the format the kernel unpacks as an initramfs, written
# here so that no cpio tool (or root, for the console node) is needed.
inode=1
pad() { head -c $(((4 - $1 % 4) % 4)) /dev/zero; }
entry() { # name mode [file] [rdev-major rdev-minor]
  local name=$1 mode=$2 file=${3:-} size=0
  [ -n "$file" ] && size=$(stat -c %s "$file")
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
    "$inode" "$mode" 0 0 1 0 "$size" 0 0 "${4:-0}" "${5:-0}" $((${#name} + 1)) 0 "$name"
  pad $((110 + ${#name} + 1))
  if [ -n "$file" ]; then cat "$file" && pad "$size"; fi
  inode=$((inode + 1))
}
{
  for dir in bin dev proc sys; do entry "$dir" $((8#040755)); done
  entry dev/console $((8#020600)) "" 5 1
  entry bin/busybox $((8#100755)) "$busybox"
  entry init $((8#100755)) "$init"
  entry TRAILER!!! 0
} >"$initrd.$$"
mv -f "$initrd.$$" "$initrd"
rm -f "$init"  # exec below skips the trap

# The wrapper QEMU sees /tmp, the cache's guest directory and these.
export XE_VFU_QEMU_SHARE=$(dirname "$kernel"):$work${XE_VFU_QEMU_SHARE:+:$XE_VFU_QEMU_SHARE}
export GUEST_MEMORY=${GUEST_MEMORY:-512M}
# The server's info lines would interleave with the guest's console.
export XE_VFU_LOG_LEVEL=${XE_VFU_LOG_LEVEL:-warning}
# TCG unless told otherwise: this small guest boots in seconds emulated, while a
# KVM that cannot emulate an instruction on trapped MMIO (seen in nested VMs,
# where /dev/kvm opens fine) would stop it with "emulation failure".
export XE_VFU_ACCEL=${XE_VFU_ACCEL:-tcg}
exec "$here/examples/qemu-attach.sh" \
  -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 quiet panic=-1 xevf=$mode" \
  -display none -nodefaults -no-reboot -serial mon:stdio "$@"
