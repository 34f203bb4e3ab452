#!/usr/bin/env bash
# The whole test suite: unit (codecs vs protocol/ vectors, device model),
# integration (real server on real Unix sockets, every command and bad input)
# and the CLI driven as a process.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
start=$(date +%s)
# The CLI tests run the built executable, so build everything first.
swift build --build-tests
log=$(mktemp /tmp/xe-vfio-user-test.XXXXXX)
set +o pipefail
swift test --skip-build 2>&1 | tee "$log" | grep --line-buffered -v '^◇'
status=${PIPESTATUS[0]}
echo "tests finished in $(( $(date +%s) - start )) s (full log: $log)" >&2
exit "$status"
