#!/usr/bin/env bash
# POSIX conformance: run pjdfstest (the Rust rewrite, crates.io `pjdfstest` 0.2.x) against a
# throwaway Strata volume mounted with FUSE. Exit code = the suite's result (0 = no
# unexpected failure).
#
# Needs root and /dev/fuse. Installs what is missing: libacl1-dev (apt, to build pjdfstest),
# pjdfstest (cargo install), and the `tests` user/group the suite switches to.
#
# Environment:
#   STRATA_BIN        strata binary to use (default: build it with cargo, debug profile)
#   PJDFSTEST_ARGS    extra arguments for pjdfstest, e.g. test-name filters ("chmod rename")
#   PJDFSTEST_LOG     where to keep the full output (default: a file in the work dir, printed)
#   KEEP_WORKDIR=1    keep the temporary volume and logs
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PJDFSTEST_VERSION="^0.2"

log() { echo "pjdfstest.sh: $*" >&2; }
die() { log "$*"; exit 2; }

[ "$(id -u)" = 0 ] || die "must run as root (pjdfstest switches users; mounting needs root)"
[ -e /dev/fuse ] || die "/dev/fuse is missing"

# --- pjdfstest ---------------------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v pjdfstest >/dev/null 2>&1; then
    if [ ! -e /usr/include/sys/acl.h ]; then
        log "installing libacl1-dev (needed to build pjdfstest)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libacl1-dev) >&2 \
            || die "apt-get install libacl1-dev failed"
    fi
    log "installing pjdfstest $PJDFSTEST_VERSION with cargo"
    cargo install --locked pjdfstest --version "$PJDFSTEST_VERSION" >&2 || die "cargo install pjdfstest failed"
fi
PJDFSTEST="$(command -v pjdfstest)"

# The suite switches to two unprivileged users, each in a group of its own:
# nobody/nogroup (Debian) and tests/tests.
nobody_group="$(id -gn nobody 2>/dev/null)" || die "user nobody is missing"
if ! id tests >/dev/null 2>&1; then
    log "creating user and group 'tests' for pjdfstest"
    getent group tests >/dev/null || groupadd tests || die "groupadd tests failed"
    useradd -M -N -g tests -d / -s /usr/sbin/nologin tests || die "useradd tests failed"
fi

# --- strata ------------------------------------------------------------------------------
if [ -n "${STRATA_BIN:-}" ]; then
    strata="$STRATA_BIN"
else
    log "building strata"
    (cd "$repo" && cargo build -p fs-core --bin strata) >&2 || die "cargo build failed"
    strata="${CARGO_TARGET_DIR:-$repo/target}/debug/strata"
fi
[ -x "$strata" ] || die "no strata binary at $strata"

work="$(mktemp -d /tmp/strata-pjdfstest.XXXXXX)"
chmod 755 "$work"
mnt="$work/mnt"
second="$work/secondary"   # another file system (the host's) for the EXDEV tests
mkdir -p "$mnt" "$second"
meta="sqlite://$work/meta.db"
mount_pid=""

is_mounted() { awk -v m="$mnt" '$5 == m && $0 ~ / - fuse/ { found = 1 } END { exit !found }' /proc/self/mountinfo; }

cleanup() {
    if is_mounted; then
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    fi
    if [ -n "$mount_pid" ]; then
        for _ in $(seq 1 100); do kill -0 "$mount_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$mount_pid" 2>/dev/null
        wait "$mount_pid" 2>/dev/null
    fi
    if [ "${KEEP_WORKDIR:-0}" = 1 ]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

STRATA_LOG=warn "$strata" format --bucket "$work/data" "$meta" pjdfstest >&2 || die "strata format failed"
STRATA_LOG=info "$strata" mount --cache-dir "$work/cache" "$meta" "$mnt" >"$work/mount.log" 2>&1 &
mount_pid=$!
for _ in $(seq 1 300); do
    is_mounted && break
    kill -0 "$mount_pid" 2>/dev/null || { cat "$work/mount.log" >&2; die "strata mount exited"; }
    sleep 0.1
done
is_mounted || { cat "$work/mount.log" >&2; die "$mnt was not mounted after 30 s"; }
log "mounted $meta at $mnt (pid $mount_pid)"

# --- configuration -----------------------------------------------------------------------
# Strata implements utimensat/UTIME_NOW, posix_fallocate (fallocate mode 0) and updates ctime
# on rename; timestamps have nanosecond resolution.
write_conf() { # FILE ALLOW_REMOUNT
    cat >"$1" <<EOF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}
secondary_fs = "$second"

[settings]
naptime = 0.01
allow_remount = $2
expected_failures = []

[dummy_auth]
entries = [
  ["nobody", "$nobody_group"],
  ["tests", "tests"],
]
EOF
}
write_conf "$work/remount.toml" true
write_conf "$work/no-remount.toml" false

