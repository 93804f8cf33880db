"""Precision, the second budget axis (issue 35), `python -m bench --precision [--quick]`:

1. speed on a bf16 index, shapes S1-S6: maxsim's default path (the measured dispatch, bf16 math
   competing with float32 math), maxsim exact=True (float32 math only), the plain bf16 torch loop a user would write (the
   query cast to bf16, 256 candidates a matmul, amax, sum) and the same loop in float32; each as a
   fraction of the bf16 GEMM peak measured in the same run, and of the shape's limit: the longer of
   its FLOPs at that peak and its index bytes at the read bandwidth measured in the run (which one
   binds is the row's `bound`);
2. recall@10 against exact float32 scoring on random unit vectors (D = 1536) of each precision,
   alone and with the cascade's rescoring (the best `depth` rescored in bf16 from the float copy),
   bytes per candidate and ms per query; numkong's maxsim (a peer) where it is installed;
3. bytes per candidate of every (budget x precision) at D = 3584 (the paper's 7B), by arithmetic;
4. `--precision-study CHECKPOINT`: P@1 on the offline eval at every (budget x precision) of one
   trained model (bf16 in float32 and in bf16 math, int8 and binary on the default path), beside
   bytes per candidate and scoring ms, the largest score difference bf16 math makes there, and the
   plot of quality against bytes per candidate, one line per precision.
"""
import os
import time

import torch

from bench.common import cpu_name, measure_peaks, unit_vectors, write_json
from machinery import cpu_kernel
from machinery.index import PRECISIONS, QUANTIZED, quantize, vector_bytes
from maxsim import maxsim, maxsim_topk, warm_up
from metaembed import GROUPS

SHAPES = {"S1": (1, 10_000, 16, 64, 128), "S2": (32, 10_000, 16, 64, 128), "S3": (32, 2_000, 16, 64, 1536),
          "S4": (32, 10_000, 1, 1, 1536), "S5": (1, 20_000, 16, 64, 1536),
          "S6": (1, 100_000, 1, 1, 3584)}   # the paper's efficiency row: 7B, 100k candidates at 1x1 (0.67 GiB)
# vectors stored a candidate: prefix views of 64, as at serving time, except S6, the 1x1 group alone
# (contiguous, as search.py's grouped layout stores it; 64 vectors a candidate would be 46 GB)
STORED = {"S6": 1}


def plain_loop(q, c, dtype=torch.bfloat16, chunk=256):
    """The loop a user would write: (N_q r_q, D) @ (D, 256 r_c) per chunk in `dtype`, amax, sum."""
    Nq, rq, D = q.shape
    qd = q.reshape(-1, D).to(dtype)
    out = []
    for j in range(0, c.shape[0], chunk):
        cj = c[j:j + chunk]
        s = (qd @ cj.reshape(-1, D).to(dtype).T).view(Nq, rq, cj.shape[0], cj.shape[1])
        out.append(s.amax(-1).float().sum(1))
    return torch.cat(out, 1)


