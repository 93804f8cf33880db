"""
Speed of MaxSim late interaction: maxsim.maxsim against the naive einsum (colpali-engine's
score_multi_vector: one einsum over (N_q, N_c, R_q, R_c), then max and sum), measured in the
same run, with the machine's own measured peaks. On the CPU both of maxsim's paths are timed:
'torch' (chunked BLAS) and 'C' (the fused kernel, maxsim.c); on a GPU 'torch' and 'triton'.

    python bench.py                 # CPU shapes S1-S4 and a budget sweep; a GPU suite on CUDA
    python bench.py --quick         # fewer repeats
    python bench.py --json out.json

Per shape: milliseconds (median), GB/s of candidate data read, GFLOP/s, % of the limit
max(FLOPs / peak FLOP/s, bytes / peak bandwidth), peak extra memory, and speed-up over naive.
Every method's output is checked against the reference before it is timed. Peers that are
installed are timed too (maxsim-cpu, `pip install maxsim-cpu`), where their output is right.
"""
import argparse
import json
import os
import platform
import time

import torch

from maxsim import maxsim, maxsim_chunked
from metaembed import GROUPS



def cpu_name():
    """The CPU's model name (/proc/cpuinfo), which a number here must say it came from."""
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


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


# -----------------------------------------------------------------------------
# measuring: time, peak extra memory, the machine's peaks

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rss_peak_reset():
    """Reset the process's peak RSS (Linux: clear_refs 5) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def timed(fn, dev, repeats):
    """-> (median seconds, peak extra bytes, output)."""
    out = fn()  # warm-up (and compile)
    sync(dev)
    del out
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_peak_reset()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
        if _ < repeats - 1:
            del out
    if dev.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = (_status("VmHWM") - base) if base is not None else float("nan")
    return sorted(times)[len(times) // 2], extra, out


def measure_peaks(dev, dtype):
    """Measured, not nominal (best of several runs): a large matmul's FLOP/s (on the CPU the faster
    of torch's and numpy's BLAS) and a large reduction's read bandwidth."""
    def best(fn, repeats=10):
        fn()
        sync(dev)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t)
        return min(ts)
    n = 8192 if dev.type == "cuda" else 4096
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    flops = 2 * n ** 3 / best(lambda: a @ b, 10 if dev.type == "cuda" else 4)
    if dev.type == "cpu":  # torch's MKL is not the fastest sgemm on every CPU (AMD): numpy's BLAS too
        try:
            an, bn = a.numpy(), b.numpy()
            flops = max(flops, 2 * n ** 3 / best(lambda: an @ bn, 4))
        except (ImportError, RuntimeError):
            pass
    x = torch.empty((4 << 30 if dev.type == "cuda" else 512 << 20) // 4, device=dev).uniform_()
    bw = x.numel() * 4 / best(lambda: x.sum())
    return flops, bw


# -----------------------------------------------------------------------------

def unit_vectors(n, r, D, dev, dtype, seed):
    """(n, r, D) random unit vectors made on the device in their own dtype (a 100k x 64 x 3584 bf16
    corpus is 46 GB: it must not pass through a float32 host tensor), in slices of <= 1 GiB."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.empty(n, r, D, device=dev, dtype=dtype)
    step = max(1, (1 << 30) // (r * D * 4))
    for j in range(0, n, step):
        y = torch.randn(x[j:j + step].shape, device=dev, generator=g)
        x[j:j + step] = torch.nn.functional.normalize(y, dim=-1)
    return x


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


# -----------------------------------------------------------------------------
# evaluation memory: peak host memory of evaluate.score_retrieval against the index's bytes

def eval_memory(n, index_dir=None, D=3584, queries=2):
    """Encode and score n candidates at (16, 64), D = 3584, through evaluate.score_retrieval with a
    stub encoder (the tiny backbone's processor; `embed` returns float32 unit vectors of size D, as
    a 7B backbone would), a bf16 index in memory or on disk. -> dict of bytes."""
    import tempfile

    import evaluate
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny")
    model.dim = D
    sample = torch.nn.functional.normalize(torch.randn(64, 64, D), dim=-1)

    def embed(inputs, side):                       # (B, R, D) float32, a fresh tensor each batch
        B, R = inputs["input_ids"].shape[0], 16 if side == "query" else 64
        return sample[:B, :R].clone()
    model.embed = embed
    task = dict(queries={f"q{i}": (f"query {i}", None) for i in range(queries)},
                corpus={f"d{i}": (f"document {i}", None) for i in range(n)},
                qrels={f"q{i}": {f"d{i}": 1} for i in range(queries)})
    index_bytes = n * 64 * D * torch.bfloat16.itemsize
    base = rss_peak_reset()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=index_dir) as tmp:
        path = os.path.join(tmp, "corpus") if index_dir else None
        evaluate.score_retrieval(model, task, [(1, 1), (16, 64)], 64, torch.device("cpu"), index_path=path)
    peak = _status("VmHWM") - base
    return dict(candidates=n, D=D, on_disk=bool(index_dir), index_bytes=index_bytes, peak_extra_bytes=peak,
                ratio=peak / index_bytes, seconds=time.perf_counter() - t)


# -----------------------------------------------------------------------------
# GradCache memory: one training step's peak host memory, with and without chunks

def grad_cache_step_memory(batch, chunk, image_px=448):
    """Peak host memory beyond the model of one training step (forward + backward, tiny backbone,
    text queries against image candidates of image_px^2 pixels, one hard negative each), plain
    (chunk 0) or with GradCache in chunks of `chunk` rows."""
    from contextlib import nullcontext

    from PIL import Image

    import data
    import train
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny", max_pixels=image_px * image_px)
    g = torch.Generator().manual_seed(0)
    pics = [Image.fromarray(torch.randint(0, 255, (image_px, image_px, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(2 * batch)]
    rows = [dict(qry_text=f"query {i}", qry_image=None, pos_text="", pos_image=pics[i], negs=[("", pics[batch + i])],
                 source=f"row {i}") for i in range(batch)]
    q_in, c_in, neg_mask = data.collate(rows, model.processor)
    tokens = int(c_in["image_grid_thw"][0].prod()) // 4
    base = rss_peak_reset()
    t = time.perf_counter()
    if chunk:
        loss, _ = train.grad_cache_step(model, model, model.config, q_in, c_in, neg_mask, batch, 0, chunk,
                                        nullcontext(), nullcontext)
    else:
        q, c = model(q_in, c_in)
        loss, _ = train.mmr_loss(model.config, q, c, neg_mask, batch, 0)
        loss.backward()
    # the whole process's peak: the step's own increase can hide in memory freed by the collate
    return dict(batch=batch, chunk=chunk, visual_tokens_per_image=tokens, loss=loss.item(), rss_before_bytes=base,
                peak_bytes=_status("VmHWM"), seconds=time.perf_counter() - t)


# -----------------------------------------------------------------------------
# search: the grouped on-disk layout, and the cascade

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
        full = index.budget(64)[0:N].float()                                          # (N, 64, D)
        sizes = {b: os.path.getsize(f) for (_, b), f in zip(index.bounds, index.vectors.files)}
        read = {b: sum(v for k, v in sizes.items() if k <= b) / sum(sizes.values()) for _, b in index.bounds}
        flops = 2 * Nq * N * D
        cases = {"grouped bf16 (search.py)": lambda: index.budget(1)[0:N],
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


def random_index(path, N, D, R_c=64, seed=0):
    """A search.py index of N random unit candidates (for speed only: random vectors carry no
    Matryoshka order, so a cascade's recall on them means nothing)."""
    import search
    from machinery import index as on_disk
    vectors = on_disk.create(path, N, R_c, D, GROUPS, "bfloat16")
    for j in range(0, N, 1000):
        vectors[j:j + 1000] = unit_vectors(min(1000, N - j), R_c, D, torch.device("cpu"), torch.float32, seed + j)
    on_disk.write_meta(path, vectors.meta)
    with open(os.path.join(path, "items.jsonl"), "w") as f:
        f.writelines(json.dumps({"n": i, "id": str(i), "source": f"random vector {i}", "kind": "text"}) + "\n"
                     for i in range(N))
    return search.Index(path)


def cascade_bench(index_path=None, random_size=None, queries=300, depths=(100, 300, 1000), k=10):
    """The cascade (1x1 over everything, 16x64 on the best `depth`) against exhaustive 16x64:
    recall@k of the exhaustive top-k on an index of the synthetic scenes (caption queries, the
    offline model), or the time per query (one at a time, as served) on random vectors."""
    import tempfile

    import search
    tmp = None
    if random_size:
        N, D = random_size
        tmp = tempfile.TemporaryDirectory()
        index = random_index(tmp.name, N, D)
        q = unit_vectors(queries, 16, D, torch.device("cpu"), torch.float32, 99)
    else:
        index = search.Index(index_path)
        model = search.load_model(index.meta["checkpoint"])
        q = model.encode_queries([it["source"] for it in index.items if "v" not in it["id"]][:queries])
    t = time.perf_counter()
    exact = torch.cat([index.search(q[a:a + 1], (16, 64), k)[1] for a in range(len(q))])
    t_exact = (time.perf_counter() - t) / len(q)
    rows = [dict(depth="exhaustive", recall=1.0, ms_per_query=1e3 * t_exact, speedup=1.0)]
    for depth in depths:
        t = time.perf_counter()
        got = torch.cat([index.search(q[a:a + 1], (16, 64), k, first=(1, 1), depth=depth)[1] for a in range(len(q))])
        dt = (time.perf_counter() - t) / len(q)
        rec = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact)) / exact.numel()
        rows.append(dict(depth=depth, recall=rec, ms_per_query=1e3 * dt, speedup=t_exact / dt))
    if tmp:
        tmp.cleanup()
    return dict(candidates=index.N, dim=index.D, queries=len(q), k=k, random=bool(random_size), rows=rows)


