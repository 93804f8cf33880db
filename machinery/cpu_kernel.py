"""The fused CPU MaxSim kernel (maxsim.c beside this file): compiled once per machine with the
system C compiler (-march=native), cached by a hash of source, flags and CPU, loaded with ctypes,
checked against numpy when it loads, and chosen per class of shape by measurement.

One source for two register widths: 8 floats (AVX2) everywhere, 16 (AVX-512F) where the CPU has
it; a 16-wide build on a CPU without AVX-512 runs as pairs of 8 (how the tests check it
anywhere). Where the CPU has bf16 units the same library has bf16-math paths (the query rounded
to bf16; exact products, float32 sums and outputs): 'c-bf16' on AVX512_BF16 dot products,
'c-amx' on AMX-BF16 tiles (where Linux grants their state). OpenMP threads (torch's own pool)
split the candidates; built without OpenMP, Python threads do (ctypes releases the GIL during
each call).
"""
import ctypes
import functools
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from machinery.checks import check_maxsim_inputs, maxsim_float64
from machinery.index import Quantized, quantize
from machinery.precision import Precision, of as precision_of

_CFLAGS = ["-O3", "-march=native", "-mtune=skylake", "-shared", "-fPIC"]
# -mtune=skylake: gcc's znver tuning folds every load into an FMA operand, reloading the same
# query registers for every candidate vector (docs/NOTES.md has the measurements)
_CTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, "int8": 3, "binary": 4}   # maxsim.c's types
_MAX_RC = 4096                     # maxsim.c's stack arrays hold this many vectors a candidate
UNITS = {"c-bf16": 0, "c-amx": 1}  # maxsim.c's bf16 units: AVX512_BF16 dot products, AMX tiles


@functools.cache
def cpu_flags():
    """This CPU's model name and flags (read once: they key the build and choose the widths)."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "".join(sorted({ln for ln in cpu.splitlines() if ln.startswith(("model name", "flags"))}))


def widths():
    """The register widths (floats) worth running here, widest first: (16, 8) with AVX-512F."""
    return (16, 8) if " avx512f" in cpu_flags() else (8,)


def ctype(c):
    """maxsim.c's candidate type of c (a tensor or a Quantized index), or None."""
    return _CTYPES.get(c.precision if isinstance(c, Quantized) else c.dtype)


def can_take(q, c):
    """What the C kernel takes: float32 / bf16 / fp16 / int8 / binary candidates with at most
    _MAX_RC vectors."""
    return ctype(c) is not None and c.shape[1] <= _MAX_RC


# -----------------------------------------------------------------------------
# the CPU dispatch: measured, not guessed. The first time a process scores a class of shapes
# (a regime) on a machine, the CPU paths (the C kernel at each register width the CPU has, and
# the torch path) are timed on a small shape of that class; the winner is kept per regime in a
# JSON file beside the compiled kernel (keyed like it: source, flags, CPU), so later processes
# on the same machine read it instead of measuring.

def bf16_math_allowed(c, exact):
    """bf16 math (the query rounded to bf16, exact products, float32 sums and outputs) is a
    candidate of the dispatch only where the kernel has a bf16 unit here and it loses nothing the
    index holds (a bf16 or a low-bit index), and never with exact=True."""
    return not exact and (isinstance(c, Quantized) or c.dtype == torch.bfloat16) and bool(bf16_units())


def regime(q, c, exact=False):
    """The class of shape a dispatch decision holds for: one block of query vectors (<= 16: one
    query) or many; one candidate vector (a plain product), up to 16 or more (the 16x64 budget,
    where bf16 GEMMs read whole rows: measured apart); D up to 256 or more; the
    index's precision (float32, bfloat16, float16, int8, binary); float32 math only, or bf16 math allowed."""
    r_c = c.shape[1]
    return "/".join(("one-query" if q.shape[0] * q.shape[1] <= 16 else "many-queries",
                     "rc1" if r_c == 1 else "multi" if r_c <= 16 else "multi>16",
                     "D<=256" if c.shape[2] <= 256 else "D>256",
                     precision_of(c), *(("bf16math",) if bf16_math_allowed(c, exact) else ())))