def speed_rows(quick, peak_bf16, bandwidth):
    dev, rows = torch.device("cpu"), []
    for name, (Nq, Nc, rq, rc, D) in SHAPES.items():
        Nc = Nc // 5 if quick else Nc
        q = unit_vectors(Nq, 16, D, dev, torch.float32, 0)[:, :rq]
        c = unit_vectors(Nc, STORED.get(name, 64), D, dev, torch.bfloat16, 1)[:, :rc]   # a bf16 index, prefix views
        ref = maxsim(q, c, exact=True)
        warm_up(q, c)                                    # the dispatch measured (once a machine) before timing
        winner = cpu_kernel.choices.get(cpu_kernel.regime(q, c), {}).get("winner", "torch")
        methods = {"maxsim default": lambda: maxsim(q, c), "maxsim exact": lambda: maxsim(q, c, exact=True),
                   "plain bf16 torch": lambda: plain_loop(q, c), "plain fp32 torch": lambda: plain_loop(q, c, torch.float32)}
        flops = 2 * Nq * Nc * rq * rc * D
        limit = {"compute": flops / peak_bf16, "memory": Nc * rc * D * 2 / bandwidth}   # seconds: FLOPs, index bytes
        bound = max(limit, key=limit.get)
        err = {m: (fn() - ref).abs().max().item() for m, fn in methods.items()}   # each run once before timing
        times = {m: [] for m in methods}
        for _ in range(3 if quick else 7):   # in turns: a slow spell of a shared machine falls on every method
            for m, fn in methods.items():
                t = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t)
        for m, ts in times.items():
            t = sorted(ts)[len(ts) // 2]                                              # the median
            rows.append(dict(shape=name, method=m, Nq=Nq, Nc=Nc, budget=f"{rq}x{rc}", D=D, ms=1e3 * t,
                             best_ms=1e3 * min(ts), GFLOPs=flops / t / 1e9, frac_bf16_peak=flops / t / peak_bf16,
                             limit_ms=1e3 * limit[bound], bound=bound, frac_limit=limit[bound] / t,
                             max_diff_vs_fp32=err[m], dispatch=winner if m == "maxsim default" else None))
        base = {r["method"]: r["ms"] for r in rows if r["shape"] == name}
        for r in rows:
            if r["shape"] == name:
                r["vs_plain_bf16"] = base["plain bf16 torch"] / r["ms"]
    return rows


def numkong_peer():
    """numkong's maxsim (one query-document pair a call; the sum of each query vector's smallest
    angular distance, so lower is better) over pre-packed documents, or None if not installed."""
    try:
        import numkong
    except ImportError:
        return None

    def search(q, c, k):                                   # q (N_q, r_q, D), c (N_c, r_c, D) -> top-k ids
        docs = [numkong.maxsim_pack(x, dtype="f32") for x in c.float().numpy()]
        ids = []
        for qa in q.float().numpy():
            pq = numkong.maxsim_pack(qa, dtype="f32")
            d = torch.tensor([numkong.maxsim_packed(pq, x) for x in docs])
            ids.append((-d).topk(k).indices)
        return torch.stack(ids)
    return search


def fast_plaid_peer(python, x, q, k, truth, nbits=(2, 4)):
    """fast-plaid's PLAID index on the same vectors, run by `python` (an interpreter whose
    environment has fast-plaid and its torch: bench/fastplaid_peer.py) -> rows, or one row saying
    why not."""
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.save({"docs": x, "queries": q, "k": k, "nbits": list(nbits), "probes": [[8, 4096], [64, 8192]]},
                   f"{d}/in.pt")
        r = subprocess.run([python, os.path.join(os.path.dirname(__file__), "fastplaid_peer.py"), f"{d}/in.pt",
                            f"{d}/out.json"], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return [dict(precision="fast-plaid", error=f"{python} failed: {(r.stderr or r.stdout).strip()[-300:]}")]
        res = json.load(open(f"{d}/out.json"))
    return [dict(precision=f"fast-plaid PLAID, nbits {run['nbits']}, {run['n_ivf_probe']} probes, "
                           f"{run['n_full_scores']} rescored (torch {res['torch']})", N=x.shape[0],
                 D=x.shape[2], budget=f"{q.shape[1]}x{x.shape[1]}", bytes_per_candidate=run["index_bytes"] / x.shape[0],
                 recall_alone=recall_of(torch.tensor(run["ids"]), truth), ms_alone=run["ms_per_query"],
                 note=f"index built in {run['build_seconds']:.0f} s; bytes: the whole index folder")
            for run in res["runs"]]


def recall_rows(quick, budget=(8, 16), D=1536, k=10, depth=100, fast_plaid_python=None):
    """Recall@10 of each precision against exact float32 MaxSim on random unit vectors."""
    N, Nq = (2_000, 8) if quick else (20_000, 32)
    rq, rc = budget
    x = unit_vectors(N, rc, D, torch.device("cpu"), torch.float32, 2)             # (N, r_c, D)
    q = unit_vectors(Nq, rq, D, torch.device("cpu"), torch.float32, 3)
    truth = maxsim_topk(q, x, k, exact=True)[1]
    full = x.bfloat16()
    stores = {"float32": x, "bfloat16": full, **{p: quantize(x, p) for p in QUANTIZED}}
    rows = []
    for p in ("bfloat16", *QUANTIZED):
        store = stores[p]
        maxsim_topk(q, store[:64], k)                     # the dispatch measured (once a machine) before timing
        maxsim(q[:1], full[:depth])
        t = time.perf_counter()
        _, ids = maxsim_topk(q, store, k)
        alone = (time.perf_counter() - t) / Nq
        t = time.perf_counter()
        _, cand = maxsim_topk(q, store, depth)                                       # the cheap pass
        fine = torch.stack([maxsim(q[a:a + 1], full[cand[a]])[0] for a in range(Nq)])   # bf16 rescoring
        rescored = cand.gather(1, fine.topk(k, dim=1).indices)
        cascade = (time.perf_counter() - t) / Nq
        rows.append(dict(precision=p, N=N, D=D, budget=f"{rq}x{rc}", bytes_per_candidate=rc * vector_bytes(D, p),
                         recall_alone=recall_of(ids, truth), ms_alone=1e3 * alone, depth=depth,
                         recall_rescored=recall_of(rescored, truth),
                         ms_rescored=1e3 * cascade))
    peer = numkong_peer()
    if peer is None:
        rows.append(dict(precision="numkong", error="not installed (pip install numkong)"))
    else:
        n = min(Nq, 4)
        t = time.perf_counter()
        ids = peer(q[:n], x, k)
        ms = 1e3 * (time.perf_counter() - t) / n
        rows.append(dict(precision="numkong maxsim (f32 packed)", N=N, D=D, budget=f"{rq}x{rc}",
                         bytes_per_candidate=rc * D * 4, recall_alone=recall_of(ids, truth[:n]),
                         ms_alone=ms, note=f"{n} queries; packing every document counted in its time"))
    if fast_plaid_python:
        rows += fast_plaid_peer(fast_plaid_python, x, q, k, truth)
    else:
        rows.append(dict(precision="fast-plaid", error="not run: pass --fast-plaid-python, an interpreter with "
                         "fast-plaid and the torch it was built for (1.7.0.2110: torch 2.11)"))
    return rows


def recall_of(got, truth):
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth)) / truth.numel()


