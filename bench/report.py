"""Markdown report and PNG chart of the results."""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

METAS = {"sqlite": "SQLite", "postgres": "PostgreSQL (127.0.0.1)"}
BACKENDS = {"local": "local directory", "s3": "SeaweedFS S3 (127.0.0.1)"}
SYSTEMS = ("Strata", "JuiceFS")


def setup_key(meta: str, backend: str) -> str:
    """One metadata engine + object store combination, e.g. "postgres/local"."""
    return f"{meta}/{backend}"


# The local-disk checkpoint row a write-back checkpoint row is compared with.
LOCAL_OF = {"ckpt_wb_new": "ckpt_new", "ckpt_wb_over": "ckpt_over"}


def split_setup(key: str) -> tuple[str, str]:
    """(meta, backend) of a setup key; a bare backend (JSON from before the PostgreSQL
    variant) means SQLite."""
    meta, _, backend = key.rpartition("/")
    return meta or "sqlite", backend


def setup_title(key: str) -> str:
    meta, backend = split_setup(key)
    return f"{METAS[meta]} + {BACKENDS[backend]}"


def setups_of(res) -> list[str]:
    """Setups with results, SQLite first, then local before S3."""
    have = {k for (k, _) in res.rows}
    return [setup_key(m, b) for m in METAS for b in BACKENDS if setup_key(m, b) in have]


def fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(xs: list[float] | None, note: str | None = None) -> str:
    if not xs:
        return note or "n/a"
    m = statistics.median(xs)
    if len(xs) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(xs))}–{fmt(max(xs))})"


def ratio(row: dict) -> float | None:
    """> 1 means Strata is better (throughput: Strata/JuiceFS; time, memory: JuiceFS/Strata)."""
    s, j = row["values"].get("Strata"), row["values"].get("JuiceFS")
    if not s or not j or row["better"] not in ("higher", "lower"):
        return None
    ms, mj = statistics.median(s), statistics.median(j)
    if row["better"] == "higher":
        return ms / mj if mj > 0 else None
    if ms <= 0:
        return None
    return mj / ms


def ratio_cell(row: dict) -> str:
    r = ratio(row)
    if r is None:
        return "—"
    txt = f"{r:.2f}×"
    return f"**{txt}**" if r < 0.9 else txt


def sys_cell(row: dict, system: str) -> str:
    return cell(row["values"].get(system), row.get("notes", {}).get(system))


