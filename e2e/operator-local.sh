#!/usr/bin/env bash
# e2e/operator-local.sh — the operator run outside the cluster, as a developer or a platform
# team trying it first would: the CRDs applied with kubectl to the API server KUBECONFIG names,
# the examples validated by that API server, malformed objects refused with readable messages,
# then `strata-operator` started on this machine with the kubeconfig: it formats a Volume
# (SQLite + a local directory here), creates its StorageClass and sets Ready, applies a Quota
# to the file system and reports its usage, and creates a CacheGroup's DaemonSet.
#
#   KUBECONFIG=... e2e/operator-local.sh      (test bed: source /tmp/tb/env first)
#
# No chart is installed; the cluster must not run Strata already. Everything it creates is
# deleted at the end (the CRDs too, unless they were there before). Ends with `operator-local: N passed, N failed`.
#
# Settings (environment):
#   STRATA_BIN=target/release        where strata and strata-operator are
#   OPLOCAL_IMAGE=docker.io/strata/strata:dev   image of the cache members (with
#                                    OPLOCAL_PULL_POLICY=Never it must be in the node's runtime;
#                                    e2e/image/build.sh strata); members Ready is reported,
#                                    not required: the DaemonSet is what is checked
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/strata-k8s-tools/bin:$PATH"
: "${KUBECONFIG:?set KUBECONFIG to the cluster to test (test bed: source /tmp/tb/env)}"
command -v kubectl >/dev/null || { echo "operator-local: kubectl needed (.ci/deps.d/k8s-tools.sh)"; exit 1; }
BIN=${STRATA_BIN:-target/release}
for b in strata strata-operator; do
  [ -x "$BIN/$b" ] || { echo "operator-local: $BIN/$b missing (cargo build --release --workspace --bins)"; exit 1; }
done
BIN=$(cd "$BIN" && pwd)
IMAGE=${OPLOCAL_IMAGE:-docker.io/strata/strata:dev}
PULL=${OPLOCAL_PULL_POLICY:-Never}
NS=strata-oplocal
TENANT=oplocal-team
WORK=$(mktemp -d /tmp/strata-oplocal.XXXXXX)
VOL=$WORK/vol
PASSED=0 FAILED=0 OP_PID= KEEP_CRDS=0
MADE_NS=()

k() { kubectl "$@"; }
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
ok() { PASSED=$((PASSED + 1)); echo "  ok: $*"; }
bad() { FAILED=$((FAILED + 1)); echo "  FAILED: $*" >&2; }
# until_ok SECONDS CMD...: run CMD until it succeeds, at most SECONDS.
until_ok() {
  local limit=$1 t0; shift; t0=$(date +%s)
  until "$@" >/dev/null 2>&1; do
    [ $(( $(date +%s) - t0 )) -ge "$limit" ] && return 1
    sleep 0.5
  done
}
# refused NAME YAML FIELD: the API server refuses YAML and its message names FIELD.
refused() {
  local err
  if err=$(k apply -f - 2>&1 <<<"$2"); then
    bad "$1 was accepted"; k delete -f - --wait=false <<<"$2" >/dev/null 2>&1; return
  fi
  if echo "$err" | grep -q -- "$3"; then
    ok "$1 refused: $(echo "$err" | grep -o -- "$3.*" | head -1 | cut -c1-200)"
  else
    bad "$1 refused without naming $3: $err"
  fi
}

