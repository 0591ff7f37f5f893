#!/usr/bin/env bash
# Offline checks of the image recipe (run by .ci/k8s-checks.sh): the Dockerfile and the test-bed
# builder use the same package list and set-up script, the scripts parse, and the archive
# writer produces an image whose manifest and config say what build.sh asks for.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -q 'COPY e2e/image/packages.txt e2e/image/setup.sh' Dockerfile \
  || { echo "Dockerfile does not copy e2e/image/packages.txt and setup.sh"; exit 1; }
grep -q '/tmp/image/packages.txt' Dockerfile && grep -q 'sh /tmp/image/setup.sh' Dockerfile \
  || { echo "Dockerfile does not install packages.txt or run setup.sh"; exit 1; }
grep -q '^USER 65532:65532' Dockerfile || { echo "Dockerfile user is not 65532:65532"; exit 1; }
grep -q -- '--user 65532:65532' e2e/image/build.sh || { echo "build.sh user is not 65532:65532"; exit 1; }
for b in strata strata-csi strata-operator; do
  grep -q "target/release/$b" Dockerfile || { echo "Dockerfile does not ship $b"; exit 1; }
done
grep -q 'for b in strata strata-csi strata-operator' e2e/image/build.sh || { echo "build.sh does not ship the three binaries"; exit 1; }
bash -n e2e/run.sh e2e/image/build.sh
sh -n e2e/image/setup.sh
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
mkdir -p "$w/root/usr/local/bin"; echo hi >"$w/root/usr/local/bin/x"
python3 e2e/image/oci_archive.py "$w/img.tar" example.org/t:1 "$w/root" --user 65532:65532 \
  --cmd-json '["strata", "--help"]' >/dev/null
python3 - "$w/img.tar" <<'PY'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
man = json.load(t.extractfile("manifest.json"))
assert man[0]["RepoTags"] == ["example.org/t:1"], man
cfg = json.load(t.extractfile(man[0]["Config"]))
assert cfg["config"]["User"] == "65532:65532", cfg
assert cfg["config"]["Cmd"] == ["strata", "--help"], cfg
layer = tarfile.open(fileobj=t.extractfile("layer.tar"))
assert "./usr/local/bin/x" in layer.getnames(), layer.getnames()
PY
echo "image recipe: ok"
