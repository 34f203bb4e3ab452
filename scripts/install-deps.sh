#!/usr/bin/env bash
# Installs what building and testing xe-vfio-user needs on Debian 12 and says
# what it does. Idempotent: nothing is installed twice.
set -euo pipefail

say() { printf '[install-deps] %s\n' "$*" >&2; }

if ! command -v swift >/dev/null 2>&1; then
  say "the Swift toolchain (6.1 or later) is not on PATH; install it from swift.org and re-run"
  exit 1
fi

need=()
pkg-config --exists json-c 2>/dev/null || need+=(libjson-c-dev)
pkg-config --exists libzstd 2>/dev/null || need+=(libzstd-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
# The test that drives `xe-vfio-user top` as a person sees it runs it under tmux.
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ "${1:-}" = "--with-valgrind" ] && ! command -v valgrind >/dev/null 2>&1; then need+=(valgrind); fi

if [ ${#need[@]} -eq 0 ]; then
  say "build and test dependencies present (json-c $(pkg-config --modversion json-c), zstd $(pkg-config --modversion libzstd))"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { say "need root (or sudo) to apt-get install ${need[*]}"; exit 1; }
  sudo="sudo"
fi
say "installing from Debian: ${need[*]} (about 1 MB)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
say "installed json-c $(pkg-config --modversion json-c), zstd $(pkg-config --modversion libzstd)"
