#!/usr/bin/env bash
# Prometheus and promtool (Debian's `prometheus` package) for e2e/prometheus-check.sh, which
# starts its own server on 127.0.0.1, and etcd (`etcd-server`) for the loopback API server it
# runs the operator against (kube-apiserver comes from the test bed when present). The
# packages' system services are kept from starting (policy-rc.d answers 101 during the
# install) and stopped if they run anyway. Idempotent.
set -euo pipefail

want=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || want+=(prometheus)
command -v etcd >/dev/null 2>&1 || want+=(etcd-server)
[ ${#want[@]} = 0 ] && exit 0
echo "install-deps: apt-get install ${want[*]} (no system service)"
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  own_policy=1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
[ "$own_policy" = 1 ] && rm -f "$policy"
for svc in prometheus etcd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done
