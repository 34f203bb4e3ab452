#!/usr/bin/env bash
# Installs xe-vfio-user under a prefix, and uninstalls exactly what it installed.
#
#   sudo scripts/install.sh [--prefix /usr/local] [--destdir DIR] [--unitdir DIR]
#                           [--hookdir DIR|none] [--binary FILE]
#                           [--with-group | --no-group] [--uninstall]
#
# What goes where (PREFIX defaults to /usr/local):
#   PREFIX/bin/xe-vfio-user                                  the binary (scripts/build.sh, stripped)
#   PREFIX/share/man/man1/xe-vfio-user*.1                    man pages (swift-argument-parser's generate-manual)
#   PREFIX/share/bash-completion/completions/xe-vfio-user    shell completions
#   PREFIX/share/zsh/site-functions/_xe-vfio-user              (xe-vfio-user --generate-completion-script)
#   PREFIX/share/fish/vendor_completions.d/xe-vfio-user.fish
#   UNITDIR/xe-vfio-user@.service                            the systemd unit, ExecStart pointing at the binary
#   UNITDIR/xe-vfio-user-vf@.service                         the unit for a real VF (instance: its BDF)
#                                                            (UNITDIR defaults to PREFIX/lib/systemd/system)
#   HOOKDIR/xe-vfio-user                                     the libvirt qemu hook (examples/libvirt-qemu-hook)
#                                                            that refuses restoring or migrating in a domain
#                                                            whose vfio-user VF would lose its state
#                                                            (HOOKDIR defaults to /etc/libvirt/hooks/qemu.d
#                                                            for the prefixes /usr and /usr/local, else none)
#   PREFIX/share/xe-vfio-user/libvirt-qemu-hook              the same hook, for any other libvirt
#   PREFIX/share/xe-vfio-user/installed                      what this install made, for --uninstall
#
# On the live system (no --destdir) as root, with the prefix /usr or /usr/local,
# it also creates the system group xe-vfio-user, which owns the unit's sockets
# (see the unit), unless it exists or --no-group is given. Any other prefix gets
# the group only with --with-group. It runs `systemctl daemon-reload` when
# systemd runs, and ends with the next steps, written for where it installed
# (the binary's path, MANPATH, `systemctl link` for a unit directory systemd does
# not read). --uninstall removes the files and the directories the install
# created (when empty), a `systemctl link` of its units, and the group only if
# the install created it.
#
# --binary FILE installs that build instead of running scripts/build.sh; its man
# pages then come from a generate-manual tool in .build/{release,debug} (build it
# with `swift build --product generate-manual`) or $XE_VFU_GENERATE_MANUAL.
# --destdir DIR stages everything under DIR (for packaging): paths inside the
# files are those of PREFIX, and no group or systemd change is made.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '[install] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
usage() { sed -n '4,6p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }

prefix=/usr/local destdir="" unitdir="" hookdir="" binary="" group=xe-vfio-user make_group="" uninstall=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --unitdir) unitdir=${2:?--unitdir needs a directory}; shift 2 ;;
    --hookdir) hookdir=${2:?--hookdir needs a directory, or none}; shift 2 ;;
    --binary) binary=${2:?--binary needs a file}; shift 2 ;;
    --no-group) make_group=0; shift ;;
    --with-group) make_group=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) say "unknown argument: $1"; usage ;;
  esac
