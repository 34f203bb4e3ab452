#!/usr/bin/env bash
# Regenerates link/startup-order.txt, the symbol ordering file that release
# builds hand to lld (Package.swift, leanExecutable): the functions an idle
# `serve` runs, in the order it first runs them, so that the linker puts them
# next to each other. The kernel maps file pages around every page fault in
# 64 KiB windows ("fault-around"); code run at startup and scattered over the
# 10 MB text segment made most of it resident (BENCHMARKS.md, "Idle memory").
#
# Only the toolchain's and the dependencies' functions are kept (standard
# library, runtime, ArgumentParser, swift-log...): their names change with a
# new toolchain or dependency version, not with our code. A stale entry is
# skipped by the linker; the cost of a stale file is a larger idle RSS, which
# `xe-vfio-user bench --only rss` shows. Needs valgrind
# (scripts/install-deps.sh --with-valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --with-valgrind

swift build -c release --static-swift-stdlib --product xe-vfio-user >&2
work=$(mktemp -d /tmp/xe-vfio-user-order.XXXXXX)
trap 'rm -rf "$work"' EXIT
# valgrind 3.19 cannot read the DWARF 5 the Swift toolchain emits: run a copy without it.
cp .build/release/xe-vfio-user "$work/xe-vfio-user"
strip --strip-debug "$work/xe-vfio-user"

valgrind --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no \
  --callgrind-out-file="$work/callgrind.out" \
  "$work/xe-vfio-user" serve --quiet --socket-path "$work/sock" 2>"$work/valgrind.log" &
pid=$!
for _ in $(seq 300); do [ -S "$work/sock" ] && break; sleep 0.1; done
[ -S "$work/sock" ] || { cat "$work/valgrind.log" >&2; echo "serve did not start under valgrind" >&2; exit 1; }
sleep 2 # idle: the accept and signal threads are waiting
kill -INT "$pid"
wait "$pid" || true

# Function names of the executable itself, first-run order, without
# callgrind's recursion suffixes ('2) and without our own modules' symbols.
awk -v exe="$work/xe-vfio-user" '
  /^ob=/ { inexe = (substr($0, 4) == exe) }
  /^fn=/ && inexe {
    name = substr($0, 4); sub(/\047[0-9]+$/, "", name)
    if (name !~ /^0x/ && !seen[name]++) print name
  }' "$work/callgrind.out" |
  grep -Ev '^\$s10IdleFloor' \
    >link/startup-order.txt
echo "link/startup-order.txt: $(wc -l <link/startup-order.txt) functions" >&2
