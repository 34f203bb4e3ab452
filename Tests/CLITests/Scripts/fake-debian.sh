#!/usr/bin/env bash
# A stand-in for what scripts/install-qemu.sh downloads and runs, so that the
# script itself can be tested in seconds without a network (InstallQEMUTests):
#
#   Tests/CLITests/Scripts/fake-debian.sh DIR
#
# makes DIR/bin, to put first on PATH, with debootstrap, chroot, apt-get,
# apt-cache, dpkg-query and make that act like Debian's for the commands the
# script runs, and DIR/pool with small packages of the same names and layout
# (a cloud and a generic amd64 kernel 6.12.99 with the VFIO modules, busybox,
# headers and linux-source with mtty.c). The "root" debootstrap makes is a
# directory: chroot runs the command on the host with the root's paths mapped,
# and the QEMU apt-get installs there is a script that answers --version and
# the qtest smoke test, and prints its arguments otherwise (a guest "boot").
#
# Each step that stands for a download or a build appends "start STEP PID" and
# "end STEP PID" to $FAKE_LOG (STEP: debootstrap, guest-download, amd64-download,
# mtty-download, mtty-make), and takes $FAKE_SECONDS (default 0.2) in between.
# A step matching $FAKE_HANG writes "hang STEP PID" instead and sleeps until it
# is killed. debootstrap mounts proc in the new root while it works, as the real
# one does for its second stage (when run as root).
set -euo pipefail
dir=$1
mkdir -p "$dir/bin" "$dir/pool"
version=6.12.99

# ---------------------------------------------------------------- the packages

deb() { # name version tree
  mkdir -p "$3/DEBIAN"
  printf 'Package: %s\nVersion: %s\nArchitecture: amd64\nMaintainer: test <test@example.org>\nDescription: stand-in for %s\n' \
    "$1" "$2" "$1" >"$3/DEBIAN/control"
  dpkg-deb --root-owner-group -Zgzip --build "$3" "$dir/pool/${1}_${2}_amd64.deb" >/dev/null
  rm -rf "$3"
}
# A module: modinfo's fields, NUL-separated, are all the script reads of it.
module() { # file depends
  mkdir -p "$(dirname "$1")"
  printf 'name=%s\0depends=%s\0' "$(basename "${1%%.ko*}")" "$2" >"${1%.xz}"
  case "$1" in *.xz) xz -f "${1%.xz}" ;; esac
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# linux-image-6.12.99-FLAVOUR: vmlinuz, its config and the VFIO modules where
# Debian puts them; the generic amd64 flavour also has mdev and igb.
kernel_package() { # flavour
  local release=$version-$1 tree=$work/$1 m
  m=$tree/usr/lib/modules/$release/kernel
  mkdir -p "$tree/boot"
  echo "$1 vmlinuz $version" >"$tree/boot/vmlinuz-$release"
  echo "CONFIG_VFIO=m" >"$tree/boot/config-$release"
  module "$m/virt/lib/irqbypass.ko.xz" ""
  module "$m/drivers/vfio/vfio.ko.xz" ""
  module "$m/drivers/vfio/vfio_iommu_type1.ko.xz" vfio
  module "$m/drivers/vfio/pci/vfio-pci-core.ko.xz" vfio,irqbypass
  module "$m/drivers/vfio/pci/vfio-pci.ko.xz" vfio-pci-core,vfio
  if [ "$1" = amd64 ]; then
    module "$m/drivers/vfio/mdev/mdev.ko.xz" vfio
    module "$m/drivers/net/ethernet/intel/igb/igb.ko.xz" ""
  fi
  deb "linux-image-$release" "$version-1" "$tree"
}
kernel_package cloud-amd64
kernel_package amd64

release=$version-amd64
mkdir -p "$work/busybox/usr/bin"
printf '#!/bin/sh\necho busybox\n' >"$work/busybox/usr/bin/busybox"
deb busybox-static 1:1.37.0-1 "$work/busybox"
for name in "linux-headers-$release" "linux-headers-$version-common" "linux-kbuild-$version"; do
  mkdir -p "$work/$name/usr/src/$name"
  deb "$name" "$version-1" "$work/$name"
done
mkdir -p "$work/src/linux-source-6.12/samples/vfio-mdev" "$work/source/usr/src"
echo '/* mtty.c */' >"$work/src/linux-source-6.12/samples/vfio-mdev/mtty.c"
tar -C "$work/src" -cJf "$work/source/usr/src/linux-source-6.12.tar.xz" linux-source-6.12
deb linux-source-6.12 "$version-1" "$work/source"

# ---------------------------------------------------------------- the commands

# What every stand-in shares: the log and the steps.
cat >"$dir/bin/fake-step" <<'EOF'
# sourced: step NAME runs a stand-in step (see fake-debian.sh)
step() {
  echo "start $1 $$" >>"$FAKE_LOG"
  case "$1" in
    ${FAKE_HANG:-no-hang}) echo "hang $1 $$" >>"$FAKE_LOG"; exec sleep 600 ;;
  esac
  sleep "${FAKE_SECONDS:-0.2}"
  echo "end $1 $$" >>"$FAKE_LOG"
}
EOF

