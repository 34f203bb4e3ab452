#!/usr/bin/env bash
# Builds the tests with ThreadSanitizer or AddressSanitizer (each in its own
# scratch directory, so the normal build is untouched) and runs the
# integration suites under it: the server over real sockets, the control
# channel, the device interface's helpers, and the simulated VF and PF; under TSan also the
# kernel backend over its fakes (its data_fd threads, the PF's debugfs). The
# QEMU/guest suites and the CLI, which run the normal build as a process, are
# not included. Any report fails the run (TSan reports every race, then the
# run fails). scripts/test.sh runs both (XE_VFU_SANITIZE=0 skips them there).
#
#   scripts/sanitize.sh thread     # ThreadSanitizer
#   scripts/sanitize.sh address    # AddressSanitizer (with LeakSanitizer)
#   scripts/sanitize.sh            # both
set -euo pipefail
cd "$(dirname "$0")/.."

sanitizers=("$@")
[ ${#sanitizers[@]} -gt 0 ] || sanitizers=(thread address)
suites='VFIOUserServerTests|VFIODeviceTests|XeVFTests|ControlTests'
status=0
for sanitizer in "${sanitizers[@]}"; do
  case "$sanitizer" in
    thread|address) ;;
    *) echo "sanitize.sh: unknown sanitizer $sanitizer (thread, address)" >&2; exit 2 ;;
  esac
  scratch=".build/${sanitizer:0:1}san"  # .build/tsan, .build/asan
  filter=$suites
  if [ "$sanitizer" = thread ]; then filter="$suites|KernelVFIOTests"; fi
  start=$(date +%s)
  swift build --build-tests --sanitize="$sanitizer" --scratch-path "$scratch" 2>&1 |
    grep -Ev '^\[|^Building|^Build complete|^Compiling|^Write' || true
  built=$(date +%s)
  log="$scratch/test.log"
  if SWIFT_BACKTRACE=enable=no TSAN_OPTIONS="second_deadlock_stack=1 suppressions=$PWD/scripts/tsan.supp" \
    ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp" \
    swift test --skip-build --sanitize="$sanitizer" --scratch-path "$scratch" --filter "$filter" \
    >"$log" 2>&1 && ! grep -qE 'WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer' "$log"; then
    grep -E '^✔ Test run with' "$log" >&2 || true
  else
    status=1
    grep -E -A40 'WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer' "$log" | head -n 80 >&2 || true
    grep -E '^✘' "$log" | head -n 20 >&2 || true
    echo "sanitize.sh: $sanitizer FAILED (log $log)" >&2
  fi
  echo "sanitize.sh: $sanitizer: build $((built - start)) s, tests $(($(date +%s) - built)) s" >&2
done
exit "$status"