def bytes_table(D=3584):
    """bytes per candidate of each (budget x precision) at D, by arithmetic (machinery.index.vector_bytes)."""
    return {f"{rq}x{rc}": {p: rc * vector_bytes(D, p) for p in PRECISIONS} for rq, rc in GROUPS}


def gemm_peak(dtype, n=4096, repeats=4):
    """torch's GEMM FLOP/s in dtype on a large square product, best of a few (bf16: AMX where the CPU
    has it)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(timed_once(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def timed_once(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def mode_precision(args):
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}; load average before the run {os.getloadavg()[0]:.2f}")
    peak_bf16 = gemm_peak(torch.bfloat16)
    peak_f32, bw = measure_peaks(torch.device("cpu"), torch.float32)
    print(f"measured: bf16 GEMM {peak_bf16 / 1e9:.0f} GFLOP/s, float32 GEMM {peak_f32 / 1e9:.0f} GFLOP/s, "
          f"read bandwidth {bw / 1e9:.1f} GB/s")
    out = {"cpu": cpu_name(), "loadavg": os.getloadavg()[0], "peak_bf16_GFLOPs": peak_bf16 / 1e9, "peak_fp32_GFLOPs": peak_f32 / 1e9,
           "bandwidth_GBps": bw / 1e9, "quick": args.quick}
    out["speed"] = speed_rows(args.quick, peak_bf16, bw)
    print(f"\n{'shape':<5} {'method':<17} {'ms':>9} {'best ms':>8} {'GFLOP/s':>8} {'of torch bf16':>13} {'of limit':>8} "
          f"{'bound':>7} {'vs plain bf16':>13} {'max diff':>9}  dispatch")
    for r in out["speed"]:
        print(f"{r['shape']:<5} {r['method']:<17} {r['ms']:>9.1f} {r['best_ms']:>8.1f} {r['GFLOPs']:>8.1f} "
              f"{100 * r['frac_bf16_peak']:>12.0f}% "
              f"{100 * r['frac_limit']:>7.0f}% {r['bound']:>7} {r['vs_plain_bf16']:>12.2f}x {r['max_diff_vs_fp32']:>9.2g}  "
              f"{r['dispatch'] or ''}")
    out["recall"] = recall_rows(args.quick, fast_plaid_python=args.fast_plaid_python)
    print("\nrecall@10 against exact float32 MaxSim, random unit vectors:")
    for r in out["recall"]:
        if "error" in r:
            print(f"  {r['precision']}: {r['error']}")
            continue
        print(f"  {r['precision']:<28} {r['N']} x {r['budget']} D={r['D']}: {r['bytes_per_candidate']:>6} B/cand  "
              f"alone {r['recall_alone']:.3f} ({r['ms_alone']:.1f} ms/query)"
              + (f"  rescored (depth {r['depth']}, bf16) {r['recall_rescored']:.3f} ({r['ms_rescored']:.1f} ms/query)"
                 if "recall_rescored" in r else "") + (f"  [{r['note']}]" if "note" in r else ""))
    out["bytes_per_candidate_D3584"] = bytes_table()
    print("\nbytes per candidate at D = 3584:", out["bytes_per_candidate_D3584"])
    write_json(args.json, out)
    return out


STUDY = (("bf16, float32 math", "bfloat16", "torch"), ("bf16, bf16 math", "bfloat16", "torch-bf16"),
         ("int8", "int8", None), ("binary", "binary", None))


def score_difference(checkpoint, budgets):
    """The largest |bf16 math - float32 math| score on the synthetic eval (every query against its
    whole corpus, a bf16 index), per budget, and the median gap between a query's best two scores
    (what a difference must exceed to change a ranking)."""
    import data
    from evaluate import ScoringOptions, encode_unique
    from metaembed import load_model
    model, _ = load_model(checkpoint, "bench")
    out = {}
    for name, task in data.synthetic_eval().items():
        Q = encode_unique(model, list(task["queries"].values()), "query", ScoringOptions(64))[0]
        C = encode_unique(model, list(task["corpus"].values()), "candidate", ScoringOptions(64, precision="bfloat16"))[0]
        for rq, rc in budgets:
            f32 = maxsim(Q[:, :rq], C[:, :rc], backend="torch")
            bf = maxsim(Q[:, :rq], C[:, :rc], backend="torch-bf16")
            top2 = f32.topk(2, dim=1).values
            o = out.setdefault(f"{rq}x{rc}", {"max_diff": 0.0, "median_top2_gap": []})
            o["max_diff"] = max(o["max_diff"], (bf - f32).abs().max().item())
            o["median_top2_gap"].append((top2[:, 0] - top2[:, 1]).median().item())
    return {b: {"max_diff": o["max_diff"], "median_top2_gap": min(o["median_top2_gap"])} for b, o in out.items()}


def mode_precision_study(args):
    """P@1 at every (budget x precision) of one checkpoint on the synthetic eval, one encoding per
    precision (evaluate.py's own path); -> rows, plotted with --plot."""
    import evaluate
    budgets = "1,4,8,16,64"
    rows = []
    for label, precision, backend in STUDY:
        argv = ["--checkpoint", args.precision_study, "--budgets", budgets, "--index-dtype", "bfloat16"]
        argv += ["--precision", precision] if precision != "bfloat16" else []
        old = os.environ.get("METAEMBED_MAXSIM")
        if backend:
            os.environ["METAEMBED_MAXSIM"] = backend
        try:
            res = evaluate.main(argv)
        finally:
            os.environ.pop("METAEMBED_MAXSIM", None) if old is None else os.environ.update(METAEMBED_MAXSIM=old)
        for b in res["budgets"]:
            s = res["summary"][b]
            rows.append({"precision": label, "budget": b, "P@1": s["overall"], "bytes_per_candidate": s["bytes_per_candidate"],
                         "score_ms": 1e3 * s["score_seconds"], "dim": res["dim"]})
    print(f"\nP@1 (%) on the synthetic eval, {args.precision_study} (D = {rows[0]['dim']}), CPU: {cpu_name()}")
    print(f"{'precision':<20} " + "  ".join(f"{r['budget']:>16}" for r in rows if r["precision"] == STUDY[0][0]))
    for label, *_ in STUDY:
        print(f"{label:<20} " + "  ".join(f"{100 * r['P@1']:5.1f} ({r['bytes_per_candidate']:>6} B)"
                                         for r in rows if r["precision"] == label))
    diff = score_difference(args.precision_study, [tuple(map(int, b.split("x"))) for b in
                                                   dict.fromkeys(r["budget"] for r in rows)])
    print("largest |bf16 math - float32 math| score on the eval (a bf16 index), and the median gap between a "
          "query's best two scores:")
    print("  " + "  ".join(f"{b}: {d['max_diff']:.2g} (gap {d['median_top2_gap']:.2g})" for b, d in diff.items()))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, *_ in STUDY:
            pts = [r for r in rows if r["precision"] == label]
            ax.plot([r["bytes_per_candidate"] for r in pts], [100 * r["P@1"] for r in pts], marker="o", label=label)
            for r in pts:
                ax.annotate(r["budget"], (r["bytes_per_candidate"], 100 * r["P@1"]), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="index bytes per candidate", ylabel="P@1 (%), synthetic eval",
               title=f"Two budget axes: vectors and bits (D = {rows[0]['dim']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"wrote {args.plot}")
    write_json(args.json, {"checkpoint": args.precision_study, "cpu": cpu_name(), "rows": rows,
                           "bf16_math_score_difference": diff})
    return rows