def table(res) -> str:
    out = []
    for key in setups_of(res):
        rows = [r for (k, _), r in res.rows.items() if k == key]
        out.append(f"### {setup_title(key)}\n")
        out.append("| workload | Strata | JuiceFS | ratio |")
        out.append("|---|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: r["workload"]):  # stable: keeps insertion order
            out.append(f"| {r['title']} [{r['unit']}] | {sys_cell(r, 'Strata')} | "
                       f"{sys_cell(r, 'JuiceFS')} | {ratio_cell(r)} |")
        out.append("")
    return "\n".join(out)


def along_path(chart: Path) -> Path:
    """The along-the-file chart beside the ratio chart: benchmarks.png -> benchmarks-along.png."""
    return chart.with_name(chart.stem + "-along.png")


def med(row: dict | None, system: str) -> float | None:
    xs = row["values"].get(system) if row else None
    return statistics.median(xs) if xs else None


def store_limits(res, backend: str) -> tuple[float | None, float | None]:
    """(PUT, GET) limit of an object store: the best median over the worker counts."""
    st = res.store.get(backend)
    if not st:
        return None, None
    best = lambda d: max((statistics.median(v) for v in d.values() if v), default=None)  # noqa: E731
    return best(st.get("put", {})), best(st.get("get", {}))


def store_table(res, cfg: dict) -> str:
    """Workload 10: the object stores alone, MiB/s per number of workers."""
    backends = [b for b in BACKENDS if res.store.get(b)]
    if not backends:
        return ""
    workers = sorted({int(n) for b in backends for op in ("put", "get") for n in res.store[b].get(op, {})})
    obj = cfg.get("store_obj_mib", 4)
    out = [f"### 10. Object store limit: parallel PUT / GET of {obj} MiB objects straight to the store\n",
           "No file system in between: " + "; ".join(
               {"local": "local directory = one file per object written (write + close, no fsync) in a "
                         "directory of the scratch file system, read back after `drop_caches`",
                "s3": "SeaweedFS S3 = signed PUT/GET requests from Python, one HTTP connection per "
                      "worker, page cache dropped before the GETs"}[b] for b in backends)
           + f"; {cfg.get('store_mib', '?')} MiB per measurement, median over runs (min–max). The best "
           "median of each column is the store's limit used in the share table below.\n",
           "| workers | " + " | ".join(f"{BACKENDS[b]} {op} [MiB/s]" for b in backends for op in ("PUT", "GET"))
           + " |", "|---|" + "---:|" * (2 * len(backends))]
    for n in workers:
        cells = [cell(res.store[b].get(op, {}).get(str(n))) for b in backends for op in ("put", "get")]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


SHARE_ROW = re.compile(r"(bigw|bigrc|fiow|fior)\d+|alongall")  # rows compared with the store
SHARE_OP = {"bigw": "put", "fiow": "put", "bigrc": "get", "fior": "get", "alongall": "get"}


def share_table(res) -> str:
    """Each client's rate in the big write / cold read rows as a share of the store's limit."""
    keys = [k for k in setups_of(res) if any(store_limits(res, split_setup(k)[1]))]
    if not keys:
        return ""
    rids: list[str] = []
    titles: dict[str, str] = {}
    for (k, rid), r in sorted(res.rows.items(), key=lambda kv: kv[1]["workload"]):
        if k in keys and SHARE_ROW.fullmatch(rid) and rid not in rids:
            rids.append(rid)
            titles[rid] = r["title"]
    if not rids:
        return ""
    out = ["### Share of the object store's limit (workload 10)\n",
           "Each client's median rate divided by its object store's limit (best PUT median for "
           "writes, best GET median for reads, table above); cells: Strata / JuiceFS.\n",
           "| workload (row of the tables above) | " + " | ".join(setup_title(k) for k in keys) + " |",
           "|---|" + "---:|" * len(keys)]
    for rid in rids:
        op = SHARE_OP[rid.rstrip("0123456789")]
        num, _, rest = titles[rid].partition(". ")
        cells = []
        for k in keys:
            put, get = store_limits(res, split_setup(k)[1])
            lim = put if op == "put" else get
            r = res.rows.get((k, rid))
            vals = [med(r, sysname) for sysname in SYSTEMS]
            cells.append(" / ".join(f"{100 * v / lim:.0f}%" if v is not None and lim else "n/a"
                                    for v in vals) if r else "n/a")
        out.append(f"| {rest} (workload {num}, vs {op.upper()}) | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


DS_CLIENTS = (("Strata", "Strata (`strata attach`, mount with a disk cache)"),
              ("plain S3 GET", "plain S3 GET / LIST (SigV4 client, 1 stream)"),
              ("rclone", "rclone mount (VFS cache full)"), ("s3fs", "s3fs (use_cache)"))


def dataset_table(res, meta: dict) -> str:
    """Workload 13: the rows of the results table with Strata next to the reference clients
    (plain S3 requests, rclone mount, s3fs); JuiceFS cannot take part."""
    keys = [k for k in setups_of(res) if any(r["workload"] == 13 for (k2, _), r in res.rows.items() if k2 == k)]
    out = []
    for k in keys:
        rows = [r for (k2, _), r in res.rows.items() if k2 == k and r["workload"] == 13]
        out += [f"### 13. Datasets in an existing bucket ({setup_title(k)}): Strata next to a plain S3 "
                "GET, rclone mount and s3fs\n",
                "The same object and small-object tree, written straight into a separate bucket of the "
                "SeaweedFS with the SigV4 client (as another system would), read by each client; "
                "JuiceFS CE can only read objects it wrote itself, so it has no column. \"—\": does "
                "not apply to that client (a plain GET has no disk cache and no remount; its listing "
                "row is a walk of the tree with ListObjectsV2, delimiter \"/\", one prefix after "
                "the other, and its page-cache row the same GET again, SeaweedFS's files then in the "
                "page cache). Median over runs (min–max).\n",
                "| row | " + " | ".join(name for _, name in DS_CLIENTS) + " |",
                "|---|" + "---:|" * len(DS_CLIENTS)]
        # A client without any number and one reason in every cell: "n/a" there, the reason once below.
        absent = {}
        for c, name in DS_CLIENTS:
            notes = {r.get("notes", {}).get(c) for r in rows}
            if not any(r["values"].get(c) for r in rows) and len(notes) == 1 and None not in notes:
                absent[c] = (name, notes.pop())
        for r in rows:
            title = r["title"].split(". ", 1)[-1]
            out.append(f"| {title} [{r['unit']}] | " + " | ".join(
                "n/a" if c in absent else cell(r["values"].get(c), r.get("notes", {}).get(c) or "—")
                for c, _ in DS_CLIENTS) + " |")
        out.append("")
        for name, why in absent.values():
            out.append(f"- {name}: {why}")
        if absent:
            out.append("")
    return "\n".join(out)


def goals_table(res, meta: dict) -> str:
    """Issue #14's goals, each checked against this run's numbers (first metadata engine)."""
    keys = setups_of(res)
    if not keys:
        return ""
    m0 = split_setup(keys[0])[0]
    cols = [k for k in keys if split_setup(k)[0] == m0]
    fio_setup = meta.get("fio_setup") or next((k for (k, rid) in res.rows if rid.startswith("fio")), None)
    ck_ok = bool(res.localdisk)  # the local-disk save ran beside the first setup

    def ratio_goal(rid, thr):
        def f(k):
            r = res.rows.get((k, rid))
            v = ratio(r) if r else None
            if v is None:
                return None
            extra = ""
            if r["unit"] == "MiB" and med(r, "Strata") is not None:
                extra = f" ({fmt(med(r, 'Strata'))} vs {fmt(med(r, 'JuiceFS'))} MiB)"
            return f"{v:.2f}×{extra}", v >= thr
        return f

    def store_goal(rid, share):
        def f(k):
            put, _ = store_limits(res, split_setup(k)[1])
            v = med(res.rows.get((k, rid)), "Strata")
            if v is None or not put:
                return None
            return f"{100 * v / put:.0f}% of {fmt(put)} MiB/s", v >= share * put
        return f

    def value_goal(rid, most, unit):
        def f(k):
            v = med(res.rows.get((k, rid)), "Strata")
            if v is None:
                return None
            return f"{v:.2f} {unit}", v <= most
        return f

    def local_goal(rid, most):
        def f(k):
            v, loc = med(res.rows.get((k, rid)), "Strata"), res.localdisk.get(LOCAL_OF.get(rid, rid))
            if v is None or not loc or not ck_ok:
                return None
            x = statistics.median(loc) / v  # Strata time / local-disk time
            return f"{x:.2f}× the local-disk time", x <= most
        return f

    only = lambda pred, f: (lambda k: f(k) if pred(k) else None)  # noqa: E731
    is_local = lambda k: split_setup(k)[1] == "local"  # noqa: E731
    is_s3 = lambda k: split_setup(k)[1] == "s3"  # noqa: E731
    is_fio = lambda k: k == fio_setup  # noqa: E731
    threads = sorted({int(rid[5:]) for (_, rid) in res.rows if rid.startswith("bigrc") and rid[5:].isdigit()})
    wthreads = sorted({int(rid[4:]) for (_, rid) in res.rows if rid.startswith("bigw") and rid[4:].isdigit()})
    warm = sorted({int(rid[5:]) for (_, rid) in res.rows if rid.startswith("bigrw") and rid[5:].isdigit()})
    fjobs = sorted({int(rid[4:]) for (_, rid) in res.rows if rid.startswith("fior") and rid[4:].isdigit()})
    th = lambda t: f"{t} thread{'s' if t > 1 else ''}"  # noqa: E731
    goals = []
    for t in [t for t in threads if t in (1, 4)] or threads:  # the 1 and 4 threads
        goals.append((f"Cold sequential read, {th(t)} (fresh mount)", "≥ 1.5× JuiceFS", ratio_goal(f"bigrc{t}", 1.5)))
    along = next((r["title"] for (_, rid), r in res.rows.items() if rid == "alongall"), None)
    if along:
        goals.append(("One reader along one big file (" + along.split("cold ", 1)[-1].split(" file")[0]
                      + "), whole-file rate", "≥ 1.5× JuiceFS", ratio_goal("alongall", 1.5)))
    for t in wthreads:
        goals.append((f"Sequential write, {th(t)}, local directory", "≥ 1.5× JuiceFS",
                      only(is_local, ratio_goal(f"bigw{t}", 1.5))))
    for t in wthreads:
        goals.append((f"Sequential write, {th(t)}, S3", "≥ 90% of the store's PUT limit (Strata)",
                      only(is_s3, store_goal(f"bigw{t}", 0.9))))
    goals.append(("Peak RSS during the big writes and reads (workload 7)", "≤ JuiceFS (ratio ≥ 1)",
                  ratio_goal("rss", 1.0)))
    for rid, what in (("ckpt_new", "save"), ("ckpt_over", "re-save (O_TRUNC)")):
        goals.append((f"Checkpoint {what}", "≥ 1.3× JuiceFS", ratio_goal(rid, 1.3)))
        goals.append((f"Checkpoint {what} vs the local disk", "Strata time ≤ 1.3× local-disk time",
                      local_goal(rid, 1.3)))
    if any(i == "ckpt_wb_new" for (_, i) in res.rows):
        for rid, what in (("ckpt_wb_new", "save"), ("ckpt_wb_over", "re-save (O_TRUNC)")):
            goals.append((f"Checkpoint {what} with write-back, S3 (both `--writeback`)", "≥ 1.3× JuiceFS",
                          only(is_s3, ratio_goal(rid, 1.3))))
            goals.append((f"Checkpoint {what} with write-back vs the local disk, S3",
                          "Strata time ≤ 1.3× local-disk time", only(is_s3, local_goal(rid, 1.3))))
    for t in warm:
        goals.append((f"Warm (page cache) read, {th(t)}", "≥ 1.2× JuiceFS", ratio_goal(f"bigrw{t}", 1.2)))
    if any(i == "warmwarm" for (_, i) in res.rows):
        goals.append(("Warm read from the local disk cache, 1 thread (workload 8)", "≥ 1.2× JuiceFS",
                      ratio_goal("warmwarm", 1.2)))
    for j in fjobs:
        goals.append((f"fio cold read, {j} job{'s' if j > 1 else ''}", "≥ 1.5× JuiceFS",
                      only(is_fio, ratio_goal(f"fior{j}", 1.5))))
    for j in fjobs:
        goals.append((f"fio write, {j} job{'s' if j > 1 else ''}", "≥ 1.0× JuiceFS",
                      only(is_fio, ratio_goal(f"fiow{j}", 1.0))))
    for rid, what in (("fiorssw", "write"), ("fiorssr", "read")):
        if any(i == rid for (_, i) in res.rows):
            goals.append((f"fio peak RSS, {what} phase", "≤ JuiceFS (ratio ≥ 1)", only(is_fio, ratio_goal(rid, 1.0))))
    grp = next((r for (_, rid), r in res.rows.items() if rid == "grpgets"), None)
    if grp:
        n, k = cfg_of(meta, "group_members", 4), cfg_of(meta, "group_readers", 8)
        goals.append((f"Cache group fan-out (issue #15, workload 11): object GETs per object of one cold "
                      f"file read by {n} mounts × {k} readers", "1.0 (met when ≤ 1.05)",
                      value_goal("grpgets", 1.05, "GETs/object")))
    met = total = 0
    out = [f"## Goals ({'issues #14 and #15' if grp else 'issue #14'})\n",
           f"Checked against this run's medians on the {METAS[m0]} setups (ratios as in the tables: "
           "> 1 means Strata is better; RSS ratio = JuiceFS/Strata). \"—\": the goal does not apply "
           "to that object store or was not measured there.\n",
           "| goal | target | " + " | ".join(BACKENDS[split_setup(k)[1]] for k in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for name, target, f in goals:
        cells = []
        got_any = False
        for k in cols:
            got = f(k)
            if got is None:
                cells.append("—")
                continue
            got_any = True
            text, ok = got
            total += 1
            met += ok
            cells.append(f"{text} met" if ok else f"{text} **not met**")
        if got_any:  # e.g. the S3 goals in a run without S3
            out.append(f"| {name} | {target} | " + " | ".join(cells) + " |")
    out.append(f"\n{met} of {total} checks met.\n")
    return "\n".join(out)


def cfg_of(meta: dict, name: str, default):
    return meta.get("config", {}).get(name, default)


def engines_table(res) -> str:
    """Ratios of the metadata-bound rows (workloads 2-4) side by side, one column per setup;
    empty unless more than one metadata engine ran."""
    keys = setups_of(res)
    if len({split_setup(k)[0] for k in keys}) < 2:
        return ""
    titles: list[str] = []
    for (_, _), r in sorted(res.rows.items(), key=lambda kv: kv[1]["workload"]):
        if r["workload"] in (2, 3, 4) and r["better"] in ("higher", "lower") and r["title"] not in titles:
            titles.append(r["title"])
    by = {(k, r["title"]): r for (k, _), r in res.rows.items()}
    out = ["### Metadata engines side by side (Strata/JuiceFS ratio, > 1: Strata better)\n",
           "| workload | " + " | ".join(setup_title(k) for k in keys) + " |",
           "|---|" + "---:|" * len(keys)]
    for t in titles:
        out.append(f"| {t} | " + " | ".join(ratio_cell(by[(k, t)]) if (k, t) in by else "n/a"
                                            for k in keys) + " |")
    out.append("")
    return "\n".join(out)


def render(res, meta: dict, chart: Path) -> str:
    cfg = meta["config"]
    m = meta.get("machine", {})
    L = []
    L.append("# Benchmarks: Strata vs JuiceFS\n")
    when = meta.get("finished") or time.strftime("%Y-%m-%d %H:%M %Z")
    L.append(f"Generated by `{meta['command']}` on {when} "
             f"in {meta['elapsed_s'] / 60:.1f} min ({meta['mode']} mode). Re-run with the same "
             "command; `bench/run --quick` takes about 14 minutes on 2 cores, `bench/run --smoke` "
             "well under one.\n")
    L.append("Cells: median over runs (min–max). **ratio > 1 means Strata is better**: "
             "Strata/JuiceFS for rates (MiB/s, files/s, ops/s), JuiceFS/Strata for times, "
             "latencies, GETs and memory. Ratios below 0.9 are in bold.\n")
    L.append(goals_table(res, meta))
    L.append("## Results\n")
    L.append(table(res))
    L.append(engines_table(res))
    L.append(f"![Ratios, one bar per row above; > 1 means Strata is better]({chart.name})\n")
    if res.along:
        L.append("### One reader along one cold big file (workload 1)\n")
        L.append(f"MiB/s of each {cfg.get('along_seg_mib', '?')} MiB segment as the reader moves "
                 "through the file (single thread, 1 MiB reads, fresh mount, page cache dropped; "
                 "median over runs per segment):\n")
        L.append(f"![MiB/s along the file, Strata and JuiceFS]({along_path(chart).name})\n")
    L.append(store_table(res, cfg))
    L.append(share_table(res))
    L.append(dataset_table(res, meta))
    # Against the first metadata engine's setups (the local-disk save ran beside those).
    keys = setups_of(res)
    ck = [k for k in keys if split_setup(k)[0] == split_setup(keys[0])[0]] if keys else []
    if res.localdisk and ck:
        L.append("### Checkpoint save against the local disk\n")
        L.append("The same save on the machine's own disk (the scratch directory's file system, "
                 "page cache, no fsync — like `torch.save`) for scale:\n")
        L.append("| save | " + " | ".join(
            f"{sysname} ({setup_title(k)})" for sysname in SYSTEMS for k in ck) + " | local disk |")
        L.append("|---|" + "---:|" * (2 * len(ck) + 1))
        wb = [("ckpt_wb_new", "write-back, new file [MiB/s]"),
              ("ckpt_wb_over", "write-back, over the old one [MiB/s]")]
        wb = [x for x in wb if any(i == x[0] for (_, i) in res.rows)]
        for rid, name in [("ckpt_new", "new file [MiB/s]"), ("ckpt_over", "over the old one, O_TRUNC [MiB/s]")] + wb:
            cells = []
            for sysname in SYSTEMS:
                for k in ck:
                    r = res.rows.get((k, rid))
                    cells.append(cell(r["values"].get(sysname)) if r else "n/a")
            L.append(f"| {name} | " + " | ".join(cells) + f" | {cell(res.localdisk.get(LOCAL_OF.get(rid, rid)))} |")
        for rid, name in [("ckpt_new", "new file: time / local-disk time"),
                          ("ckpt_over", "over the old one: time / local-disk time")] + \
                [(r, n.replace(" [MiB/s]", ": time / local-disk time")) for r, n in wb]:
            cells = []
            loc = res.localdisk.get(LOCAL_OF.get(rid, rid))
            for sysname in SYSTEMS:
                for k in ck:
                    v = med(res.rows.get((k, rid)), sysname)
                    cells.append(f"{statistics.median(loc) / v:.2f}×" if v and loc else "n/a")
            L.append(f"| {name} | " + " | ".join(cells) + " | 1.00× |")
        L.append("")

    L.append("## Setup\n")
    L.append("| | |\n|---|---|")
    for k in ("cpu", "nproc", "memory", "kernel", "disk", "python"):
        L.append(f"| {k} | {m.get(k, '?')} |")
    for k, v in meta.get("versions", {}).items():
        L.append(f"| {k} | {v} |")
    if meta.get("load"):
        lo, hi = meta["load"]
        L.append(f"| 1-min load average at session starts | {lo:.1f}–{hi:.1f} on {m.get('nproc', '?')} cores"
                 f"{' (other work was running: expect noise)' if hi > 1.5 else ''} |")
    L.append(f"| page cache dropped between cold runs | "
             f"{'yes (`sync; echo 3 > /proc/sys/vm/drop_caches`)' if meta.get('page_cache_dropped') else 'NO (not root?)'} |")
    L.append("")
    L.append("Exact commands (scratch paths are per run; secrets replaced by SECRET):\n")
    cache_mounts = meta.get("cache_mounts", {})
    for key, per in meta.get("flags", {}).items():
        key = setup_key(*split_setup(key))
        L.append(f"**{setup_title(key)}**\n")
        L.append("```")
        for sysname, cmds in per.items():
            L.append(f"# {sysname}")
            L.append(cmds["format"])
            L.append(cmds["mount"])
            if sysname in cache_mounts.get(key, {}):
                L.append(f"# {sysname}, workload 8 (local disk cache)")
                L.append(cache_mounts[key][sysname])
            for what, cmd in meta.get("cmds", {}).get(key, {}).get(sysname, {}).items():
                L.append(f"# {sysname}, {what}")
                L.append(cmd)
        L.append("```\n")
    L.append(
        "Matching settings: block size 4 MiB, buffer 300 MiB, 16 parallel uploads on both; "
        "Strata's in-memory block cache and read-ahead at their defaults (`--mem-cache-size 64`, "
        "`--max-readahead 64`; with the local directory Strata maps the store's files and the "
        "kernel's page cache holds what is read ahead); in workloads "
        "1-7 neither has a local disk cache (both run with `--cache-size 0`), so reads go "
        "to the object store, JuiceFS's through its read-ahead buffers. Workload 8 mounts both "
        f"with a local disk cache of the same size ({cfg.get('cache_mib', '?')} MiB, "
        "`--cache-dir DIR --cache-size N`, and `--free-space-ratio` 0 for Strata, 0.01 for "
        "JuiceFS, which reads 0 as its default 0.1, so that a scratch disk under 10 % free "
        "does not stop either from caching) in separate mount sessions. JuiceFS is formatted "
        "with `--trash-days 0` (Strata has no trash) and mounted with `--no-usage-report "
        "--backup-meta 0`. Kernel attribute/entry caches are 1 s on both (defaults). The "
        "kernel's own readahead of each mount (its `read_ahead_kb`) is each client's default: "
        "Strata sets 4 MiB once mounted (`--kernel-readahead 4`), JuiceFS leaves the kernel's "
        "128 KiB. "
        "PostgreSQL: one throwaway server from the Debian package on 127.0.0.1 (`initdb -A trust`, "
        "server settings at their defaults, so fsync and synchronous commit are on), one "
        "database per system and object store (`strata_local`, `juicefs_local`, …); both "
        "clients connect over TCP to 127.0.0.1 without TLS.\n")

    L.append("## Method\n")
    L.append(f"- Runs: {cfg['runs']} per workload; the runs alternate systems (Strata run 1, "
             "JuiceFS run 1, Strata run 2, …); both stay mounted, only one is busy at a time.")
    L.append("- Each run of a system: writes on a freshly mounted client (big files, small files, "
             "the fan-out file), then the client is remounted (new process, empty block cache) and "
             "the page cache dropped before every cold read, stat and fan-out.")
    thr = "/".join(str(t) for t in cfg.get("threads", [1, 2]))
    warm = "/".join(str(t) for t in cfg.get("warm_threads", cfg.get("threads", [1, 2])))
    L.append(f"- 1. Big files: {thr} threads, {cfg['big_mib']} MiB per thread, one file per thread, "
             "1 MiB write()/read() calls, time includes close() (which uploads and commits). Cold "
             "reads on a fresh mount after dropping the page cache; warm read (at "
             f"{warm} threads) = the same files read again right after the cold read (kernel page "
             "cache).")
    if cfg.get("along_mib"):
        L.append(f"- 1. One reader along one big file (SQLite setups only, like workload 8): a "
                 f"{cfg['along_mib']} MiB file written (untimed), the system remounted (new process) "
                 "and the page cache dropped, then one thread reads it from start to end with 1 MiB "
                 f"read() calls; the time of every {cfg['along_seg_mib']} MiB segment is recorded. "
                 "Rows: the whole-file rate, the slowest segment, and slowest/median segment "
                 "(1.00 = a perfectly even rate); the chart plots every segment.")
    L.append(f"- 2. Small files: {cfg['small_count']} files of {cfg['small_kib']} KiB, one thread, "
             "one directory: create+write+close, then read (cold), stat (dentry cache dropped), "
             "delete.")
    L.append(f"- 3. Metadata: {cfg['meta_threads']} threads × {cfg['meta_files']} empty files over "
             f"{cfg['meta_dirs']} directories shared by the threads; create (O_CREAT|O_EXCL + "
             "close), stat (after dropping caches), rename into the next directory, unlink.")
    L.append(f"- 4. Truncate: a file fragmented by {cfg['trunc_frags']} scattered 4 KiB pwrite()s "
             "(fsync every 16; none adjacent, so each is its own slice, spread evenly over the "
             "chunks to stay under both systems' compaction triggers) and extended with ftruncate "
             f"to {', '.join(str(g) for g in cfg['trunc_sizes_gib'])} GiB (sparse). Slice counts "
             "from `strata info` / `juicefs info` are listed below. Then "
             f"{cfg['trunc_samples']} samples of ftruncate(size/2) + ftruncate(size), and "
             f"{cfg['trunc_samples']} samples of open(O_TRUNC) (before each, untimed: ftruncate "
             "back to full size and fresh fragments). p50/p99 per run, then median over runs.")
    L.append(f"- 5. Checkpoint: a PyTorch-style save of {cfg['ckpt_mib']} MiB: open(O_TRUNC), "
             f"a stored zip64 written entry by entry with Python's zipfile ({cfg['ckpt_entry_mib']} "
             "MiB entries, zipfile seeks back to patch each entry header), close. The second save "
             "overwrites the first in place. On S3 the two saves run once more with write-back: "
             "both systems remounted with `--writeback` and a local disk cache (an empty "
             "directory with room for two checkpoints), so close returns once the blocks are on "
             "the local disk and the uploads follow; the \"until uploaded\" row runs from the "
             "start of the first save until the client's staging gauge "
             "(`strata_writeback_staged_blocks`, `juicefs_staging_blocks`) reads 0.")
    L.append(f"- 6. Fan-out: {cfg['fanout_readers']} threads read the same cold {cfg['fanout_mib']} "
             "MiB file at once; GETs from each client's metrics (`strata_object_requests_total"
             "{op=\"get\"}`, `juicefs_object_request_durations_histogram_seconds_count"
             "{method=\"GET\"}`) divided by the number of 4 MiB blocks (1.0 = each block fetched once).")
    L.append("- 7. Peak RSS: VmHWM of the mount daemon (the process holding /dev/fuse; for "
             "JuiceFS the larger of supervisor and worker), reset with clear_refs before the "
             f"write phase: one row for the write mount (big writes at {thr} threads), one for the "
             "read mount (a new process: cold and warm big reads, read before the fan-out), and "
             "the larger of the two.")
    L.append(f"- 8. Disk cache (SQLite setups only; the metadata engine hardly matters for it): a "
             f"{cfg['big_mib']} MiB file is written on the regular mount (no disk cache), then "
             f"the system is remounted with a local disk cache ({cfg.get('cache_mib', '?')} MiB, "
             "empty directory on the scratch disk) and the file read once, single thread, 1 MiB "
             "reads, after dropping the page cache (cold: from the object store, filling the "
             "cache); after waiting for the cache directory to stop growing, the system is "
             "remounted with the same cache directory (new process, empty memory) and the page "
             "cache dropped again, so only the block cache on disk is warm; then the timed warm "
             "read. GETs are counted during the warm read (0 = served from the disk cache)."
             + (f" This Strata build has no disk cache (`strata mount --help` lists no "
                f"`--cache-dir`/`--cache-size`: {meta['strata_disk_cache']}): its cells say n/a."
                if meta.get("strata_disk_cache") else ""))
    if cfg.get("fio_mib"):
        jobs = cfg.get("fio_jobs", [1, 4])
        L.append(f"- 9. fio (on {setup_title(meta['fio_setup']) if meta.get('fio_setup') else '?'} "
                 f"only; {meta.get('versions', {}).get('fio', 'fio')}): per job count "
                 f"({', '.join(map(str, jobs))}) a fresh mount, `fio --name=seq --rw=write --bs=1M "
                 f"--size={cfg['fio_mib'] // max(jobs)}M --numjobs={max(jobs)} --ioengine=psync "
                 "--direct=0 --end_fsync=1 --fallocate=none --group_reporting --output-format=json` "
                 f"({cfg['fio_mib']} MiB in total whatever the job count: 1 job × {cfg['fio_mib']} MiB, "
                 f"{max(jobs)} jobs × {cfg['fio_mib'] // max(jobs)} MiB), then a remount (new "
                 "process), `drop_caches` and the same command with `--rw=read`. MiB/s = fio's "
                 "aggregate bandwidth (`bw_bytes`). Peak RSS (VmHWM) per phase, max over the job "
                 "counts. Both clients without a disk cache, as in workloads 1-7.")
    if cfg.get("store_mib"):
        L.append(f"- 10. Object store limit: before each run's sessions, the object store alone: "
                 f"{cfg['store_mib']} MiB in {cfg.get('store_obj_mib', 4)} MiB objects PUT by "
                 f"{', '.join(map(str, cfg.get('store_workers', [])))} parallel workers (each its "
                 "share, one object after another), page cache dropped, GET back by as many "
                 "workers, then deleted; S3 through a minimal SigV4 client in Python "
                 "(`UNSIGNED-PAYLOAD`, one keep-alive connection per worker) to the same "
                 "SeaweedFS on 127.0.0.1, the local directory as files on the scratch file system. "
                 "The store's limit is the best median over the worker counts.")
    if cfg.get("group_mib"):
        n, k, mib = cfg.get("group_members", 4), cfg.get("group_readers", 8), cfg["group_mib"]
        L.append(f"- 11. Cache group fan-out (SQLite setups only, every object store; issue #15): a "
                 f"{mib} MiB file written through the regular mount (untimed), then {n} more mounts "
                 "of the same volume (same metadata URL), each with its own empty disk cache "
                 f"directory of {2 * mib} MiB (`--cache-dir DIR --cache-size {2 * mib} "
                 "--free-space-ratio 0`; JuiceFS 0.01, as it reads 0 as its default 0.1) and "
                 "metrics port. Strata's join one cache group (`--cache-group benchfan "
                 "--cache-group-addr 127.0.0.1:0`): each block is fetched from the object store by "
                 "one member and served to the others over the group; "
                 "JuiceFS CE has no shared cache, so each of its mounts fetches on its own. "
                 f"{cfg.get('group_settle_s', 4):g} s after the last mount (members re-read the "
                 f"membership every 2 s) and after `drop_caches`, {k} threads per mount ({n * k} in "
                 "all) read the whole file at once (1 MiB read() calls, sizes checked). Rows: wall "
                 f"time until the last reader is done, aggregate rate = {n * k} × file size / wall "
                 "time, and object GETs summed over the members' metrics "
                 "(`strata_object_requests_total{op=\"get\"}`, "
                 "`juicefs_object_request_durations_histogram_seconds_count{method=\"GET\"}`) divided "
                 f"by the objects of the file ({mib} MiB / 4 MiB, rounded up): 1.00 = the group "
                 f"fetched every object once, {n}.00 = every mount fetched it.")
    if cfg.get("gw_mib"):
        mib = cfg["gw_mib"]
        lo, hi = min(cfg.get("gw_clients", [1, 8])), max(cfg.get("gw_clients", [1, 8]))
        why = meta.get("strata_gateway")
        L.append(f"- 12. S3 gateway (SQLite setups only, every object store): a {mib} MiB file written "
                 "through the regular mount (untimed) is read as an S3 object through each "
                 "system's gateway on 127.0.0.1: `strata gateway` and `juicefs gateway --no-banner` "
                 "(MinIO-based), both with `--buffer-size 300 --max-uploads 16`, an empty disk "
                 f"cache of {max(256, 2 * mib)} MiB (`--cache-dir DIR --cache-size N "
                 "--free-space-ratio 0`; JuiceFS 0.01) and a fresh random key pair; bucket = "
                 "volume name, path-style. Clients: the SigV4 client of `harness.py` (Python, one keep-alive "
                 "connection per client, `UNSIGNED-PAYLOAD`), each GETting the whole object (no "
                 "ranges) and streaming the body through a 1 MiB buffer, sizes checked. Per client "
                 f"count ({lo}, then {hi}) a fresh gateway process after `drop_caches`: all "
                 "clients GET at once (cold), then again from the same gateway (warm: its memory "
                 f"and disk cache). MiB/s = clients × object size / wall time. For reference the "
                 f"same through a fresh mount with the same disk cache settings: {lo} then {hi} "
                 "threads read the whole file at once (1 MiB read() calls) cold after "
                 "`drop_caches`, then again (warm: the kernel page cache)."
                 + (f" This Strata build has no `strata gateway` ({why}): its gateway cells say n/a."
                    if why else ""))
    if cfg.get("ds_mib") and any(r["workload"] == 13 for r in res.rows.values()):
        mib, n, p = cfg["ds_mib"], cfg.get("ds_files", 2000), cfg.get("ds_prefixes", 20)
        why = meta.get("strata_attach")
        L.append(f"- 13. Datasets in an existing bucket (issue #16; SQLite + SeaweedFS S3 only): once per "
                 f"setup a separate bucket `bench-dataset` gets, straight from the SigV4 client of "
                 f"`harness.py` (as another system would write it), one {mib} MiB object "
                 f"`web/model.bin` (a single streamed PUT) and {n} objects of "
                 f"{cfg.get('ds_small_bytes', 1024)} bytes in {p} prefixes `web/small/pNN/`. Strata: "
                 "each run `strata attach META_URL --path /dataset-runN --source s3://bench-dataset/web "
                 "--endpoint URL --refresh 0` (keys in `STRATA_SOURCE_ACCESS_KEY`/"
                 "`STRATA_SOURCE_SECRET_KEY`), a second mount of the volume with an empty disk cache "
                 f"(`--cache-dir DIR --cache-size {max(256, 2 * mib)} --free-space-ratio 0`, its own "
                 "metrics port), `strata detach` at the end. rclone: `rclone mount src:bench-dataset/web "
                 "MNT --read-only --vfs-cache-mode full --cache-dir DIR --vfs-cache-max-size "
                 f"{max(256, 2 * mib)}M` (remote from `RCLONE_CONFIG_SRC_*` variables: type s3, "
                 "provider Other, path style), in the foreground as the bench's child and stopped with "
                 "SIGINT (rclone writes which ranges it cached a moment after the file is closed: the "
                 "bench waits for that before the remount, like it waits for Strata's cache directory "
                 "to fill). s3fs: `s3fs bench-dataset:/web MNT -f -o url=URL,use_path_request_style,"
                 "ro,use_cache=DIR`, only if Debian's `s3fs` is installed. Each mount, per run: "
                 "`drop_caches`, the object read start to end (1 MiB read() calls, cold), `ls -R` of "
                 "`small/` (cold: Strata imports each directory's listing on first access), remount "
                 "with the same cache directory, `drop_caches`, `ls -R` again, `drop_caches`, the "
                 "object read again (warm: from the disk cache), and a third time without a remount "
                 "(page cache); 3 pieces of the object compared with what was written. Counters: "
                 "Strata's `strata_source_requests_total{op=\"get\"|\"list\"}` and "
                 "`strata_source_bytes_total` of the mount's metrics; rclone's `core/stats` bytes "
                 "(remote control on 127.0.0.1), which counts no requests; s3fs none. Plain S3: after "
                 "`drop_caches` one GET of the whole object (1 connection, body through a 1 MiB "
                 "buffer), the same GET again, and the tree walked with ListObjectsV2 (delimiter "
                 "`/`). `ls -R` writes to a pipe (names only; the number of names is checked)."
                 + (f" This Strata build has no `strata attach` ({why}): its cells say n/a." if why else ""))
    if len(cfg.get("metas", ["sqlite"])) > 1:
        L.append("- Metadata engines: workloads 1-7 run on each engine and object store "
                 f"({', '.join(setup_title(k) for k in setups_of(res))}); each combination is a "
                 "separate pair of freshly formatted volumes.")
    L.append("")
    if res.details:
        L.append("## Fragmentation check (workload 4)\n")
        for k, v in res.details.items():
            L.append(f"- {k}: {', '.join(str(x) for x in v)}")
        L.append("")
    if meta.get("notes"):
        L.append("## Notes on this run\n")
        for n in meta["notes"]:
            L.append(f"- {n}")
        L.append("")
    if res.failures:
        L.append("## Failures\n")
        for f in res.failures:
            L.append(f"- {f}")
        L.append("")
    return "\n".join(L) + "\n"


def chart(res, path: Path) -> None:
    """Horizontal bars of the ratios on a log scale, one panel per backend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = setups_of(res)
    metas = [m for m in METAS if any(split_setup(k)[0] == m for k in keys)]
    backends = [b for b in BACKENDS if any(split_setup(k)[1] == b for k in keys)]
    titles: list[str] = []
    vals: dict[tuple[str, str], float] = {}
    for (k, _), r in sorted(res.rows.items(), key=lambda kv: kv[1]["workload"]):
        v = ratio(r)
        if v is None or v <= 0:
            continue
        if r["title"] not in titles:
            titles.append(r["title"])
        vals[(k, r["title"])] = v
    if not titles:
        return
    logs = [math.log2(v) for v in vals.values()]
    lo, hi = min(0.0, min(logs)) - 0.9, max(0.0, max(logs)) + 1.1
    step = 1 if hi - lo <= 10 else 2
    ticks = [t for t in range(math.floor(lo), math.ceil(hi) + 1) if t % step == 0]
    n = len(titles)
    fig, axes = plt.subplots(len(metas), len(backends),
                             figsize=(5.2 * len(backends) + 3.6, (0.26 * n + 1.3) * len(metas) + 0.5),
                             sharey=True, squeeze=False)
    colors = {"local": "#3b75af", "s3": "#e0892b"}
    ys = list(range(n))[::-1]
    panels = [(axes[i][j], setup_key(m, b)) for i, m in enumerate(metas) for j, b in enumerate(backends)]
    for ax, key in panels:
        b = split_setup(key)[1]
        if key not in keys:
            ax.set_visible(False)
            continue
        for y, t in zip(ys, titles):
            v = vals.get((key, t))
            if v is None:
                continue
            x = math.log2(v)
            ax.barh(y, x, color=colors[b], alpha=0.35 if v < 1 else 0.9)
            ax.text(x + (0.08 if v >= 1 else -0.08), y, f"{v:.2f}×", va="center",
                    ha="left" if v >= 1 else "right", fontsize=6.5)
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{2.0 ** t:g}×" for t in ticks], fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.grid(axis="x", lw=0.3, alpha=0.5)
        ax.set_title(setup_title(key), fontsize=9)
        ax.set_xlabel("ratio (log scale); > 1: Strata better", fontsize=8)
    for row in axes:
        row[0].set_yticks(ys)
        row[0].set_yticklabels(titles, fontsize=7)
    fig.suptitle("Strata vs JuiceFS 1.4.2 — faded bars: Strata behind", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def along_chart(res, meta: dict, path: Path) -> None:
    """MiB/s of each segment along the big file (one reader, cold), both systems on one chart,
    one panel per setup; median over runs per segment, each run as a thin line."""
    if not res.along:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cfg = meta.get("config", {})
    seg = cfg.get("along_seg_mib", 256)
    keys = [k for k in setups_of(res) if k in res.along] or sorted(res.along)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 3.8), squeeze=False)
    colors = {"Strata": "#3b75af", "JuiceFS": "#e0892b"}
    gib = cfg.get("along_mib", 0) >= 2048
    for ax, k in zip(axes[0], keys):
        top = 0.0
        for sysname in SYSTEMS:
            runs = [r for r in res.along[k].get(sysname, []) if r]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            xs = [(i + 1) * seg / (1024 if gib else 1) for i in range(n)]
            for r in runs:
                ax.plot(xs, r[:n], color=colors[sysname], lw=0.6, alpha=0.3)
            ys = [statistics.median(r[i] for r in runs) for i in range(n)]
            top = max(top, max(max(r[:n]) for r in runs))
            ax.plot(xs, ys, color=colors[sysname], lw=1.8, marker="o", ms=2.5,
                    label=f"{sysname} (median {fmt(statistics.median(ys))} MiB/s, "
                          f"min {fmt(min(ys))})")
        ax.set_ylim(0, top * 1.15 or 1)
        ax.set_xlim(0, None)
        ax.grid(lw=0.3, alpha=0.5)
        ax.set_title(setup_title(k), fontsize=9)
        ax.set_xlabel(f"position in the file [{'GiB' if gib else 'MiB'}] (end of each {seg} MiB segment)",
                      fontsize=8)
        ax.set_ylabel("MiB/s in the segment", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    size = cfg.get("along_mib", 0)
    name = f"{size // 1024} GiB" if size and size % 1024 == 0 else f"{size} MiB"
    fig.suptitle(f"One reader along one cold {name} file, Strata vs JuiceFS 1.4.2\n(fresh mount, page "
                 "cache dropped, 1 MiB reads; thick: median over runs, thin: single runs)", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
