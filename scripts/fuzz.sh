#!/usr/bin/env bash
# Builds the libFuzzer targets (Tests/Fuzz) with -sanitize=fuzzer,address in
# their own scratch directory (.build/fuzz, so the normal build is untouched)
# and runs them from the seed corpus that protocol/ provides. A crash, a leak
# (AddressSanitizer's LeakSanitizer) or an input that runs longer than the
# timeout fails the run; libFuzzer keeps the input as .build/fuzz/artifacts/TARGET/crash-*
# (replay it with the normal build: .build/debug/fuzz-TARGET FILE).
#
#   scripts/fuzz.sh                       every target, 60 s each
#   scripts/fuzz.sh --seconds 3600 dispatch   one target, an hour
#   scripts/fuzz.sh --runs 10000000 wire      a number of executions (ten
#       million on a free core: about 7 min for wire, 1.5 h for xe-stream,
#       3 h for dispatch)
#
# Targets: wire (the wire decoder), dispatch (the whole dispatcher with the
# simulated VF), xe-stream (the Xe migration stream's restore side),
# checkpoint (the save-file reader, expanded and tagged).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
runs=""
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    wire|dispatch|xe-stream|checkpoint) targets+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument $1 (targets: wire dispatch xe-stream checkpoint)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(wire dispatch xe-stream checkpoint)

scratch=.build/fuzz
# Optimised (-c release): at -Onone the instrumented Swift code runs about ten
# times slower (generic code unspecialised, a retain and release per value),
# and the dispatch and xe-stream targets did about 300 inputs a second.
# Preconditions and overflow traps stay; coverage counts edges of the
# optimised code, so cov/ft of an -Onone run are not comparable.
fuzz_flags=(
  -c release --scratch-path "$scratch"
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DXE_VFU_LIBFUZZER -Xswiftc -use-ld=lld
  -Xcc -fsanitize=fuzzer-no-link,address
)
# The normal build writes the seeds (it reads protocol/ with json-c).
for target in "${targets[@]}"; do
  swift build --product "fuzz-$target" >/dev/null 2>&1
  swift build "${fuzz_flags[@]}" --product "fuzz-$target" 2>&1 | grep -Ev '^\[|^Building|^Build complete|^Compiling|^Write' || true
  [ -x "$scratch/release/fuzz-$target" ] || { echo "fuzz.sh: fuzz-$target did not build" >&2; exit 1; }
done

status=0
for target in "${targets[@]}"; do
  seeds="$scratch/seeds/$target"
  corpus="$scratch/corpus/$target"
  artifacts="$scratch/artifacts/$target"
  rm -rf "$seeds"
  mkdir -p "$scratch/seeds" "$corpus" "$artifacts"
  ".build/debug/fuzz-$target" --write-seeds "$seeds" protocol >/dev/null
  limit=(-max_total_time="$seconds")
  [ -n "$runs" ] && limit=(-runs="$runs")
  # A dispatch input is a client's whole life, message by message: its cost
  # grows with its length (each STOP_COPY in it saves the device again), and
  # with 64 KiB allowed, libFuzzer's growing inputs slowed a long run from
  # 1,650 to 750 executions a second by 1.6 M while coverage came from
  # sequences of a few messages. 4 KiB holds dozens of them.
  max_len=65536
  [ "$target" = dispatch ] && max_len=4096
  echo "== fuzz-$target: ${runs:+$runs runs}${runs:-$seconds s}" >&2
  log="$scratch/$target.log"
  # Each input must finish within 10 s (the simulated PF runs inline with no
  # waits); -rss_limit_mb catches unbounded growth.
  if SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=detect_leaks=1 "$scratch/release/fuzz-$target" \
    "${limit[@]}" -timeout=10 -rss_limit_mb=4096 -max_len="$max_len" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$corpus" "$seeds" >"$log" 2>&1; then
    grep -E '^#[0-9]+' "$log" | tail -n 1 >&2
  else
    status=1
    tail -n 60 "$log" >&2
    echo "fuzz.sh: fuzz-$target FAILED (log $log, input in $artifacts)" >&2
  fi
done
exit "$status"
