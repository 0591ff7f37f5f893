#!/usr/bin/env bash
# Smoke test of the benchmark harness: a tiny run (`bench/run --smoke`, SQLite + local
# directory only, one run of every workload) into a temporary report, then checks that the
# table has a row with numbers for both systems for every workload (1-8) and that the chart
# was drawn. Workload 8 (disk cache) accepts "n/a (…)" for Strata while its build has no disk
# cache, but JuiceFS must have numbers, so the warm-read code path always runs.
# Needs root (FUSE mounts, drop_caches) and /dev/fuse, like the real benchmark.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-smoke.XXXXXX")"
trap 'rm -rf "$out"' EXIT

python3 "$here/run" --smoke --out "$out/BENCHMARKS.md" "$@"

md="$out/BENCHMARKS.md"
fail=0
check() { # check PATTERN DESCRIPTION: a table row matching PATTERN with a number for both systems
  local rows
  rows="$(grep -E "^\| $1" "$md" || true)"
  if [ -z "$rows" ]; then
    echo "MISSING row: $2"; fail=1; return
  fi
  if echo "$rows" | awk -F'|' '{ if ($3 !~ /[0-9]/ || $4 !~ /[0-9]/) bad=1 } END { exit !bad }'; then
    echo "NO NUMBERS in row: $2"; echo "$rows"; fail=1; return
  fi
  echo "ok: $2"
}
check_cache() { # like check, but Strata may say "n/a (...)" when its build has no disk cache
  local rows
  rows="$(grep -E "^\| $1" "$md" || true)"
  if [ -z "$rows" ]; then
    echo "MISSING row: $2"; fail=1; return
  fi
  if echo "$rows" | awk -F'|' '{ if (($3 !~ /[0-9]/ && $3 !~ /n\/a \(/) || $4 !~ /[0-9]/) bad=1 } END { exit !bad }'; then
    echo "NO NUMBERS in row: $2"; echo "$rows"; fail=1; return
  fi
  if echo "$rows" | grep -q 'n/a ('; then echo "ok: $2 (JuiceFS only: $(echo "$rows" | grep -o 'n/a ([^)]*)' | head -1))"
  else echo "ok: $2"; fi
}
check '1\. big file write, 1 thread'          '1. big file write, 1 thread'
check '1\. big file write, 2 threads'         '1. big file write, 2 threads'
check '1\. big file read cold, 1 thread'      '1. big file read cold, 1 thread'
check '1\. big file read cold, 2 threads'     '1. big file read cold, 2 threads'
check '1\. big file read warm, 1 thread'      '1. big file read warm, 1 thread'
check '1\. big file read warm, 2 threads'     '1. big file read warm, 2 threads'
check '2\. small files: create'               '2. small files create+write+close'
check '2\. small files: read'                 '2. small files read'
check '2\. small files: stat'                 '2. small files stat'
check '2\. small files: delete'               '2. small files delete'
check '3\. metadata.*create'                  '3. metadata create'
check '3\. metadata.*stat'                    '3. metadata stat'
check '3\. metadata.*rename'                  '3. metadata rename'
check '3\. metadata.*remove'                  '3. metadata remove'
check '4\. truncate 4 GiB: slices'            '4. truncate 4 GiB slice count'
check '4\. truncate 4 GiB.*shrink.*p50'       '4. truncate 4 GiB ftruncate shrink p50'
check '4\. truncate 4 GiB.*grow.*p99'         '4. truncate 4 GiB ftruncate grow p99'
check '4\. truncate 4 GiB.*O_TRUNC.*p50'      '4. truncate 4 GiB open(O_TRUNC) p50'
check '4\. truncate 40 GiB.*O_TRUNC.*p99'     '4. truncate 40 GiB open(O_TRUNC) p99'
check '5\. checkpoint save'                   '5. checkpoint save'
check '5\. checkpoint re-save'                '5. checkpoint re-save (O_TRUNC)'
check '6\. fan-out.*wall'                     '6. fan-out wall time'
check '6\. fan-out.*GETs'                     '6. fan-out GETs per block'
check '7\. peak RSS'                          '7. peak RSS'
check_cache '8\. disk cache: big file read cold'  '8. disk cache cold read'
check_cache '8\. disk cache: big file read after' '8. disk cache warm read after remount'
check_cache '8\. disk cache: object GETs'         '8. disk cache GETs during the warm read'
if ! grep -q 'local disk' "$md"; then echo "MISSING: checkpoint local-disk table"; fail=1; fi
if [ ! -s "$out/benchmarks.png" ]; then echo "MISSING: chart $out/benchmarks.png"; fail=1; fi
if grep -q '^## Failures' "$md"; then echo "the run reported failures:"; sed -n '/^## Failures/,$p' "$md"; fail=1; fi
# Nothing left mounted or running from the run.
if grep -q "strata-bench-" /proc/self/mountinfo; then echo "LEFT MOUNTED:"; grep "strata-bench-" /proc/self/mountinfo; fail=1; fi

if [ "$fail" -ne 0 ]; then
  echo "bench smoke test: FAILED"; exit 1
fi
echo "bench smoke test: 1 passed, 0 failed"
