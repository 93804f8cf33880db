"""MaxSim speed: maxsim against the naive einsum, a chunked matmul and installed peers, per shape, as a
fraction of the machine's measured limit; the CPU dispatch; the grouped on-disk layout."""
import json
import os

import torch

from bench.common import cpu_name, measure_peaks, random_index, timed, unit_vectors, write_json
from maxsim import maxsim, maxsim_chunked
from metaembed import GROUPS



def naive_einsum(q, c):
    """colpali-engine's score_multi_vector, on the whole corpus at once."""
    return torch.einsum("bnd,csd->bcns", q, c).max(dim=3)[0].sum(dim=2).float()


def chunked_matmul(q, c, chunk=128):
    """A plain chunked matmul (the twenty lines anyone would write): 128 candidates at a time,
    one matmul, amax over r_c, sum over r_q."""
    Nq, rq, D = q.shape
    qf = q.reshape(-1, D).float()
    out = []
    for j in range(0, c.shape[0], chunk):
        cj = c[j:j + chunk]
        s = (qf @ cj.reshape(-1, D).float().T).view(Nq, rq, cj.shape[0], cj.shape[1])
        out.append(s.amax(-1).sum(1))
    return torch.cat(out, 1)


def maxsim_cpu_peer():
    """maxsim-cpu (Rust, one query at a time) if installed: a peer, timed only where it is correct."""
    try:
        import maxsim_cpu
    except ImportError:
        return None
    import numpy as np

    def fn(q, c):
        if q.shape[1] * c.shape[1] * q.shape[2] > 16 * 64 * 128:  # seen here: a segfault at 16x64, D=1536
            raise RuntimeError("maxsim-cpu 0.1.0 crashes past R_q R_c D = 131072")
        cn = np.ascontiguousarray(c.numpy())
        return torch.stack([torch.from_numpy(maxsim_cpu.maxsim_scores(np.ascontiguousarray(qi.numpy()), cn))
                            for qi in q])
    return fn


