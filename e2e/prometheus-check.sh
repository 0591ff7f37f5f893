#!/usr/bin/env bash
# Acceptance check of the chart's monitoring (issue #18; docs/OPERATIONS.md): a real
# Prometheus (Debian `prometheus`, started here on 127.0.0.1 with the chart's rules file)
# scrapes two `strata mount`s forming a cache group of two members, a `strata gateway`, and
# the operator (`strata-operator` against a kube-apiserver + etcd started here on loopback,
# with a Volume adopting the same volume and a Quota), while a workload runs through them (writes, cold reads through the peer, warm re-reads,
# lookups of missing names, S3 PUT/GET through the gateway). Then every query of the
# dashboard (charts/strata/files/grafana-dashboard.json) and every rule of
# charts/strata/files/prometheus-rules.yaml is run with `promtool query instant`; each must
# return at least one sample. A recording rule is checked by querying its series; an alert by
# querying its expression without the final threshold comparison (`X > 0.9` -> `X`), i.e.
# whether the series the alert watches exist, firing or not. `promtool check rules` runs
# first.
#
# The operator needs etcd (Debian etcd-server), kube-apiserver (PATH or the test bed's
# /opt/strata-testbed/bin), kubectl and openssl; STRATA_OPERATOR_METRICS=HOST:PORT scrapes an
# operator running elsewhere instead (e.g. a `kubectl port-forward` on a cluster). Without
# either, its series are reported as skipped, not passed, and their queries must still be
# valid PromQL.
#
# Usage: e2e/prometheus-check.sh [--strata-bin PATH]   (default target/debug/strata, built
# if missing). Needs root (FUSE), prometheus, promtool, python3, and the aws CLI for the
# gateway (.ci/deps.d/prometheus.sh, .ci/deps.d/gateway.sh).
# Ends with: prometheus-check: N passed, M failed
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --strata-bin) bin="$2"; shift 2 ;;
    *) echo "usage: $0 [--strata-bin PATH]"; exit 2 ;;
  esac
done
summary_fail() { echo "prometheus-check: $1"; echo "prometheus-check: 0 passed, 1 failed"; exit 1; }
for t in prometheus promtool python3; do
  command -v "$t" >/dev/null 2>&1 || summary_fail "$t missing: run .ci/install-deps (.ci/deps.d/prometheus.sh)"
done
if [ -z "$bin" ]; then
  bin="$root/target/debug/strata"
  [ -x "$bin" ] || cargo build -q -p fs-core --bin strata || summary_fail "cargo build of strata failed"
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
[ -x "$bin" ] || summary_fail "no strata binary at $bin"

rules="$root/charts/strata/files/prometheus-rules.yaml"
dashboard="$root/charts/strata/files/grafana-dashboard.json"
tmp="$(mktemp -d /tmp/strata-promcheck.XXXXXX)"
pids=()
mounts=()
stop() { # pid: SIGTERM, then SIGKILL after 5 s
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}
cleanup() {
  for m in "${mounts[@]}"; do "$bin" umount --force "$m" >/dev/null 2>&1; done
  # Newest first: the operator before the API server it talks to, that before etcd.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[$i]}"; done
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  return 1
}

pass=0; fail=0; skipped=0
ok() { pass=$((pass+1)); echo "ok   $1"; }
bad() { fail=$((fail+1)); echo "FAIL $1"; }

# 1. The rules file as promtool reads it.
if promtool check rules "$rules" >"$tmp/check.out" 2>&1; then ok "promtool check rules $(sed -n 's/.*SUCCESS: //p' "$tmp/check.out")"
else bad "promtool check rules"; sed 's/^/     /' "$tmp/check.out"; fi

# 2. A volume (SQLite + local directory, 1 MiB blocks), two mounts in cache group `promcheck`
#    with small caches (so that blocks are evicted), and a gateway in the same group.
meta="sqlite://$tmp/meta.db"
"$bin" format --storage file --bucket "$tmp/bucket" --block-size 1024 "$meta" promcheck \
  >"$tmp/format.log" 2>&1 || { cat "$tmp/format.log"; summary_fail "strata format failed"; }
