#!/usr/bin/env bash
# The whole test suite: unit (codecs vs protocol/ vectors, device model),
# integration (real server on real Unix sockets, every command and bad input),
# the CLI driven as a process, and interop with real QEMU (qtest, a Linux guest
# under TCG, the examples). scripts/install-qemu.sh provides QEMU (cached after
# the first run); without it the interop tests are skipped, loudly, except on
# CI (CI=true), where that is a failure. Then the fuzz targets, and the
# integration suites under ThreadSanitizer and AddressSanitizer
# (scripts/sanitize.sh): XE_VFU_SANITIZE=0 skips those locally (not on CI).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
start=$(date +%s)

banner() { printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!!! %s\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' "$*" >&2; }

qemu_skip=""
if ./scripts/install-qemu.sh; then
  set -a
  # shellcheck disable=SC1090
  . "${XE_VFU_CACHE:-/opt/xe-vfio-user}/env"
  set +a
else
  qemu_skip="scripts/install-qemu.sh failed (see above)"
  if [ "${CI:-}" = true ]; then
    banner "CI: QEMU for the interop tests could not be installed: $qemu_skip"
    exit 1
  fi
  banner "QEMU interop tests will be SKIPPED: $qemu_skip"
fi

# The CLI and QEMU tests run the built executable, so build everything first,
# and swift-argument-parser's man page generator for the install test.
swift build --build-tests
swift build --product generate-manual
# The kernel VFIO guest test runs release builds inside its guest (the Swift
# runtime linked in, so only the few libraries `ldd` lists go into the initramfs).
./scripts/build.sh >/dev/null
swift build -c release --static-swift-stdlib --product xe-vfu-guest-check
log=$(mktemp /tmp/xe-vfio-user-test.XXXXXX)
set +o pipefail
swift test --skip-build 2>&1 | tee "$log" | grep --line-buffered -v '^◇'
status=${PIPESTATUS[0]}
set -o pipefail

# The fuzz targets, a bounded run each from their seeds (a crash, leak or timeout fails).
fuzz_start=$(date +%s)
./scripts/fuzz.sh --seconds "${XE_VFU_FUZZ_SECONDS:-45}" || status=1
echo "fuzzing took $(( $(date +%s) - fuzz_start )) s" >&2

# The integration suites under TSan, then ASan (each builds into its own
# scratch directory): 7 min for both on 2 cores from a clean clone, 15 when busy.
if [ "${XE_VFU_SANITIZE:-1}" = 0 ]; then
  banner "Sanitizer runs SKIPPED (XE_VFU_SANITIZE=0)"
  [ "${CI:-}" = true ] && status=1
else
  sanitize_start=$(date +%s)
  ./scripts/sanitize.sh thread address || status=1
  echo "sanitizers took $(( $(date +%s) - sanitize_start )) s" >&2
fi

# How long the QEMU part took, and whether any of it was skipped.
interop=$(grep -E 'Suite "(QEMU interop|Examples \(QEMU|libvirt)[^"]*" (passed|failed) after' "$log" |
  sed -E 's/^.* Suite "(.*)" (passed|failed) after ([0-9.]+) seconds(.*)/  \1: \2 after \3 s\4/' || true)
[ -n "$interop" ] && printf 'QEMU interop suites:\n%s\n' "$interop" >&2
skipped=$(grep -E 'skipped: "?(QEMU interop|guest boot|libvirt) skipped' "$log" | head -n 3 || true)
if [ -n "$skipped" ] || [ -n "$qemu_skip" ]; then
  banner "QEMU interop tests were SKIPPED: ${qemu_skip:-$(printf '%s' "$skipped" | head -n1)}"
  [ "${CI:-}" = true ] && status=1
fi
echo "tests finished in $(( $(date +%s) - start )) s (full log: $log)" >&2
exit "$status"