def serve_bench(N=20_000, D=1536, requests=30, k=10):
    """search.py serve's latency: p50 / p95 of whole HTTP search requests (encode + search + JSON)
    on N random candidates at D, against the same search in-process (what `search.py query`
    times), at 1x1, 8x16, 16x64 and the cascade 1x1 -> 16x64 at depth 300."""
    import tempfile
    import threading
    import urllib.request

    from machinery import serve
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny", proj_dim=D)            # a query encoder of the index's D
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        index = random_index(tmp, N, D)
        index.meta.update(model_groups=GROUPS, checkpoint="(random vectors)")
        server = serve.make_server(serve.Searcher(index, model), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/api/search?q=red+top+left&k={k}"
        for name, budget, first in (("1x1", (1, 1), None), ("8x16", (8, 16), None), ("16x64", (16, 64), None),
                                    ("cascade 1x1 -> 16x64, depth 300", (16, 64), (1, 1))):
            query = f"&budget={budget[0]}x{budget[1]}" + (f"&first={first[0]}x{first[1]}&depth=300" if first else "")
            http, cli = [], []
            for _ in range(requests + 2):                          # the first two warm up
                t = time.perf_counter()
                urllib.request.urlopen(url + query, timeout=120).read()
                http.append(time.perf_counter() - t)
                t = time.perf_counter()
                q = model.encode_queries(["red top left"])
                index.search(q, budget, k, first, 300)
                cli.append(time.perf_counter() - t)
            http, cli = sorted(http[2:]), sorted(cli[2:])
            rows.append(dict(search=name, http_p50_ms=1e3 * http[len(http) // 2], http_p95_ms=1e3 * http[int(0.95 * len(http))],
                             in_process_p50_ms=1e3 * cli[len(cli) // 2]))
        server.shutdown()
    return dict(candidates=N, dim=D, requests=requests, k=k, rows=rows)


# Full-size configs (random weights): the numbers of each model's config.json on the hub, as copied
# in public code. Each is checked by its parameter count
# against the hub's safetensors total (`published`): a wrong width or depth would not match.
REHEARSAL_CONFIGS = {
    # Qwen/Qwen2-VL-2B-Instruct: 2,208,985,600 parameters
    "qwen2-vl-2b": dict(family="qwen2_vl", published=2_208_985_600, text=dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)),
    # Qwen/Qwen2.5-VL-3B-Instruct, the paper's smallest: windowed vision attention, 4 full blocks
    "qwen2.5-vl-3b": dict(family="qwen2_5_vl", published=3_754_622_976, text=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")),
    # Qwen/Qwen3-VL-2B-Instruct: 2,127,532,032 (the text MLP is 6,144 wide; 5,632 and 8,192, also
    # seen in third-party code, give 2,039M and 2,480M)
    "qwen3-vl-2b": dict(family="qwen3_vl", published=2_127_532_032, text=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True)),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
    # Qwen/Qwen3.5-2B: 2,274,069,824 on the hub, of which 60,828,160 are the multi-token-prediction
    # layer that transformers does not build: 2,213,241,664. Gated DeltaNet in 3 of every 4 layers.
    "qwen3.5-2b": dict(family="qwen3_5", published=2_213_241_664, text=dict(
        vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, max_position_embeddings=262144, tie_word_embeddings=True,
        attn_output_gate=True, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                                       mrope_section=[11, 11, 10], mrope_interleaved=True)),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    hidden_act="gelu_pytorch_tanh")),
}


def head_dim(text):
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def layer_parameters(text, family):
    """One Qwen2 / Qwen3 decoder layer: q, k, v, o, the MLP, two norms; Qwen2's q, k, v biases or
    Qwen3's QK-norms."""
    H, I, hd = text["hidden_size"], text["intermediate_size"], head_dim(text)
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    return 2 * H * q + 2 * H * kv + 3 * H * I + 2 * H + (2 * hd if family == "qwen3_vl" else q + 2 * kv)


def trained_parameters(text, lora_r=32, meta_tokens=80):
    """LoRA r on q, k, v, o, gate, up, down of every layer (r x (in + out) each), + the Meta Tokens."""
    H, I, hd = text["hidden_size"], text["intermediate_size"], head_dim(text)
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    return lora_r * text["num_hidden_layers"] * (2 * (H + q) + 2 * (H + kv) + 3 * (H + I)) + meta_tokens * H


def layer_bytes_per_token(text, family):
    """What autograd keeps for one Qwen2 / Qwen3 decoder layer per token without checkpointing,
    bf16 weights and float32 LoRA with dropout: 14 H-wide float32 tensors (RMSNorm inputs, the LoRA
    inputs cast to float32 and their dropout), 3 bf16 and 2 float32 I-wide ones (the MLP), q, k, v
    and the attention output in bf16, and Qwen3's QK-norm inputs in float32. Counted from the saved
    tensors of Qwen2-VL-2B and Qwen3-VL-2B (both within 0.5%). None for Qwen3.5, whose Gated
    DeltaNet layers keep what their kernel keeps (the PyTorch reference here: 1.8x a full layer)."""
    if family == "qwen3_5":
        return None
    H, I, hd = text["hidden_size"], text["intermediate_size"], head_dim(text)
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    return 56 * H + 14 * I + 4 * hd * (heads + kv) * (2 if family == "qwen3_vl" else 1)


# The models of the per-device memory table (python bench.py --memory-table): the rehearsed ones
# by name, the paper's larger two by their language model's config.json and the hub's total.
MEMORY_MODELS = {
    "Qwen2-VL-2B": "qwen2-vl-2b", "Qwen3-VL-2B": "qwen3-vl-2b", "Qwen2.5-VL-3B": "qwen2.5-vl-3b",
    "Qwen2.5-VL-7B": dict(family="qwen2_5_vl", published=8_292_166_656, text=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, tie_word_embeddings=False)),
    "Qwen2.5-VL-32B": dict(family="qwen2_5_vl", published=33_452_718_336, text=dict(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, tie_word_embeddings=False)),
}


def memory_table(measured, query_tokens, candidate_tokens=1116, batch=48, negatives=1, chunk=None, fsdp=1):
    """Per-device GiB of one training step. weights: bf16, without an untied lm_head (the base model
    is loaded, not the LM head); with FSDP2 the decoder layers sharded, the root (vision tower,
    embeddings) whole, two layers gathered (this one, the next prefetched). trained: LoRA r = 32 +
    Meta Tokens in float32 with the gradient and AdamW's two moments, 16 bytes each, sharded with
    FSDP. kept: every row's checkpointed hidden state at every layer (the rehearsals' bytes per
    token per layer). transient, the larger of: one layer recomputed in backward for the rows of
    one forward (layer_bytes_per_token x the rehearsals' measured ratio), or the frozen vision
    tower's forward over the candidate images (the rehearsals' bytes per patch, 4,096 patches an
    image at 1,024 visual tokens) while only the query rows' checkpoints are kept. Rows are
    query_tokens / candidate_tokens long (1,024 visual tokens, the prompt, the 16 / 80 Meta
    Tokens). chunk: GradCache, at most `chunk` rows with a graph at a time. `measured`: the
    results of bench.py --rehearse."""
    kept = max(r["kept_bytes_per_token_per_layer"] / r["hidden_size"] for r in measured)        # x H
    recompute = max(r["recompute_bytes_per_token"] / r["layer_bytes_per_token"] for r in measured
                    if r.get("layer_bytes_per_token"))
    vision = max(r["vision_peak_per_patch_KiB"] for r in measured) * 2**10
    rows_q, rows_c = batch, batch * (1 + negatives)
    if chunk:   # one chunk's graph at a time, of whichever rows are longer
        rows_q, rows_c = 0, chunk
        candidate_tokens = max(candidate_tokens, query_tokens)
    table = []
    for name, spec in MEMORY_MODELS.items():
        spec = REHEARSAL_CONFIGS[spec] if isinstance(spec, str) else spec
        text, family = spec["text"], spec["family"]
        H, L = text["hidden_size"], text["num_hidden_layers"]
        base = spec["published"] - (0 if text["tie_word_embeddings"] else text["vocab_size"] * H)
        layers = L * layer_parameters(text, family)
        weights = base if fsdp == 1 else layers / fsdp + (base - layers) + 2 * layer_parameters(text, family)
        kept_q, kept_c = rows_q * query_tokens * L * kept * H, rows_c * candidate_tokens * L * kept * H
        layer = max(rows_q * query_tokens, rows_c * candidate_tokens) * layer_bytes_per_token(text, family) * recompute
        tower = rows_c * 4096 * vision
        row = dict(model=name, weights=2 * weights, trained=16 * trained_parameters(text) / fsdp,
                   kept=kept_q + kept_c, transient=max(layer, tower - kept_c))
        row["total"] = row["weights"] + row["trained"] + row["kept"] + row["transient"]
        row = {k: v / 2**30 if k != "model" else v for k, v in row.items()}
        row["transient_is"] = "vision tower" if tower - kept_c > layer else "layer recompute"
        table.append(row)
    return dict(batch=batch, negatives=negatives, query_tokens=query_tokens, candidate_tokens=candidate_tokens,
                chunk=chunk, fsdp=fsdp, kept_x_hidden=kept, recompute_ratio=recompute, vision_KiB_per_patch=vision / 2**10,
                rows=table)


def save_full_size(name, path, dtype):
    """REHEARSAL_CONFIGS[name] with random weights, saved as its hub repo is laid out (the tiny
    tokenizer's special-token ids in the config)."""
    import transformers

    from machinery import backbones
    spec = REHEARSAL_CONFIGS[name]
    tokenizer = backbones.tiny_tokenizer(backbones.TINY["vocab_size"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in backbones.SPECIAL_TOKENS}
    config = getattr(transformers, backbones.FAMILIES[spec["family"]].model.replace("Model", "Config"))(
        text_config=spec["text"], vision_config=spec["vision"], tie_word_embeddings=spec["text"]["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    backbones.save_hub_layout(config, tokenizer, path, dtype)


class AnonPeak:
    """Peak anonymous memory (RssAnon: tensors, not the safetensors files that transformers maps
    and pages in as they are read) while the block runs, sampled every 2 ms. glibc is told, for the
    rest of the process, to give blocks from 64 KiB up back when they are freed, so RssAnon follows
    the live tensors."""

    def __enter__(self):
        import ctypes
        import threading
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD: 64 KiB
        except (OSError, AttributeError):
            pass
        self.start = self.peak = _status("RssAnon")
        self.done = threading.Event()
        def sample():
            while not self.done.wait(0.002):
                self.peak = max(self.peak, _status("RssAnon"))
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.end = _status("RssAnon")
        self.peak = max(self.peak, self.end)


def kept_for_backward(fn, model):
    """-> (fn(), bytes that autograd keeps for backward when fn returns: the unique storages saved
    in the graph and still alive, the model's own parameters not counted)."""
    import weakref
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}
    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            saved.setdefault(s.data_ptr(), []).append((weakref.ref(x), s.nbytes()))
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(refs[0][1] for refs in saved.values() if any(r() is not None for r, _ in refs))


def rehearse(name, dtype=torch.bfloat16):
    """A full-size backbone with random weights, on this CPU: encode a 2000 x 3000 page and a query,
    one LoRA step with gradient checkpointing on 1 query + its page + 1 hard-negative page, save and
    reload the checkpoint (the base from a local hub-layout folder). -> times, parameters, and the
    step's memory: what autograd keeps per row, the forward and backward peaks above the start."""
    import tempfile

    from PIL import Image

    import data
    import train
    from machinery import backbones
    from metaembed import MetaEmbed
    spec = REHEARSAL_CONFIGS[name]
    out, t0 = {"name": name, "dtype": str(dtype).removeprefix("torch."), "cpu": cpu_name()}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_full_size(name, f"{tmp}/base", dtype)
        out["build_s"] = time.perf_counter() - t0
        model = MetaEmbed.from_backbone(f"{tmp}/base", dtype=out["dtype"])
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["trained_parameters"] = sum(p.numel() for p in model.trained_parameters().values())
        out["base_parameters"] = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" not in n)
        out["published_parameters"] = spec["published"]
        out["weights_GiB"] = sum(p.numel() * p.element_size() for p in model.backbone.parameters()) / 2**30
        page = Image.fromarray(torch.randint(0, 255, (3000, 2000, 3), dtype=torch.uint8).numpy())
        neg = Image.fromarray(torch.randint(0, 255, (3000, 2000, 3), dtype=torch.uint8).numpy())
        t = time.perf_counter()
        model.encode_candidates([""], [page])
        out["encode_page_s"], out["visual_tokens"] = time.perf_counter() - t, int(
            (model.prepare([""], [page], "candidate")["input_ids"] == model.backbone.config.image_token_id).sum())
        t = time.perf_counter()
        model.encode_queries(["a query about the page"])
        out["encode_query_s"] = time.perf_counter() - t
        backbones.checkpoint_activations(model.backbone)
        model.train()
        rows = [dict(qry_text="a query about the page", qry_image=None, pos_text="", pos_image=page,
                     negs=[("", neg)], source="rehearsal")]
        q_in, c_in, neg_mask = data.collate(rows, model.processor, query_suffix=True)
        R = model.config.num_query_tokens + model.config.num_candidate_tokens
        pages, out["page_row_tokens"] = c_in["input_ids"].shape[0], c_in["input_ids"].shape[1] + R
        t = time.perf_counter()
        with AnonPeak() as fwd:
            (q, _), kept_q = kept_for_backward(lambda: model(q_in, None), model)
            (_, cand), kept_c = kept_for_backward(lambda: model(None, c_in), model)
            loss, _ = train.mmr_loss(model.config, q, cand, neg_mask, 1, 0)
        with AnonPeak() as bwd:
            loss.backward()
        out["train_step_s"], out["loss"] = time.perf_counter() - t, loss.item()
        out["kept_query_row_MiB"], out["kept_page_row_MiB"] = kept_q / 2**20, kept_c / pages / 2**20
        # a checkpointed layer keeps its input hidden state: tokens x H x 2 bytes (bf16)
        out["kept_bytes_per_token_per_layer"] = kept_c / pages / out["page_row_tokens"] / spec["text"]["num_hidden_layers"]
        out["hidden_size"] = spec["text"]["hidden_size"]
        out["forward_peak_GiB"] = (fwd.peak - fwd.start) / 2**30       # above the start: the vision tower, one layer
        out["backward_peak_GiB"] = (bwd.peak - fwd.start) / 2**30      # above the start: kept + one layer's recompute
        out["backward_recompute_GiB"] = (bwd.peak - bwd.start) / 2**30  # above the forward's end
        del q, cand, loss
        with AnonPeak() as vis:        # the frozen vision tower alone, in training mode: no graph
            model.base_model().visual(c_in["pixel_values"].to(dtype), grid_thw=c_in["image_grid_thw"])
        patches = c_in["pixel_values"].shape[0]
        out["vision_peak_per_patch_KiB"] = (vis.peak - vis.start) / patches / 2**10
        out["layer_bytes_per_token"] = layer_bytes_per_token(spec["text"], spec["family"])   # no checkpointing
        out["recompute_bytes_per_token"] = (bwd.peak - bwd.start) / (pages * out["page_row_tokens"])
        model.save_pretrained(f"{tmp}/ck")
        back = MetaEmbed.from_pretrained(f"{tmp}/ck")
        model.eval()
        torch.testing.assert_close(back.encode_candidates([""], [page]), model.encode_candidates([""], [page]))
        out["checkpoint_MiB"] = os.path.getsize(f"{tmp}/ck/model.safetensors") / 2**20
        out["save_reload_identical"] = True
        out["process_peak_GiB"] = _status("VmHWM") / 2**30
    out["total_s"] = time.perf_counter() - t0
    return out


def cascade_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        pts = r["rows"][1:]
        label = f"{r['candidates']} x D={r['dim']}" + (" (random)" if r["random"] else " (offline model)")
        ax = axes[1] if r["random"] else axes[0]
        if r["random"]:
            ax.plot([p["depth"] for p in pts], [p["speedup"] for p in pts], marker="o", label=label)
        else:
            ax.plot([p["depth"] for p in pts], [100 * p["recall"] for p in pts], marker="o", label=label)
    axes[0].set_ylabel(f"recall@{results[0]['k']} of exhaustive 16x64 (%)")
    axes[1].set_ylabel("speed-up over exhaustive 16x64 (one query)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("cascade depth (re-scored at 16x64 after 1x1)")
        ax.legend(fontsize=8)
    fig.suptitle("cascade 1x1 -> 16x64")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
        print(f"wrote {path}")


def mode_rehearse(args):
    """a full-size backbone with random weights, rehearsed on this CPU."""
    r = rehearse(args.rehearse)
    print(json.dumps(r, indent=1))
    write_json(args.json, r)


def mode_memory_table(args):
    """the official recipe's per-device memory, by arithmetic from the rehearsals' measurements."""
    import glob
    paths = args.memory_table or sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "docs", "rehearse-*.json")))
    measured = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if "vision_peak_per_patch_KiB" not in r:
            raise SystemExit(f"{path}: no vision_peak_per_patch_KiB; rerun python bench.py --rehearse {r.get('name')}")
        measured.append(r)
    if not measured:
        raise SystemExit("no rehearsal results: run python bench.py --rehearse qwen2-vl-2b --json docs/rehearse-qwen2-vl-2b.json")
    # a text query: about 48 tokens + 16 Meta Tokens; an image query: 1,024 visual tokens, the prompt, 16
    cases = {"document batch: text queries (64 tokens), page candidates": dict(query_tokens=64),
             "every row an image (the worst case)": dict(query_tokens=1070),
             "every row an image, GradCache chunk 8": dict(query_tokens=1070, chunk=8),
             "every row an image, GradCache chunk 48 (one GPU, 384 rows)": dict(query_tokens=1070, chunk=48),
             "every row an image, GradCache chunk 8, FSDP over 8 GPUs": dict(query_tokens=1070, chunk=8, fsdp=8)}
    out = {"from": [r["name"] + " on " + r["cpu"] for r in measured],
           "cases": {case: memory_table(measured, **kw) for case, kw in cases.items()}}
    card = 80e9 / 2**30
    for r in measured:        # the arithmetic's trained count against a built model's (not Qwen3.5's layers)
        if REHEARSAL_CONFIGS[r["name"]]["family"] != "qwen3_5":
            print(f"{r['name']}: LoRA + Meta Tokens {trained_parameters(REHEARSAL_CONFIGS[r['name']]['text']):,} by "
                  f"arithmetic, {r['trained_parameters']:,} built")
    for case, t in out["cases"].items():
        print(f"\n{case}; batch {t['batch']} per device, {t['negatives']} hard negative; GiB:")
        print(f"{'model':<15}{'weights':>9}{'LoRA+Adam':>11}{'kept':>8}{'transient':>11}  {'(of)':<16}{'total':>7}"
              f"{'left of 80 GB':>15}")
        for row in t["rows"]:
            print(f"{row['model']:<15}{row['weights']:>9.1f}{row['trained']:>11.1f}{row['kept']:>8.1f}"
                  f"{row['transient']:>11.1f}  {row['transient_is']:<16}{row['total']:>7.1f}"
                  f"{card - row['total']:>15.1f}")
    print(f"\n80 GB = {card:.1f} GiB; CUDA's context and the allocator's slack are not counted; from the "
          "rehearsals of " + ", ".join(out["from"]))
    write_json(args.json, out)


def mode_serve(args):
    """search.py serve's latency."""
    r = serve_bench()
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads; search.py serve, {r['candidates']} random "
          f"candidates x D={r['dim']}, k={r['k']}, {r['requests']} requests each, one at a time:")
    for row in r["rows"]:
        print(f"  {row['search']:<34} HTTP p50 {row['http_p50_ms']:7.1f} ms  p95 {row['http_p95_ms']:7.1f} ms   "
              f"in-process p50 {row['in_process_p50_ms']:7.1f} ms")
    write_json(args.json, {**r, "device": cpu_name()})


