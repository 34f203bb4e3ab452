#!/usr/bin/env bash
# The main job: build xe-vfio-user (scripts/build.sh, the one build everything
# uses) and serve the simulated Xe VF (BMG), printing the QEMU command line that
# attaches it. Extra arguments go to `serve`
# (e.g. --socket-path /tmp/vf0.sock --profile ptl --log-level debug).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(./scripts/build.sh)
exec "$bin" serve "$@"
