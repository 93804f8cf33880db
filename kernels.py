"""
Late interaction (ColBERT MaxSim) for multi-vector embeddings:

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q^i, E_c^j>

maxsim_reference: plain PyTorch, dense, differentiable (used by the training loss).
maxsim_chunked:   the reference over candidate chunks, in bounded memory (any device, any dtype).
maxsim_c:         the fused C kernel (maxsim.c, AVX2 or AVX-512), compiled on first use.
maxsim_triton:    fused Triton kernel; the CUDA default.
maxsim:           inference entry point, dispatching to the above.
"""
import ctypes
import functools
import hashlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def maxsim_reference(q, c, q_mask=None, c_mask=None):
    """q (N_q, r_q, D), c (N_c, r_c, D), masks (N, r) bool (True = real) -> (N_q, N_c) float32.

    Materialises (N_q, r_q, N_c, r_c): use for training batches, not for a corpus."""
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    s = (q.reshape(Nq * r_q, D).float() @ c.reshape(Nc * r_c, D).float().T).view(Nq, r_q, Nc, r_c)
    if c_mask is not None:  # a padded candidate vector never wins a max (whatever it holds)
        c_mask = c_mask.to(s.device, torch.bool)
        s = s.masked_fill(~c_mask[None, None], float("-inf"))
    m = s.amax(-1)                                                    # (N_q, r_q, N_c); NaN propagates
    if c_mask is not None:  # a candidate with no real vector contributes 0
        m = m.masked_fill(~c_mask.any(1)[None, None], 0.0)
    if q_mask is not None:  # a padded query vector adds nothing (masked_fill: even if it holds NaN)
        m = m.masked_fill(~q_mask[:, :, None].to(m.device, torch.bool), 0.0)
    return m.sum(1)                                                   # (N_q, N_c)