cat >"$dir/bin/debootstrap" <<'EOF'
#!/usr/bin/env bash
# debootstrap --variant=minbase SUITE TARGET MIRROR
set -euo pipefail
. "$(dirname "$0")/fake-step"
target=$3
mkdir -p "$target"/{dev,proc,sys,tmp,etc/apt/sources.list.d,etc/dpkg/dpkg.cfg.d,usr/bin,var/lib/apt/lists,var/cache/apt}
# The real one's working directory: a second debootstrap in the same target fails here.
mkdir "$target/debootstrap"
[ "$(id -u)" -ne 0 ] || mount -t proc proc "$target/proc"
step debootstrap
[ "$(id -u)" -ne 0 ] || umount "$target/proc"
rmdir "$target/debootstrap"
EOF

cat >"$dir/bin/chroot" <<'EOF'
#!/usr/bin/env bash
# chroot ROOT COMMAND...: runs COMMAND on the host, with the root's QEMU and the
# directory a `sh -c "cd DIR && ..."` goes to taken from ROOT.
set -euo pipefail
export FAKE_CHROOT=$1
shift
args=()
for arg in "$@"; do
  case "$arg" in
    /usr/bin/qemu-system-x86_64) arg=$FAKE_CHROOT$arg ;;
    "cd /"*) arg="cd $FAKE_CHROOT${arg#cd }" ;;
  esac
  args+=("$arg")
done
exec "${args[@]}"
EOF

cat >"$dir/bin/apt-get" <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
. "$(dirname "$0")/fake-step"
pool=$(dirname "$0")/../pool
command="" packages=() print=0
while [ $# -gt 0 ]; do
  case "$1" in
    -o | -t) shift ;;
    --print-uris) print=1 ;;
    -*) ;;
    *) if [ -z "$command" ]; then command=$1; else packages+=("$1"); fi ;;
  esac
  shift
done
case "$command" in
  update | clean) ;;
  install)
    [ "$print" = 0 ] || exit 0
    if [ -z "${FAKE_CHROOT:-}" ]; then
      echo "host apt-get install ${packages[*]}" >>"$FAKE_LOG"
    elif [[ " ${packages[*]} " == *" qemu-system-x86 "* ]]; then
      mkdir -p "$FAKE_CHROOT/usr/bin"
      cp "$(dirname "$0")/qemu" "$FAKE_CHROOT/usr/bin/qemu-system-x86_64"
    elif [[ " ${packages[*]} " == *" libvirt-daemon "* ]]; then
      step libvirt-install
      mkdir -p "$FAKE_CHROOT/usr/sbin"
      printf '#!/bin/sh\n' >"$FAKE_CHROOT/usr/sbin/libvirtd"
      chmod +x "$FAKE_CHROOT/usr/sbin/libvirtd"
    fi
    ;;
  download)
    case " ${packages[*]}" in
      *" linux-source-"*) step mtty-download ;;
      *-cloud-amd64*) step guest-download ;;
      *) step amd64-download ;;
    esac
    for package in "${packages[@]}"; do
      found=("$pool/${package%%=*}"_*.deb)
      [ -e "${found[0]}" ] || { echo "E: Unable to locate package ${package%%=*}" >&2; exit 100; }
      cp "${found[@]}" .
    done
    ;;
  *) echo "fake apt-get: unexpected $command" >&2; exit 100 ;;
esac
EOF

cat >"$dir/bin/apt-cache" <<EOF
#!/bin/sh
case "\$1 \$2" in
  "depends linux-image-cloud-amd64") printf 'linux-image-cloud-amd64\n  Depends: linux-image-$version-cloud-amd64\n' ;;
  "show linux-image-$version-amd64") printf 'Package: linux-image-$version-amd64\nVersion: $version-1\n' ;;
  *) echo "fake apt-cache: unexpected \$*" >&2; exit 100 ;;
esac
EOF

printf '#!/bin/sh\necho 1:10.1.0+ds-1~fake\n' >"$dir/bin/dpkg-query"

cat >"$dir/bin/make" <<'EOF'
#!/usr/bin/env bash
# make -C HEADERS M=/mtty ... modules, in the mtty build root
set -euo pipefail
. "$(dirname "$0")/fake-step"
step mtty-make
for arg in "$@"; do
  case "$arg" in M=*) printf 'name=mtty\0depends=mdev\0' >"$FAKE_CHROOT${arg#M=}/mtty.ko" ;; esac
done
EOF

cat >"$dir/bin/qemu" <<'EOF'
#!/bin/sh
case " $* " in
  *" --version "*) echo "QEMU emulator version 10.1.0 (Debian 1:10.1.0+ds-1~fake)" ;;
  *" -qtest stdio "*) read -r _; echo OK; read -r _; echo "OK 0x29c08086"; exec sleep 600 ;;
  *) echo "fake qemu booted: $*" ;;
esac
EOF
chmod 0755 "$dir"/bin/*
