#!/usr/bin/env bash
# e2e/image/build.sh — container images for a cluster without a Docker engine or registry.
#
#   build.sh strata [BIN_DIR] [TAG]
#       The Strata image, described by the same files as the Dockerfile: Debian bookworm
#       (debootstrap minbase) + e2e/image/packages.txt, e2e/image/setup.sh run inside it, the
#       binaries strata, strata-csi and strata-operator of BIN_DIR (default target/release) in
#       /usr/local/bin, user 65532:65532. TAG default docker.io/strata/strata:dev.
#   build.sh sidecars BIN_DIR [TAG]
#       One image per kubernetes-csi sidecar binary found in BIN_DIR (csi-provisioner,
#       csi-resizer, csi-node-driver-registrar, livenessprobe; static Go binaries built from
#       source), named registry.k8s.io/sig-storage/<name>:TAG (default TAG: testbed) with the
#       binary as entry point (the chart passes only arguments).
#
# Images are written to $STRATA_IMAGE_DIR (default /var/tmp/strata-images) as tars and, when
# CTR_SOCK names a containerd socket, imported into its k8s.io namespace at once.
# Needs (root): debootstrap, python3; the root file system is cached per package list.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${STRATA_IMAGE_DIR:-/var/tmp/strata-images}
mkdir -p "$out"
die() { echo "build.sh: $*" >&2; exit 1; }

import() {
  [ -n "${CTR_SOCK:-}" ] || return 0
  ctr --address "$CTR_SOCK" -n k8s.io images import "$1" >/dev/null || die "importing $1"
  echo "imported into $CTR_SOCK"
}

packages() { grep -v '^[[:space:]]*\(#\|$\)' "$here/packages.txt" | tr -d ' ' | paste -sd, -; }

strata_image() {
  local bins=${1:-target/release} tag=${2:-docker.io/strata/strata:dev}
  command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
  local key rootfs
  key=$(cat "$here/packages.txt" "$here/setup.sh" | sha256sum | cut -c1-12)
  rootfs=$out/rootfs-bookworm-$key
  if [ ! -e "$rootfs/.done" ]; then
    rm -rf "$rootfs"
    echo "build.sh: debootstrap bookworm + $(packages) -> $rootfs"
    debootstrap --variant=minbase --include="$(packages)" bookworm "$rootfs" http://deb.debian.org/debian \
      >"$out/debootstrap.log" 2>&1 || die "debootstrap failed (see $out/debootstrap.log)"
    install -m 0755 "$here/setup.sh" "$rootfs/tmp/setup.sh"
    chroot "$rootfs" /bin/sh /tmp/setup.sh
    rm -f "$rootfs/tmp/setup.sh"
    touch "$rootfs/.done"
  fi
  local w
  w=$(mktemp -d)
  trap 'rm -rf "$w"' RETURN
  cp -a "$rootfs/." "$w/"
  rm -f "$w/.done"
  local b
  for b in strata strata-csi strata-operator; do
    [ -x "$bins/$b" ] || die "$bins/$b missing (cargo build --release --workspace --bins)"
    install -m 0755 "$bins/$b" "$w/usr/local/bin/$b"
    strip --strip-debug "$w/usr/local/bin/$b"
  done
  python3 "$here/oci_archive.py" "$out/strata.tar" "$tag" "$w" --user 65532:65532 --cmd-json '["strata", "--help"]'
  import "$out/strata.tar"
}

sidecar_images() {
  local bins=${1:?BIN_DIR} tag=${2:-testbed} n=0 name
  for name in csi-provisioner csi-resizer csi-node-driver-registrar livenessprobe; do
    [ -x "$bins/$name" ] || continue
    local w
    w=$(mktemp -d)
    mkdir -p "$w/bin" "$w/tmp"
    chmod 1777 "$w/tmp"
    install -m 0755 "$bins/$name" "$w/bin/$name"
    python3 "$here/oci_archive.py" "$out/$name.tar" "registry.k8s.io/sig-storage/$name:$tag" "$w" --entrypoint "/bin/$name"
    rm -rf "$w"
    import "$out/$name.tar"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || die "no sidecar binaries in $bins"
}

case "${1:-}" in
  strata) shift; strata_image "$@" ;;
  sidecars) shift; sidecar_images "$@" ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
