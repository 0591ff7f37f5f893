#!/usr/bin/env bash
# Benchmark harness smoke test (bench/smoke_test.sh): fio for workload 9. (bench/run installs
# it by itself when missing; installed here so CI does not depend on that.)
set -euo pipefail
if ! command -v fio >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