cleanup() {
  log "cleaning up"
  k delete cachegroup oplocal --ignore-not-found --timeout=60s >/dev/null 2>&1
  k -n "$TENANT" delete quota storage --ignore-not-found --timeout=60s >/dev/null 2>&1
  k delete volume oplocal --ignore-not-found --timeout=60s >/dev/null 2>&1
  [ -n "$OP_PID" ] && kill "$OP_PID" 2>/dev/null && wait "$OP_PID" 2>/dev/null
  # Anything a failed run left with a finalizer goes anyway.
  local o
  for o in $(k get volumes,cachegroups -o name 2>/dev/null) $(k get quotas -A -o name 2>/dev/null); do
    k patch "$o" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
  done
  k delete namespace "$NS" "$TENANT" "${MADE_NS[@]}" --ignore-not-found --wait=false >/dev/null 2>&1
  k delete storageclass oplocal --ignore-not-found >/dev/null 2>&1
  [ "$KEEP_CRDS" = 1 ] || k delete -f charts/strata/crds/strata.io.yaml --ignore-not-found >/dev/null 2>&1
  umount "$WORK/mnt" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

log "1. CRDs and examples against the API server ($(k version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])'))"
if [ -n "$(k get pods -A -l app.kubernetes.io/name=strata-csi-controller -o name 2>/dev/null)" ]; then
  echo "operator-local: Strata is installed in this cluster (its operator would reconcile too): run this on a cluster without it"
  trap - EXIT; rm -rf "$WORK"; exit 1
fi
# CRDs left by an earlier install (Helm never deletes them) are applied over and kept.
k get crd volumes.strata.io >/dev/null 2>&1 && KEEP_CRDS=1
if k apply -f charts/strata/crds/strata.io.yaml >/dev/null &&
   k wait --for=condition=Established crd/volumes.strata.io crd/quotas.strata.io crd/cachegroups.strata.io --timeout=60s >/dev/null; then
  ok "kubectl apply -f charts/strata/crds/strata.io.yaml: 3 CRDs Established"
else
  bad "the CRDs did not install"; exit 1
fi
# The examples' namespaces, made for the dry run when missing (and deleted at the end).
for ns in strata-system team-a; do
  k get namespace "$ns" >/dev/null 2>&1 || { k create namespace "$ns" >/dev/null && MADE_NS+=("$ns"); }
done
if out=$(k apply --dry-run=server -f e2e/examples/ 2>&1); then
  ok "kubectl apply --dry-run=server -f e2e/examples/: $(echo "$out" | wc -l) objects valid"
else
  bad "the examples: $out"
fi

log "2. malformed objects"
# bad_volume SPEC_LINE: a Volume that is well formed but for SPEC_LINE.
bad_volume() {
  printf '%s\n' "apiVersion: strata.io/v1alpha1" "kind: Volume" "metadata: {name: oplocal-bad}" "spec:" \
    "  credentialsSecretRef: {name: x, namespace: $NS}" "  storage: {type: file, bucket: /tmp/x}" "  $1"
}
refused "a Volume with blockSizeKiB 1000" "$(bad_volume 'format: {blockSizeKiB: 1000}')" "blockSizeKiB"
refused "a Quota with neither capacity nor inodes" "apiVersion: strata.io/v1alpha1
kind: Quota
metadata: {name: oplocal-bad, namespace: default}
spec: {volume: oplocal}" "capacity"
refused "a CacheGroup with an absolute warm-up path" "apiVersion: strata.io/v1alpha1
kind: CacheGroup
metadata: {name: oplocal-bad}
spec:
  volume: oplocal
  medium: {hostPath: {path: /var/cache/x}}
  sizePerNode: 1Gi
  warmupPaths: [/etc]" "warmupPaths"
refused "a mount option with a space" "$(bad_volume "mountOptions: ['buffer-size 600']")" "mountOptions"

log "3. strata-operator outside the cluster, with the kubeconfig"
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
printf 'image: %s\nimagePullPolicy: %s\nresyncSecs: 5\nretrySecs: 5\n' "$IMAGE" "$PULL" >"$WORK/operator.yaml"
k create namespace "$NS" --dry-run=client -o yaml | k apply -f - >/dev/null
"$BIN/strata-operator" --config "$WORK/operator.yaml" --metrics-addr "127.0.0.1:$port" \
  --lease-namespace "$NS" --identity "$(hostname)-oplocal" >"$WORK/operator.log" 2>&1 &
OP_PID=$!
if until_ok 30 curl -sf "http://127.0.0.1:$port/readyz"; then
  ok "strata-operator running here (pid $OP_PID), ready on 127.0.0.1:$port"
else
  bad "the operator did not get ready"; tail -20 "$WORK/operator.log"; exit 1
fi
mkdir -p "$VOL"
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Secret
metadata: {name: oplocal, namespace: $NS}
stringData: {metaurl: "sqlite://$VOL/meta.db"}
---
apiVersion: strata.io/v1alpha1
kind: Volume
metadata: {name: oplocal}
spec:
  credentialsSecretRef: {name: oplocal, namespace: $NS}
  storage: {type: file, bucket: $VOL/data}
  capacity: 10Gi
  storageClasses: [{name: oplocal, reclaimPolicy: Delete, onDelete: delete}]
  deletionPolicy: Delete
EOF
t0=$(date +%s.%N)
if k wait volume/oplocal --for=condition=Ready --timeout=60s >/dev/null; then
  ok "Volume oplocal Ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
else
  bad "Volume oplocal not Ready: $(k get volume oplocal -o jsonpath='{.status.conditions}')"
fi
if info=$("$BIN/strata" status "sqlite://$VOL/meta.db" 2>&1) && echo "$info" | grep -q '"name": "oplocal"'; then
  ok "formatted by the operator: strata status shows $(echo "$info" | grep -E '"(name|capacity|block_size)"' | tr -s ' \n' ' ')"
else
  bad "strata status of the Volume's metadata: $info"
fi
if sc=$(k get storageclass oplocal -o jsonpath='{.provisioner} {.parameters}' 2>&1); then
  ok "StorageClass oplocal: $(echo "$sc" | cut -c1-160)"
else
  bad "no StorageClass oplocal: $sc"
fi
ev=$(k get events -A --field-selector involvedObject.name=oplocal -o jsonpath='{range .items[*]}{.reason} {end}' 2>/dev/null)
echo "$ev" | grep -q Formatted && ok "events of the Volume: $ev" || bad "no Formatted event (events: $ev)"

log "4. a tenant Quota, applied to the file system, its usage reported"
k create namespace "$TENANT" --dry-run=client -o yaml | k apply -f - >/dev/null
k apply -f - >/dev/null <<EOF
apiVersion: strata.io/v1alpha1
kind: Quota
metadata: {name: storage, namespace: $TENANT}
spec: {volume: oplocal, capacity: 64Mi, inodes: 1000}
EOF
if k -n "$TENANT" wait quota/storage --for=condition=Ready --timeout=60s >/dev/null; then
  ok "Quota $TENANT/storage Ready"
else
  bad "Quota not Ready: $(k -n "$TENANT" get quota storage -o jsonpath='{.status.conditions}')"
fi
q=$("$BIN/strata" quota get "sqlite://$VOL/meta.db" --path "tenants/$TENANT" 2>&1)
echo "$q" | grep -q "/ 67108864 bytes, inodes [0-9]* / 1000" && ok "strata quota get tenants/$TENANT: $(echo "$q" | tr -s ' \n' ' ')" ||
  bad "the directory quota is not in the file system: $q"
mkdir -p "$WORK/mnt"
if "$BIN/strata" mount -d --cache-dir "$WORK/client-cache" "sqlite://$VOL/meta.db" "$WORK/mnt" >/dev/null 2>&1; then
  dd if=/dev/zero of="$WORK/mnt/tenants/$TENANT/ten" bs=1M count=10 conv=fsync status=none
  err=$(dd if=/dev/zero of="$WORK/mnt/tenants/$TENANT/big" bs=1M count=100 conv=fsync 2>&1)
  echo "$err" | grep -qi "quota exceeded" && ok "a write past 64Mi in the tenant directory: $(echo "$err" | grep -io 'disk quota exceeded' | head -1)" ||
    bad "no EDQUOT past the Quota: $err"
  rm -f "$WORK/mnt/tenants/$TENANT/big"
  until_ok 30 sh -c "[ \"\$(kubectl -n $TENANT get quota storage -o jsonpath='{.status.usedBytes}')\" -ge 10485760 ] 2>/dev/null"
  used=$(k -n "$TENANT" get quota storage -o jsonpath='{.status.usedBytes} {.status.limitBytes} {.status.usedInodes} {.status.usage}')
  [ "${used%% *}" -ge 10485760 ] 2>/dev/null && ok "Quota status (usedBytes limitBytes usedInodes usage): $used" ||
    bad "Quota usage not reported: $used"
  "$BIN/strata" umount "$WORK/mnt" >/dev/null 2>&1 || umount "$WORK/mnt"
else
  bad "strata mount of the Volume failed"
fi

log "5. a CacheGroup reconciled to a DaemonSet"
gport=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
k apply -f - >/dev/null <<EOF
apiVersion: strata.io/v1alpha1
kind: CacheGroup
metadata: {name: oplocal}
spec:
  volume: oplocal
  medium: {hostPath: {path: $WORK/cache}}
  sizePerNode: 1Gi
  port: $gport
EOF
if until_ok 30 k -n "$NS" get daemonset strata-cache-oplocal; then
  ok "DaemonSet $NS/strata-cache-oplocal: $(k -n "$NS" get daemonset strata-cache-oplocal -o jsonpath='image {.spec.template.spec.containers[0].image}, desired {.status.desiredNumberScheduled}')"
else
  bad "no DaemonSet for the CacheGroup: $(k get cachegroup oplocal -o jsonpath='{.status.conditions}')"
fi
if k wait cachegroup/oplocal --for=condition=Ready --timeout=90s >/dev/null 2>&1; then
  echo "      members: $(k get cachegroup oplocal -o jsonpath='{.status.members}') Ready"
else
  echo "      members not Ready within 90 s (image $IMAGE on the node?): $(k get cachegroup oplocal -o jsonpath='{.status.conditions[?(@.type=="Degraded")].message}' | cut -c1-200)"
fi

log "6. deletion through the finalizers"
k delete cachegroup oplocal --timeout=60s >/dev/null && until_ok 30 sh -c "! kubectl -n $NS get daemonset strata-cache-oplocal" &&
  ok "CacheGroup deleted, its DaemonSet gone" || bad "CacheGroup deletion"
k -n "$TENANT" delete quota storage --timeout=60s >/dev/null &&
  q=$("$BIN/strata" quota get "sqlite://$VOL/meta.db" --path "tenants/$TENANT" 2>&1); echo "$q" | grep -q "has no quota" &&
  ok "Quota deleted: limit removed from the file system" || bad "the limit outlived the Quota: $q"
k delete volume oplocal --timeout=60s >/dev/null && ! k get storageclass oplocal >/dev/null 2>&1 &&
  ok "Volume deleted (deletionPolicy Delete), its StorageClass gone, $(find "$VOL/data" -type f 2>/dev/null | wc -l) object files left" ||
  bad "Volume deletion"

echo "operator-local: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
