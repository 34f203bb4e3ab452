#!/usr/bin/env bash
# Writes the man pages of an xe-vfio-user binary, one for the command and one
# for each subcommand, with swift-argument-parser's generate-manual tool
# (scripts/build.sh --man and scripts/install.sh --binary both use this):
#
#   scripts/man-pages.sh GENERATE-MANUAL BINARY OUTPUT-DIRECTORY
#
# `help` is argument-parser's own subcommand: it gets no page. The tool lists
# every subcommand in the top page's SEE ALSO and has no option to leave one
# out, so each page's SEE ALSO is trimmed here to the pages written.
# A fixed date (the last commit's) keeps the pages identical from one build
# to the next.
set -euo pipefail
[ $# -eq 3 ] || { sed -n '6s/^# */usage: /p' "$0" >&2; exit 2; }
generator=$1 binary=$2 out=$3
here=$(cd "$(dirname "$0")/.." && pwd)

"$generator" "$binary" --multi-page --date "$(git -C "$here" log -1 --format=%cs 2>/dev/null || date +%F)" \
  --output-directory "$out" >&2
rm -f "$out/xe-vfio-user.help.1"
for page in "$out"/xe-vfio-user*.1; do
  # A SEE ALSO section is a run of `.Xr NAME SECTION ,` lines, the last
  # without the comma; one that names no written page goes altogether.
  awk -v dir="$out" '
    function flush(i) {
      if (count > 0) print header
      for (i = 1; i <= count; i++) print refs[i] (i < count ? " ," : "")
      count = 0; inside = 0
    }
    function written(name, section, file, line, found) {
      file = dir "/" name "." section
      found = (getline line < file) >= 0
      close(file)
      return found
    }
    inside && /^\.Xr / { if (written($2, $3)) refs[++count] = ".Xr " $2 " " $3; next }
    inside { flush() }
    /^\.Sh "SEE ALSO"$/ { inside = 1; header = $0; next }
    { print }
    END { if (inside) flush() }
  ' "$page" >"$page.tmp"
  mv "$page.tmp" "$page"
done