def mode_dispatch(args):
    """the CPU dispatch, measured afresh for every regime."""
    from machinery import cpu_kernel
    if cpu_kernel.library() is None:
        print("the C kernel does not build here: maxsim always takes the torch path")
        return
    cpu_kernel.choices.clear()
    if cpu_kernel.dispatch_file() and cpu_kernel.dispatch_file().exists():
        cpu_kernel.dispatch_file().unlink()
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads; "
          f"kept in {cpu_kernel.dispatch_file()}")
    for one in ("one-query", "many-queries"):
        for rc in ("rc1", "multi"):
            for d in ("D<=256", "D>256"):
                for dt in ("fp32", "16bit"):
                    name = f"{one}/{rc}/{d}/{dt}"
                    win, t = cpu_kernel.measured_choice(name)
                    widths = "  ".join(f"C {w}-wide {t[f'C{w}_ms']:7.2f} ms" for w in cpu_kernel.widths())
                    pick = f"C kernel, {t['width']}-wide" if win == "c" else "torch"
                    print(f"  {name:<34} {widths}  torch {t['torch_ms']:7.2f} ms  -> {pick}   ({t['probe']})")
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


def mode_cascade(args):
    """the cascade's recall and speed."""
    results = [cascade_bench(path) for path in args.cascade]
    results += [cascade_bench(random_size=tuple(int(x) for x in s.split("x")), queries=20) for s in args.random]
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads")
    for r in results:
        print(f"cascade 1x1 -> 16x64, {r['candidates']} candidates x D={r['dim']}"
              f"{' (random: speed only)' if r['random'] else ''}, {r['queries']} queries one at a time, top-{r['k']}:")
        for row in r["rows"]:
            print(f"  depth {str(row['depth']):>10}: recall@{r['k']} {100 * row['recall']:5.1f}%  "
                  f"{row['ms_per_query']:7.2f} ms a query  {row['speedup']:5.1f}x")
    if args.plot:
        cascade_plot(results, args.plot)
    write_json(args.json, results)


