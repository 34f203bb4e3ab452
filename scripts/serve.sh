#!/usr/bin/env bash
# The main job: build xe-vfio-user and serve the simulated Xe VF (BMG), printing
# the QEMU command line that attaches it. Extra arguments go to `serve`
# (e.g. --socket-path /tmp/vf0.sock --profile ptl --log-level debug).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# A static Swift runtime: fewer instructions per request (no PLT or dynamic TLS) and a smaller RSS.
swift build -c release --static-swift-stdlib --product xe-vfio-user >&2
exec .build/release/xe-vfio-user serve "$@"
