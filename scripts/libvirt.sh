#!/usr/bin/env bash
# Runs a real libvirt daemon beside the project's QEMU, on a host with no systemd
# and a libvirt too old for QEMU 11.1 (Debian 12's 9.0 cannot `virsh save` with it):
# libvirt 12.9 from trixie-backports, which scripts/install-qemu.sh installs in a
# copy of its Debian 13 root ($XE_VFU_CACHE/libvirt/root). The daemon runs in a
# private mount namespace, chrooted into that root, with its configuration,
# defined domains, logs and sockets in a state directory of yours: the cache is
# never written, and two daemons with two state directories never meet.
#
#   scripts/libvirt.sh start STATE         start libvirtd; returns once it answers
#   scripts/libvirt.sh virsh STATE ARGS... run virsh against it (qemu:///system)
#   scripts/libvirt.sh stop STATE          destroy its running domains, stop it
#
# The daemon, and the QEMU it starts, see the host's /tmp, /run/xe-vfio-user (where
# servers put their sockets by default), /proc, /dev and /sys, and the directories
# listed in XE_VFU_QEMU_SHARE (colon-separated), at their host paths: a domain's
# kernel, disk, serial log and vfio-user socket must live under one of them.
#
# The first `start` makes STATE/etc/libvirt from the root's, with qemu.conf set
# for this setting: QEMU runs as root, no security driver, no mount namespace or
# cgroups per domain (there is no systemd), console logs written directly. Hook
# scripts go in STATE/etc/libvirt/hooks/qemu.d/ (libvirt looks for hooks when it
# starts: stop, then start again). libvirtd's own log is STATE/libvirtd.log.
# Needs root (mount namespaces, chroot).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${XE_VFU_CACHE:-/opt/xe-vfio-user}
root=${XE_VFU_LIBVIRT_ROOT:-$cache/libvirt/root}

die() { echo "libvirt.sh: $*" >&2; exit 1; }
usage() { echo "usage: $0 start|stop STATE | virsh STATE ARGS..." >&2; exit 2; }

[ $# -ge 2 ] || usage
command=$1 state=$2
shift 2
case "$state" in /*) ;; *) state=$PWD/$state ;; esac
pidfile=$state/run/libvirtd.pid

# Inside the new namespace: the shared directories and the state directories are
# mounted into the root, then the daemon replaces this script (its PID is ours).
if [ "$command" = _inside ]; then
  for dir in /proc /dev /sys; do mount --rbind "$dir" "$root$dir"; done
  # First, so that /run/xe-vfio-user lands inside the state's run directory.
  for dir in etc/libvirt var/lib/libvirt var/log/libvirt var/cache/libvirt run; do
    mkdir -p "$state/$dir"
    mount --bind "$state/$dir" "$root/$dir"
  done
  IFS=: read -r -a extra <<<"${XE_VFU_QEMU_SHARE:-}"
  for dir in /tmp /run/xe-vfio-user "${extra[@]}"; do
    case "$dir" in "" | / | /proc* | /dev* | /sys*) continue ;; esac
    [ -d "$dir" ] || continue
    mkdir -p "$root$dir"
    mount --bind "$dir" "$root$dir"
  done
  exec chroot "$root" /usr/sbin/libvirtd
fi

running() { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
in_daemon() { nsenter --mount --target "$(cat "$pidfile")" chroot "$root" "$@"; }

case "$command" in
  start)
    [ "$(id -u)" -eq 0 ] || die "needs root (mount namespace, chroot)"
    [ -x "$root/usr/sbin/libvirtd" ] || die "no libvirt in $root: run scripts/install-qemu.sh"
    running && die "a libvirtd already runs with $state (pid $(cat "$pidfile"))"
    mkdir -p "$state/etc" "$state/run"
    if [ ! -f "$state/etc/libvirt/qemu.conf" ]; then
      cp -a "$root/etc/libvirt" "$state/etc/"
      cat >>"$state/etc/libvirt/qemu.conf" <<'EOF'

# Set by scripts/libvirt.sh: a chroot on a host with no systemd.
user = "root"
group = "root"
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
EOF
    fi
    rm -f "$pidfile"
    setsid unshare --mount --propagation private -- "$here/libvirt.sh" _inside "$state" \
      </dev/null >"$state/libvirtd.log" 2>&1 &
    for _ in $(seq 300); do
      if running && in_daemon virsh -q -c qemu:///system version >/dev/null 2>&1; then
        echo "libvirtd $(cat "$pidfile") is running with $state"
        exit 0
      fi
      kill -0 $! 2>/dev/null || break
      sleep 0.1
    done
    tail -n 20 "$state/libvirtd.log" >&2
    die "libvirtd did not start (log: $state/libvirtd.log)"
    ;;
  virsh)
    running || die "no libvirtd runs with $state (scripts/libvirt.sh start $state)"
    in_daemon virsh -c qemu:///system "$@"
    ;;
  stop)
    running || exit 0
    for domain in $(in_daemon virsh -q -c qemu:///system list --name); do
      in_daemon virsh -q -c qemu:///system destroy "$domain" >/dev/null
    done
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    ;;
  *) usage ;;
esac
