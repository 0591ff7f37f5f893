#!/usr/bin/env python3
"""Write a directory as a one-layer container image in the docker-archive format (the
format of `docker save`, read by `ctr images import`), without an engine or a registry.

    oci_archive.py OUT.tar NAME:TAG ROOTFS [--user U] [--entrypoint ARG ...] [--cmd-json '["ARG", ...]']
"""
import argparse
import hashlib
import io
import json
import tarfile
import time

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("ref")
p.add_argument("rootfs")
p.add_argument("--user", default="")
p.add_argument("--entrypoint", nargs="*", default=[])
p.add_argument("--cmd-json", default="[]")
a = p.parse_args()


def anonymous(info):
    # File owners stay numeric (uid 65532 has no name on the host).
    info.uname = info.gname = ""
    return info


layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
    t.add(a.rootfs, arcname=".", filter=anonymous)
layer = layer.getvalue()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
config = {
    "architecture": "amd64",
    "os": "linux",
    "created": created,
    "config": {
        "User": a.user,
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Entrypoint": a.entrypoint or None,
        "Cmd": json.loads(a.cmd_json) or None,
    },
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created": created, "created_by": "e2e/image/build.sh"}],
}
config_bytes = json.dumps(config, sort_keys=True).encode()
config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": [a.ref], "Layers": ["layer.tar"]}]).encode()
with tarfile.open(a.out, "w") as t:
    for name, data in ((config_name, config_bytes), ("layer.tar", layer), ("manifest.json", manifest)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        t.addfile(info, io.BytesIO(data))
print(f"{a.out}: {a.ref} ({len(layer) >> 20} MiB layer, user {a.user or 'root'})")