mport_a=$(free_port); mport_b=$(free_port); gport=$(free_port); s3port=$(free_port); pport=$(free_port)
client_opts=(--cache-size 24 --mem-cache-size 8 --cache-group promcheck --no-bgjob)
start_mount() { # name metrics-port
  mkdir -p "$tmp/mnt-$1"
  "$bin" mount --metrics "127.0.0.1:$2" --metrics-labels "node=node-$1" \
    --cache-dir "$tmp/cache-$1" --cache-group-addr "127.0.0.1:$(free_port)" "${client_opts[@]}" \
    "$meta" "$tmp/mnt-$1" >"$tmp/mount-$1.log" 2>&1 &
  pids+=($!)
  mounts+=("$tmp/mnt-$1")
}
start_mount a "$mport_a"
start_mount b "$mport_b"
STRATA_GATEWAY_ACCESS_KEY=promcheck STRATA_GATEWAY_SECRET_KEY=promcheck-secret \
  "$bin" gateway --metrics "127.0.0.1:$gport" --cache-dir "$tmp/cache-gw" \
  --cache-group-addr "127.0.0.1:$(free_port)" "${client_opts[@]}" "$meta" "127.0.0.1:$s3port" \
  >"$tmp/gateway.log" 2>&1 &
pids+=($!)
for p in "$mport_a" "$mport_b" "$gport"; do
  wait_http "http://127.0.0.1:$p/metrics" 30 || { tail -n 5 "$tmp"/*.log; summary_fail "a client did not serve metrics on 127.0.0.1:$p"; }
done
for m in "${mounts[@]}"; do
  for _ in $(seq 100); do mountpoint -q "$m" && break; sleep 0.1; done
  mountpoint -q "$m" || { tail -n 5 "$tmp"/mount-*.log; summary_fail "$m was not mounted"; }
done

# 2b. The operator, against a real kube-apiserver on loopback (etcd and kube-apiserver only:
#     no nodes, nothing scheduled), with a Volume adopting the volume above and a Quota on
#     it, when those binaries are here (the test bed's, /opt/strata-testbed/bin) and no
#     STRATA_OPERATOR_METRICS is given.
operator_bin="$(dirname "$bin")/strata-operator"
apiserver="$(command -v kube-apiserver || echo /opt/strata-testbed/bin/kube-apiserver)"
kubectl="$(command -v kubectl || echo /opt/strata-k8s-tools/bin/kubectl)"
operator_note="no STRATA_OPERATOR_METRICS, and no etcd/kube-apiserver/kubectl/strata-operator to start one"
if [ -z "${STRATA_OPERATOR_METRICS:-}" ] && [ ! -x "$operator_bin" ] && [ -x "$apiserver" ]; then
  cargo build -q -p strata-operator --bin strata-operator 2>/dev/null \
    && operator_bin="$root/target/debug/strata-operator"
fi
if [ -z "${STRATA_OPERATOR_METRICS:-}" ] && [ -x "$apiserver" ] && [ -x "$operator_bin" ] && [ -x "$kubectl" ] \
  && command -v etcd >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
  kc=("$kubectl" --kubeconfig "$tmp/kubeconfig")
  ep=$(free_port); epp=$(free_port); ap=$(free_port); oport=$(free_port)
  etcd --name pc --data-dir "$tmp/etcd" --listen-client-urls "http://127.0.0.1:$ep" \
    --advertise-client-urls "http://127.0.0.1:$ep" --listen-peer-urls "http://127.0.0.1:$epp" \
    --initial-advertise-peer-urls "http://127.0.0.1:$epp" --initial-cluster "pc=http://127.0.0.1:$epp" \
    --initial-cluster-state new >"$tmp/etcd.log" 2>&1 &
  pids+=($!)
  openssl genrsa -out "$tmp/sa.key" 2048 2>/dev/null
  openssl rsa -in "$tmp/sa.key" -pubout -out "$tmp/sa.pub" 2>/dev/null
  token=$(openssl rand -hex 16)
  echo "$token,admin,admin-uid,system:masters" >"$tmp/tokens.csv"
  "$apiserver" --etcd-servers "http://127.0.0.1:$ep" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
    --secure-port "$ap" --cert-dir "$tmp/certs" --token-auth-file "$tmp/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local --service-account-key-file "$tmp/sa.pub" \
    --service-account-signing-key-file "$tmp/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
    --endpoint-reconciler-type none --profiling=false >"$tmp/apiserver.log" 2>&1 &
  pids+=($!)
  cat >"$tmp/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: pc, cluster: {server: "https://127.0.0.1:$ap", certificate-authority: "$tmp/certs/apiserver.crt"}}]
users: [{name: admin, user: {token: $token}}]
contexts: [{name: pc, context: {cluster: pc, user: admin}}]
current-context: pc
KUBECONFIG
  for _ in $(seq 120); do
    curl -sf --cacert "$tmp/certs/apiserver.crt" -H "Authorization: Bearer $token" \
      "https://127.0.0.1:$ap/readyz" -o /dev/null 2>&1 && break
    sleep 0.5
  done
  if "${kc[@]}" apply -f "$root/charts/strata/crds/strata.io.yaml" >"$tmp/kubectl.log" 2>&1 \
    && "${kc[@]}" wait --for=condition=Established crd --all --timeout=60s >>"$tmp/kubectl.log" 2>&1 \
    && "${kc[@]}" apply -f - >>"$tmp/kubectl.log" 2>&1 <<OBJECTS
apiVersion: v1
kind: Namespace
metadata: {name: strata-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: v1
kind: Secret
metadata: {name: promcheck-volume, namespace: strata-system}
stringData: {metaurl: "$meta"}
---
apiVersion: strata.io/v1alpha1
kind: Volume
metadata: {name: promcheck}
spec:
  credentialsSecretRef: {name: promcheck-volume, namespace: strata-system}
  storage: {type: file, bucket: "$tmp/bucket"}
  format: {blockSizeKiB: 1024}
  capacity: 1Gi
---
apiVersion: strata.io/v1alpha1
kind: Quota
metadata: {name: storage, namespace: team-a}
spec: {volume: promcheck, capacity: 64Mi, inodes: 1000}
OBJECTS
  then
    printf 'resyncSecs: 2\nretrySecs: 2\n' >"$tmp/operator.yaml"
    KUBECONFIG="$tmp/kubeconfig" "$operator_bin" --config "$tmp/operator.yaml" \
      --metrics-addr "127.0.0.1:$oport" --lease-namespace strata-system --identity promcheck \
      >"$tmp/operator.log" 2>&1 &
    pids+=($!)
    if "${kc[@]}" wait --for=condition=Ready volume/promcheck --timeout=60s >>"$tmp/kubectl.log" 2>&1; then
      STRATA_OPERATOR_METRICS="127.0.0.1:$oport"
      ok "operator on a loopback kube-apiserver: Volume promcheck Ready, status $("${kc[@]}" get volume promcheck \
        -o jsonpath='clients={.status.clients} usedInodes={.status.usedInodes} usage={.status.usage}')"
    else
      operator_note="the operator's Volume did not become Ready"
      bad "operator on a loopback kube-apiserver: Volume promcheck not Ready in 60 s"
      tail -n 5 "$tmp/operator.log" "$tmp/kubectl.log"
    fi
  else
    operator_note="the loopback kube-apiserver did not take the CRDs and objects"
    bad "operator: $operator_note"
    tail -n 5 "$tmp/kubectl.log" "$tmp/apiserver.log"
  fi
fi

# 3. Prometheus on 127.0.0.1 with the chart's rules, jobs named like the chart's PodMonitors.
operator_job=""
if [ -n "${STRATA_OPERATOR_METRICS:-}" ]; then
  operator_job="  - job_name: strata-operator
    static_configs: [{targets: ['${STRATA_OPERATOR_METRICS}']}]"
fi
cat >"$tmp/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ['$rules']
scrape_configs:
  - job_name: strata-mount
    static_configs: [{targets: ['127.0.0.1:$mport_a', '127.0.0.1:$mport_b']}]
  - job_name: strata-gateway
    static_configs: [{targets: ['127.0.0.1:$gport']}]
$operator_job
EOF
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$pport" >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
prom="http://127.0.0.1:$pport"
wait_http "$prom/-/ready" 30 || { tail -20 "$tmp/prometheus.log"; summary_fail "prometheus did not start"; }

# 4. The workload, in two rounds so that every rate sees movement between scrapes.
a="$tmp/mnt-a"; b="$tmp/mnt-b"
export AWS_ACCESS_KEY_ID=promcheck AWS_SECRET_ACCESS_KEY=promcheck-secret AWS_DEFAULT_REGION=us-east-1
s3() { aws --endpoint-url "http://127.0.0.1:$s3port" s3 "$@" >/dev/null 2>&1; }
for round in 1 2; do
  mkdir -p "$a/r$round"
  # 48 MiB written on A (48 blocks: more than a 24 MiB disk cache holds: evictions).
  dd if=/dev/urandom of="$a/r$round/big" bs=1M count=48 status=none
  for i in $(seq 50); do echo "file $i" >"$a/r$round/small-$i"; done
  sync
  # Cold on B: blocks from the group (A's cache) or the store; then warm re-reads.
  cat "$b/r$round/big" >/dev/null
  cat "$b/r$round/big" >/dev/null
  cat "$a/r$round/big" >/dev/null
  ls -l "$b/r$round" >/dev/null
  for i in $(seq 20); do stat "$b/r$round/missing-$i" >/dev/null 2>&1; done   # ENOENT
  rm -f "$a/r$round"/small-*
  if command -v aws >/dev/null 2>&1; then
    dd if=/dev/urandom of="$tmp/obj" bs=1M count=4 status=none
    s3 cp "$tmp/obj" "s3://promcheck/s3/obj-$round"
    s3 cp "s3://promcheck/s3/obj-$round" "$tmp/obj.back"
    s3 ls "s3://promcheck/r$round/"
  fi
  sleep 3
done
# Two more scrapes and rule evaluations after the last of it.
sleep 3

# 5. Every series a Strata client exports carries its volume and the --metrics-labels.
count() { promtool query instant -o json "$prom" "$1" 2>/dev/null \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(int(float(r[0]["value"][1])) if r else 0)' 2>/dev/null || echo 0; }
all=$(count 'count({__name__=~"strata_.+", job=~"strata-(mount|gateway)"})')
labelled=$(count 'count({__name__=~"strata_.+", job=~"strata-(mount|gateway)", volume="promcheck"})')
node_labelled=$(count 'count({__name__=~"strata_.+", job="strata-mount", node=~"node-(a|b)", cache_group="promcheck"})')
mount_all=$(count 'count({__name__=~"strata_.+", job="strata-mount"})')
if [ "$all" -gt 0 ] && [ "$all" = "$labelled" ] && [ "$mount_all" = "$node_labelled" ]; then
  ok "labels: all $all client series carry volume=\"promcheck\"; the mounts' $mount_all carry cache_group and their --metrics-labels node"
else
  bad "labels: $labelled of $all client series carry volume=\"promcheck\", $node_labelled of $mount_all the mounts' cache_group and node labels"
fi

# 6. Every dashboard query and every rule through promtool.
python3 - "$dashboard" "$rules" >"$tmp/queries.tsv" <<'PY'
import json, re, sys
dash, rules = sys.argv[1], sys.argv[2]
out = []
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(json.load(open(dash))["panels"]):
    for t in p.get("targets", []):
        e = t["expr"].replace("$__rate_interval", "1m").replace("$volume", ".*")
        out.append(("panel", f'{p["title"]} [{t["refId"]}]', e))
# The rules file is plain YAML of a known shape (a list of groups of rules with `record` or
# `alert` and an `expr`, one line or a `|` block): read without a YAML library.
name, kind, expr, block = None, None, None, False
def flush():
    if name:
        e = " ".join(expr.split())
        if kind == "alert":
            e = re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[-+0-9.eE]+$", "", e)
        out.append((kind, name, e))
for line in open(rules):
    m = re.match(r"\s*- (record|alert): (\S+)", line)
    if m:
        flush(); kind, name, expr, block = m.group(1), m.group(2), "", False
        continue
    m = re.match(r"\s*expr: (.*)", line)
    if m and name:
        v = m.group(1).strip()
        if v == "|":
            block = True
        else:
            expr, block = v, False
        continue
    if block and line.startswith("          "):
        expr += " " + line.strip()
    elif block:
        block = False
flush()
# Series only the operator exports, and recording rules made of them.
op_series = ["strata_operator_", "strata-operator"]
for kind, n, e in out:
    if kind == "record" and any(o in e for o in op_series):
        op_series.append(n)
for kind, n, e in out:
    q = n if kind == "record" else e
    operator = any(o in e for o in op_series)
    tag = "operator" if operator else "check"
    print(f"{kind}\t{n}\t{q}\t{tag}")
PY
while IFS=$'\t' read -r kind name query tag; do
  n=$(promtool query instant -o json "$prom" "$query" 2>"$tmp/q.err" \
      | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null)
  n=${n:-0}
  if [ "$tag" = operator ] && [ -z "$operator_job" ]; then
    # Without an operator its series are absent, but the query must still be valid PromQL.
    if [ -s "$tmp/q.err" ]; then
      bad "$kind \"$name\": $query: $(head -c 300 "$tmp/q.err")"
    else
      skipped=$((skipped+1)); echo "skip $kind \"$name\": operator series ($operator_note; the query is valid)"
    fi
    continue
  fi
  if [ "$n" -gt 0 ]; then
    ok "$kind \"$name\": $n series"
  else
    bad "$kind \"$name\": no data for $query $(head -c 300 "$tmp/q.err")"
  fi
done <"$tmp/queries.tsv"
echo "prometheus-check: $(wc -l <"$tmp/queries.tsv") queries; ${skipped} skipped (operator); ${SECONDS} s"
echo "prometheus-check: ${pass} passed, ${fail} failed"
[ "$fail" = 0 ]
