#!/usr/bin/env bash
# CSI driver tests: real FUSE and bind mounts (fusermount3 / mount from util-linux). The CSI
# protobuf is compiled by the pure-Rust protox crate, so no protoc is needed.
set -euo pipefail
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v mount >/dev/null 2>&1 || need+=(mount)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The conformance test starts the `strata` client binary next to `strata-csi`.
cargo build -q -p fs-core --bin strata