# The EROFS tests run `mount -o remount,ro MNT`. The mount's type is plain "fuse" (fuser
# mounts with mount(2) and type "fuse", without the subtype), so mount(8) hands a remount to
# the /sbin/mount.fuse helper, which tries to run the source "strata:NAME" as a program and
# fails. `mount -i` skips the helper and remounts with mount(2) directly: put a wrapper that
# adds it first in pjdfstest's PATH.
mkdir -p "$work/bin"
printf '#!/bin/sh\nexec %s -i "$@"\n' "$(command -v mount)" >"$work/bin/mount"
chmod 755 "$work/bin/mount"

# --- run ---------------------------------------------------------------------------------
# Two passes. The kernel refuses a read-only remount (EBUSY) while any file of the mount is
# open for writing, and some pjdfstest 0.2.2 cases leak such descriptors for the rest of the
# process (nix 0.29's open() returns a raw fd that is never closed, e.g.
# posix_fallocate::affected_only_create_flags). So the EROFS cases run first in a process of
# their own, then everything else with remounts disabled (the EROFS cases are then skipped
# by their guard, and not counted twice).
out="${PJDFSTEST_LOG:-$work/pjdfstest.log}"
: >"$out"
total_pass=0 total_fail=0 total_skip=0 rc=0
run_pass() { # CONF LABEL PATTERNS...
    local conf="$1" label="$2" r summary p f s
    shift 2
    echo "=== pjdfstest pass: $label" | tee -a "$out"
    PATH="$work/bin:$PATH" "$PJDFSTEST" -c "$conf" -p "$mnt" "$@" 2>&1 \
        | sed 's/\x1b\[[0-9;]*m//g' | tee "$out.pass"
    r=${PIPESTATUS[0]}
    cat "$out.pass" >>"$out"
    summary="$(grep -E '^Summary:' "$out.pass" | tail -1)"
    [ -n "$summary" ] || { echo "pjdfstest printed no summary (exit $r)"; r=1; }
    f=$(echo "$summary" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')
    s=$(echo "$summary" | sed -nE 's/.* ([0-9]+) skipped.*/\1/p')
    p=$(echo "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')
    total_pass=$((total_pass + ${p:-0}))
    total_fail=$((total_fail + ${f:-0}))
    total_skip=$((total_skip + ${s:-0}))
    [ "$r" = 0 ] || rc=1
}
start=$(date +%s)
if [ -n "${PJDFSTEST_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    run_pass "$work/remount.toml" "filtered: $PJDFSTEST_ARGS" $PJDFSTEST_ARGS
else
    run_pass "$work/remount.toml" "EROFS cases (read-only remounts)" erofs
    erofs_cases=$((total_pass + total_fail))
    run_pass "$work/no-remount.toml" "all other cases"
    # The second pass lists the EROFS cases again as skipped (remounts disallowed).
    total_skip=$((total_skip - erofs_cases))
fi
elapsed=$(( $(date +%s) - start ))

echo
echo "pjdfstest on strata finished in ${elapsed}s"
if [ "$total_fail" != 0 ]; then
    echo "failed test cases:"
    grep -E ' FAILED$| PASSED UNEXPECTEDLY$' "$out" | awk '{print "  " $1}'
fi
if grep -q "ERROR\|panicked" "$work/mount.log"; then
    echo "errors in the mount log:"
    grep "ERROR\|panicked" "$work/mount.log" | head -20
fi
if ! is_mounted; then
    echo "the mount was gone at the end of the run (crash?); log tail:"
    tail -20 "$work/mount.log"
    rc=1
fi
if [ -n "${PJDFSTEST_LOG:-}" ] || [ "${KEEP_WORKDIR:-0}" = 1 ]; then echo "full output: $out"; fi
echo "pjdfstest: $total_pass passed, $total_fail failed, $total_skip skipped"
exit "$rc"
