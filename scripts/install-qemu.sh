#!/usr/bin/env bash
# Gets everything the QEMU interop tests need, and nothing else:
#
#   * a QEMU with the vfio-user client (`-device vfio-user-pci`, QEMU 10.1 or later).
#     A host QEMU that is new enough is used as it is. Otherwise (Debian 12 ships
#     7.2) a minimal Debian 13 root is bootstrapped under the cache directory and
#     qemu-system-x86 is installed in it from trixie-backports; a wrapper runs it
#     in a private mount namespace + chroot. The host's glibc, packages and apt
#     sources are left alone.
#   * a guest kernel, its VFIO modules and a static busybox, from Debian's
#     packages, for the tests that boot a Linux guest with the VF attached (the
#     tests build the initramfs); gcc and libc6-dev if missing, for the static
#     program the vIOMMU guest runs;
#   * virt-xml-validate (libvirt-clients) and systemd-analyze, which check the
#     libvirt and systemd examples;
#   * libvirt 12.9 in a copy of the Debian 13 root, for the test that starts the
#     libvirt example under a real daemon (scripts/libvirt.sh runs it; about 17 MB).
#
# Idempotent and cached: a second run only checks what is there (well under a
# second). Safe to run twice at once: a run holds a lock on $XE_VFU_CACHE/.lock
# (flock) for all its work, and another run says that it waits for it, then finds
# the finished cache. Each part is made under a staging name (qemu/root.partial,
# guest/download*, mtty-build, *.new), renamed into place and then marked
# .complete; what a killed run left half-made is removed by the next run, which
# makes that part again. The lock goes when the run and all it started have ended.
# Everything lives in one directory, /opt/xe-vfio-user by default:
#
#   qemu/root/                  the Debian 13 root (only when the host QEMU is too old)
#   qemu/bin/qemu-system-x86_64 the wrapper (only then)
#   guest/vmlinuz, guest/busybox
#   guest/modules/*.ko          the VFIO modules of that kernel, decompressed
#   guest/amd64/vmlinuz         the generic amd64 flavour of the same kernel version (it has
#   guest/amd64/modules/*.ko    igb, which the cloud flavour lacks), igb and the VFIO modules
#                               with their dependencies, and modules/order (insmod order)
#   guest/amd64/extra/mdev.ko   mdev.ko of that package, for the mtty build (not inserted there)
#   guest/mtty/mtty.ko, mdev.ko the Linux sample mdev driver mtty, built for that kernel from its
#                               linux-source, and mdev.ko from the amd64 package
#   libvirt/root/               the Debian 13 root again, with libvirt added (only with qemu/root)
#   env                         XE_VFU_QEMU=... and friends, for scripts/test.sh and the tests
#
# Usage: scripts/install-qemu.sh [--force] [--guest-only] | --env
#   --guest-only  only what scripts/guest.sh needs: QEMU, the cloud guest kernel (vmlinuz,
#                 its VFIO modules) and busybox, about 127 MB the first time (everything:
#                 about 460 MB). The SR-IOV guest's kernel, the mtty build and the example
#                 checkers are left for a run without it (scripts/test.sh)
#   --force       remove what is installed in the cache and install again
#   --env         print the env file of a finished install and exit (nothing is installed)
#
# Environment: XE_VFU_CACHE (cache directory), XE_VFU_MIRROR (Debian mirror; default
# the one in the host's apt sources), XE_VFU_QEMU (use this QEMU, skip the lookup),
# XE_VFU_QEMU_SUITE (trixie-backports, or sid), XE_VFU_NO_HOST_QEMU=1 (ignore a host QEMU).
#
# The wrapper shares these host directories with QEMU at the same paths: /tmp, the
# directory it is started from, the guest cache ($XE_VFU_CACHE/guest), and any
# listed in XE_VFU_QEMU_SHARE (colon-separated).
# Sockets, kernels and files passed to QEMU must live under one of them.
set -euo pipefail

CACHE=${XE_VFU_CACHE:-/opt/xe-vfio-user}
SUITE=${XE_VFU_QEMU_SUITE:-trixie-backports}
MIN_QEMU=10.1
QROOT=$CACHE/qemu/root
WRAPPER=$CACHE/qemu/bin/qemu-system-x86_64
LROOT=$CACHE/libvirt/root
GUEST=$CACHE/guest
ENVFILE=$CACHE/env

say() { printf '[install-qemu] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

force=0 guest_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --guest-only) guest_only=1 ;;
    --env) [ -f "$ENVFILE" ] || die "nothing installed yet in $CACHE; run $0"; cat "$ENVFILE"; exit 0 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--force] [--guest-only] | --env" >&2; exit 2 ;;
  esac
  shift
done

