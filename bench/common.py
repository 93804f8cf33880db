"""Shared helpers of the benchmarks: the CPU's name, timing, peaks, random unit vectors, JSON."""
import json
import os
import platform
import time

import torch

from metaembed import GROUPS



def cpu_name():
    """The CPU's model name (/proc/cpuinfo), which a number here must say it came from."""
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


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


def random_index(path, N, D, R_c=64, seed=0):
    """A search.py index of N random unit candidates (for speed only: random vectors carry no
    Matryoshka order, so a cascade's recall on them means nothing)."""
    from apps import search_index
    from machinery import index as on_disk
    vectors = on_disk.create(path, N, R_c, D, GROUPS, "bfloat16")
    for j in range(0, N, 1000):
        vectors[j:j + 1000] = unit_vectors(min(1000, N - j), R_c, D, torch.device("cpu"), torch.float32, seed + j)
    on_disk.write_meta(path, {**vectors.meta, "num_query_tokens": 16, "model_groups": GROUPS,
                              "checkpoint": "(random vectors)", "fingerprint": None})
    with open(os.path.join(path, "items.jsonl"), "w") as f:
        f.writelines(json.dumps({"n": i, "id": str(i), "source": f"random vector {i}", "kind": "text"}) + "\n"
                     for i in range(N))
    return search_index.Index(path)


def write_json(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
        print(f"wrote {path}")