def naive_chunked(q, c, max_bytes=4 << 30):
    """The same einsum in candidate chunks (for corpora where the 4-D tensor cannot exist)."""
    per = q.shape[0] * q.shape[1] * c.shape[1] * q.element_size()
    step = max(1, max_bytes // per)
    return torch.cat([naive_einsum(q, c[j:j + step]) for j in range(0, c.shape[0], step)], 1)


def run_shape(name, Nq, Nc, rq, rc, D, dev, dtype, peaks, repeats, methods, R=(16, 64)):
    # full (R_q, R_c) embeddings, budgets read as prefix views, as at serving time
    q = unit_vectors(Nq, max(rq, R[0]), D, dev, dtype, 0)
    c = unit_vectors(Nc, max(rc, R[1]), D, dev, dtype, 1)
    qv, cv = q[:, :rq], c[:, :rc]
    flops = 2 * Nq * Nc * rq * rc * D
    cbytes = Nc * rc * D * c.element_size()
    limit = max(flops / peaks[0], cbytes / peaks[1])
    # every method's WHOLE output is checked against float32 math in bounded memory (a wrong
    # offset past 2^31 elements shows only in the far candidates)
    ref = maxsim_chunked(qv, cv)
    tol = 1e-3 if dtype == torch.float32 else 1e-2 * rq    # bf16 rounding of each dot product
    rows = []
    for mname, fn in methods.items():
        try:
            out = fn(qv, cv)
            err = (out.float() - ref).abs().max().item()
            if not err <= tol:
                raise AssertionError(f"max error {err:.3g} > {tol:.3g} against the reference")
            del out
        except torch.OutOfMemoryError:
            rows.append(dict(shape=name, method=mname, error="out of memory"))
            continue
        except Exception as e:  # noqa: BLE001 - report and skip a method that fails or is wrong
            rows.append(dict(shape=name, method=mname, error=f"{type(e).__name__}: {str(e)[:80]}"))
            continue
        try:
            t, extra, _ = timed(lambda: fn(qv, cv), dev, repeats)
        except torch.OutOfMemoryError:
            rows.append(dict(shape=name, method=mname, error="out of memory"))
            continue
        rows.append(dict(shape=name, method=mname, Nq=Nq, Nc=Nc, budget=f"{rq}x{rc}", D=D,
                         dtype=str(dtype).removeprefix("torch."), ms=1e3 * t, max_err=err,
                         GBps=cbytes / t / 1e9, GFLOPs=flops / t / 1e9, pct_of_limit=100 * limit / t,
                         limit_ms=1e3 * limit, extra_MiB=extra / 2 ** 20))
    base = next((r for r in rows if r["method"].startswith("naive") and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["speedup_vs_naive"] = base["ms"] / r["ms"]
    return rows


def print_rows(rows):
    hdr = f"{'shape':<6} {'method':<16} {'Nq':>5} {'Nc':>7} {'budget':>6} {'D':>5} {'ms':>9} {'limit':>8} " \
          f"{'%limit':>6} {'GB/s':>7} {'GFLOP/s':>8} {'xnaive':>7} {'extra MiB':>9}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<6} {r['method']:<16} skipped: {r['error']}")
            continue
        print(f"{r['shape']:<6} {r['method']:<16} {r['Nq']:>5} {r['Nc']:>7} {r['budget']:>6} {r['D']:>5} "
              f"{r['ms']:>9.1f} {r['limit_ms']:>8.1f} {r['pct_of_limit']:>6.0f} {r['GBps']:>7.1f} "
              f"{r['GFLOPs']:>8.1f} {r.get('speedup_vs_naive', float('nan')):>7.2f} {r['extra_MiB']:>9.0f}")


def layout_bench(N=10_000, Nq=32, D=1536, repeats=7, folder=None):
    """32 queries x N candidates at (1, 1), D = 1536: from search.py's grouped layout (the first
    vector of every candidate in one contiguous bf16 block) against prefix views of full (16, 64)
    embeddings, in memory (float32 and bf16); and the bytes each budget reads."""
    import tempfile
    peaks = measure_peaks(torch.device("cpu"), torch.float32)
    q = unit_vectors(Nq, 16, D, torch.device("cpu"), torch.float32, 0)
    rows = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        index = random_index(tmp, N, D)
        full = index.prefix(64)[0:N].float()                                          # (N, 64, D)
        sizes = {b: os.path.getsize(f) for (_, b), f in zip(index.bounds, index.vectors.files)}
        read = {b: sum(v for k, v in sizes.items() if k <= b) / sum(sizes.values()) for _, b in index.bounds}
        flops = 2 * Nq * N * D
        cases = {"grouped bf16 (search.py)": lambda: index.prefix(1)[0:N],
                 "prefix view, full fp32": lambda: full[:, :1],
                 "prefix view, full bf16": (lambda fb: (lambda: fb[:, :1]))(full.bfloat16())}
        for name, cands in cases.items():
            c = cands()
            for backend in ("c", "torch"):
                err = (maxsim(q[:, :1], c, backend=backend) - maxsim_chunked(q[:, :1], c)).abs().max().item()
                t, _, _ = timed(lambda: maxsim(q[:, :1], cands(), backend=backend), torch.device("cpu"), repeats)
                limit = max(flops / peaks[0], N * D * c.element_size() / peaks[1])
                rows.append(dict(layout=name, backend=backend, ms=1e3 * t, limit_ms=1e3 * limit,
                                 x_limit=t / limit, max_err=err))
    return dict(N=N, Nq=Nq, D=D, peaks=peaks, rows=rows, bytes_read_fraction=read)


def mode_dispatch(args):
    """the CPU dispatch, measured afresh for every regime."""
    from machinery import cpu_kernel
    from machinery.precision import Precision
    if cpu_kernel.library() is None:
        print("the C kernel does not build here: maxsim always takes the torch path")
        return
    cpu_kernel.choices.clear()
    if cpu_kernel.dispatch_file() and cpu_kernel.dispatch_file().exists():
        cpu_kernel.dispatch_file().unlink()
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads; "
          f"kept in {cpu_kernel.dispatch_file()}")
    # every regime maxsim's auto path can meet (cpu_kernel.regime): bf16 math only where a bf16 unit is here
    maths = ("", "/bf16math") if cpu_kernel.bf16_units() else ("",)
    for one in ("one-query", "many-queries"):
        for rc in ("rc1", "multi", "multi>16"):
            for d in ("D<=256", "D>256"):
                for dt in Precision:               # bf16 math only where it loses nothing the index holds
                    for math in maths if dt in ("bfloat16", "int8", "binary") else ("",):
                        name = f"{one}/{rc}/{d}/{dt}{math}"
                        win, t = cpu_kernel.measured_choice(name, maxsim_chunked)
                        paths = "  ".join(f"{k[:-3]} {v:7.2f} ms" for k, v in t.items()
                                          if k.endswith("_ms") and k != "C_ms" and v is not None)
                        pick = f"C kernel, {t['width']}-wide" if win == "c" else win
                        print(f"  {name:<44} {paths}  -> {pick}   ({t['probe']})")
    write_json(args.json, cpu_kernel.choices)


def mode_layout(args):
    """the grouped on-disk layout at 1x1."""
    r = layout_bench()
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads; peaks "
          f"{r['peaks'][0] / 1e9:.0f} GFLOP/s, {r['peaks'][1] / 1e9:.1f} GB/s; {r['Nq']} x {r['N']} at 1x1, D={r['D']}")
    for row in r["rows"]:
        print(f"  {row['layout']:<26} {row['backend']:<6} {row['ms']:7.1f} ms  limit {row['limit_ms']:5.1f} ms  "
              f"{row['x_limit']:.2f}x the limit  (max err {row['max_err']:.1e})")
    print("  bytes read per budget r_c (fraction of the index): " +
          ", ".join(f"{b}: {f:.4f}" for b, f in r["bytes_read_fraction"].items()))
    write_json(args.json, {**r, "device": cpu_name()})