started=$(date +%s.%N)
# Bytes received by the machine, to report what a step really downloaded.
rx_bytes() { awk 'NR > 2 && $1 != "lo:" { sum += $2 } END { printf "%d\n", sum }' /proc/net/dev; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
rx_start=$(rx_bytes)

is_root() { [ "$(id -u)" -eq 0 ]; }
as_root() {
  if is_root; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) for: $*"; fi
}

# "X.Y.Z" of `$1 --version`, or nothing.
qemu_version() { { "$1" --version 2>/dev/null || true; } | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1; }
version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
has_vfio_user() { "$1" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; }

# Reads the q35 host bridge id over qtest (CF8/CFC) with no guest code: proves the
# binary runs, and through the wrapper that the namespace and chroot work.
smoke_test() {
  local qemu=$1 out pid reply
  out=$(mktemp /tmp/xe-vfu-smoke.XXXXXX)
  # QEMU keeps running after the qtest stream ends, so it is stopped by PID.
  printf 'outl 0xcf8 0x80000000\ninl 0xcfc\n' |
    "$qemu" -machine q35 -accel qtest -qtest stdio -qtest-log none -display none -nodefaults -m 64M \
      >"$out" 2>/dev/null &
  pid=$!
  for _ in $(seq 300); do [ "$(wc -l <"$out")" -ge 2 ] && break; sleep 0.05; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  reply=$(head -n2 "$out" | tr '\n' ' ')
  rm -f "$out"
  [ "$reply" = "OK OK 0x29c08086 " ] || { say "qtest smoke test of $qemu failed (got '$reply')"; return 1; }
}

host_mirror() {
  [ -n "${XE_VFU_MIRROR:-}" ] && { echo "$XE_VFU_MIRROR"; return; }
  local file
  for file in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$file" ] || continue
    # deb822 "URIs: http://.../debian" or one-line "deb [opts] http://.../debian suite ..."
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }
         /^deb[ \t]/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; break } }' "$file"
  done | sed 's:/*$::' | grep -E '/debian$' | head -n1
}

# ---------------------------------------------------------------- the cache: lock, staging, leftovers

LOCK=$CACHE/.lock
# Holds the cache for this run: a second run waits here until the first is done.
# The lock is on the open file (fd 9, inherited by what the run starts), so a
# run that dies, killed or not, never leaves it behind. The holder's PID is the
# file's first line.
lock_cache() {
  { exec 9<>"$LOCK"; } 2>/dev/null || die "cannot create $LOCK (set XE_VFU_CACHE, or run as root)"
  if ! flock -n 9; then
    local holder
    holder=$(head -n1 "$LOCK" 2>/dev/null | tr -cd 0-9)
    say "waiting for another install-qemu.sh (pid ${holder:-unknown}) to finish with $CACHE ..."
    flock 9
    say "        the other run has finished; checking what it installed"
  fi
  printf '%s\n' "$$" >&9
}

# rm -rf for what a run stages: first unmounts what a killed debootstrap left
# mounted inside (its proc and sys), and never crosses into another file system.
remove_tree() {
  local path=$1 real mount
  [ -e "$path" ] || [ -L "$path" ] || return 0
  real=$(realpath -m "$path")
  findmnt -rn -o TARGET | awk -v p="$real/" 'index($0 "/", p) == 1' | sort -r |
    while read -r mount; do umount -l "$mount" || die "cannot unmount $mount, left mounted by an interrupted run"; done
  rm -rf --one-file-system "$path"
}

