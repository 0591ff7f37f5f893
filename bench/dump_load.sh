#!/usr/bin/env bash
# Metadata move at scale (issue #17): a volume with N inodes (default 1,000,000) is dumped
# from SQLite and loaded into PostgreSQL; the loaded volume is checked (fsck), mounted, and
# its real files read back byte-exact. Prints a Markdown table of the times.
#
#   bench/dump_load.sh [--inodes N] [--strata-bin PATH] [--keep]
#
# How the volume gets N inodes quickly: a real volume with a few files written through a
# mount is dumped, the dump is extended with N empty files in directories of 1,000 (records
# as `strata dump` writes them, docs/FORMAT.md §14) and loaded into SQLite. Timed: that load,
# a dump of the SQLite volume (also while a mount writes to it), the load into PostgreSQL,
# fsck on PostgreSQL, and a mount + read on PostgreSQL. Needs root, /dev/fuse and Debian's
# postgresql package.
set -euo pipefail
cd "$(dirname "$0")/.."
inodes=1000000
bin=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --inodes) inodes="$2"; shift 2 ;;
    --strata-bin) bin="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  cargo build --release -p fs-core >&2
  bin="$PWD/target/release/strata"
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL server binaries not found: apt-get install -y postgresql" >&2; exit 1; }

work="$(mktemp -d /tmp/strata-dumpload.XXXXXX)"
chmod 755 "$work"
cleanup() {
  for m in "$work"/mnt*; do mountpoint -q "$m" 2>/dev/null && { "$bin" umount --force "$m" || umount -l "$m"; }; done
  [ -d "$work/pg" ] && su postgres -c "$pgbin/pg_ctl -D $work/pg/data -m immediate stop" >/dev/null 2>&1 || true
  [ "$keep" = 1 ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

# PostgreSQL on a random loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/pg" && chown postgres "$work/pg"
su postgres -c "$pgbin/initdb -D $work/pg/data -A trust -U postgres" >/dev/null
su postgres -c "$pgbin/pg_ctl -D $work/pg/data -l $work/pg/log -o '-k $work/pg -c listen_addresses=127.0.0.1 -p $port -c fsync=on -c synchronous_commit=on' -w start" >/dev/null
su postgres -c "$pgbin/createdb -h 127.0.0.1 -p $port strata_moved"
pgurl="postgres://postgres@127.0.0.1:$port/strata_moved"

# 1. A real volume with real files.
src="sqlite://$work/src.db"
"$bin" format --storage file --bucket "$work/objects" "$src" movevol >/dev/null
mkdir -p "$work/mnt"
"$bin" mount -d --cache-size 0 "$src" "$work/mnt" >/dev/null
for i in 1 2 3; do head -c $((i * 8 << 20)) /dev/urandom > "$work/mnt/real-$i.bin"; done
(cd "$work/mnt" && sha256sum real-*.bin) > "$work/sums"
"$bin" umount "$work/mnt"
"$bin" dump "$src" -o "$work/base.dump" 2>/dev/null

# 2. Extend the dump to N inodes and load it into SQLite.
python3 - "$work/base.dump" "$work/big.dump" "$inodes" <<'EOF'
import base64, json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [json.loads(l) for l in open(src)]
head, body = lines[0], [l for l in lines[1:] if l.get("t") != "end"]
counters = {r["name"]: r for r in body if r["t"] == "counter"}
nxt = counters["next_inode"]["value"]
now = head["dumped_at"]
per_dir = 1000
ndirs = max(1, n // (per_dir + 1))
nfiles = n - ndirs
with open(dst, "w") as out:
    out.write(json.dumps(head) + "\n")
    count = 1  # the header counts (what `strata dump` writes)
    def put(r):
        global count
        out.write(json.dumps(r, separators=(",", ":")) + "\n")
        count += 1
    for r in body:
        if r["t"] == "counter" and r["name"] == "next_inode":
            r = dict(r, value=nxt + n + 1)
        if r["t"] == "counter" and r["name"] == "used_inodes":
            r = dict(r, value=r["value"] + n)
        if r["t"] == "counter" and r["name"] == "used_space":
            r = dict(r, value=r["value"] + ndirs * 4096)
        if r["t"] == "node" and r["ino"] == 1:
            r = dict(r, nlink=r["nlink"] + ndirs)
        put(r)
    ino = nxt
    def node(i, kind, parent, nlink, length):
        return {"t": "node", "ino": i, "kind": kind, "mode": 0o755 if kind == 2 else 0o644,
                "uid": 0, "gid": 0, "atime": now, "mtime": now, "ctime": now, "nlink": nlink,
                "length": length, "rdev": 0, "parent": parent, "seq": 0, "masks": []}
    def edge(parent, name, i, kind):
        return {"t": "edge", "parent": parent, "name": base64.b64encode(name.encode()).decode(),
                "ino": i, "kind": kind}
    left = nfiles
    for d in range(ndirs):
        dino = ino; ino += 1
        put(node(dino, 2, 1, 2, 4096)); put(edge(1, f"d{d:05}", dino, 2))
        k = min(per_dir, left) if d < ndirs - 1 else left
        for f in range(k):
            put(node(ino, 1, dino, 1, 0)); put(edge(dino, f"f{f:04}", ino, 1)); ino += 1
        left -= k
    out.write(json.dumps({"t": "end", "records": count}) + "\n")
EOF
big="sqlite://$work/big.db"
t0=$(now); "$bin" load "$big" "$work/big.dump" >/dev/null; t1=$(now)
load_sqlite=$(secs "$t0" "$t1")

# 3. Dump the big SQLite volume: idle, then while a mount writes to it.
t0=$(now); "$bin" dump "$big" -o "$work/moved.dump" 2>/dev/null; t1=$(now)
dump_idle=$(secs "$t0" "$t1")
mkdir -p "$work/mnt2"
"$bin" mount -d --cache-size 0 "$big" "$work/mnt2" >/dev/null
( i=0; while [ -e "$work/mnt2" ] && [ ! -e "$work/stop" ]; do echo "$i" > "$work/mnt2/live-$i"; i=$((i+1)); done ) 2>/dev/null &
writer=$!
sleep 1
t0=$(now); "$bin" dump "$big" -o "$work/moved-live.dump" 2>"$work/dump-live.err"; t1=$(now)
dump_live=$(secs "$t0" "$t1")
token=$(grep -o 'change token: [^ ]*' "$work/dump-live.err" | cut -d' ' -f3)
[ -n "$token" ] || { cat "$work/dump-live.err"; echo "no change token printed by strata dump" >&2; exit 1; }
touch "$work/stop"; wait "$writer" || true
live_files=$(ls "$work/mnt2" | grep -c '^live-' || true)
"$bin" umount "$work/mnt2"
size=$(du -m "$work/moved.dump" | cut -f1)
records=$(wc -l < "$work/moved.dump")

# 4. Load into PostgreSQL, check, mount, read.
# The copy loaded into PostgreSQL is the dump taken while the mount wrote; catch-ups bring it
# up to date: first the files created after the snapshot, then (the pause) 100 files changed
# in 10 directories with the writers stopped.
t0=$(now); "$bin" load "$pgurl" "$work/moved-live.dump" >/dev/null; t1=$(now)
load_pg=$(secs "$t0" "$t1")
t0=$(now); out=$("$bin" load "$pgurl" --from "$big" --since "$token"); t1=$(now)
catch1=$(secs "$t0" "$t1"); catch1_what=$(echo "$out" | sed 's/; next token.*//; s/caught up in [0-9.]* s: //')
token=$(echo "$out" | grep -o 'next token: .*' | cut -d' ' -f3)
"$bin" mount -d --cache-size 0 "$big" "$work/mnt2" >/dev/null
for d in 0 1 2 3 4 5 6 7 8 9; do for f in 0 1 2 3 4 5 6 7 8 9; do
  echo "changed $d $f" > "$work/mnt2/d0000$d/f000$f"; done; done
"$bin" umount "$work/mnt2"
t0=$(now); out=$("$bin" load "$pgurl" --from "$big" --since "$token"); t1=$(now)
catch2=$(secs "$t0" "$t1"); catch2_what=$(echo "$out" | sed 's/; next token.*//; s/caught up in [0-9.]* s: //')
t0=$(now); fsck=$("$bin" fsck "$pgurl" 2>&1 | tail -1); t1=$(now)
fsck_pg=$(secs "$t0" "$t1")
mkdir -p "$work/mnt3"
t0=$(now)
"$bin" mount -d --cache-size 0 "$pgurl" "$work/mnt3" >/dev/null
(cd "$work/mnt3" && sha256sum -c --quiet "$work/sums")
t1=$(now)
mount_read=$(secs "$t0" "$t1")
entries=$(ls "$work/mnt3/d00000" | wc -l)
copied_live=$(ls "$work/mnt3" | grep -c '^live-' || true)
changed=$(cat "$work/mnt3/d00003/f0007")
"$bin" umount "$work/mnt3"

cat <<EOF
| step | inodes | seconds |
|---|---:|---:|
| load the extended dump into SQLite | $inodes | $load_sqlite |
| dump SQLite, idle ($size MiB, $records lines) | $inodes | $dump_idle |
| dump SQLite while a mount creates files ($live_files created meanwhile) | $inodes | $dump_live |
| load into PostgreSQL (the dump taken while the mount wrote) | $inodes | $load_pg |
| catch-up 1, writer stopped after the dump: $catch1_what | $inodes | $catch1 |
| catch-up 2 = the pause: 100 files changed in 10 directories, writers stopped: $catch2_what | $inodes | $catch2 |
| fsck on PostgreSQL: $fsck | $inodes | $fsck_pg |
| mount the PostgreSQL copy + read 48 MiB of real files byte-exact (sha256) | — | $mount_read |

The loaded volume lists $entries entries in /d00000 and $copied_live of the $live_files files
the mount created during and after the dump; /d00003/f0007 reads "$changed"; sha256 of every
real file matched.
EOF
