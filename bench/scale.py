"""
The cost of growing (issue 39, item 5): python -m bench --scale [--quick] [--json F] [--plot P]

A stub encoder (no model: unit vectors with clustered topics, so that recall@10 means something)
writes N candidates x 64 vectors of D = 128 into search.py's on-disk index (machinery/index.py,
bf16), a batch at a time, and into Qdrant's engine in-process (qdrant-edge, through
apps/search_index.py's to_qdrant: the collection search.py push writes). For each N (10k, 100k,
1M; --quick: 10k) and method, one row {n, method, p50_ms, p95_ms, recall_at_10, build_s,
peak_rss_mb, disk_bytes} (and a few more fields), every method in a fresh process (its peak RSS
its own, ru_maxrss), one query at a time:

    exhaustive 16x64        our kernel (maxsim_topk) over the whole on-disk index
    cascade 1x1->16x64      ours: 1x1 over every candidate, 16x64 on the best `depth`
    engine hnsw             the engine: HNSW prefetch of `depth` by the first vector (1x1), MaxSim rerank
    engine hnsw int8        the same collection with scalar int8 quantization (rescored, oversampling 4)
    engine hnsw binary      binary quantization (8-bit queries, rescored, oversampling 4)
    cascade int8 + bf16 copy     ours on an int8 index (search.py index --precision int8): 1x1 in int8
                                 over everything, 16x64 rescored from the bf16 copy on the best `depth`
    cascade int8, no float copy  the same index built with --keep-float none: rescored from the int8 codes
    cascade binary ...           the same two with --precision binary (N <= 100k: each builds its index)

recall@10 is against the exact (float32 math) 16x64 top 10 over all N. The stub: topic t of
candidate n = n mod T (T = N / 100 topics, random unit centres c_t); candidate n has a random
signature z_n and 64 noise vectors e_nj; its vectors are normalize(A c_t + B z_n + C e_nj), its
first vector normalize(A c_t + B z_n) (a summary, as the 1x1 budget is trained to be). A query is a
noisy copy (noise QUERY_NOISE) of 16 of one candidate's vectors, its first vector from the
candidate's first. Candidates are generated a batch at a time from (seed, batch), so the corpus is
never held.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

from bench.common import cpu_name, write_json

D, R_Q, R_C = 128, 16, 64
GROUPS = [[1, 1], [2, 4], [4, 8], [8, 16], [16, 64]]
TOPIC_SIZE = 100              # candidates per topic
A, B, C = 1.0, 0.5, 0.7       # topic, signature, per-vector noise
QUERY_NOISE = 0.3
BATCH = 2048                  # candidates generated and written at a time
DEPTH = 1000                  # the cascades' depth (ours and the engine's prefetch)
SEED = 0
METHODS = ("exhaustive 16x64", "cascade 1x1->16x64", "engine hnsw", "engine hnsw int8", "engine hnsw binary")
KEEP_FLOAT = ("cascade int8 + bf16 copy", "cascade int8, no float copy", "cascade binary + bf16 copy",
              "cascade binary, no float copy")     # --keep-float all / none (issue 39 item 3), N <= KEEP_FLOAT_MAX
KEEP_FLOAT_MAX = 100_000


# -----------------------------------------------------------------------------
# the stub encoder

def centres(N, seed=SEED):
    """(T, D) unit topic centres, T = max(1, N // TOPIC_SIZE)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(max(1, N // TOPIC_SIZE), D, generator=g), dim=-1)


def candidates(start, n, N, topics, seed=SEED):
    """Candidates start..start + n (start a multiple of BATCH, n <= BATCH) -> (n, R_C, D) float32 unit."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 1 + start // BATCH)
    ids = torch.arange(start, start + BATCH)
    t = topics[ids % len(topics)]                                             # (BATCH, D)
    z = torch.nn.functional.normalize(torch.randn(BATCH, D, generator=g), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(BATCH, R_C, D, generator=g), dim=-1)
    x = A * t[:, None] + B * z[:, None] + C * e                               # (BATCH, R_C, D)
    x[:, 0] = A * t + B * z                                                   # the first vector: the summary
    return torch.nn.functional.normalize(x[:n], dim=-1)


def queries(N, topics, count, seed=SEED):
    """count queries, each a noisy copy of 16 vectors (0, 4, 8, ...) of a random candidate -> (count, R_Q, D)."""
    g = torch.Generator().manual_seed(seed + 7)
    targets = torch.randint(0, N, (count,), generator=g).tolist()
    out = []
    for n in targets:
        s = n // BATCH * BATCH
        x = candidates(s, min(BATCH, N - s), N, topics, seed)[n - s]          # (R_C, D)
        out.append(x[torch.arange(R_Q) * (R_C // R_Q)] + QUERY_NOISE * torch.randn(R_Q, D, generator=g) / D ** 0.5)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def build_index(path, N, precision=None, seed=SEED, float_r_c=None):
    """N stub candidates into an index folder as search.py writes one (bf16 groups, items.jsonl,
    index.json), BATCH at a time: memory is one batch, whatever N. precision int8 / binary: those
    groups too, with the float copy of vectors 1..float_r_c (None: all; 0: none)."""
    from machinery import index as on_disk
    topics = centres(N, seed)
    v = on_disk.create(path, N, R_C, D, GROUPS, on_disk.default_float(D), precision, float_r_c)
    with open(os.path.join(path, "items.jsonl"), "w") as f:
        for s in range(0, N, BATCH):
            n = min(BATCH, N - s)
            v[s:s + n] = candidates(s, n, N, topics, seed)
            f.writelines(f'{{"n": {j}, "id": "c{j}", "source": "stub"}}\n' for j in range(s, s + n))
    on_disk.write_meta(path, {**v.meta, "num_query_tokens": R_Q, "model_groups": GROUPS, "index_id": uuid.uuid4().hex,
                              "fingerprint": "stub", "checkpoint": "stub", "checksums": {}})
    return v


# -----------------------------------------------------------------------------
# one method in its own process

def percentiles(times):
    t = np.asarray(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 95))


def recall_at_10(got, truth):
    return sum(len(set(a) & set(b)) for a, b in zip(got, truth)) / sum(len(b) for b in truth)


def disk_bytes(path):
    """Bytes a folder's files take on disk (allocated blocks: the engine's files are sparse until filled)."""
    return sum(os.stat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(path) for f in fs)


def run_one(job):
    """One measurement in this process -> its row. job: {what, work, n, queries, ...}."""
    from apps import search_index
    from maxsim import maxsim_topk
    work, N = job["work"], job["n"]
    ours = os.path.join(work, "index")
    row = {"n": N, "method": job["what"]}
    if job["what"] == "build ours":
        t = time.perf_counter()
        build_index(ours, N)
        row.update(build_s=time.perf_counter() - t, disk_bytes=disk_bytes(ours))
    elif job["what"] == "truth":
        index = search_index.Index(ours)
        q = queries(N, centres(N), job["queries"])
        truth = maxsim_topk(q, index.prefix(R_C), 10, exact=True)[1].tolist()     # one pass over the index
        with open(os.path.join(work, "truth.json"), "w") as f:
            json.dump(truth, f)
    else:
        truth = json.load(open(os.path.join(work, "truth.json")))
        q = queries(N, centres(N), len(truth))
        index = search_index.Index(ours)
        q, truth = q[:job.get("timed") or len(q)], truth[:job.get("timed") or len(q)]
        if job["what"].startswith("engine"):
            precision = job["what"].split()[-1] if job["what"].split()[-1] in ("int8", "binary") else None
            where = os.path.join(work, "engine-" + (precision or "float"))
            shutil.rmtree(where, ignore_errors=True)
            store = search_index.qdrant_client(where)
            t = time.perf_counter()
            search_index.to_qdrant(index, store, budgets=[job["rerank"]], precision=precision)
            row.update(build_s=time.perf_counter() - t, disk_bytes=disk_bytes(where), stored=f"first + mv{job['rerank']}",
                       engine_precision=precision or "float16")
            search = lambda qa: [j for _, j in search_index.qdrant_search(                   # noqa: E731
                store, qa.numpy(), (R_Q, job["rerank"]), 10, first=(1, 1), depth=job["depth"], precision=precision)]
        elif job["what"] in KEEP_FLOAT:                 # its own low-bit index, built here (build_s, disk_bytes)
            precision, none = job["what"].split()[1].rstrip(","), "no float" in job["what"]
            path = os.path.join(work, f"index-{precision}-{'none' if none else 'all'}")
            t = time.perf_counter()
            build_index(path, N, precision, float_r_c=0 if none else None)
            row.update(build_s=time.perf_counter() - t, disk_bytes=disk_bytes(path),
                       stored=f"16x64 {precision}" + ("" if none else " + bf16"))
            index = search_index.Index(path)
            search = lambda qa: index.search(qa[None], (R_Q, R_C), 10, first=(1, 1), depth=job["depth"])[1][0].tolist()  # noqa: E731
        elif job["what"] == "exhaustive 16x64":
            search = lambda qa: index.search(qa[None], (R_Q, R_C), 10)[1][0].tolist()       # noqa: E731
        else:
            search = lambda qa: index.search(qa[None], (R_Q, R_C), 10, first=(1, 1), depth=job["depth"])[1][0].tolist()  # noqa: E731
        search(q[0])                                                          # warm-up (and the kernel's dispatch)
        got, times = [], []
        for qa in q:
            t = time.perf_counter()
            got.append(search(qa))
            times.append(time.perf_counter() - t)
        row["p50_ms"], row["p95_ms"] = percentiles(times)
        if job["what"].startswith("engine"):
            store.close()                                                     # the shard's files and lock
        row.update(recall_at_10=recall_at_10(got, truth), queries=len(q), timed_queries=len(times),
                   depth=job.get("depth"))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def child(job):
    """Run one job in a fresh python: its row (and its own peak RSS)."""
    r = subprocess.run([sys.executable, "-m", "bench.scale", json.dumps(job)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        raise RuntimeError(f"bench --scale: {job['what']} at N = {job['n']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# the study

def study(sizes, work_root=None, count=30, depth=DEPTH, keep=False, log=print, methods=METHODS, rerank=None,
          isolate=True):
    """-> rows for every N in sizes and method. rerank: {N: r_c} the engine's rerank group (default 64).
    isolate: each job in a fresh process (its own peak RSS); False: in this one (a quick test)."""
    rows, child = [], globals()["child"] if isolate else run_one
    for N in sizes:
        work = tempfile.mkdtemp(prefix=f"scale-{N}-", dir=work_root)
        try:
            base = child({"what": "build ours", "work": work, "n": N})
            log(f"N = {N:,}: our index built in {base['build_s']:.1f}s, {base['disk_bytes'] / 2**30:.2f} GiB, "
                f"peak RSS {base['peak_rss_mb']:.0f} MB")
            child({"what": "truth", "work": work, "n": N, "queries": count})
            for m in methods:
                job = {"what": m, "work": work, "n": N, "depth": min(depth, N) if "exhaustive" not in m else None,
                       "rerank": (rerank or {}).get(N, R_C)}
                if m == "exhaustive 16x64" and N >= 500_000:
                    job["timed"] = 3          # each reads the whole index from disk: 3 queries, timed and scored
                r = child(job)
                if "build_s" not in r:                     # ours: the index built above
                    r.update(build_s=base["build_s"], disk_bytes=base["disk_bytes"], build_peak_rss_mb=base["peak_rss_mb"],
                             stored="16x64 bf16")
                r["peak_rss_mb"] = max(r["peak_rss_mb"], r.get("build_peak_rss_mb", 0))
                rows.append(r)
                log(f"  {m:<22} p50 {r['p50_ms']:9.2f} ms  p95 {r['p95_ms']:9.2f} ms  recall@10 {r['recall_at_10']:.3f}  "
                    f"build {r['build_s']:7.1f}s  peak RSS {r['peak_rss_mb']:6.0f} MB  disk {r['disk_bytes'] / 2**30:6.2f} GiB"
                    + (f"  ({r['stored']})" if r.get("stored") else ""))
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows):
    """The rows as a markdown table (docs/scale.md's)."""
    out = ["| N | method | p50 ms | p95 ms | recall@10 | build s | peak RSS MB | disk GiB | stored |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    order = METHODS + KEEP_FLOAT
    for r in sorted(rows, key=lambda r: (r["n"], order.index(r["method"]) if r["method"] in order else 99)):
        out.append(f"| {r['n']:,} | {r['method']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['recall_at_10']:.3f} | "
                   f"{r['build_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['disk_bytes'] / 2**30:.2f} | {r.get('stored', '')} |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["n"], r["p50_ms"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates N")
    ax.set_ylabel("p50 latency of one query (ms)")
    ax.set_title("one query, D = 128, 16x64 (stub encoder)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def mode_scale(args):
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    rerank = {n: 16 for n in sizes if n >= 1_000_000}       # at 1M the engine reranks at 16x16: see docs/scale.md
    print(f"bench --scale on {cpu_name()}: N = {', '.join(f'{n:,}' for n in sizes)}, D = {D}, depth {DEPTH}")
    t, rows = time.time(), []
    for N in sizes:                   # the JSON (and plot) rewritten after each N: a long run keeps what it measured
        count = 20 if args.quick else 10 if N >= 1_000_000 else 30       # at 1M: 10 queries (each exhaustive one reads 16 GB)
        rows += study([N], args.scale_dir, count=count, rerank=rerank,
                      methods=METHODS + (KEEP_FLOAT if N <= KEEP_FLOAT_MAX else ()))
        out = {"cpu": cpu_name(), "D": D, "depth": DEPTH, "seconds": time.time() - t,
               "stub": {"topic_size": TOPIC_SIZE, "A": A, "B": B, "C": C, "query_noise": QUERY_NOISE}, "rows": rows}
        if args.json:
            write_json(args.json, out)
        if args.plot:
            plot(rows, args.plot)
    print(table(rows))
    return out


# -----------------------------------------------------------------------------
# bounded-memory indexing: search.py index and push at two sizes 10x apart, each in a fresh process

def peak_rss_of(argv):
    """Run search.py's main(argv) in a fresh python -> (its peak RSS in MB, seconds, its anonymous RSS at the
    end in MB: what it holds itself, without the file pages it maps, e.g. the engine's segments)."""
    code = ("import resource, sys, time, search; t = time.time(); search.main(sys.argv[1:]); "
            "anon = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon:')][0]; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.time() - t, anon / 1024)")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        raise RuntimeError(f"search.py {' '.join(argv)} failed:\n{r.stderr[-2000:]}")
    return tuple(float(x) for x in r.stdout.strip().splitlines()[-1].split())


def index_memory(sizes=(1000, 10000), work_root=None, log=print):
    """search.py index --texts (the offline tiny model, D = 128) and push --qdrant FOLDER (the engine)
    at each size -> rows {n, what, peak_rss_mb, seconds, index_bytes}."""
    from metaembed import MetaEmbed
    work = tempfile.mkdtemp(prefix="index-memory-", dir=work_root)
    rows = []
    try:
        ck = os.path.join(work, "ck")
        MetaEmbed.from_backbone("tiny", seed=1, proj_dim=D).save_pretrained(ck)
        for N in sizes:
            texts, out = os.path.join(work, f"texts-{N}.jsonl"), os.path.join(work, f"index-{N}")
            with open(texts, "w") as f:
                f.writelines(json.dumps({"id": n, "text": f"page {n}: topic {n % 97}, words {n * 7919 % 10007}"}) + "\n"
                             for n in range(N))
            for what, argv in (("search.py index", ["index", "--checkpoint", ck, "--out", out, "--texts", texts]),
                               ("search.py push", ["push", "--index", out, "--qdrant", os.path.join(work, f"qd-{N}")])):
                mb, sec, anon = peak_rss_of(argv)
                rows.append({"n": N, "what": what, "peak_rss_mb": mb, "seconds": sec, "anon_rss_at_end_mb": anon,
                             "index_bytes": disk_bytes(out) if what.endswith("index") else disk_bytes(os.path.join(work, f"qd-{N}"))})
                log(f"N = {N:,}: {what:<16} peak RSS {mb:7.0f} MB (anonymous at the end {anon:5.0f})  {sec:7.1f}s  on disk {rows[-1]['index_bytes'] / 2**20:8.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def mode_index_memory(args):
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1000, 10000]
    print(f"bench --index-memory on {cpu_name()}: N = {', '.join(f'{n:,}' for n in sizes)}")
    rows = index_memory(sizes, args.scale_dir)
    out = {"cpu": cpu_name(), "D": D, "rows": rows}
    write_json(args.json, out)
    return out


if __name__ == "__main__":                 # a child: one job, its row as the last line
    print(json.dumps(run_one(json.loads(sys.argv[1]))))