# Removes $1 by renaming it aside first (to a .trash.* name that the next run
# removes if this one is killed meanwhile), so that $1 is never seen half-deleted.
discard() {
  [ -e "$1" ] || return 0
  local trash=$CACHE/.trash.${1##*/}.$$
  mv "$1" "$trash"
  remove_tree "$trash"
}

# Puts the finished staging directory $1 in the place of $2.
replace_dir() {
  discard "$2"
  mv "$1" "$2"
}

# What a run killed midway leaves: staging names only, whose part has no
# .complete marker yet (it is made again) or was complete before they were
# cleaned up. Under the lock no other run is using them.
remove_leftovers() {
  local path found=()
  for path in "$CACHE"/qemu/root.partial "$CACHE"/qemu/*.new "$CACHE"/qemu/bin/*.new \
    "$QROOT"/var/cache/xe-vfio-user-download "$GUEST"/download "$GUEST"/download-* "$GUEST"/*.new \
    "$CACHE"/mtty-build "$CACHE"/libvirt/root.partial "$ENVFILE".new "$CACHE"/.trash.*; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    found+=("${path#"$CACHE"/}")
    remove_tree "$path"
  done
  [ ${#found[@]} -eq 0 ] || say "removed what an interrupted run left: ${found[*]}"
}

# ---------------------------------------------------------------- QEMU

write_wrapper() {
  mkdir -p "$(dirname "$WRAPPER")"
  cat >"$WRAPPER.new" <<'WRAPPER_EOF'
#!/usr/bin/env bash
# QEMU from the Debian 13 root that scripts/install-qemu.sh installed. Runs it in a
# private mount namespace, chrooted, with /proc, /dev, /sys and the shared
# directories (/tmp, the current directory, the guest cache with the kernel that
# scripts/guest.sh boots, $XE_VFU_QEMU_SHARE) at their host paths.
# Each stage exec()s the next, so this script's PID is QEMU's PID.
set -euo pipefail
root=@QROOT@
if [ "${XE_VFU_WRAPPER_STAGE:-}" != inside ]; then
  ns=(--mount --propagation private)
  [ "$(id -u)" -eq 0 ] || ns=(--user --map-root-user "${ns[@]}")
  XE_VFU_WRAPPER_STAGE=inside exec unshare "${ns[@]}" -- "$(readlink -f "$0")" "$@"
fi
unset XE_VFU_WRAPPER_STAGE
for dir in /proc /dev /sys; do mount --rbind "$dir" "$root$dir"; done
IFS=: read -r -a extra <<<"${XE_VFU_QEMU_SHARE:-}"
cwd=$PWD
for dir in /tmp "$cwd" @GUEST@ "${extra[@]}"; do
  case "$dir" in
    "" | / | /proc | /proc/* | /dev | /dev/* | /sys | /sys/*) continue ;;
    /*) ;;
    *) echo "qemu wrapper: shared directories must be absolute: $dir" >&2; exit 2 ;;
  esac
  [ -d "$dir" ] || continue
  [ "$(stat -c %d:%i "$dir")" = "$(stat -c %d:%i "$root$dir" 2>/dev/null)" ] && continue  # already there
  mkdir -p "$root$dir"
  mount --bind "$dir" "$root$dir"
done
[ -d "$root$cwd" ] || cwd=/
exec chroot "$root" /usr/bin/env --chdir="$cwd" /usr/bin/qemu-system-x86_64 "$@"
WRAPPER_EOF
  sed -i -e "s#@QROOT@#$QROOT#" -e "s#@GUEST@#$GUEST#" "$WRAPPER.new"
  chmod 0755 "$WRAPPER.new"
  mv -f "$WRAPPER.new" "$WRAPPER"
}

install_qemu_root() {
  is_root || die "installing QEMU into $QROOT needs root (debootstrap, chroot)"
  [ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported"
  local mirror base
  mirror=$(host_mirror)
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt; set XE_VFU_MIRROR"
  case "$SUITE" in
    trixie-backports) base=trixie ;;
    sid) base=sid ;;
    *) die "XE_VFU_QEMU_SUITE must be trixie-backports or sid" ;;
  esac
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap on the host from Debian 12 (about 0.1 MB)"
    # 9>&-: nothing the host's dpkg starts keeps this script's lock.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends debootstrap >/dev/null 9>&- ||
      { apt-get -o DPkg::Lock::Timeout=300 update -qq 9>&- &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends debootstrap >/dev/null 9>&-; }
  fi
  rm -f "$CACHE/qemu/.complete"
  local staging=$CACHE/qemu/root.partial rx
  remove_tree "$staging"
  mkdir -p "$staging"
  say "step 1/2: bootstrapping a minimal Debian 13 ($base) root into $QROOT from $mirror (downloads about 40 MB)"
  rx=$(rx_bytes)
  debootstrap --variant=minbase "$base" "$staging" "$mirror" >"$CACHE/qemu/debootstrap.log" 2>&1 ||
    { tail -n 20 "$CACHE/qemu/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/qemu/debootstrap.log)"; }
  say "        done, $(mb $(($(rx_bytes) - rx))) received"
  # Only the chroot's apt is configured; the host's /etc/apt is not touched.
  [ "$SUITE" = trixie-backports ] && echo "deb $mirror trixie-backports main" >"$staging/etc/apt/sources.list.d/backports.list"
  cat >"$staging/etc/dpkg/dpkg.cfg.d/xe-vfio-user-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/doc/*/copyright
EOF
  local target=()
  [ "$SUITE" = trixie-backports ] && target=(-t trixie-backports)
  in_root() { chroot "$staging" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
  in_root apt-get update -qq >>"$CACHE/qemu/apt.log" 2>&1 || { tail -n 20 "$CACHE/qemu/apt.log" >&2; die "apt-get update in the root failed"; }
  local bytes
  bytes=$(in_root apt-get install --print-uris -qq --no-install-recommends "${target[@]}" qemu-system-x86 | awk '{ s += $3 } END { print s + 0 }')
  say "step 2/2: installing qemu-system-x86 from $SUITE inside the root ($(mb "$bytes") of packages)"
  rx=$(rx_bytes)
  in_root apt-get install -y -qq --no-install-recommends "${target[@]}" qemu-system-x86 >>"$CACHE/qemu/apt.log" 2>&1 ||
    { tail -n 20 "$CACHE/qemu/apt.log" >&2; die "installing qemu-system-x86 failed (log: $CACHE/qemu/apt.log)"; }
  in_root apt-get clean
  rm -rf "$staging"/var/lib/apt/lists/* "$staging"/var/cache/apt/*.bin "$staging"/usr/share/doc/* "$staging"/usr/share/man/* "$staging"/usr/share/locale/*
  say "        done, $(mb $(($(rx_bytes) - rx))) received"
  local version
  version=$(qemu_version "$staging/usr/bin/qemu-system-x86_64" 2>/dev/null || true)
  [ -n "$version" ] || version=$(chroot "$staging" /usr/bin/qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p')
  version_at_least "$version" "$MIN_QEMU" || die "$SUITE has QEMU $version, older than $MIN_QEMU"
  chroot "$staging" dpkg-query -W -f='${Version}\n' qemu-system-x86 >"$CACHE/qemu/package-version.new"
  replace_dir "$staging" "$QROOT"
  write_wrapper
  mv -f "$CACHE/qemu/package-version.new" "$CACHE/qemu/package-version"
  touch "$CACHE/qemu/.complete"
}

# Decides which QEMU the tests use; sets QEMU and QEMU_KIND.
find_qemu() {
  local candidate version
  if [ -n "${XE_VFU_QEMU:-}" ]; then
    version=$(qemu_version "$XE_VFU_QEMU")
    [ -n "$version" ] && version_at_least "$version" "$MIN_QEMU" && has_vfio_user "$XE_VFU_QEMU" ||
      die "XE_VFU_QEMU=$XE_VFU_QEMU is not a QEMU >= $MIN_QEMU with vfio-user-pci"
    QEMU=$XE_VFU_QEMU QEMU_KIND="given by XE_VFU_QEMU"
    return
  fi
  if [ -z "${XE_VFU_NO_HOST_QEMU:-}" ] && candidate=$(command -v qemu-system-x86_64); then
    version=$(qemu_version "$candidate")
    if [ -n "$version" ] && version_at_least "$version" "$MIN_QEMU" && has_vfio_user "$candidate"; then
      QEMU=$candidate QEMU_KIND="the host's own"
      return
    fi
    say "the host's $candidate is QEMU ${version:-?}: too old for vfio-user-pci (needs $MIN_QEMU), not using it"
  fi
  if [ -f "$CACHE/qemu/.complete" ] && [ -x "$QROOT/usr/bin/qemu-system-x86_64" ]; then
    write_wrapper  # cheap, and keeps the wrapper in step with this script
    QEMU=$WRAPPER QEMU_KIND="cached, Debian $(cat "$CACHE/qemu/package-version")"
    return
  fi
  install_qemu_root
  QEMU=$WRAPPER QEMU_KIND="just installed, Debian $(cat "$CACHE/qemu/package-version")"
}

# ---------------------------------------------------------------- guest kernel and busybox

# Downloads Debian packages into $2 with apt-get download, from the QEMU root's apt
# when there is one (Debian 13), else the host's (never installing anything).
apt_download() {
  local into=$1; shift
  if [ -f "$CACHE/qemu/.complete" ] && [ "$QEMU" = "$WRAPPER" ]; then
    local spool=/var/cache/xe-vfio-user-download
    rm -rf "${QROOT:?}$spool" && mkdir -p "$QROOT$spool"
    chroot "$QROOT" sh -c "cd $spool && apt-get download -qq $*" >>"$CACHE/guest/apt.log" 2>&1 ||
      { tail -n 20 "$CACHE/guest/apt.log" >&2; return 1; }
    mv "$QROOT$spool"/*.deb "$into"/ && rm -rf "${QROOT:?}$spool"
  else
    (cd "$into" && { apt-get download -qq "$@" 2>/dev/null || { as_root apt-get update -qq && apt-get download -qq "$@"; }; }) >>"$CACHE/guest/apt.log" 2>&1 ||
      { tail -n 20 "$CACHE/guest/apt.log" >&2; return 1; }
  fi
}

# The vIOMMU guest binds the VF to vfio-pci: these modules, inserted in this order.
GUEST_MODULES=(irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci)

install_guest() {
  if [ -f "$GUEST/.complete" ] && [ -s "$GUEST/vmlinuz" ] && [ -x "$GUEST/busybox" ] &&
    [ -f "$GUEST/modules/.complete" ]; then return; fi
  mkdir -p "$GUEST"
  rm -f "$GUEST/.complete"
  local work=$GUEST/download rx kernel
  rm -rf "$work" && mkdir -p "$work"
  # Resolve the cloud kernel meta-package to its image package. PCI, the serial
  # console, devtmpfs, /dev/mem and intel-iommu are built in; VFIO is modules,
  # taken from the same package so they match vmlinuz exactly.
  if [ -f "$CACHE/qemu/.complete" ] && [ "$QEMU" = "$WRAPPER" ]; then
    chroot "$QROOT" apt-get update -qq >>"$GUEST/apt.log" 2>&1
    kernel=$(chroot "$QROOT" apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  else
    kernel=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$kernel" ] || die "cannot resolve linux-image-cloud-amd64 (apt lists missing? run apt-get update)"
  say "guest for the boot tests: downloading $kernel and busybox-static from Debian (about 36 MB; only vmlinuz, busybox and ${#GUEST_MODULES[@]} VFIO modules are kept)"
  rx=$(rx_bytes)
  apt_download "$work" "$kernel" busybox-static || die "downloading the guest packages failed (log: $GUEST/apt.log)"
  local deb
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
  cp "$(ls "$work"/x/boot/vmlinuz-* | head -n1)" "$GUEST/vmlinuz.new"
  cp "$(ls "$work"/x/boot/config-* | head -n1)" "$GUEST/kernel-config.new"
  cp "$(ls "$work"/x/usr/bin/busybox "$work"/x/bin/busybox 2>/dev/null | head -n1)" "$GUEST/busybox.new"
  chmod 0644 "$GUEST/vmlinuz.new" && chmod 0755 "$GUEST/busybox.new"
  # Busybox insmod takes plain .ko files: decompress the kernel's .ko.xz here.
  command -v xz >/dev/null 2>&1 || die "xz (xz-utils) is needed to decompress the guest's modules"
  rm -rf "$GUEST/modules.new" && mkdir -p "$GUEST/modules.new"
  local module file
  for module in "${GUEST_MODULES[@]}"; do
    file=$(find "$work/x" -path '*/modules/*' \( -name "$module.ko" -o -name "$module.ko.xz" \) | head -n1)
    [ -n "$file" ] || die "$kernel has no $module module"
    case "$file" in
      *.xz) xz -dc "$file" >"$GUEST/modules.new/$module.ko" ;;
      *) cp "$file" "$GUEST/modules.new/$module.ko" ;;
    esac
  done
  touch "$GUEST/modules.new/.complete"
  echo "$kernel" >"$GUEST/kernel-package.new"
  local file
  for file in vmlinuz busybox kernel-config kernel-package; do mv -f "$GUEST/$file.new" "$GUEST/$file"; done
  replace_dir "$GUEST/modules.new" "$GUEST/modules"
  rm -rf "$work"
  touch "$GUEST/.complete"
  say "        done, $(mb $(($(rx_bytes) - rx))) received"
}

# The SR-IOV guest test: QEMU's igb (a PF with igbvf VFs) needs the igb driver,
# which only the generic amd64 flavour has. Same version as the cloud kernel;
# only vmlinuz and igb + VFIO (with what they depend on) are kept.
# vfio_iommu_type1 is no dependency of vfio-pci (VFIO requests it when a container is set up).
IGB_MODULES=(igb vfio-pci vfio_iommu_type1)

install_guest_amd64() {
  local dir=$GUEST/amd64
  if [ -f "$dir/.complete" ] && [ -s "$dir/vmlinuz" ] && [ -s "$dir/modules/order" ]; then return; fi
  local cloud kernel work rx
  cloud=$(cat "$GUEST/kernel-package")
  kernel=${cloud%-cloud-amd64}-amd64
  [ "$kernel" != "$cloud" ] || die "unexpected cloud kernel package name $cloud"
  work=$GUEST/download-amd64
  rm -rf "$work" && mkdir -p "$work"
  say "SR-IOV guest: downloading $kernel from Debian (about 109 MB; only vmlinuz and igb + VFIO modules are kept)"
  rx=$(rx_bytes)
  # The package indexes are still there when the cloud kernel was fetched in this run.
  if [ -f "$CACHE/qemu/.complete" ] && [ "$QEMU" = "$WRAPPER" ] &&
    ! ls "$QROOT"/var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    chroot "$QROOT" apt-get update -qq >>"$GUEST/apt.log" 2>&1
  fi
  apt_download "$work" "$kernel" || die "downloading $kernel failed (log: $GUEST/apt.log)"
  local deb=("$work"/*.deb)
  # The package has no modules.dep (depmod makes it on install): each module's
  # dependencies come from its own modinfo "depends=" field.
  dpkg-deb --fsys-tarfile "${deb[0]}" >"$work/data.tar" && rm -f "${deb[@]}"
  tar -tf "$work/data.tar" | grep -E '/modules/[^/]+/kernel/.*\.ko(\.xz)?$' >"$work/index"
  tar -xf "$work/data.tar" -C "$work" --wildcards './boot/vmlinuz-*'
  local order=() wanted=() seen=" " name
  resolve() {  # $1: a module name; "-" and "_" are the same
    local m=${1//-/_} path file deps dep
    case "$seen" in *" $m "*) return ;; esac
    seen+="$m "
    path=$(awk -v m="$m" '{ n = $0; sub(/.*\//, "", n); sub(/\.ko(\.xz)?$/, "", n); gsub(/-/, "_", n); if (n == m) { print; exit } }' "$work/index")
    [ -n "$path" ] || die "$kernel has no $m module"
    tar -xf "$work/data.tar" -C "$work" "$path"
    file=$work/${path#./}
    case "$file" in
      *.xz) xz -dc "$file" >"$file.ko" ;;
      *) cp "$file" "$file.ko" ;;
    esac
    deps=$(tr '\0' '\n' <"$file.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do resolve "$dep"; done
    order+=("$m") wanted+=("$file.ko")
  }
  for name in "${IGB_MODULES[@]}"; do resolve "$name"; done
  # mdev.ko is for the mtty guest (install_guest_mtty), not inserted here:
  # kept beside the modules, outside their insmod order, so that the mtty
  # build need not download this package again.
  local mdev
  mdev=$(grep -E '/kernel/drivers/vfio/mdev/mdev\.ko(\.xz)?$' "$work/index" | head -n1)
  rm -rf "$dir.new" && mkdir -p "$dir.new/modules"
  if [ -n "$mdev" ]; then
    mkdir -p "$dir.new/extra"
    tar -xf "$work/data.tar" -C "$work" "$mdev"
    case "$mdev" in
      *.xz) xz -dc "$work/${mdev#./}" >"$dir.new/extra/mdev.ko" ;;
      *) cp "$work/${mdev#./}" "$dir.new/extra/mdev.ko" ;;
    esac
  fi
  cp "$(ls "$work"/boot/vmlinuz-* | head -n1)" "$dir.new/vmlinuz" && chmod 0644 "$dir.new/vmlinuz"
  local i
  for i in "${!order[@]}"; do mv "${wanted[$i]}" "$dir.new/modules/${order[$i]}.ko"; done
  printf '%s\n' "${order[@]}" >"$dir.new/modules/order"
  echo "$kernel" >"$dir.new/kernel-package"
  touch "$dir.new/.complete"
  replace_dir "$dir.new" "$dir"
  rm -rf "$work"
  say "        done, $(mb $(($(rx_bytes) - rx))) received"
}

# The kernel-migration guest test: the Linux sample driver mtty (an mdev with
# VFIO migration: STOP_COPY, P2P, PRE_COPY), which Debian does not ship
# (CONFIG_SAMPLES is off). It is built as an out-of-tree module from the
# samples/vfio-mdev/mtty.c of the guest kernel's own version (linux-source),
# against that version's headers, with the gcc Debian built the kernel with,
# in a throw-away copy of the Debian 13 root; mdev.ko comes from the generic
# amd64 kernel package. Only mtty.ko, mdev.ko and mtty.c (for reference) are kept.
install_guest_mtty() {
  local dir=$GUEST/mtty
  if [ -f "$dir/.complete" ] && [ -s "$dir/mtty.ko" ] && [ -s "$dir/mdev.ko" ]; then return; fi
  if ! { [ -f "$CACHE/qemu/.complete" ] && [ "$QEMU" = "$WRAPPER" ]; }; then
    say "mtty guest: skipped (building mtty.ko needs the Debian 13 root this script makes when the host QEMU is too old)"
    return
  fi
  local cloud kernel release version series build rx
  cloud=$(cat "$GUEST/kernel-package")
  kernel=${cloud%-cloud-amd64}-amd64
  release=${kernel#linux-image-}
  build=$CACHE/mtty-build
  rm -rf "$build" "$dir.new" && mkdir -p "$dir.new"
  say "mtty guest: building the mtty sample module for $release (downloads gcc-14, the kernel headers and linux-source, about 225 MB; only mtty.ko and mdev.ko are kept)"
  rx=$(rx_bytes)
  cp -a "$QROOT" "$build"
  trap 'rm -rf "${build:?}"' EXIT
  chroot "$build" apt-get update -qq >>"$GUEST/apt.log" 2>&1 || die "apt-get update in the mtty build root failed (log: $GUEST/apt.log)"
  version=$(chroot "$build" apt-cache show "$kernel" | awk '/^Version:/ { print $2; exit }')
  series=$(echo "$release" | cut -d. -f1,2)
  [ -n "$version" ] || die "cannot find $kernel's version"
  # The root has QEMU from backports, whose libelf is newer than trixie's.
  DEBIAN_FRONTEND=noninteractive chroot "$build" apt-get install -y -qq --no-install-recommends \
    -t "$SUITE" gcc-14 make libelf1t64 >>"$GUEST/apt.log" 2>&1 ||
    die "installing gcc-14 in the mtty build root failed (log: $GUEST/apt.log)"
  local spool=/var/cache/mtty-download
  mkdir -p "$build$spool"
  # mdev.ko comes from the amd64 package, which install_guest_amd64 already
  # unpacked when it ran on this machine with this version (kept in extra/).
  local amd64_mdev=$GUEST/amd64/extra/mdev.ko image=$kernel
  if [ -s "$amd64_mdev" ] && [ "$(cat "$GUEST/amd64/kernel-package" 2>/dev/null)" = "$kernel" ]; then image=; fi
  chroot "$build" sh -c "cd $spool && apt-get download -qq linux-headers-$release linux-headers-${release%-amd64}-common linux-kbuild-${release%-amd64} linux-source-$series=$version $image" >>"$GUEST/apt.log" 2>&1 ||
    die "downloading the headers, linux-source-$series=$version and $kernel failed (log: $GUEST/apt.log)"
  local deb
  for deb in "$build$spool"/linux-headers-*.deb "$build$spool"/linux-kbuild-*.deb; do dpkg-deb -x "$deb" "$build"; done
  mkdir -p "$build/mtty"
  dpkg-deb --fsys-tarfile "$build$spool"/linux-source-*.deb | tar -xO --wildcards '*.tar.xz' |
    xz -dc | tar -x -O --wildcards '*/samples/vfio-mdev/mtty.c' >"$build/mtty/mtty.c"
  [ -s "$build/mtty/mtty.c" ] || die "linux-source-$series has no samples/vfio-mdev/mtty.c"
  echo 'obj-m := mtty.o' >"$build/mtty/Kbuild"
  # BTF for the module needs pahole and the kernel's vmlinux; neither is wanted here.
  chroot "$build" make -C "/usr/src/linux-headers-$release" M=/mtty CC=gcc-14 \
    CONFIG_DEBUG_INFO_BTF_MODULES= modules >>"$GUEST/mtty-build.log" 2>&1 ||
    { tail -n 20 "$GUEST/mtty-build.log" >&2; die "building mtty.ko failed (log: $GUEST/mtty-build.log)"; }
  cp "$build/mtty/mtty.ko" "$build/mtty/mtty.c" "$dir.new/"
  if [ -z "$image" ]; then
    cp "$amd64_mdev" "$dir.new/mdev.ko.raw"
  else
    dpkg-deb --fsys-tarfile "$build$spool"/"$kernel"_*.deb |
      tar -x -O --wildcards '*/kernel/drivers/vfio/mdev/mdev.ko*' >"$dir.new/mdev.ko.raw"
  fi
  case "$(head -c 6 "$dir.new/mdev.ko.raw" | od -An -tx1 | tr -d ' ')" in
    fd377a585a00) xz -dc "$dir.new/mdev.ko.raw" >"$dir.new/mdev.ko" ;;
    *) mv "$dir.new/mdev.ko.raw" "$dir.new/mdev.ko" ;;
  esac
  rm -f "$dir.new/mdev.ko.raw"
  [ -s "$dir.new/mdev.ko" ] || die "$kernel has no mdev module"
  echo "$kernel" >"$dir.new/kernel-package"
  touch "$dir.new/.complete"
  replace_dir "$dir.new" "$dir"
  rm -rf "$build"
  trap - EXIT
  say "        done, $(mb $(($(rx_bytes) - rx))) received"
}

