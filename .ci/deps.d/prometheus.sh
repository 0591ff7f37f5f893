#!/usr/bin/env bash
# Prometheus and promtool (Debian's `prometheus` package) for e2e/prometheus-check.sh, which
# starts its own server on 127.0.0.1. The package's system service is kept from starting
# (policy-rc.d answers 101 during the install) and stopped if it runs anyway. Idempotent.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
echo "install-deps: apt-get install prometheus (no system service)"
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  own_policy=1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
[ "$own_policy" = 1 ] && rm -f "$policy"
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