def mode_grad_cache_one(args):
    """one GradCache measurement (in a child process)."""
    print(json.dumps(grad_cache_step_memory(*args.grad_cache_one)))


def mode_grad_cache(args):
    """GradCache memory, each chunk size in a fresh process."""
    import subprocess
    import sys
    rows = []
    for chunk in [0] + [int(c) for c in args.chunks.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--grad-cache-one", str(args.grad_cache), str(chunk)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"one training step, tiny backbone, batch {args.grad_cache} (+1 hard negative each), "
          f"{base['visual_tokens_per_image']} visual tokens per image:")
    for r in rows:
        print(f"  {'plain' if not r['chunk'] else 'GradCache chunk ' + str(r['chunk']):<18} process peak "
              f"{r['peak_bytes'] / 2**20:6.0f} MiB ({r['peak_bytes'] / base['peak_bytes']:.2f}x; "
              f"{r['rss_before_bytes'] / 2**20:.0f} MiB before the step), {r['seconds']:.1f} s, loss {r['loss']:.6f}")
    write_json(args.json, rows)


def mode_eval_memory(args):
    """evaluation memory against the index's size."""
    r = eval_memory(args.eval_memory, args.index_dir)
    where = f"on disk ({args.index_dir})" if args.index_dir else "in memory"
    print(f"{r['candidates']} candidates x 64 x {r['D']}, bf16 index {where}: {r['index_bytes'] / 2**30:.2f} GiB; "
          f"peak host memory beyond the model {r['peak_extra_bytes'] / 2**30:.2f} GiB = "
          f"{r['ratio']:.2f}x the index ({r['seconds']:.0f} s)")
    write_json(args.json, r)


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-memory", type=int, metavar="N",
                   help="instead: peak host memory of evaluating N candidates at (16, 64), D = 3584 (stub "
                   "encoder), against the bf16 index's size")
    p.add_argument("--index-dir", help="with --eval-memory: put the index on disk in this folder")
    p.add_argument("--grad-cache", type=int, metavar="B", help="instead: peak host memory of one training step at "
                   "batch B, plain and with GradCache chunks (--chunks), each in a fresh process")
    p.add_argument("--chunks", default="4,16", help="with --grad-cache: the chunk sizes to measure (default 4,16)")
    p.add_argument("--grad-cache-one", nargs=2, type=int, help=argparse.SUPPRESS)   # B chunk, in a child process
    p.add_argument("--layout", action="store_true", help="instead: 32 x 10k at (1, 1), D = 1536, from search.py's "
                   "grouped layout against prefix views of full embeddings")
    p.add_argument("--cascade", nargs="+", metavar="INDEX", help="instead: the cascade's recall on search.py "
                   "indexes of the synthetic scenes, and its speed on random ones (--random)")
    p.add_argument("--random", nargs="*", default=[], metavar="NxD", help="with --cascade: random indexes to time "
                   "(e.g. 20000x1536)")
    p.add_argument("--plot", help="with --cascade: write the recall / speed-up plot here")
    p.add_argument("--rehearse", choices=sorted(REHEARSAL_CONFIGS), help="instead: a full-size backbone with random "
                   "weights on this CPU (bf16): encode a 2000x3000 page, one LoRA training step (memory kept per row, "
                   "forward and backward peaks), save and reload")
    p.add_argument("--memory-table", nargs="*", metavar="JSON", help="instead: the official recipe's per-device "
                   "memory (batch 48, 1,024 visual tokens, checkpointing, bf16) for 2B / 3B / 7B / 32B, by arithmetic "
                   "from rehearsal results (default: docs/rehearse-*.json)")
    p.add_argument("--serve", action="store_true", help="instead: search.py serve's request latency (p50, p95) on "
                   "20,000 random candidates at D = 1536, against the same search in-process")
    p.add_argument("--dispatch", action="store_true", help="instead: measure the CPU dispatch afresh for every "
                   "regime, print the timings and the winners, and keep them (as maxsim's auto path does)")
    args = p.parse_args()
    if args.memory_table is not None:
        return mode_memory_table(args)
    for name in ("rehearse", "serve", "dispatch", "layout", "cascade", "grad_cache_one", "grad_cache", "eval_memory"):
        if getattr(args, name):
            return globals()[f"mode_{name}"](args)
    return mode_speed(args)


if __name__ == "__main__":
    main()