def _check(q, c, q_mask, c_mask):
    if len(q.shape) != 3 or len(c.shape) != 3:
        raise ValueError(f"maxsim wants q (N_q, r_q, D) and c (N_c, r_c, D), got {tuple(q.shape)} "
                         f"and {tuple(c.shape)}")
    if q.shape[-1] != c.shape[-1]:
        raise ValueError(f"embedding sizes differ: q has D={q.shape[-1]}, c has D={c.shape[-1]}")
    for name, x, m in (("q_mask", q, q_mask), ("c_mask", c, c_mask)):
        if m is not None and tuple(m.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {tuple(x.shape[:2])}")


def _max_over_rc(s, scratch):
    """max over dim 1 of s (n, r_c, M) -> (n, M) by halving: elementwise maxima of the two halves,
    the first into `scratch` (a reused buffer), then in place. Faster here than amax over a middle
    dimension."""
    n, r, M = s.shape
    if r == 1:
        return s[:, 0]
    h = r // 2                                       # pairs (i, r - h + i); an odd middle is kept
    m = scratch[:n * (r - h) * M].view(n, r - h, M)
    torch.maximum(s[:, :h], s[:, r - h:], out=m[:, :h])
    if r - h > h:
        m[:, h] = s[:, h]
    r -= h
    while r > 1:
        h = r // 2
        torch.maximum(m[:, :h], m[:, r - h:r], out=m[:, :h])
        r -= h
    return m[:, 0]


def maxsim_chunked(q, c, q_mask=None, c_mask=None, chunk=None):
    """The reference over candidate chunks, never more than (N_q, r_q, chunk, r_c) at once.

    One matmul per chunk into a reused buffer (fresh large allocations cost page faults), max
    over r_c on a view of it, then sum over r_q; float32 math. With few query vectors
    (N_q r_q < 64) the candidate chunk is the matmul's tall operand, (n r_c, D) @ (D, N_q r_q),
    which streams the corpus best, and the max is taken by halving; otherwise
    (N_q r_q, D) @ (D, n r_c)."""
    _check(q, c, q_mask, c_mask)
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    M = Nq * r_q
    tall = M < 64
    if chunk is None:  # score blocks of about 1 MiB on the CPU (its L2), 256 MiB on a GPU
        block = (1 << 18) if q.device.type == "cpu" else (1 << 26)
        chunk = max(1, min(Nc, block // max(1, M * r_c)))
        if not (c.dtype == torch.float32 and (c.is_contiguous() or r_c == 1)):   # each chunk is copied:
            chunk = min(chunk, max(8, (1 << 20) // (r_c * D)))      # keep it in cache (4 MiB of float32)
    out = torch.empty(Nq, Nc, dtype=torch.float32, device=q.device)
    qf = q.reshape(M, D).float()                                          # (N_q r_q, D)
    qT = qf.T.contiguous() if tall else None                              # (D, N_q r_q)
    qm = ~q_mask.to(q.device, torch.bool)[:, :, None] if q_mask is not None else None   # True = padded
    buf = torch.empty(M * chunk * r_c, dtype=torch.float32, device=q.device)
    cbuf = torch.empty(chunk * r_c * D, dtype=torch.float32, device=q.device) \
        if c.dtype != torch.float32 else None                              # a 16-bit chunk widened
    scratch = torch.empty(M * chunk * ((r_c + 1) // 2), dtype=torch.float32, device=q.device) if tall else None
    with torch.no_grad():
        for j in range(0, Nc, chunk):
            n = min(chunk, Nc - j)
            cj = c[j:j + n]
            if cj.dtype == torch.float32:
                cf = cj.reshape(n * r_c, D)                # (n r_c, D): a view, or one copy of a prefix view
            else:  # a 16-bit index widened in one pass into a reused buffer (no new pages each chunk)
                cf = cbuf[:n * r_c * D].view(n * r_c, D)
                cf.view(n, r_c, D).copy_(cj)
            cm = c_mask[j:j + n].to(q.device, torch.bool) if c_mask is not None else None
            if tall:
                s = torch.mm(cf, qT, out=buf[:M * n * r_c].view(n * r_c, M)).view(n, r_c, Nq, r_q)
                if cm is not None:  # a padded candidate vector never wins a max
                    s.masked_fill_(~cm[:, :, None, None], float("-inf"))
                m = _max_over_rc(s.view(n, r_c, M), scratch).view(n, Nq, r_q).permute(1, 2, 0)  # max_j -> (N_q, r_q, n)
            else:
                s = torch.mm(qf, cf.T, out=buf[:M * n * r_c].view(M, n * r_c)).view(Nq, r_q, n, r_c)
                if cm is not None:
                    s.masked_fill_(~cm[None, None], float("-inf"))
                m = s.amax(-1)                                            # max_j -> (N_q, r_q, n)
            if cm is not None:      # a candidate with no real vector contributes 0
                m = m.masked_fill(~cm.any(1), 0.0)
            if qm is not None:      # a padded query vector adds nothing, whatever it holds
                m = m.masked_fill(qm, 0.0)
            out[:, j:j + n] = m.sum(1)                                    # sum_i -> (N_q, n)
    return out


def maxsim(q, c, q_mask=None, c_mask=None, backend=None):
    """MaxSim scores (N_q, N_c) float32 for any budget: pass prefix views q[:, :r_q], c[:, :r_c].

    backend: None (auto: 'triton' on CUDA; on the CPU the path measured fastest for this class of
    shape on this machine, the C kernel 'c' or 'torch', see measured_choice), 'torch', 'c' or
    'triton' (the command-line tools pass METAEMBED_MAXSIM here)."""
    if backend is None:
        if q.is_cuda:
            backend = "triton"
        elif _cpu_can(q, c) and _cpu_lib() is not None:
            backend, choice = measured_choice(regime(q, c))
            if backend == "c":
                return maxsim_c(q, c, q_mask, c_mask, width=choice.get("width"))
        else:
            backend = "torch"
    if backend == "torch":
        return maxsim_chunked(q, c, q_mask, c_mask)
    if backend == "c":
        return maxsim_c(q, c, q_mask, c_mask)
    if backend == "triton":
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("maxsim backend 'triton' needs CUDA tensors and these are on the CPU: use 'torch' or "
                             "'c' (or TRITON_INTERPRET=1, Triton's slow CPU interpreter, for tests)")
        return maxsim_triton(q, c, q_mask, c_mask)
    raise ValueError(f"unknown maxsim backend {backend!r}: use 'torch', 'c' (the fused C kernel) or 'triton'")


# -----------------------------------------------------------------------------
# the fused CPU kernel (maxsim.c): compiled once per machine with the system C compiler
# (-march=native), cached by a hash of source, flags and CPU, loaded with ctypes. One source
# for two register widths: 8 floats (AVX2) everywhere, 16 (AVX-512F) where the CPU has it; a
# 16-wide build on a CPU without AVX-512 runs as pairs of 8 (how the tests check it anywhere).
# OpenMP threads (torch's own pool) split the candidates; built without OpenMP, Python threads
# do (ctypes releases the GIL during each call).

_CFLAGS = ["-O3", "-march=native", "-mtune=skylake", "-shared", "-fPIC"]
# -mtune=skylake: gcc's znver tuning folds every load into an FMA operand, reloading the same
# query registers for every candidate vector (docs/NOTES.md has the measurements)
_CTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # maxsim.c's candidate types
_MAX_RC = 4096                     # maxsim.c's stack arrays hold this many vectors a candidate


@functools.cache
def _cpu_flags():
    """This CPU's model name and flags (read once: they key the build and choose the widths)."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "".join(sorted({ln for ln in cpu.splitlines() if ln.startswith(("model name", "flags"))}))


def _widths():
    """The register widths (floats) worth running here, widest first: (16, 8) with AVX-512F."""
    return (16, 8) if " avx512f" in _cpu_flags() else (8,)


def _cpu_can(q, c):
    """What the C kernel takes: float32 / bf16 / fp16 candidates with at most _MAX_RC vectors."""
    return c.dtype in _CTYPES and c.shape[1] <= _MAX_RC


# -----------------------------------------------------------------------------
# the CPU dispatch: measured, not guessed. The first time a process scores a class of shapes
# (a regime) on a machine, the CPU paths (the C kernel at each register width the CPU has, and
# the torch path) are timed on a small shape of that class; the winner is kept per regime in a
# JSON file beside the compiled kernel (keyed like it: source, flags, CPU), so later processes
# on the same machine read it instead of measuring.

def regime(q, c):
    """The class of shape a dispatch decision holds for: one block of query vectors (<= 16: one
    query) or many; one candidate vector (a plain product) or several; D up to 256 or more; a
    float32 or a 16-bit index."""
    return "/".join(("one-query" if q.shape[0] * q.shape[1] <= 16 else "many-queries",
                     "rc1" if c.shape[1] == 1 else "multi", "D<=256" if c.shape[2] <= 256 else "D>256",
                     "fp32" if c.dtype == torch.float32 else "16bit"))


def _probe(name):
    """Random inputs standing for a regime: 1 or 32 queries; r_q = r_c = 1 (a plain product) or 16 x
    16 prefix views of (16, 64) embeddings, as at serving time; enough candidates to amortise
    set-up (512 to 10,000, up to about 1 GFLOP)."""
    one, rc1, small, fp32 = (p in name for p in ("one-query", "rc1", "D<=256", "fp32"))
    Nq, r, D = (1 if one else 32), (1 if rc1 else 16), (128 if small else 1536)
    Nc = min(10_000, max(512, int(1e9 // (2 * Nq * r * r * D))))
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(Nq, 16, D, generator=g), dim=-1)[:, :r]
    c = torch.nn.functional.normalize(torch.randn(Nc, 64, D, generator=g), dim=-1)
    return q, (c if fp32 else c.bfloat16())[:, :r]


def _time(fns, repeats=3):
    """Best time of each of fns {name: fn}, taken in turns so that a slow spell of a shared machine
    (or threads left spinning by the previous path) does not fall on one path only."""
    best = {}
    for name, fn in fns.items():
        fn()
        best[name] = float("inf")
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


_choices = {}   # regime -> {"C_ms": ..., "torch_ms": ..., "winner": "c" or "torch", "width": 8 or 16, ...}


def measured_choice(name):
    """The fastest CPU path for a regime, measured once per machine and kept on disk;
    -> (backend 'c' or 'torch', the record: timings, the C kernel's register width, the probe)."""
    if not _choices and _dispatch_file() and _dispatch_file().exists():
        try:
            _choices.update(json.loads(_dispatch_file().read_text()))
        except ValueError:
            pass                                       # a damaged file is measured again
    if name not in _choices:
        q, c = _probe(name)
        fns = {w: functools.partial(maxsim_c, q, c, width=w) for w in _widths() if _cpu_lib(w) is not None}
        t_c = _time({**fns, "torch": functools.partial(maxsim_chunked, q, c)})
        t_torch = t_c.pop("torch")
        width = min(t_c, key=t_c.get)
        _choices[name] = {"C_ms": 1e3 * t_c[width], "torch_ms": 1e3 * t_torch, "width": width,
                          "winner": "c" if t_c[width] <= t_torch else "torch",
                          **{f"C{w}_ms": 1e3 * t for w, t in t_c.items()},
                          "probe": f"{q.shape[0]}x{c.shape[0]} at {q.shape[1]}x{c.shape[1]}, D={c.shape[2]}, {c.dtype}"}
        if _dispatch_file():
            tmp = _dispatch_file().with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_choices, indent=1))
            os.replace(tmp, _dispatch_file())          # atomic: concurrent processes are safe
    return _choices[name]["winner"], _choices[name]


def _dispatch_file():
    lib = _cpu_lib()
    return Path(lib.path).with_name(Path(lib.path).stem.replace("maxsim-", "dispatch-") + ".json") if lib else None


@functools.cache
def _cpu_lib(width=None):
    """The compiled maxsim.c for `width` floats a register (None: this CPU's widest that passes its
    self-check) as a ctypes library, built once per machine and loaded once per process; or None,
    with one warning, where it cannot build."""
    if width is None:
        return next((lib for w in _widths() if (lib := _cpu_lib(w)) is not None), None)
    src = Path(__file__).with_name("maxsim.c")
    cc = os.environ.get("CC", "cc")
    errors = []
    for openmp in (["-fopenmp"], []):       # without OpenMP (a compiler lacking it), Python threads
        try:
            lib = _build(src, cc, [*_CFLAGS, f"-DMAXSIM_W={width}", "-Wno-psabi", *openmp])
            break
        except OSError as e:
            errors.append(str(e))
    else:
        warnings.warn(f"the fused CPU MaxSim kernel is unavailable ({errors[-1]}); using the torch path")
        return None
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.maxsim_c.argtypes = [P, P, I, I, P, ctypes.c_int, P, P] + [I] * 9 + [ctypes.c_int]
    lib.maxsim_c.restype = ctypes.c_int
    lib.rows, lib.openmp = lib.maxsim_rows(), bool(lib.maxsim_openmp())
    err = _self_check(lib)
    if err > 1e-4:     # never a silent wrong number: a build this CPU runs wrongly is not used
        warnings.warn(f"the {width}-float build of maxsim.c ({lib.path}) scores wrongly on this CPU (error {err:.2g}); "
                      "not using it")
        return None
    return lib


def _build(src, cc, flags):
    """cc flags src -> a loaded library, built once into the cache and renamed into place (atomic:
    concurrent processes are safe); its path is lib.path."""
    # -march=native code is for this CPU only: its model and flags are part of the key
    key = hashlib.sha1(src.read_bytes() + " ".join([cc, *flags, _cpu_flags()]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("METAEMBED_CACHE", Path.home() / ".cache" / "metaembed"))
    so = cache / f"maxsim-{key}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run([cc, *flags, "-o", f"{tmp}/m.so", str(src)], capture_output=True, text=True,
                               check=False)
            if r.returncode != 0:
                raise OSError(f"{cc} failed on {src.name}: {r.stderr.strip()[-500:]}")
            os.replace(f"{tmp}/m.so", so)
    lib = ctypes.CDLL(str(so))      # its libgomp is torch's, already loaded (the same soname)
    lib.path = so
    return lib


def _self_check(lib):
    """Largest error of the kernel against float64 numpy on a small problem that takes both paths
    (r_c = 1 and several), every block split, masks and padded rows (a few ms, once a process)."""
    g = np.random.default_rng(0)
    worst = 0.0
    for Nq, r_q, Nc, r_c in ((3, 2 * lib.rows // 3 + 1, 2 * 48 + 7, 1), (5, 7, 9, 23)):
        q, c = g.standard_normal((Nq, r_q, 19), np.float32), g.standard_normal((Nc, r_c, 19), np.float32)
        qm, cm = g.random((Nq, r_q)) < 0.8, g.random((Nc, r_c)) < 0.8
        s = np.einsum("aid,njd->anij", q.astype(np.float64), c.astype(np.float64))
        best = np.where(cm[None, :, None, :], s, -np.inf).max(-1)                  # (N_q, N_c, r_q)
        best[:, ~cm.any(1)] = 0.0                         # a candidate with no real vector scores 0
        ref = np.where(qm[:, None, :], best, 0.0).sum(-1)
        got = _run_c(lib, torch.from_numpy(q), torch.from_numpy(c), torch.from_numpy(qm), torch.from_numpy(cm))
        worst = max(worst, float(np.abs(got.numpy() - ref).max()))
    return worst


_pool = None


@torch.no_grad()
def maxsim_c(q, c, q_mask=None, c_mask=None, width=None):
    """The fused C kernel on the CPU: float32 math, candidates float32, bfloat16 or float16 (a 16-bit
    index halves the bytes read), no score tensor; same contract as maxsim. width: floats a
    register, 16 (AVX-512) or 8 (AVX2); None: this CPU's widest.

    The real query vectors of all queries are packed into blocks of 2 x width rows; candidates
    are read in place through their strides (budget prefixes c[:, :r_c] are views)."""
    _check(q, c, q_mask, c_mask)
    lib = _cpu_lib(width)
    if lib is None:
        raise RuntimeError("the fused CPU kernel did not build (see the warning); use backend='torch'")
    if q.is_cuda or c.is_cuda or c.dtype not in _CTYPES:
        raise ValueError(f"maxsim_c wants CPU candidates in float32, bfloat16 or float16, got {c.dtype} "
                         f"on {c.device}")
    if c.shape[1] > _MAX_RC:
        raise ValueError(f"maxsim_c takes at most {_MAX_RC} vectors a candidate, got r_c={c.shape[1]}")
    return _run_c(lib, q, c, q_mask, c_mask)


def _run_c(lib, q, c, q_mask, c_mask):
    global _pool
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    if c.stride(2) != 1:
        c = c.contiguous()
    # Packing in numpy, not torch: a torch op here would start torch's OpenMP threads, which then
    # spin-wait on the cores the kernel's own threads need (docs/NOTES.md).
    rows = q.detach().float().numpy().reshape(Nq * r_q, D)              # (N_q r_q, D)
    owner = np.repeat(np.arange(Nq, dtype=np.int64), r_q)              # each row's query
    if q_mask is not None:                                             # padded query vectors dropped
        keep = q_mask.numpy().reshape(-1).astype(bool)
        rows, owner = rows[keep], owner[keep]
    B = lib.rows                                                       # rows a packed block
    n_rows = -(-rows.shape[0] // B) * B or B
    padded = np.zeros((n_rows, D), dtype=np.float32)
    padded[:rows.shape[0]] = rows
    # (n_rows/B, D, B), 64-byte aligned: no register load of a block row straddles two cache lines
    buf = np.empty(n_rows * D + 16, dtype=np.float32)
    qp = buf[(-buf.ctypes.data % 64) // 4:][:n_rows * D].reshape(n_rows // B, D, B)
    qp[...] = padded.reshape(n_rows // B, B, D).transpose(0, 2, 1)
    owner = np.concatenate([owner, np.full(n_rows - owner.shape[0], -1, dtype=np.int64)])
    cm = np.ascontiguousarray(c_mask.numpy(), dtype=np.uint8) if c_mask is not None else None
    out = np.empty((Nq, Nc), dtype=np.float32)
    args = (qp.ctypes.data, owner.ctypes.data, n_rows, Nq, c.data_ptr(), _CTYPES[c.dtype],
            cm.ctypes.data if cm is not None else None, out.ctypes.data, r_c, D)
    strides = (c.stride(0), c.stride(1), *((cm.strides[0], 1) if cm is not None else (0, 0)), Nc)
    threads = torch.get_num_threads()
    if lib.openmp or threads == 1:             # OpenMP splits [0, N_c) into pieces inside the call
        status = [lib.maxsim_c(*args, 0, Nc, *strides, threads)]
    else:                                      # Python threads, four pieces each, as maxsim.c does
        step = max(4, -(-Nc // (4 * threads)))
        if _pool is None or _pool[0] != (threads, os.getpid()):   # a forked child needs its own threads
            _pool = ((threads, os.getpid()), ThreadPoolExecutor(threads))
        status = list(_pool[1].map(lambda n0: lib.maxsim_c(*args, n0, min(Nc, n0 + step), *strides, 1),
                                   range(0, Nc, step)))
    if any(status):
        raise MemoryError(f"maxsim_c: no memory for the kernel's buffers ({n_rows} query vectors, D={D})")
    return torch.from_numpy(out)


# -----------------------------------------------------------------------------
# the fused Triton kernel: one program scores QB queries x CB candidates. It streams D in
# BLOCK_D slices through one tl.dot, S = Q (QB*RQ, D) @ C^T (D, CB*RC), then max over each
# candidate's RC vectors and sum over each query's RQ vectors, all in registers: the
# (N_q, N_c, r_q, r_c) tensor never exists. Budgets are prefixes (r_q, r_c) read through the
# full tensors' strides, so no copy is made.

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still have the reference
    triton = None

if triton is not None:
    @triton.jit
    def _maxsim_kernel(q_ptr, c_ptr, qm_ptr, cm_ptr, out_ptr, Nq, Nc, r_q, r_c, D,
                       sqn, sqr, sqd, scn, scr, scd, sqmn, sqmr, scmn, scmr, son, soc,
                       HAS_QM: tl.constexpr, HAS_CM: tl.constexpr, IEEE: tl.constexpr,
                       QB: tl.constexpr, RQ: tl.constexpr, CB: tl.constexpr, RC: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        # candidate blocks on grid axis 0 (up to 2^31 - 1 blocks; axis 1 stops at 65,535)
        pid_c, pid_q = tl.program_id(0), tl.program_id(1)
        rows = tl.arange(0, QB * RQ)                          # (QB*RQ,) query vector slots
        qn, qr = pid_q * QB + rows // RQ, rows % RQ
        cols = tl.arange(0, CB * RC)                          # (CB*RC,) candidate vector slots
        cn, cr = pid_c * CB + cols // RC, cols % RC
        q_ok = (qn < Nq) & (qr < r_q)
        c_ok = (cn < Nc) & (cr < r_c)
        # element offsets in 64 bits: a corpus of 100k x 64 x 3584 passes 2^31 elements, and
        # program_id / arange are 32-bit, so products of them would wrap
        qn, qr, cn, cr = qn.to(tl.int64), qr.to(tl.int64), cn.to(tl.int64), cr.to(tl.int64)
        if HAS_QM:
            q_ok &= tl.load(qm_ptr + qn * sqmn + qr * sqmr, mask=q_ok, other=0) != 0
        if HAS_CM:
            c_ok &= tl.load(cm_ptr + cn * scmn + cr * scmr, mask=c_ok, other=0) != 0
        q_base = q_ptr + qn * sqn + qr * sqr                  # (QB*RQ,) row starts
        c_base = c_ptr + cn * scn + cr * scr                  # (CB*RC,) column starts
        s = tl.zeros((QB * RQ, CB * RC), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            qt = tl.load(q_base[:, None] + d[None, :] * sqd,
                         mask=q_ok[:, None] & (d[None, :] < D), other=0.0)     # (QB*RQ, BLOCK_D)
            ct = tl.load(c_base[None, :] + d[:, None] * scd,
                         mask=c_ok[None, :] & (d[:, None] < D), other=0.0)     # (BLOCK_D, CB*RC)
            if IEEE:
                s = tl.dot(qt, ct, s, input_precision="ieee")
            else:
                s = tl.dot(qt, ct, s)
        s = tl.where(c_ok[None, :], s, float("-inf"))
        s3 = tl.reshape(s, (QB * RQ, CB, RC))
        m = tl.max(s3, axis=2)                                                 # max_j over r_c
        # a NaN product makes the maximum NaN, as torch's amax (tl.max may drop it)
        m = tl.where(tl.max((s3 != s3).to(tl.int32), axis=2) > 0, float("nan"), m)
        c_any = tl.max(tl.reshape(c_ok.to(tl.int32), (CB, RC)), axis=1) > 0
        m = tl.where(c_any[None, :], m, 0.0)                 # a candidate with no real vector
        m = tl.where(q_ok[:, None], m, 0.0)                  # padded query vectors add nothing
        score = tl.sum(tl.reshape(m, (QB, RQ, CB)), axis=1)                    # sum_i over r_q
        on = (pid_q * QB + tl.arange(0, QB)).to(tl.int64)
        oc = (pid_c * CB + tl.arange(0, CB)).to(tl.int64)
        tl.store(out_ptr + on[:, None] * son + oc[None, :] * soc, score,
                 mask=(on[:, None] < Nq) & (oc[None, :] < Nc))


def _pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


_GRID_Y = 65535  # CUDA's limit on grid axis 1 (the query blocks)


def maxsim_triton(q, c, q_mask=None, c_mask=None):
    """The fused kernel (CUDA, or the CPU under TRITON_INTERPRET=1). Same contract as maxsim.

    The query is cast to the index's dtype, never the index to the query's (a bf16 index stays
    bf16: no copy of the corpus); products accumulate in float32."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton, or use backend='torch'")
    _check(q, c, q_mask, c_mask)
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    if Nq == 0 or Nc == 0:
        return torch.zeros(Nq, Nc, dtype=torch.float32, device=q.device)
    if q.dtype != c.dtype:
        q = q.to(c.dtype)                                  # (N_q, r_q, D): small
    RQ, RC = _pow2(r_q), _pow2(r_c)
    QB = max(1, 16 // RQ)              # tl.dot needs >= 16 rows: pack queries when r_q < 16
    if Nq >= 4 * QB and RQ <= 16:
        QB *= 4                        # many queries: a taller tile reuses each candidate load
    CB = max(1, 128 // RC)             # about 128 candidate vectors a tile
    block_d = min(64, max(16, _pow2(D)))
    out = torch.empty(Nq, Nc, dtype=torch.float32, device=q.device)
    qm = q_mask.to(torch.int8) if q_mask is not None else q.new_zeros(1, 1, dtype=torch.int8)
    cm = c_mask.to(torch.int8) if c_mask is not None else q.new_zeros(1, 1, dtype=torch.int8)
    step = _GRID_Y * QB                # queries per launch, so grid axis 1 stays within its limit
    for a in range(0, Nq, step):
        n = min(step, Nq - a)
        qa, qma = q[a:a + n], (qm[a:a + n] if q_mask is not None else qm)
        grid = (triton.cdiv(Nc, CB), triton.cdiv(n, QB))
        _maxsim_kernel[grid](qa, c, qma, cm, out[a:a + n], n, Nc, r_q, r_c, D,
                             *qa.stride(), *c.stride(), *qma.stride(), *cm.stride(), *out.stride(),
                             HAS_QM=q_mask is not None, HAS_CM=c_mask is not None,
                             IEEE=c.dtype == torch.float32, QB=QB, RQ=RQ, CB=CB, RC=RC, BLOCK_D=block_d)
    return out


def maxsim_topk(q, c, k, q_mask=None, c_mask=None, chunk=None, backend=None):
    """Top-k candidates per query over a corpus too large for one score matrix.

    c: a tensor (N_c, r_c, D) on any device, or an on-disk index that slices like one
    (evaluate.EmbeddingFile). A corpus already on q's device is scored in place, 65,536
    candidates at a time; any other is copied (or read) to q's device a chunk of about 256 MiB at
    a time, in its own dtype, so a host or on-disk corpus is scored in bounded memory.
    -> (scores (N_q, k) float32, indices (N_q, k) int64), best first; a running top-k merged
    chunk by chunk, so memory is O(N_q * (k + chunk)) plus one chunk of the corpus."""
    _check(q, c, q_mask, c_mask)
    Nq, Nc = q.shape[0], c.shape[0]
    if chunk is None:
        in_place = isinstance(c, torch.Tensor) and c.device == q.device
        row_bytes = getattr(c, "row_bytes", c.shape[1] * c.shape[2] * c.dtype.itemsize)
        chunk = 65536 if in_place else max(1, min(65536, (256 << 20) // row_bytes))
    k = min(k, Nc)
    best_s = torch.full((Nq, 0), float("-inf"), device=q.device)
    best_i = torch.zeros((Nq, 0), dtype=torch.long, device=q.device)
    for j in range(0, Nc, chunk):
        cj = c[j:j + chunk].to(q.device, non_blocking=True)
        cm = c_mask[j:j + chunk].to(q.device) if c_mask is not None else None
        s = maxsim(q, cj, q_mask, cm, backend)                                # (N_q, chunk)
        idx = torch.arange(j, j + s.shape[1], device=q.device).expand(Nq, -1)
        s, idx = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        best_s, pos = s.topk(min(k, s.shape[1]), dim=1)                       # k may exceed a chunk
        best_i = idx.gather(1, pos)
        del cj                                         # freed before the next chunk is read
    return best_s, best_i