def _probe(name):
    """Random inputs standing for a regime: 1 or 32 queries; r_q = r_c = 1 (a plain product), 16 x 16
    prefix views of (16, 64) embeddings, as at serving time, or 16 x 64 (multi>16); enough
    candidates to amortise set-up (512 to 10,000, up to about 1 GFLOP); int8 / binary: quantized."""
    one, rc1, small = (p in name for p in ("one-query", "rc1", "D<=256"))
    held = next(Precision(p) for p in name.split("/") if p in Precision._value2member_map_)
    packed = held if held.quantized else None
    Nq, r, D = (1 if one else 32), (1 if rc1 else 16), (128 if small else 1536)
    rc = 64 if "multi>16" in name.split("/") else r                     # 16x64: whole rows
    Nc = min(10_000, max(512, int(1e9 // (2 * Nq * r * rc * D))))
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(Nq, 16, D, generator=g), dim=-1)[:, :r]
    # the prefix view of a full (N_c, 64, D) index with only its first r_c vectors written: the
    # strides are serving time's, and only the pages it reads are ever committed (the whole
    # float32 index would be 3.9 GB at D = 1536)
    c = torch.empty(Nc, 64, D, dtype=held.dtype or torch.bfloat16)[:, :rc]   # int8 / binary: from bf16
    c.copy_(torch.nn.functional.normalize(torch.randn(Nc, rc, D, generator=g), dim=-1))
    return q, (quantize(c, packed) if packed else c)


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


choices = {}   # regime -> {"C_ms": ..., "torch_ms": ..., "winner": "c" or "torch", "width": 8 or 16, ...}


def measured_choice(name, torch_paths=None):
    """The fastest CPU path for a regime, measured once per machine and kept on disk;
    -> (backend 'c' or a torch path's name, the record: timings, the C kernel's register width,
    the probe). torch_paths: the torch path timed against the kernel (maxsim.py gives its chunked
    float32 path: the machinery imports nothing above it), or {name: fn}; needed only when the
    regime is not measured yet. In a bf16math regime the kernel's bf16 units ('c-bf16', 'c-amx')
    are timed too."""
    if not choices and dispatch_file() and dispatch_file().exists():
        try:
            choices.update({k: v for k, v in json.loads(dispatch_file().read_text()).items()
                            if isinstance(v, dict) and v.get("winner") in ("c", "torch", *UNITS)})
        except (ValueError, AttributeError, OSError):
            pass                                       # a damaged file is measured again
    if name in choices and not usable(name, choices[name]):
        del choices[name]                              # measured again, and the file rewritten
    if name not in choices:
        if torch_paths is None:
            raise ValueError(f"regime {name} is not measured yet: pass the torch paths to time the kernel against")
        if callable(torch_paths):
            torch_paths = {"torch": torch_paths}
        q, c = _probe(name)
        fns = {w: functools.partial(maxsim_c, q, c, width=w) for w in widths() if library(w) is not None}
        if "bf16math" in name.split("/") and can_take_bf16(q, c):
            torch_paths = {**torch_paths, **{u: functools.partial(maxsim_bf16, unit=u) for u in bf16_units()}}
        t_c = _time({**fns, **{k: functools.partial(f, q, c) for k, f in torch_paths.items()}})
        t_torch = {k: t_c.pop(k) for k in torch_paths}
        width = min(t_c, key=t_c.get) if t_c else None
        fastest = min(t_torch, key=t_torch.get)
        choices[name] = {"C_ms": 1e3 * t_c[width] if t_c else None, "width": width,
                          **{f"{k}_ms": 1e3 * t for k, t in t_torch.items()},
                          "winner": "c" if t_c and t_c[width] <= t_torch[fastest] else fastest,
                          **{f"C{w}_ms": 1e3 * t for w, t in t_c.items()},
                          "probe": f"{q.shape[0]}x{c.shape[0]} at {q.shape[1]}x{c.shape[1]}, D={c.shape[2]}, "
                                   f"{precision_of(c)}"}
        if dispatch_file():
            tmp = dispatch_file().with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(choices, indent=1))
            os.replace(tmp, dispatch_file())          # atomic: concurrent processes are safe
    return choices[name]["winner"], choices[name]


def usable(name, record):
    """The record is a cache, not an authority: a kept decision is used only where this process
    could have made it for this regime: the C kernel at a register width built and self-checked
    here; a bf16 unit only in a regime that allows bf16 math (never exact=True, never a float32
    index) and usable here; else the torch path."""
    winner = record.get("winner")
    if winner == "c":
        return type(record.get("width")) is int and record["width"] in widths() and library(record["width"]) is not None
    if winner in UNITS:
        return "bf16math" in name.split("/") and winner in bf16_units()
    return winner == "torch"


def choose(q, c, torch_paths, exact=False):
    """-> (backend, width) for maxsim.maxsim's auto path on the CPU: 'c' (with its measured
    register width), 'c-bf16', 'c-amx' or the torch path; 'torch' where the kernel cannot take
    the input or did not build."""
    if not (can_take(q, c) and library() is not None):
        return "torch", None
    backend, record = measured_choice(regime(q, c, exact), torch_paths)
    return backend, record.get("width")


def dispatch_file():
    lib = library()
    return Path(lib.path).with_name(Path(lib.path).stem.replace("maxsim-", "dispatch-") + ".json") if lib else None


@functools.cache
def library(width=None):
    """The compiled maxsim.c for `width` floats a register (None: this CPU's widest that passes its
    self-check) as a ctypes library, built once per machine and loaded once per process; or None,
    with one warning, where it cannot build."""
    if width is None:
        return next((lib for w in widths() if (lib := library(w)) is not None), None)
    src = Path(__file__).with_name("maxsim.c")
    cc = os.environ.get("CC", "cc")
    errors = []
    for openmp in (["-fopenmp"], []):       # without OpenMP (a compiler lacking it), Python threads
        try:
            lib = build(src, cc, [*_CFLAGS, f"-DMAXSIM_W={width}", "-Wno-psabi", *openmp])
            break
        except OSError as e:
            errors.append(str(e))
    else:
        warnings.warn(f"the fused CPU MaxSim kernel is unavailable ({errors[-1]}); using the torch path")
        return None
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.maxsim_c.argtypes = [P, P, I, I, P, ctypes.c_int, P, P] + [I] * 9 + [ctypes.c_int, P, I, I]
    lib.maxsim_c.restype = ctypes.c_int
    if lib.maxsim_bf16_units():       # the bf16 units' entry: the same arguments and the unit
        lib.maxsim_bf16.argtypes, lib.maxsim_bf16.restype = lib.maxsim_c.argtypes + [ctypes.c_int], ctypes.c_int
    lib.rows, lib.openmp = lib.maxsim_rows(), bool(lib.maxsim_openmp())
    err = self_check(lib)
    if err > 1e-4:     # never a silent wrong number: a build this CPU runs wrongly is not used
        warnings.warn(f"the {width}-float build of maxsim.c ({lib.path}) scores wrongly on this CPU (error {err:.2g}); "
                      "not using it")
        return None
    return lib


@functools.cache
def bf16_units():
    """The kernel's bf16-math units usable here ('c-bf16', 'c-amx'): built in (this CPU has them),
    granted by Linux (AMX's tile state) and passing their self-check."""
    lib = library()
    if lib is None or not lib.maxsim_bf16_units():
        return ()
    units = []
    for name, unit in UNITS.items():
        if not lib.maxsim_bf16_units() >> unit & 1:
            continue
        if name == "c-amx" and lib.maxsim_amx_init() != 0:
            warnings.warn("this CPU has AMX but Linux refused its tile state (arch_prctl): not using the AMX path")
            continue
        err = self_check(lib, unit=unit)
        if err > 1e-4:
            warnings.warn(f"the {name} path of maxsim.c ({lib.path}) scores wrongly on this CPU (error {err:.2g}); "
                          "not using it")
            continue
        units.append(name)
    return tuple(units)


def can_take_bf16(q, c):
    """What the bf16 units take: a bf16, int8 or binary index (bf16 math loses nothing it holds)."""
    return ctype(c) in (1, 3, 4) and c.shape[1] <= _MAX_RC


def build(src, cc, flags):
    """cc flags src -> a loaded library, built once into the cache and renamed into place (atomic:
    concurrent processes are safe); its path is lib.path."""
    # -march=native code is for this CPU only: its model and flags are part of the key
    key = hashlib.sha1(src.read_bytes() + " ".join([cc, *flags, cpu_flags()]).encode()).hexdigest()[:12]
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


def self_check(lib, unit=None):
    """Largest error of the kernel against checks.maxsim_float64 on a small problem that takes both paths
    (r_c = 1 and several), every block split, masks and padded rows (a few ms, once a process).
    unit: a bf16 unit (0, 1) instead (bf16 candidates; the reference given the query rounded to bf16)."""
    bf16 = unit is not None
    g = np.random.default_rng(0)
    worst = 0.0
    for Nq, r_q, Nc, r_c in ((3, 2 * lib.rows // 3 + 1, 2 * 48 + 7, 1), (5, 7, 9, 23), (2, 3, 5, 140)):
        q, c = g.standard_normal((Nq, r_q, 19), np.float32), g.standard_normal((Nc, r_c, 19), np.float32)
        qm, cm = g.random((Nq, r_q)) < 0.8, g.random((Nc, r_c)) < 0.8
        if bf16:    # the reference of bf16 math: the query and the index in bf16, float64 after
            q, c = (torch.from_numpy(x).bfloat16().float().numpy() for x in (q, c))
        ref = maxsim_float64(q, c, qm, cm).numpy()
        cc = torch.from_numpy(c).bfloat16() if bf16 else torch.from_numpy(c)
        got = _run_c(lib, torch.from_numpy(q), cc, torch.from_numpy(qm), torch.from_numpy(cm), unit)
        worst = max(worst, _error(got.numpy(), ref))
    # int8 and binary candidates (D = 19: a partial byte of bits) against their dequantised values
    q, c = g.standard_normal((3, 5, 19), np.float32), g.standard_normal((2 * 48 + 7, 3, 19), np.float32)
    if bf16:
        q = torch.from_numpy(q).bfloat16().float().numpy()
    for r_c in (1, 3):
        for kind in ("int8", "binary"):
            packed = quantize(torch.from_numpy(c[:, :r_c]), kind)
            got = _run_c(lib, torch.from_numpy(q), packed, None, None, unit)
            worst = max(worst, _error(got.numpy(), maxsim_float64(q, packed.dequantize(torch.float64)).numpy()))
    return worst


def _error(got, want):
    """Largest absolute difference; a NaN where the reference has none counts as infinite."""
    with np.errstate(invalid="ignore"):
        return float(np.nan_to_num(np.abs(got - want), nan=np.inf).max())


_pool = None


@torch.no_grad()
def maxsim_c(q, c, q_mask=None, c_mask=None, width=None):
    """The fused C kernel on the CPU: float32 math, candidates float32, bfloat16 or float16 (a 16-bit
    index halves the bytes read), or an int8 / binary index (Quantized: a quarter / a 32nd of the
    float32 bytes, dequantised in L1), no score tensor; same contract as maxsim. width: floats a
    register, 16 (AVX-512) or 8 (AVX2); None: this CPU's widest.

    The real query vectors of all queries are packed into blocks of 2 x width rows; candidates
    are read in place through their strides (budget prefixes c[:, :r_c] are views)."""
    check_maxsim_inputs(q, c, q_mask, c_mask)
    lib = library(width)
    if lib is None:
        raise RuntimeError("the fused CPU kernel did not build (see the warning); use backend='torch'")
    if q.is_cuda or c.device.type != "cpu" or ctype(c) is None:
        raise ValueError(f"maxsim_c wants CPU candidates in float32, bfloat16, float16, int8 or binary, got "
                         f"{getattr(c, 'precision', c.dtype)} on {c.device}")
    if c.shape[1] > _MAX_RC:
        raise ValueError(f"maxsim_c takes at most {_MAX_RC} vectors a candidate, got r_c={c.shape[1]}")
    return _run_c(lib, q, c, q_mask, c_mask)


@torch.no_grad()
def maxsim_bf16(q, c, q_mask=None, c_mask=None, unit="c-amx"):
    """The C kernel's bf16 math on a bf16 unit ('c-bf16': AVX512_BF16; 'c-amx': AMX tiles): the
    query rounded to bf16, products exact, summed and returned in float32, on a bf16, int8 or binary
    index; same contract as maxsim."""
    check_maxsim_inputs(q, c, q_mask, c_mask)
    if unit not in bf16_units():
        need = {"c-bf16": "AVX512_BF16", "c-amx": "AMX-BF16"}.get(unit)
        raise RuntimeError(f"maxsim backend {unit!r} needs a CPU with {need} (and the C kernel built): use 'c' or 'torch'"
                           if need else f"unknown bf16 unit {unit!r}: 'c-bf16' or 'c-amx'")
    if q.is_cuda or c.device.type != "cpu" or not can_take_bf16(q, c):
        raise ValueError(f"maxsim backend {unit!r} takes a CPU bf16, int8 or binary index (bf16 math loses nothing "
                         f"it holds), got {getattr(c, 'precision', c.dtype)} on {c.device}")
    return _run_c(library(), q, c, q_mask, c_mask, UNITS[unit])


def bf16_bits(x):
    """float32 array -> its bf16 bit patterns (uint16), rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = np.isnan(x)
    b = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    b[nan] = 0x7FC0
    return b


def _run_c(lib, q, c, q_mask, c_mask, unit=None):
    global _pool
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    kind, scale, scale_strides = ctype(c), None, (0, 0)
    if isinstance(c, Quantized):         # the codes, read in place; binary strides in bits
        scale = c.scale if c.scale.dtype == torch.float32 else c.scale.float()
        scale_strides = scale.stride()
        c = c.codes
    if c.stride(2) != 1:
        c = c.contiguous()
    # Packing in numpy, not torch: a torch op here would start torch's OpenMP threads, which then
    # spin-wait on the cores the kernel's own threads need (docs/NOTES.md).
    rows = q.detach().float().numpy().reshape(Nq * r_q, D)              # (N_q r_q, D)
    owner = np.repeat(np.arange(Nq, dtype=np.int64), r_q)              # each row's query
    if q_mask is not None:                                             # padded query vectors dropped
        keep = q_mask.numpy().reshape(-1).astype(bool)
        rows, owner = rows[keep], owner[keep]
    # rows a packed block: the bf16 units take 32; unit 0 takes one block of 16 (its one-query path)
    B = (16 if unit == 0 and rows.shape[0] <= 16 else 32) if unit is not None else lib.rows
    n_rows = -(-rows.shape[0] // B) * B or B
    if unit is not None:    # bf16, D padded to DP; 64-byte aligned
        DP = -(-D // 32) * 32
        padded = np.zeros((n_rows, DP), dtype=np.uint16)
        padded[:rows.shape[0], :D] = bf16_bits(rows)
        buf = np.empty(n_rows * DP + 32, dtype=np.uint16)
        qp = buf[(-buf.ctypes.data % 64) // 2:][:n_rows * DP]
        if unit == 1:       # AMX's B tiles: (n_rows/16, DP/32, 16 pairs of elements, 16 rows, 2)
            qp[...] = padded.reshape(n_rows // 16, 16, DP // 32, 16, 2).transpose(0, 2, 3, 1, 4).reshape(-1)
        else:               # AVX512_BF16: (n_rows/B, DP/2, B rows, 2)
            qp[...] = padded.reshape(n_rows // B, B, DP // 2, 2).transpose(0, 2, 1, 3).reshape(-1)
    else:
        padded = np.zeros((n_rows, D), dtype=np.float32)
        padded[:rows.shape[0]] = rows
        # (n_rows/B, D, B), 64-byte aligned: no register load of a block row straddles two cache lines
        buf = np.empty(n_rows * D + 16, dtype=np.float32)
        qp = buf[(-buf.ctypes.data % 64) // 4:][:n_rows * D].reshape(n_rows // B, D, B)
        qp[...] = padded.reshape(n_rows // B, B, D).transpose(0, 2, 1)
    owner = np.concatenate([owner, np.full(n_rows - owner.shape[0], -1, dtype=np.int64)])
    cm = np.ascontiguousarray(c_mask.numpy(), dtype=np.uint8) if c_mask is not None else None
    out = np.empty((Nq, Nc), dtype=np.float32)
    args = (qp.ctypes.data, owner.ctypes.data, n_rows, Nq, c.data_ptr(), kind,
            cm.ctypes.data if cm is not None else None, out.ctypes.data, r_c, D)
    bits = 8 if kind == 4 else 1
    strides = (bits * c.stride(0), bits * c.stride(1), *((cm.strides[0], 1) if cm is not None else (0, 0)), Nc)
    scales = (scale.data_ptr() if scale is not None else None, *scale_strides)
    threads = torch.get_num_threads()
    fn = lib.maxsim_c if unit is None else (lambda *a: lib.maxsim_bf16(*a, unit))
    if lib.openmp or threads == 1:             # OpenMP splits [0, N_c) into pieces inside the call
        status = [fn(*args, 0, Nc, *strides, threads, *scales)]
    else:                                      # Python threads, four pieces each, as maxsim.c does
        step = max(4, -(-Nc // (4 * threads)))
        if _pool is None or _pool[0] != (threads, os.getpid()):   # a forked child needs its own threads
            _pool = ((threads, os.getpid()), ThreadPoolExecutor(threads))
        status = list(_pool[1].map(lambda n0: fn(*args, n0, min(Nc, n0 + step), *strides, 1, *scales),
                                   range(0, Nc, step)))
    if any(status):
        raise MemoryError(f"maxsim_c: no memory for the kernel's buffers ({n_rows} query vectors, D={D})")
    return torch.from_numpy(out)


_onednn_mode = threading.Lock()


@contextmanager
def onednn_bf16():
    """float32 GEMMs on the CPU in oneDNN's bf16 mode (both operands rounded to bf16, AMX /
    AVX512_BF16 where the CPU has them) while inside; nothing changes where torch has no such mode.
    The mode is process-wide (torch's global context): a float32 matmul in another thread runs in
    bf16 while it is on, so only a caller that asked for it ('torch-bf16') enters, and the lock
    keeps two such blocks from restoring each other's setting."""
    mode = getattr(torch.backends.mkldnn, "matmul", None)
    if mode is None:
        yield
        return
    with _onednn_mode:
        old, mode.fp32_precision = mode.fp32_precision, "bf16"
        try:
            yield
        finally:
            mode.fp32_precision = old