# The root's apt lists and caches are only needed while downloading.
clean_root_apt() {
  if [ -d "$QROOT/var/lib/apt/lists" ]; then
    rm -rf "$QROOT"/var/lib/apt/lists/* "$QROOT"/var/cache/apt/*.bin
  fi
}

# ---------------------------------------------------------------- libvirt

# A real libvirt daemon for the test that runs the libvirt example (scripts/libvirt.sh
# runs it): libvirt 12.9 from $SUITE, installed in a copy of the QEMU root so that it
# starts that QEMU. Debian 12's libvirt 9.0 is too old for QEMU 11.1 (`virsh save`
# fails: its migrate command has no 'detach'), and trixie's 11.3 restores from a file
# only with --bypass-cache; 12.9 saves and restores as is. A copy, not the QEMU root
# itself, so that a run killed while installing never leaves that root half-changed;
# made again when the QEMU package it was copied with changes.
install_libvirt() {
  local dir=$CACHE/libvirt qemu_package
  qemu_package=$(cat "$CACHE/qemu/package-version" 2>/dev/null || true)
  if [ -f "$dir/.complete" ] && [ -x "$LROOT/usr/sbin/libvirtd" ] &&
    [ "$(cat "$dir/qemu-package-version" 2>/dev/null)" = "$qemu_package" ]; then return; fi
  if ! { [ -f "$CACHE/qemu/.complete" ] && [ "$QEMU" = "$WRAPPER" ]; }; then
    say "libvirt: skipped (it is installed beside the Debian 13 root's QEMU, which this host does without)"
    return
  fi
  rm -f "$dir/.complete"
  local staging=$dir/root.partial rx bytes target=()
  [ "$SUITE" = trixie-backports ] && target=(-t trixie-backports)
  mkdir -p "$dir"
  remove_tree "$staging"
  cp -a "$QROOT" "$staging"
  in_lroot() { chroot "$staging" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
  in_lroot apt-get update -qq >>"$dir/apt.log" 2>&1 || { tail -n 20 "$dir/apt.log" >&2; die "apt-get update in the libvirt root failed (log: $dir/apt.log)"; }
  local packages=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
  bytes=$(in_lroot apt-get install --print-uris -qq --no-install-recommends "${target[@]}" "${packages[@]}" | awk '{ s += $3 } END { print s + 0 }')
  say "libvirt: installing libvirt from $SUITE in a copy of the QEMU root, for the libvirt test ($(mb "$bytes") of packages)"
  rx=$(rx_bytes)
  in_lroot apt-get install -y -qq --no-install-recommends "${target[@]}" "${packages[@]}" >>"$dir/apt.log" 2>&1 ||
    { tail -n 20 "$dir/apt.log" >&2; die "installing libvirt failed (log: $dir/apt.log)"; }
  [ -x "$staging/usr/sbin/libvirtd" ] || die "libvirt's packages installed no /usr/sbin/libvirtd (log: $dir/apt.log)"
  in_lroot apt-get clean
  rm -rf "$staging"/var/lib/apt/lists/* "$staging"/var/cache/apt/*.bin
  say "        done, $(mb $(($(rx_bytes) - rx))) received"
  replace_dir "$staging" "$LROOT"
  printf '%s\n' "$qemu_package" >"$dir/qemu-package-version"
  touch "$dir/.complete"
}

# ---------------------------------------------------------------- example checkers

install_checkers() {
  local need=()
  command -v virt-xml-validate >/dev/null 2>&1 || need+=(libvirt-clients)
  command -v xmllint >/dev/null 2>&1 || need+=(libxml2-utils)  # virt-xml-validate runs it
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  command -v groff >/dev/null 2>&1 || need+=(groff-base)  # InstallTests checks the man pages with it
  # The vIOMMU guest's test program is built on the host with gcc -static.
  command -v gcc >/dev/null 2>&1 || need+=(gcc)
  [ -f "/usr/lib/$(uname -m)-linux-gnu/libc.a" ] || need+=(libc6-dev)
  [ ${#need[@]} -eq 0 ] && return
  local bytes
  bytes=$(apt-get install --print-uris -qq --no-install-recommends "${need[@]}" 2>/dev/null | awk '{ s += $3 } END { print s + 0 }')
  say "installing ${need[*]} from Debian 12 for the example checks and the guest program (virt-xml-validate, xmllint, systemd-analyze, gcc -static; $(mb "$bytes"))"
  export DEBIAN_FRONTEND=noninteractive
  # 9>&-: nothing the host's dpkg starts (a daemon) keeps this script's lock.
  as_root apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 9>&- ||
    { as_root apt-get -o DPkg::Lock::Timeout=300 update -qq 9>&- &&
      as_root apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null 9>&-; } ||
    die "installing ${need[*]} failed"
}

# ---------------------------------------------------------------- main

mkdir -p "$CACHE" 2>/dev/null || die "cannot create $CACHE (set XE_VFU_CACHE, or run as root)"
lock_cache
remove_leftovers
if [ "$force" = 1 ]; then
  say "--force: removing what is installed in $CACHE"
  for part in qemu guest libvirt env; do discard "$CACHE/$part"; done
fi

find_qemu
smoke_test "$QEMU" || die "the QEMU at $QEMU does not run"
version=$(qemu_version "$QEMU")
say "QEMU $version with vfio-user-pci: $QEMU ($QEMU_KIND)"
install_guest
if [ "$guest_only" = 0 ]; then
  install_guest_amd64
  install_guest_mtty
  install_libvirt
fi
clean_root_apt
if [ "$guest_only" = 0 ]; then
  install_checkers
else
  say "--guest-only: the SR-IOV and mtty guests and the example checkers are left for a full run (scripts/test.sh)"
fi

cat >"$ENVFILE.new" <<EOF
XE_VFU_QEMU=$QEMU
XE_VFU_QEMU_VERSION=$version
XE_VFU_GUEST_KERNEL=$GUEST/vmlinuz
XE_VFU_GUEST_BUSYBOX=$GUEST/busybox
XE_VFU_GUEST_MODULES=$GUEST/modules
XE_VFU_GUEST_AMD64=$GUEST/amd64
XE_VFU_GUEST_MTTY=$GUEST/mtty
EOF
[ -f "$CACHE/libvirt/.complete" ] && echo "XE_VFU_LIBVIRT_ROOT=$LROOT" >>"$ENVFILE.new"
mv -f "$ENVFILE.new" "$ENVFILE"
elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
say "ready in $elapsed s ($(mb $(($(rx_bytes) - rx_start))) received; cache $CACHE uses $(du -sh "$CACHE" 2>/dev/null | cut -f1)); settings in $ENVFILE"
