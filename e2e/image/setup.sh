#!/bin/sh
# Runs as root inside the image's root file system after its packages are installed: by the
# Dockerfile (RUN) and by e2e/image/build.sh (chroot). The one place that sets up the image's
# user and FUSE configuration.
set -eu
# Mount clients serve FUSE mounts that other users (the workload's uid) read.
grep -q '^user_allow_other' /etc/fuse.conf 2>/dev/null || echo user_allow_other >>/etc/fuse.conf
# uid/gid 65532 "strata": the operator, the CSI controller and mount Pods run as it, and it
# owns the files of volumes kept on a node (SQLite metadata, local-directory buckets).
grep -q '^strata:' /etc/group || groupadd --gid 65532 strata
grep -q '^strata:' /etc/passwd || useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin strata
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
