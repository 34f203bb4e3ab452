#!/usr/bin/env bash
# The one build of xe-vfio-user that everything uses: scripts/serve.sh,
# scripts/install.sh, scripts/guest.sh, examples/qemu-attach.sh and the README.
# One set of flags means one build directory state, so switching between them
# never rebuilds.
#
#   scripts/build.sh          -> .build/release/xe-vfio-user
#   scripts/build.sh --man    -> also .build/release/man/*.1 (swift-argument-parser's generate-manual)
#
# Release, with the Swift runtime and Foundation linked in statically
# (--static-swift-stdlib): the binary needs only system libraries (json-c,
# glibc, libstdc++), so it runs on a host without the Swift toolchain, and it
# costs fewer instructions per request (no PLT or dynamic TLS). The build's
# output goes to stderr; stdout gets the binary's path and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

man=0
case "${1:-}" in
  --man) man=1 ;;
  "") ;;
  *) echo "usage: $0 [--man]" >&2; exit 2 ;;
esac

./scripts/install-deps.sh
flags=(-c release --static-swift-stdlib)
swift build "${flags[@]}" --product xe-vfio-user >&2
bin=$PWD/.build/release/xe-vfio-user

if [ "$man" = 1 ]; then
  # The tool behind `swift package plugin generate-manual`, built with the same
  # flags so that it reuses the modules above. The plugin itself would rebuild
  # the whole package without --static-swift-stdlib (it takes no build flags)
  # and leave a binary tied to the toolchain in .build/release.
  swift build "${flags[@]}" --product generate-manual >&2
  out=$PWD/.build/release/man
  rm -rf "$out" && mkdir -p "$out"
  ./scripts/man-pages.sh .build/release/generate-manual "$bin" "$out"
fi
echo "$bin"
