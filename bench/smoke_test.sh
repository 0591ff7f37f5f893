#!/usr/bin/env bash
# Smoke test of the benchmark harness: a tiny run (`bench/run --smoke --backends local,s3`:
# SQLite with the local directory and with a throwaway SeaweedFS S3, one run of every workload;
# the S3 setup adds about a minute and is needed for workload 13; `--backends local` leaves it
# out) into a temporary report, then checks that the
# table has a row with numbers for both systems for every workload (1-9, 11, 12), that the
# store-limit rows (10), the share-of-store and goals tables are there, and that both charts
# were drawn. Workload 12 (S3 gateway) accepts "n/a (no gateway in this build)" for Strata's
# gateway rows (not for its mount rows) while its build has no `strata gateway`.
# fio (workload 9) is installed by the harness if missing (apt-get install fio). Workload 8 (disk cache) accepts "n/a (…)" for Strata while its build has no disk
# cache, but JuiceFS must have numbers, so the warm-read code path always runs.
# Needs root (FUSE mounts, drop_caches) and /dev/fuse, like the real benchmark.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-smoke.XXXXXX")"
trap 'rm -rf "$out"' EXIT

python3 "$here/run" --smoke --backends local,s3 --out "$out/BENCHMARKS.md" "$@"

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
check '1\. big file write, 4 threads'         '1. big file write, 4 threads'
check '1\. big file read cold, 4 threads'     '1. big file read cold, 4 threads'
check '1\. one reader along.*whole file'      '1. one reader along one cold file: whole file'
check '1\. one reader along.*slowest [0-9]+ MiB segment' '1. one reader along one file: slowest segment'
check '1\. one reader along.*slowest segment / median' '1. one reader along one file: slowest / median'
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
check '5\. checkpoint save .*with write-back'  '5. checkpoint save with write-back (S3)'
check '5\. checkpoint re-save .*with write-back' '5. checkpoint re-save with write-back (S3)'
check '5\. write-back: save until'             '5. write-back: save until uploaded (S3)'
check '6\. fan-out.*wall'                     '6. fan-out wall time'
check '6\. fan-out.*GETs'                     '6. fan-out GETs per block'
check '7\. peak RSS'                          '7. peak RSS'
check '7\. peak RSS.*big writes'             '7. peak RSS during the big writes'
check '7\. peak RSS.*big reads'              '7. peak RSS during the big reads'
check_cache '8\. disk cache: big file read cold'  '8. disk cache cold read'
check_cache '8\. disk cache: big file read after' '8. disk cache warm read after remount'
check_cache '8\. disk cache: object GETs'         '8. disk cache GETs during the warm read'
check '9\. fio seq write, 1 job '             '9. fio write, 1 job'
check '9\. fio seq write, 4 jobs'             '9. fio write, 4 jobs'
check '9\. fio seq read cold, 1 job '         '9. fio cold read, 1 job'
check '9\. fio seq read cold, 4 jobs'         '9. fio cold read, 4 jobs'
check '9\. fio peak RSS.*write'               '9. fio peak RSS, write phase'
check '9\. fio peak RSS.*read'                '9. fio peak RSS, read phase'
check '11\. cache group fan-out:.*wall time'  '11. cache group fan-out wall time'
check '11\. cache group fan-out: aggregate'   '11. cache group fan-out aggregate MiB/s'
check '11\. cache group fan-out: object GETs' '11. cache group fan-out GETs per object'
check_gateway() { # like check, but Strata may say "n/a (no gateway in this build)"
  local rows
  rows="$(grep -E "^\| $1" "$md" || true)"
  if [ -z "$rows" ]; then
    echo "MISSING row: $2"; fail=1; return
  fi
  if echo "$rows" | awk -F'|' '{ if (($3 !~ /[0-9]/ && $3 !~ /n\/a \(no gateway in this build\)/) || $4 !~ /[0-9]/) bad=1 } END { exit !bad }'; then
    echo "NO NUMBERS in row: $2"; echo "$rows"; fail=1; return
  fi
  if echo "$rows" | grep -q 'n/a ('; then echo "ok: $2 (JuiceFS only: no gateway in this Strata build)"
  else echo "ok: $2"; fi
}
check_gateway '12\. S3 gateway GET, 1 client, cold'  '12. S3 gateway GET, 1 client, cold'
check_gateway '12\. S3 gateway GET, [0-9]+ clients, cold' '12. S3 gateway GET, 8 clients, cold'
check_gateway '12\. S3 gateway GET, 1 client, warm'  '12. S3 gateway GET, 1 client, warm'
check_gateway '12\. S3 gateway GET, [0-9]+ clients, warm' '12. S3 gateway GET, 8 clients, warm'
check '12\. through the mount.*1 reader, cold'       '12. through the mount, 1 reader, cold'
check '12\. through the mount.*[0-9]+ readers, cold' '12. through the mount, 8 readers, cold'
check '12\. through the mount.*1 reader, warm'       '12. through the mount, 1 reader, warm'
check '12\. through the mount.*[0-9]+ readers, warm' '12. through the mount, 8 readers, warm'
# Workload 13 (datasets in an existing bucket) runs on the SQLite + S3 setup only: Strata
# needs numbers (or "n/a (no strata attach in this build)"), JuiceFS its "cannot read" note;
# in the side table the plain S3 GET needs numbers, rclone and s3fs may say n/a.
if grep -q '^### SQLite + SeaweedFS S3' "$md"; then
  check_dataset() {
    local rows
    rows="$(grep -E "^\| 13\. $1" "$md" || true)"
    if [ -z "$rows" ]; then echo "MISSING row: $2"; fail=1; return; fi
    if echo "$rows" | awk -F'|' '{ if (($3 !~ /[0-9]/ && $3 !~ /n\/a \(no strata attach in this build\)/) || $4 !~ /n\/a \(JuiceFS CE cannot read/) bad=1 } END { exit !bad }'; then
      echo "NO NUMBERS in row: $2"; echo "$rows"; fail=1; return
    fi
    if echo "$rows" | grep -q 'no strata attach'; then echo "ok: $2 (no strata attach in this build)"
    else echo "ok: $2 (Strata: $(echo "$rows" | awk -F'|' '{ gsub(/^ +| +$/, "", $3); print $3 }'))"; fi
  }
  check_dataset 'dataset in an existing bucket:.*read cold' '13. dataset: object read cold'
  check_dataset 'dataset: the object read after a remount'  '13. dataset: warm read (disk cache)'
  check_dataset 'dataset: the object read a third time'      '13. dataset: page cache read'
  check_dataset 'dataset: source GETs per 4 MiB block'       '13. dataset: source GETs per block, cold'
  check_dataset 'dataset: source GETs during the warm read'  '13. dataset: source GETs, warm'
  check_dataset 'dataset: `ls -R` of'                        '13. dataset: ls -R cold'
  check_dataset 'dataset: source LISTs during the cold'      '13. dataset: LISTs, cold ls -R'
  check_dataset 'dataset: `ls -R` again'                     '13. dataset: ls -R after a remount'
  check_dataset 'dataset: source LISTs during the second'    '13. dataset: LISTs, second ls -R'
  row="$(grep -E '^\| dataset in an existing bucket:.*read cold' "$md" || true)"
  if grep -q '^### 13\. Datasets in an existing bucket' "$md" && [ -n "$row" ] && echo "$row" | awk -F'|' '{ ok = ($4 ~ /[0-9]/) && ($5 ~ /[0-9]/ || $5 ~ /n\/a/) && ($6 ~ /[0-9]/ || $6 ~ /n\/a/) } END { exit !ok }'
  then echo "ok: 13. side table (plain GET / rclone / s3fs: $(echo "$row" | awk -F'|' '{ for (i = 4; i <= 6; i++) { gsub(/^ +| +$/, "", $i); printf "%s%s", $i, (i < 6 ? " / " : "") } }'))"
  else echo "MISSING or empty: 13. side table (plain S3 GET, rclone, s3fs)"; echo "$row"; fail=1; fi
