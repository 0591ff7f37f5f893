"""The workloads. Each function runs against one mounted system (a directory inside its
mount) and returns plain numbers; the driver (bench/run) decides order, runs and remounts."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from harness import drop_caches

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 64 * MiB
IO = 1 * MiB  # request size of the sequential workloads (like dd bs=1M)


@dataclass
class Config:
    mode: str
    runs: int
    backends: list[str]
    big_mib: int                 # size of each big file (one per thread)
    threads: list[int] = field(default_factory=lambda: [1, 2, 4])       # write and cold read
    warm_threads: list[int] = field(default_factory=lambda: [1, 2])     # warm (page cache) read
    along_mib: int = 8192        # workload 1, one big file read cold along its length ...
    along_seg_mib: int = 256     # ... in segments of this size (SQLite setups only)
    store_mib: int = 512         # workload 10: MiB per store-limit measurement
    store_obj_mib: int = 4       # object size (= block size of both systems)
    store_workers: list[int] = field(default_factory=lambda: [1, 2, 4, 16])
    fio_mib: int = 2048          # workload 9: total bytes per fio phase (split over the jobs)
    fio_jobs: list[int] = field(default_factory=lambda: [1, 4])
    small_count: int = 1000
    small_kib: int = 128
    meta_files: int = 2000       # per thread
    meta_threads: int = 2
    meta_dirs: int = 16
    trunc_sizes_gib: list[int] = field(default_factory=lambda: [4, 40])
    trunc_frags: int = 2048
    trunc_samples: int = 20
    ckpt_mib: int = 2048
    ckpt_entry_mib: int = 32
    fanout_mib: int = 1024
    fanout_readers: int = 8
    metas: list[str] = field(default_factory=lambda: ["sqlite", "postgres"])  # metadata engines
    cache_mib: int = 0           # disk cache of workload 8 (default: twice the big file, >= 256)
    group_mib: int = 4096        # workload 11: the file all members read (SQLite setups only)
    group_members: int = 4       # ... mounts of the volume (Strata: one cache group)
    group_readers: int = 8       # ... reader threads per mount
    group_settle_s: float = 4.0  # ... wait after the last mount (Strata re-reads membership every 2 s)
    gw_mib: int = 1024           # workload 12: the object GET through the S3 gateways
    gw_clients: list[int] = field(default_factory=lambda: [1, 8])  # ... concurrent clients
    ds_mib: int = 1024           # workload 13: the object in a bucket written by "another system"
    ds_files: int = 2000         # ... small objects beside it for the `ls -R` rows
    ds_prefixes: int = 20        # ... spread over this many prefixes
    ds_small_bytes: int = 1024   # ... each this big


def make_config(mode: str, ckpt_mib: int | None) -> Config:
    if mode == "smoke":
        c = Config(mode, runs=1, backends=["local"], big_mib=16, small_count=20, meta_files=50,
                   trunc_frags=64, trunc_samples=3, ckpt_mib=16, ckpt_entry_mib=4, fanout_mib=16,
                   metas=["sqlite"], along_mib=64, along_seg_mib=8, store_mib=32, fio_mib=32,
                   group_mib=32, gw_mib=16, ds_mib=32, ds_files=40, ds_prefixes=4)
    elif mode == "quick":
        c = Config(mode, runs=3, backends=["local", "s3"], big_mib=128, small_count=100,
                   meta_files=250, trunc_frags=512, trunc_samples=6, ckpt_mib=128,
                   ckpt_entry_mib=16, fanout_mib=128, along_mib=512, along_seg_mib=32,
                   store_mib=128, fio_mib=512, group_mib=512, gw_mib=256, ds_mib=256, ds_files=500,
                   ds_prefixes=10)
    else:
        c = Config(mode, runs=3, backends=["local", "s3"], big_mib=1024)
    if ckpt_mib:
        c.ckpt_mib = ckpt_mib
    c.cache_mib = max(256, 2 * c.big_mib)
    return c


def pattern(size: int = 8 * MiB) -> bytes:
    """Incompressible data (neither system compresses, but be safe)."""
    return random.Random(7).randbytes(size)


DATA = pattern()


def chunk_of(i: int, n: int = IO) -> memoryview:
    """The i-th n-byte piece of the pattern (rotating so blocks differ)."""
    off = (i * 4099 * 256) % (len(DATA) - n)
    return memoryview(DATA)[off:off + n]


def run_threads(fns) -> float:
    """Run the callables in parallel threads, start together; wall seconds. Re-raises."""
    errs: list[BaseException] = []
    barrier = threading.Barrier(len(fns) + 1)

    def wrap(f):
        try:
            barrier.wait()
            f()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errs.append(e)
    ts = [threading.Thread(target=wrap, args=(f,), daemon=True) for f in fns]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errs:
        raise errs[0]
    return wall


# --------------------------------------------------------------------------- 1. big files

def write_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // IO):
            os.write(fd, chunk_of(i))
    finally:
        os.close(fd)  # close flushes to the object store on both systems: timed


def read_file(path: Path, bufsize: int = IO) -> int:
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(mv)
            if not k:
                return n
            n += k


def big_paths(d: Path, threads: int) -> list[Path]:
    return [d / f"big-{threads}t-{i}" for i in range(threads)]


def big_write(d: Path, threads: int, size: int) -> float:
    """MiB/s of `threads` writers, one file each."""
    paths = big_paths(d, threads)
    wall = run_threads([lambda p=p: write_file(p, size) for p in paths])
    return threads * size / MiB / wall


def big_read(d: Path, threads: int, size: int) -> float:
    paths = big_paths(d, threads)
    got = [0] * threads

    def rd(i):
        got[i] = read_file(paths[i])
    wall = run_threads([lambda i=i: rd(i) for i in range(threads)])
    if sum(got) != threads * size:
        raise RuntimeError(f"read {sum(got)} bytes, expected {threads * size}")
    return sum(got) / MiB / wall


def read_along(path: Path, size: int, seg: int) -> tuple[float, list[float]]:
    """One reader, 1 MiB read() calls, start to end: (MiB/s over the whole file, MiB/s of
    each `seg`-byte segment in file order)."""
    buf = bytearray(IO)
    mv = memoryview(buf)
    rates: list[float] = []
    n = 0
    with open(path, "rb", buffering=0) as f:
        t0 = last = time.perf_counter()
        mark = seg
        while True:
            k = f.readinto(mv)
            if not k:
                break
            n += k
            if n >= mark:
                now = time.perf_counter()
                rates.append(seg / MiB / (now - last))
                last, mark = now, mark + seg
        wall = time.perf_counter() - t0
    if n != size:
        raise RuntimeError(f"read {n} bytes along {path}, expected {size}")
    return n / MiB / wall, rates


# --------------------------------------------------------------------------- 2. small files

def small_write(d: Path, count: int, kib: int) -> float:
    d.mkdir(exist_ok=True)
    payload = bytes(chunk_of(3, kib * 1024))
    t0 = time.perf_counter()
    for i in range(count):
        fd = os.open(d / f"s{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return count / (time.perf_counter() - t0)


def small_read(d: Path, count: int, kib: int) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        n = read_file(d / f"s{i:06d}", 256 * 1024)
        if n != kib * 1024:
            raise RuntimeError(f"small file {i}: {n} bytes")
    return count / (time.perf_counter() - t0)


def small_stat(d: Path, count: int) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        os.stat(d / f"s{i:06d}")
    return count / (time.perf_counter() - t0)


def small_delete(d: Path, count: int) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        os.unlink(d / f"s{i:06d}")
    return count / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- 3. metadata

def metadata(d: Path, threads: int, per_thread: int, ndirs: int) -> dict[str, float]:
    """ops/s of create, stat, rename (to another directory), remove of empty files,
    `threads` threads working in the same small tree."""
    dirs = [d / f"dir{k:02d}" for k in range(ndirs)]
    for x in dirs:
        x.mkdir(parents=True, exist_ok=True)
    name = lambda t, i: dirs[i % ndirs] / f"t{t}-{i}"  # noqa: E731
    moved = lambda t, i: dirs[(i + 1) % ndirs] / f"r{t}-{i}"  # noqa: E731

    def create(t):
        for i in range(per_thread):
            os.close(os.open(name(t, i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    def stat(t):
        for i in range(per_thread):
            os.stat(name(t, i))

    def rename(t):
        for i in range(per_thread):
            os.rename(name(t, i), moved(t, i))

    def remove(t):
        for i in range(per_thread):
            os.unlink(moved(t, i))
    total = threads * per_thread
    out = {}
    for op, fn in (("create", create), ("stat", stat), ("rename", rename), ("remove", remove)):
        if op == "stat":
            drop_caches()  # stat must reach the file system, not the kernel's dentry cache
        out[op] = total / run_threads([lambda t=t, fn=fn: fn(t) for t in range(threads)])
    return out


# --------------------------------------------------------------------------- 4. truncate

def fragment_offsets(size: int, frags: int, seed: int) -> list[int]:
    """`frags` 4 KiB-aligned offsets spread evenly over the chunks of [0, size), in
    scattered order, none adjacent (each write becomes its own slice)."""
    nchunks = max(1, size // CHUNK)
    per_chunk = -(-frags // nchunks)
    step = CHUNK // per_chunk
    offs = []
    for j in range(frags):
        c, k = j % nchunks, j // nchunks
        offs.append(c * CHUNK + k * step + 4096 * (j % 3) * 2)
    random.Random(seed).shuffle(offs)
    return offs


def fragment(fd: int, offs: list[int], fsync_every: int = 16) -> None:
    piece = bytes(chunk_of(11, 4096))
    for i, off in enumerate(offs):
        os.pwrite(fd, piece, off)
        if i % fsync_every == fsync_every - 1:
            os.fsync(fd)
    os.fsync(fd)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def truncate(path: Path, size: int, frags: int, samples: int, slices_fn) -> dict[str, float]:
    """Latencies (ms) on a fragmented sparse file of logical size `size`:
    ftruncate shrink to size/2, ftruncate grow back to size, open(O_TRUNC) from size.
    Returns p50/p99 of each and the slice count the system reports after fragmenting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fragment(fd, fragment_offsets(size, frags, 1))
        os.ftruncate(fd, size)
        os.fsync(fd)
        slices = slices_fn(path)
        shrink, grow, otrunc = [], [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            os.ftruncate(fd, size // 2)
            t1 = time.perf_counter()
            os.ftruncate(fd, size)
            t2 = time.perf_counter()
            shrink.append((t1 - t0) * 1e3)
            grow.append((t2 - t1) * 1e3)
        for s in range(samples):
            # Untimed: give the file its logical size and fresh fragments again.
            os.ftruncate(fd, size)
            fragment(fd, fragment_offsets(size, max(16, frags // 8), 100 + s))
            t0 = time.perf_counter()
            fd2 = os.open(path, os.O_WRONLY | os.O_TRUNC)
            otrunc.append((time.perf_counter() - t0) * 1e3)
            os.close(fd2)
    finally:
        os.close(fd)
    os.unlink(path)
    out = {"slices": float(slices)}
    for name, xs in (("shrink", shrink), ("grow", grow), ("otrunc", otrunc)):
        out[f"{name}_p50"] = pct(xs, 50)
        out[f"{name}_p99"] = pct(xs, 99)
    return out


# --------------------------------------------------------------------------- 5. checkpoint

def checkpoint_save(path: Path, total_mib: int, entry_mib: int) -> float:
    """A PyTorch-style save: open(O_TRUNC) over the old file, a zip (stored, zip64)
    written entry by entry with zipfile (which seeks back to patch each entry's header),
    closed. Returns MiB/s of the whole save."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:  # O_WRONLY|O_CREAT|O_TRUNC, like torch.save(path)
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr("archive/data.pkl", bytes(chunk_of(5, 64 * 1024)))
            zf.writestr("archive/version", b"3\n")
            for e in range(max(1, total_mib // entry_mib)):
                with zf.open(f"archive/data/{e}", "w", force_zip64=True) as w:
                    for i in range(entry_mib):
                        w.write(chunk_of(e * 131 + i))
    return total_mib / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- 6. fan-out

def fanout(path: Path, readers: int, size: int) -> float:
    """Wall seconds for `readers` concurrent sequential readers of one file."""
    got = [0] * readers

    def rd(i):
        got[i] = read_file(path)
    wall = run_threads([lambda i=i: rd(i) for i in range(readers)])
    if any(g != size for g in got):
        raise RuntimeError(f"fan-out readers got {got}, expected {size} each")
    return wall


# --------------------------------------------------------------------------- 11. cache group fan-out

def fanout_mounts(paths: list[Path], readers: int, size: int) -> float:
    """Wall seconds for `readers` concurrent sequential readers (1 MiB reads) of each path
    (the same file seen through several mounts), all started together."""
    got = [0] * (len(paths) * readers)

    def rd(i):
        got[i] = read_file(paths[i // readers])
    wall = run_threads([lambda i=i: rd(i) for i in range(len(got))])
    if any(g != size for g in got):
        raise RuntimeError(f"fan-out readers got {sorted(set(got))} bytes, expected {size} each")
    return wall


# --------------------------------------------------------------------------- 12. S3 gateway

def gateway_get(clients: list, path: str, size: int) -> float:
    """Wall seconds for every client (an harness.S3, one connection each) to GET the whole
    object `path` ("/bucket/key") at once, the body streamed through a 1 MiB buffer."""
    got = [0] * len(clients)

    def get(i):
        got[i] = clients[i].get_count(path, IO)
    wall = run_threads([lambda i=i: get(i) for i in range(len(clients))])
    if any(g != size for g in got):
        raise RuntimeError(f"gateway GETs of {path} got {got} bytes, expected {size} each")
    return wall


# --------------------------------------------------------------------------- 13. datasets in a bucket

def dataset_keys(prefix: str, files: int, prefixes: int) -> list[str]:
    """Keys of the small objects of workload 13: PREFIX/small/pNN/fNNNNN.json, `files` of
    them round-robin over `prefixes` prefixes."""
    return [f"{prefix}/small/p{i % prefixes:02d}/f{i:05d}.json" for i in range(files)]


def write_bucket(put_big, put_small, size: int, keys: list[str], small: int, workers: int = 4) -> None:
    """Fill the bucket as another system would: put_big(chunks, size) streams one object of
    `size` bytes (the 1 MiB pieces of the pattern, as chunk_of gives them); then
    put_small(worker, key, data) PUTs each small object, `workers` threads in parallel."""
    put_big((chunk_of(i) for i in range(size // IO)), size)
    run_threads([lambda wk=wk: [put_small(wk, k, bytes(chunk_of(j + 17, small)))
                                for j, k in enumerate(keys) if j % workers == wk]
                 for wk in range(workers)])


def check_pieces(path: Path, size: int) -> None:
    """The first, a middle and the last 1 MiB of an object written by write_bucket read back
    through a file system must be the pieces written (catches wrong offsets; untimed)."""
    n = size // IO
    with open(path, "rb", buffering=0) as f:
        for i in sorted({0, n // 2, n - 1}):
            got = os.pread(f.fileno(), IO, i * IO)
            if got != bytes(chunk_of(i)):
                raise RuntimeError(f"{path}: the 1 MiB at offset {i * IO} differs from what was written")


def ls_r(path: Path, expect: int) -> float:
    """Seconds of `ls -R PATH` (output to a pipe: names only, no stat per entry); the number of
    .json names it printed must be `expect`."""
    import subprocess
    t0 = time.perf_counter()
    p = subprocess.run(["ls", "-R", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"ls -R {path} failed ({p.returncode}): {p.stderr[-500:]}")
    got = sum(1 for l in p.stdout.splitlines() if l.endswith(".json"))
    if got != expect:
        raise RuntimeError(f"ls -R {path}: {got} files, expected {expect}")
    return wall


def list_walk(list_dir, prefix: str) -> tuple[float, int, int]:
    """The tree under `prefix` walked straight on the store, one directory after the other,
    like `ls -R`: list_dir(prefix) -> (keys, prefixes, requests). (seconds, LIST requests,
    objects)."""
    t0 = time.perf_counter()
    todo, requests, objects = [prefix], 0, 0
    while todo:
        keys, subs, n = list_dir(todo.pop(0))
        requests += n
        objects += len(keys)
        todo += subs
    return time.perf_counter() - t0, requests, objects


# --------------------------------------------------------------------------- 9. fio

def fio(binary: Path, d: Path, rw: str, jobs: int, total_mib: int) -> float:
    """One fio phase in directory `d`: `jobs` jobs, each sequentially writing (rw=write, with
    end_fsync=1) or reading (rw=read) its own file of total_mib/jobs MiB in 1 MiB requests,
    buffered (direct=0), psync engine. MiB/s of all jobs together, as fio reports it."""
    import json
    import subprocess
    per = max(1, total_mib // jobs)
    cmd = [str(binary), "--name=seq", f"--directory={d}", f"--rw={rw}", "--bs=1M",
           f"--size={per}M", f"--numjobs={jobs}", "--ioengine=psync", "--direct=0",
           "--group_reporting", "--output-format=json", "--fallocate=none"]
    if rw == "write":
        cmd.append("--end_fsync=1")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout[p.stdout.index("{"):])
    job = out["jobs"][0][rw]
    if job["io_bytes"] != per * jobs * MiB:
        raise RuntimeError(f"fio {rw}: {job['io_bytes']} bytes, expected {per * jobs * MiB}")
    return job["bw_bytes"] / MiB


# --------------------------------------------------------------------------- 10. store limit

def store_limit(put, get, delete, total_mib: int, obj_mib: int, workers: int) -> tuple[float, float]:
    """The object store alone: `workers` threads PUT total_mib/obj_mib objects of obj_mib MiB
    (each thread its share, one after the other), then, after dropping the page cache, GET
    them back the same way; then they are deleted (untimed). put(worker, i, data),
    get(worker, i) -> bytes read, delete(worker, i) act on object number i, on the worker's own
    connection. (PUT MiB/s, GET MiB/s)."""
    size = obj_mib * MiB
    n = max(workers, total_mib // obj_mib)
    mine = lambda w: range(w, n, workers)  # noqa: E731
    wall_put = run_threads([lambda w=w: [put(w, i, chunk_of(i, size)) for i in mine(w)]
                            for w in range(workers)])
    drop_caches()
    got = [0] * workers

    def rd(w):
        for i in mine(w):
            got[w] += get(w, i)
    wall_get = run_threads([lambda w=w: rd(w) for w in range(workers)])
    if sum(got) != n * size:
        raise RuntimeError(f"store limit: read back {sum(got)} bytes, expected {n * size}")
    for i in range(n):
        delete(i % workers, i)
    return n * size / MiB / wall_put, n * size / MiB / wall_get


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