def mode_speed(args):
    """The default: MaxSim speed on this device against the naive einsum and the peers."""
    dev = torch.device(args.device)
    repeats = 3 if args.quick else 7
    if dev.type == "cpu":
        dtype = torch.float32
        name = cpu_name()
        print(f"CPU: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32")
    else:
        dtype = torch.bfloat16
        name = torch.cuda.get_device_name(dev)
        print(f"GPU: {name}, torch {torch.__version__}, bf16 embeddings, fp32 accumulation")
    peaks = measure_peaks(dev, dtype)
    print(f"measured peaks: {peaks[0] / 1e9:.0f} GFLOP/s matmul, {peaks[1] / 1e9:.1f} GB/s read\n")

    methods = {"naive einsum": naive_einsum, "peer chunked matmul": chunked_matmul,
               "maxsim (torch)": lambda q, c: maxsim(q, c, backend="torch"),
               "maxsim (C)": lambda q, c: maxsim(q, c, backend="c"), "maxsim (auto)": maxsim}
    if dev.type == "cuda":
        methods = {"naive (chunked)": naive_chunked, "maxsim (torch)": lambda q, c: maxsim(q, c, backend="torch"),
                   "maxsim (triton)": lambda q, c: maxsim(q, c, backend="triton")}
        shapes = [(f"G{i}", nq, 100_000, rq, rc, D) for i, (nq, D) in enumerate(((1, 128), (1000, 128), (1, 3584)))
                  for rq, rc in GROUPS]
    else:
        if (peer := maxsim_cpu_peer()) is not None:
            methods["peer maxsim-cpu"] = peer
        shapes = [("S1", 1, 10_000, 16, 64, 128), ("S2", 32, 10_000, 16, 64, 128),
                  ("S3", 32, 2_000, 16, 64, 1536), ("S4", 32, 10_000, 1, 1, 1536)]
        shapes += [(f"B{rq}x{rc}", 1, 10_000, rq, rc, 128) for rq, rc in GROUPS[:-1]]
    rows = []
    for shape in shapes:
        name_, Nq, Nc, rq, rc, D = shape
        rows += run_shape(name_, Nq, Nc, rq, rc, D, dev, dtype, peaks, repeats, methods)
    if dev.type == "cpu":  # a bf16 index: half the bytes of S1 (the C kernel widens it to fp32)
        rows += run_shape("S1bf16", 1, 10_000, 16, 64, 128, dev, torch.bfloat16, peaks, repeats, methods)
    print_rows(rows)
    print("\nper shape: the default (auto) against the fastest correct peer measured in this run")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        got = {r["method"]: r["ms"] for r in rows if r["shape"] == shape and "ms" in r}
        peers = {m: t for m, t in got.items() if not m.startswith("maxsim")}
        auto = got.get("maxsim (auto)") or got.get("maxsim (triton)")
        if peers and auto:
            best = min(peers, key=peers.get)
            print(f"  {shape:<7} auto {auto:8.1f} ms   fastest peer {best} {peers[best]:8.1f} ms   "
                  f"{peers[best] / auto:5.2f}x")
    print("\nlimit = max(FLOPs / peak FLOP/s, candidate bytes / peak GB/s); %limit = limit / time; "
          "xnaive = naive time / time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peaks": {"flops": peaks[0], "bytes_per_s": peaks[1]}, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.json}")