else
  echo "skipped: 13. dataset in an existing bucket (no SQLite + S3 setup in this run)"
fi
# Workload 10 (store limit, one number per store and direction, not per system) and the
# tables built from it; the goals table at the top.
for n in 1 2 4 16; do
  if ! grep -qE "^\| $n \| [0-9][0-9,.]* .*\| [0-9][0-9,.]* " "$md"; then
    echo "MISSING or empty: 10. store limit row, $n workers"; fail=1
  else echo "ok: 10. store limit, $n workers"; fi
done
if grep -q '^### Share of the object store' "$md" && grep -qE '^\| big file write, 1 thread.*[0-9]+% / [0-9]+%' "$md"
then echo "ok: share of the store limit"; else echo "MISSING: share of the store limit table"; fail=1; fi
if grep -qE '^## Goals \(issues? #14' "$md" && grep -qE '^[0-9]+ of [0-9]+ checks met' "$md"
then echo "ok: goals table ($(grep -E '^[0-9]+ of [0-9]+ checks met' "$md"))"; else echo "MISSING: goals table"; fail=1; fi
if grep -qE '^\| Cache group fan-out \(issue #15.*\| [0-9.]+ GETs/object (met|\*\*not met)' "$md"
then echo "ok: goal fan-out GETs/object (issue #15)"; else echo "MISSING: goal fan-out GETs/object (issue #15)"; fail=1; fi
if ! grep -q 'local disk' "$md"; then echo "MISSING: checkpoint local-disk table"; fail=1; fi
if ! grep -qE '^\| new file: time / local-disk time \| [0-9]' "$md"; then echo "MISSING: checkpoint time / local-disk time"; fail=1; fi
if [ ! -s "$out/benchmarks.png" ]; then echo "MISSING: chart $out/benchmarks.png"; fail=1; fi
if [ ! -s "$out/benchmarks-along.png" ]; then echo "MISSING: chart $out/benchmarks-along.png"; fail=1; fi
if grep -q '^## Failures' "$md"; then echo "the run reported failures:"; sed -n '/^## Failures/,$p' "$md"; fail=1; fi
# Nothing left mounted or running from the run.
# (the 4 cache group members of workload 11 and the reference mount of workload 12 included)
if grep -q "strata-bench-" /proc/self/mountinfo; then echo "LEFT MOUNTED:"; grep "strata-bench-" /proc/self/mountinfo; fail=1; fi

if [ "$fail" -ne 0 ]; then
  echo "bench smoke test: FAILED"; exit 1
fi
echo "bench smoke test: 1 passed, 0 failed"