done
case "$prefix" in /*) ;; *) die "--prefix must be absolute: $prefix" ;; esac
prefix=${prefix%/}
unitdir=${unitdir:-$prefix/lib/systemd/system}
case "$unitdir" in /*) ;; *) die "--unitdir must be absolute: $unitdir" ;; esac
[ -z "$destdir" ] || destdir=$(mkdir -p "$destdir" && cd "$destdir" && pwd)
manifest=$prefix/share/xe-vfio-user/installed
live() { [ -z "$destdir" ]; }
# The prefixes a system's PATH, man and systemd look in: the group is made only
# for these unless --with-group, and the hints use bare names only for these.
system_prefix() { case "$prefix" in /usr | /usr/local) return 0 ;; esac; return 1; }
if [ -z "$hookdir" ]; then
  if system_prefix; then hookdir=/etc/libvirt/hooks/qemu.d; else hookdir=none; fi
fi
case "$hookdir" in /* | none) ;; *) die "--hookdir must be absolute, or none: $hookdir" ;; esac
hookdir=${hookdir%/}
if [ -z "$make_group" ]; then
  if system_prefix; then make_group=1; else make_group=0; fi
fi
systemd_runs() { live && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }
# Only the directories systemd reads units from get a daemon-reload.
systemd_dir() {
  case "$unitdir" in
    /etc/systemd/system | /usr/lib/systemd/system | /lib/systemd/system | /usr/local/lib/systemd/system) return 0 ;;
  esac
  return 1
}

# Removes what the manifest lists: files first, then the directories (deepest
# first) that are empty. The group goes too, unless $1 is "keep-group".
remove_installed() {
  local keep=${1:-} kind path dirs=() link
  while IFS=' ' read -r kind path; do
    case "$kind" in
      file)
        rm -f "$destdir$path"
        # The unit linked into /etc/systemd/system as the install's hints say.
        link=/etc/systemd/system/$(basename "$path")
        if live && [ "${path%.service}" != "$path" ] && [ -L "$link" ] && [ "$(readlink "$link")" = "$path" ]; then
          rm -f "$link"
        fi
        ;;
      dir) dirs=("$path" "${dirs[@]}") ;;
      group)
        if [ "$keep" != keep-group ] && live && getent group "$path" >/dev/null; then
          groupdel "$path" && say "removed the group $path"
        fi
        ;;
    esac
  done <"$destdir$manifest"
  rm -f "$destdir$manifest"
  for path in "${dirs[@]}"; do rmdir "$destdir$path" 2>/dev/null || true; done
}

if [ "$uninstall" = 1 ]; then
  [ -f "$destdir$manifest" ] || die "nothing installed under ${destdir}$prefix (no $destdir$manifest)"
  if systemd_runs; then
    # Instances enabled or running from the unit about to go.
    for link in /etc/systemd/system/*.wants/xe-vfio-user@*.service \
      /etc/systemd/system/*.wants/xe-vfio-user-vf@*.service; do
      [ -e "$link" ] || [ -L "$link" ] || continue
      say "disabling and stopping $(basename "$link")"
      systemctl disable --now "$(basename "$link")" || true
    done
  fi
  remove_installed
  systemd_runs && systemd_dir && systemctl daemon-reload
  say "uninstalled xe-vfio-user from ${destdir}$prefix"
  exit 0
fi

if [ -n "$binary" ]; then
  [ -x "$binary" ] || die "--binary $binary is not an executable file"
  generator=${XE_VFU_GENERATE_MANUAL:-}
  if [ -z "$generator" ]; then
    for candidate in "$here/.build/release/generate-manual" "$here/.build/debug/generate-manual"; do
      if [ -x "$candidate" ]; then generator=$candidate; break; fi
    done
  fi
  [ -n "$generator" ] || die "no generate-manual tool for the man pages: run 'swift build --product generate-manual' (or install without --binary)"
else
  binary=$("$here/scripts/build.sh" --man)
fi
work=$(mktemp -d /tmp/xe-vfio-user-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -n "${generator:-}" ]; then
  mkdir "$work/man"
  "$here/scripts/man-pages.sh" "$generator" "$binary" "$work/man"
  mandir=$work/man
else
  mandir=$(dirname "$binary")/man
fi
ls "$mandir"/xe-vfio-user*.1 >/dev/null 2>&1 || die "no man pages in $mandir"
for shell in bash zsh fish; do
  "$binary" --generate-completion-script "$shell" >"$work/completion.$shell" ||
    die "$binary --generate-completion-script $shell failed"
done
sed "s#/usr/local/bin/xe-vfio-user#$prefix/bin/xe-vfio-user#g" "$here/examples/xe-vfio-user@.service" >"$work/unit"
sed "s#/usr/local/bin/xe-vfio-user#$prefix/bin/xe-vfio-user#g" "$here/examples/xe-vfio-user-vf@.service" >"$work/unit-vf"

# A reinstall replaces the previous install's files; a group it made stays.
had_group=""
if [ -f "$destdir$manifest" ]; then
  grep -q "^group $group\$" "$destdir$manifest" && had_group=1
  remove_installed keep-group
fi

entries=()
# mkdir -p that notes each directory it creates.
make_dir() {
  local dir=$1 missing=()
  while [ ! -d "$destdir$dir" ]; do
    missing=("$dir" "${missing[@]}")
    dir=$(dirname "$dir")
  done
  for dir in "${missing[@]}"; do
    mkdir "$destdir$dir" || die "cannot create $destdir$dir"
    entries+=("dir $dir")
  done
}
put() { # mode source target
  make_dir "$(dirname "$3")"
  install -m "$1" "$2" "$destdir$3" || die "cannot install $destdir$3"
  entries+=("file $3")
}

make_dir "$prefix/bin"
install -m 0755 -s "$binary" "$destdir$prefix/bin/xe-vfio-user" || die "cannot install $destdir$prefix/bin/xe-vfio-user"
entries+=("file $prefix/bin/xe-vfio-user")
for page in "$mandir"/xe-vfio-user*.1; do
  put 0644 "$page" "$prefix/share/man/man1/$(basename "$page")"
done
put 0644 "$work/completion.bash" "$prefix/share/bash-completion/completions/xe-vfio-user"
put 0644 "$work/completion.zsh" "$prefix/share/zsh/site-functions/_xe-vfio-user"
put 0644 "$work/completion.fish" "$prefix/share/fish/vendor_completions.d/xe-vfio-user.fish"
put 0644 "$work/unit" "$unitdir/xe-vfio-user@.service"
put 0644 "$work/unit-vf" "$unitdir/xe-vfio-user-vf@.service"
put 0755 "$here/examples/libvirt-qemu-hook" "$prefix/share/xe-vfio-user/libvirt-qemu-hook"
[ "$hookdir" = none ] || put 0755 "$here/examples/libvirt-qemu-hook" "$hookdir/xe-vfio-user"

if [ -n "$had_group" ]; then
  entries+=("group $group")
elif live && [ "$make_group" = 1 ] && ! getent group "$group" >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    groupadd --system "$group" || die "groupadd --system $group failed"
    entries+=("group $group")
    say "created the system group $group (the unit's sockets belong to it)"
  else
    say "not root: the group $group was not created (see the unit's comments)"
  fi
fi

make_dir "$(dirname "$manifest")"
printf '%s\n' "${entries[@]}" >"$destdir$manifest"

systemd_runs && systemd_dir && systemctl daemon-reload
say "installed xe-vfio-user $("$destdir$prefix/bin/xe-vfio-user" --version) under ${destdir}$prefix ($(grep -c '^file' "$destdir$manifest") files)"
if live; then
  # The next steps, each a command that works for this prefix and unit directory.
  next=()
  if system_prefix; then
    next+=("xe-vfio-user --help" "man xe-vfio-user")
  else
    next+=("$prefix/bin/xe-vfio-user --help" "MANPATH=$prefix/share/man man xe-vfio-user")
  fi
  systemd_dir || next+=("systemctl link $unitdir/xe-vfio-user@.service  # systemd does not read units from $unitdir")
  next+=("systemctl enable --now xe-vfio-user@vf0  # serves /run/xe-vfio-user/vf0.sock")
  if getent group "$group" >/dev/null; then
    next+=("usermod -aG $group USER  # USER: whoever runs QEMU (libvirt-qemu for libvirt)")
  else
    next+=("groupadd --system $group  # the unit's sockets' group (--with-group makes it); without it only root connects")
  fi
  if [ "$hookdir" != none ]; then
    next+=("systemctl try-restart libvirtd virtqemud  # libvirt finds the hook $hookdir/xe-vfio-user when it starts")
  fi
  next+=("$0 --uninstall --prefix $prefix  # removes all of it")
  say "next:"
  printf '  %s\n' "${next[@]}" >&2
fi
