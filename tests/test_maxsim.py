"""maxsim.py: MaxSim reference, chunking and masks, the fused C and Triton kernels."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import brute_maxsim
import maxsim as maxsim_module
from maxsim import maxsim, maxsim_chunked, maxsim_reference, maxsim_topk
from machinery import cpu_kernel, triton_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ragged(N, R, D, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(N, R, D, generator=g), dim=-1)
    lengths = torch.randint(1, R + 1, (N,), generator=g)
    mask = torch.arange(R)[None] < lengths[:, None]
    return x, mask


def backend_here(backend):
    """An explicit CPU path for tests of maxsim's contract (the automatic choice is measured, so it
    would decide which path such a test exercises): 'torch', or 'c' where the kernel builds."""
    if backend == "c" and cpu_kernel.library() is None:
        pytest.skip("the fused C kernel does not build here")
    return backend


BACKENDS = pytest.mark.parametrize("backend", ["torch", "c"])


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_maxsim_matches_brute_force_ragged(dtype, backend):
    q, qm = ragged(5, 4, 16, 0)
    c, cm = ragged(7, 6, 16, 1)
    want = brute_maxsim(q.to(dtype), c.to(dtype), qm, cm)
    got = maxsim(q.to(dtype), c.to(dtype), qm, cm, backend=backend_here(backend), exact=True)
    assert got.dtype == torch.float32 and got.shape == (5, 7)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


@BACKENDS
def test_padding_never_changes_a_score(backend):
    b = backend_here(backend)
    q, qm = ragged(4, 5, 8, 2)
    c, cm = ragged(6, 7, 8, 3)
    base = maxsim(q, c, qm, cm, backend=b)
    q2, c2 = q.clone(), c.clone()
    q2[~qm] = 100.0   # garbage in padded slots, large enough to win any max if it were read
    c2[~cm] = 100.0
    torch.testing.assert_close(maxsim(q2, c2, qm, cm, backend=b), base)
    # no masks == all-True masks
    torch.testing.assert_close(maxsim(q, c, backend=b), maxsim(q, c, torch.ones_like(qm), torch.ones_like(cm), backend=b))


@pytest.mark.parametrize("Nq", [3, 6])  # N_q R_q = 48 (candidates as the tall operand) and 96 (queries)
def test_chunking_is_exact_and_bounded(Nq):
    q, qm = ragged(Nq, 16, 8, 4)
    for Rc in (1, 6, 7):  # odd and even r_c: the max by halving keeps an odd middle
        c, cm = ragged(50, Rc, 8, 5)
        full = maxsim_reference(q, c, qm, cm)
        for chunk in (None, 1, 7, 50, 1000):
            torch.testing.assert_close(maxsim_chunked(q, c, qm, cm, chunk=chunk), full)


@BACKENDS
def test_prefix_views_are_budgets(backend):
    q, _ = ragged(3, 16, 8, 6)
    c, _ = ragged(9, 64, 8, 7)
    for rq, rc in ((1, 1), (2, 4), (16, 64)):
        torch.testing.assert_close(maxsim(q[:, :rq], c[:, :rc], backend=backend_here(backend)),
                                   maxsim_reference(q[:, :rq].contiguous(), c[:, :rc].contiguous()))


def test_bad_shapes():
    with pytest.raises(ValueError, match="D=8.*D=4"):
        maxsim(torch.zeros(1, 2, 8), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="c_mask has shape"):
        maxsim(torch.zeros(1, 2, 8), torch.zeros(3, 2, 8), c_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown maxsim backend"):
        maxsim(torch.zeros(1, 2, 8), torch.zeros(3, 2, 8), backend="cuda-magic")


def test_triton_on_the_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' needs CUDA tensors"):
        maxsim(torch.zeros(1, 2, 8), torch.zeros(3, 2, 8), backend="triton")


# -- the fused C kernel (maxsim.c, x86 with AVX2: compiled by maxsim.py on first use) --------

def c_kernel_builds():
    return cpu_kernel.library() is not None


def c_kernel(width=None):
    """maxsim_c built for `width` floats a register (16 runs as pairs of 8 on a CPU without
    AVX-512: the same code, so its logic is tested on any x86 machine)."""
    import functools
    import os
    import platform
    import shutil
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("maxsim.c is AVX2 code: this CPU cannot run it")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler (cc) here to build maxsim.c: maxsim uses the torch path")
    assert cpu_kernel.library(width) is not None, "maxsim.c did not build: see the warning"
    return functools.partial(cpu_kernel.maxsim_c, width=width)


WIDTHS = pytest.mark.parametrize("width", [8, 16], ids=["AVX2-width", "AVX512-width"])


# (N_q, R_q, N_c, R_c, D): one row block (candidate vectors NS = 4 at a time) and several (NB,
# then NS: ragged masks give every split), r_c = 1 (NB or NS candidates a step, a ragged tail),
# r_c not a multiple of 4, D not a multiple of 8, one query vector; the last two have more rows
# than one 16-wide block (32)
@pytest.mark.parametrize("shape", [(1, 16, 9, 64, 32), (5, 3, 7, 5, 24), (20, 1, 130, 1, 8),
                                   (3, 7, 23, 1, 13), (2, 16, 33, 6, 128), (1, 1, 5, 3, 4),
                                   (3, 7, 11, 10, 16), (7, 16, 17, 30, 16), (40, 1, 101, 1, 20)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # of the candidates
@WIDTHS
def test_c_kernel_matches_reference(shape, threads, dtype, width):
    maxsim_c = c_kernel(width)
    Nq, Rq, Nc, Rc, D = shape
    q, qm = ragged(Nq, Rq, D, 20)
    c, cm = ragged(Nc, Rc, D, 21)
    c = c.to(dtype)        # widened exactly to float32 in the kernel, as in the reference
    qm[0] = False          # a query with no real vector: every score 0
    cm[-1] = False         # a candidate with no real vector: scores 0
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(maxsim_c(q, c), maxsim_reference(q, c), atol=1e-5, rtol=0)
        torch.testing.assert_close(maxsim_c(q, c, qm, cm), maxsim_reference(q, c, qm, cm), atol=1e-5, rtol=0)
        for rq, rc in ((1, 1), (min(2, Rq), min(4, Rc))):   # budgets: prefix views, read in place
            torch.testing.assert_close(maxsim_c(q[:, :rq], c[:, :rc], qm[:, :rq], cm[:, :rc]),
                                       maxsim_reference(q[:, :rq], c[:, :rc], qm[:, :rq], cm[:, :rc]),
                                       atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(old)


def test_c_kernel_refuses_what_it_cannot_do():
    maxsim_c = c_kernel()
    q, c = torch.randn(2, 4, 16), torch.randn(9, 8, 16)
    assert cpu_kernel.can_take(q, c) and cpu_kernel.can_take(q, c.bfloat16()) and not cpu_kernel.can_take(q, c.double())
    assert not cpu_kernel.can_take(q, torch.randn(1, 5000, 16))
    with pytest.raises(ValueError, match="at most 4096 vectors a candidate, got r_c=5000"):
        maxsim_c(q, torch.randn(1, 5000, 16))
    with pytest.raises(ValueError, match="float32, bfloat16, float16, int8 or binary, got torch.float64"):
        maxsim_c(q, c.double())
    torch.testing.assert_close(maxsim(q, c.double()), maxsim_reference(q, c.double()))  # -> the torch path


def test_dispatch_is_measured_once_and_kept(monkeypatch, tmp_path):
    """The CPU path is the one measured fastest for the regime, and the decision is kept on disk
    beside the kernel: another process (here: a cleared memory) reads it instead of measuring."""
    c_kernel()
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: tmp_path / "dispatch-abc123.json")
    # the C kernel (at each width) takes 2 s, torch 1 s
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: {k: 1.0 if k == "torch" else 2.0 for k in fns})
    used, chunked = [], maxsim_module.maxsim_chunked
    monkeypatch.setattr(maxsim_module, "maxsim_chunked", lambda *a, **k: used.append("torch") or chunked(*a, **k))
    q, c = ragged(3, 16, 32, 50)[0], ragged(20, 64, 32, 51)[0][:, :16]
    torch.testing.assert_close(maxsim(q, c), maxsim_reference(q, c), atol=1e-5, rtol=0)
    assert used == ["torch"] and cpu_kernel.regime(q, c) == "many-queries/multi/D<=256/float32"
    kept = json.loads((tmp_path / "dispatch-abc123.json").read_text())
    assert kept["many-queries/multi/D<=256/float32"]["winner"] == "torch"
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: pytest.fail("measured again"))
    assert cpu_kernel.measured_choice("many-queries/multi/D<=256/float32", maxsim_chunked)[0] == "torch"
    used.clear()
    maxsim(q, c, backend="c")                  # backend= still forces a path
    assert used == []


def test_dispatch_picks_the_faster_register_width(monkeypatch, tmp_path):
    """Where the CPU has AVX-512 both widths are timed, and the faster one is used."""
    c_kernel(16)
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: None)
    monkeypatch.setattr(cpu_kernel, "widths", lambda: (16, 8))
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: {16: 3.0, 8: 1.0, "torch": 2.0})
    used, real = [], cpu_kernel.maxsim_c
    monkeypatch.setattr(cpu_kernel, "maxsim_c", lambda *a, width=None, **k: used.append(width) or real(*a, width=width, **k))
    q, c = ragged(3, 16, 32, 50)[0], ragged(20, 64, 32, 51)[0][:, :16]
    torch.testing.assert_close(maxsim(q, c), maxsim_reference(q, c), atol=1e-5, rtol=0)
    record = cpu_kernel.measured_choice(cpu_kernel.regime(q, c), maxsim_chunked)[1]
    assert (record["winner"], record["width"], record["C16_ms"], record["C8_ms"]) == ("c", 8, 3e3, 1e3)
    assert used == [8]


def test_a_build_that_scores_wrongly_is_never_used(monkeypatch, tmp_path, fresh_build):
    """The kernel checks itself against numpy when it loads; a build that fails (here: a library
    whose kernel writes nothing) is refused with a warning, and maxsim takes the torch path."""
    c_kernel()

    class Broken:
        rows, openmp = 16, True
        def maxsim_c(self, *args):
            return 0
    assert cpu_kernel.self_check(cpu_kernel.library(8)) < 1e-4
    assert cpu_kernel.self_check(Broken()) > 1e-4
    monkeypatch.setattr(cpu_kernel, "self_check", lambda lib: 1.0)
    cpu_kernel.library.cache_clear()
    with pytest.warns(UserWarning, match="scores wrongly on this CPU"):
        assert cpu_kernel.library() is None
    q, c = torch.randn(2, 4, 16), torch.randn(9, 8, 16)
    torch.testing.assert_close(maxsim(q, c), maxsim_reference(q, c))


@pytest.fixture
def fresh_build():
    """_cpu_lib built anew in the test, and again (as normal) after it."""
    cpu_kernel.library.cache_clear()
    yield
    cpu_kernel.library.cache_clear()


def test_without_openmp_python_threads_split_the_work(monkeypatch, tmp_path, fresh_build):
    """A compiler without OpenMP: the kernel is built without it and maxsim.py's Python threads
    split the candidates instead; the scores are the same."""
    c_kernel()
    cpu_kernel.library.cache_clear()
    build = cpu_kernel.build

    def no_openmp(src, cc, flags):
        if "-fopenmp" in flags:
            raise OSError("cc: error: unsupported option '-fopenmp'")
        return build(src, cc, flags)
    monkeypatch.setattr(cpu_kernel, "build", no_openmp)
    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path))
    lib = cpu_kernel.library(8)
    assert lib is not None and not lib.openmp
    q, qm = ragged(3, 7, 24, 60)
    c, cm = ragged(101, 9, 24, 61)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.testing.assert_close(cpu_kernel.maxsim_c(q, c, qm, cm, width=8), maxsim_reference(q, c, qm, cm),
                                   atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(old)


def test_without_a_compiler_maxsim_warns_and_still_works(monkeypatch, tmp_path, fresh_build):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path))
    q, c = torch.randn(2, 4, 16), torch.randn(9, 8, 16)
    with pytest.warns(UserWarning, match="fused CPU MaxSim kernel is unavailable"):
        got = maxsim(q, c)
    torch.testing.assert_close(got, maxsim_reference(q, c))
    with pytest.raises(RuntimeError, match="did not build"):
        cpu_kernel.maxsim_c(q, c)


# -- the fused Triton kernel (on CPU: TRITON_INTERPRET=1, set in conftest) ------------------

HAS_TRITON = triton_kernel.triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the fused kernel cannot run")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # bf16 tl.dot is wrong in the interpreter
@pytest.mark.parametrize("shape", [(1, 16, 9, 64, 32), (5, 3, 7, 5, 24), (20, 1, 130, 1, 8)])
def test_triton_matches_reference(dtype, shape):
    from machinery.triton_kernel import maxsim_triton
    Nq, Rq, Nc, Rc, D = shape
    q, qm = ragged(Nq, Rq, D, 10)
    c, cm = ragged(Nc, Rc, D, 11)
    q, c = q.to(dtype), c.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(maxsim_triton(q, c), maxsim_reference(q, c), atol=tol, rtol=0)
    torch.testing.assert_close(maxsim_triton(q, c, qm, cm), maxsim_reference(q, c, qm, cm), atol=tol, rtol=0)
    # budgets: prefix views of the full tensors, read through their strides (no copy)
    for rq, rc in ((1, 1), (min(2, Rq), min(4, Rc))):
        torch.testing.assert_close(maxsim_triton(q[:, :rq], c[:, :rc], qm[:, :rq], cm[:, :rc]),
                                   maxsim_reference(q[:, :rq], c[:, :rc], qm[:, :rq], cm[:, :rc]),
                                   atol=tol, rtol=0)


def test_dispatch_and_topk(monkeypatch):
    from maxsim import maxsim_topk
    q, _ = ragged(3, 4, 8, 12)
    c, cm = ragged(40, 8, 8, 13)
    want = maxsim_reference(q, c, c_mask=cm)
    for backend in ("torch", "c", "triton") if HAS_TRITON else ("torch", "c"):
        if backend == "c" and not c_kernel_builds():
            continue
        torch.testing.assert_close(maxsim(q, c, c_mask=cm, backend=backend), want, atol=1e-5, rtol=0)
        s, i = maxsim_topk(q, c, 5, c_mask=cm, chunk=7, backend=backend)
        ws, wi = want.topk(5, dim=1)
        torch.testing.assert_close(s, ws, atol=1e-5, rtol=0)
        assert i.tolist() == wi.tolist()


def test_offsets_past_2_31_elements(monkeypatch):
    """A corpus of 100k x 64 x 3584 has more than 2^31 elements: candidates past that offset must
    still be read right (32-bit offsets would wrap and read another candidate's memory). A strided
    view over a large virtual buffer: torch.empty commits only the pages that are touched."""
    D, R = 16, 8
    S = 2 ** 30 + 64                                   # candidate stride: candidates 2, 3 lie past 2^31
    base = torch.empty(3 * S + R * D, dtype=torch.float16)
    c = base.as_strided((4, R, D), (S, D, 1))
    c.copy_(torch.nn.functional.normalize(torch.randn(4, R, D, generator=torch.Generator().manual_seed(0)), dim=-1))
    q, qm = ragged(3, 4, D, 30)
    cm = torch.ones(4, R, dtype=torch.bool)
    cm[3, 5:] = False
    budgets = ((1, 1), (2, 4), (4, 8))                 # prefix views of the strided corpus
    for rq, rc in budgets:
        want = maxsim_reference(q[:, :rq], c.contiguous()[:, :rc], qm[:, :rq], cm[:, :rc])
        args = (c[:, :rc], qm[:, :rq], cm[:, :rc])
        if HAS_TRITON:
            torch.testing.assert_close(triton_kernel.maxsim_triton(q[:, :rq].half(), *args), want, atol=2e-3, rtol=0)
        for backend in ("c", "torch"):               # the C kernel (fp16 candidates) and the torch path
            if backend == "c" and not c_kernel_builds():
                continue
            torch.testing.assert_close(maxsim(q[:, :rq], *args, backend=backend), want, atol=1e-5, rtol=0)
    cb = c.view(torch.bfloat16)                        # the same pages holding a bf16 index
    cb.copy_(c.float().bfloat16())
    for rq, rc in budgets:
        want = maxsim_reference(q[:, :rq], cb.contiguous()[:, :rc], qm[:, :rq], cm[:, :rc])
        torch.testing.assert_close(maxsim(q[:, :rq], cb[:, :rc], qm[:, :rq], cm[:, :rc], exact=True), want,
                                   atol=1e-5, rtol=0)


@needs_triton
def test_triton_splits_queries_past_the_grid_limit(monkeypatch):
    """Grid axis 1 (query blocks) stops at 65,535 on CUDA: more queries go in several launches."""
    monkeypatch.setattr(triton_kernel, "_GRID_Y", 1)
    q, qm = ragged(37, 2, 8, 31)
    c, cm = ragged(11, 4, 8, 32)
    torch.testing.assert_close(triton_kernel.maxsim_triton(q, c, qm, cm), maxsim_reference(q, c, qm, cm), atol=1e-5, rtol=0)
    assert triton_kernel.maxsim_triton(q[:0], c).shape == (0, 11) and triton_kernel.maxsim_triton(q, c[:0]).shape == (37, 0)


@needs_triton
def test_triton_casts_the_query_never_the_index(monkeypatch):
    """A bf16/fp16 index must not be copied to the query's fp32 (a 100k x 64 x 3584 corpus: 92 GB)."""
    q, _ = ragged(2, 4, 16, 33)
    c, _ = ragged(9, 8, 16, 34)
    c = c.half()
    seen = []
    real = triton_kernel._maxsim_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((args[0].dtype, args[1].data_ptr()))
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(triton_kernel, "_maxsim_kernel", Spy())
    got = triton_kernel.maxsim_triton(q, c)
    assert seen == [(torch.float16, c.data_ptr())]
    torch.testing.assert_close(got, maxsim_reference(q.half(), c), atol=2e-3, rtol=0)


def test_topk_with_k_larger_than_a_chunk():
    from maxsim import maxsim_topk
    q, _ = ragged(3, 4, 8, 35)
    c, _ = ragged(40, 8, 8, 36)
    want = maxsim_reference(q, c).topk(25, dim=1)
    s, i = maxsim_topk(q, c, 25, chunk=7)
    torch.testing.assert_close(s, want.values, atol=1e-5, rtol=0)
    assert i.tolist() == want.indices.tolist()


@pytest.mark.parametrize("Nq", [2, 5, 11])   # the C kernel's one-row-block path and its multi-block path
def test_non_finite_input_same_answer_on_every_path(Nq):
    """A masked slot never affects a score, whatever it holds (NaN, inf); a NaN in a real vector
    makes exactly the scores that read it NaN, on every path (reference, torch, C, Triton)."""
    q, qm = ragged(Nq, 4, 16, 40)
    c, cm = ragged(7, 6, 16, 41)
    qm[0, 3], cm[1, 5] = False, False
    q[0, 3], c[1, 5] = float("nan"), float("inf")         # masked slots holding garbage
    c[2, 0, 3] = float("nan")                               # a real candidate vector with a NaN
    cm[2, 0] = True
    q[-1, 0, 0] = float("nan")                              # a real query vector with a NaN
    qm[-1, 0] = True
    want = brute_maxsim(q, c, qm, cm)
    paths = {"reference": maxsim_reference(q, c, qm, cm), "torch": maxsim(q, c, qm, cm, backend="torch")}
    if HAS_TRITON:
        paths["triton"] = triton_kernel.maxsim_triton(q, c, qm, cm)
    if c_kernel_builds():
        for width in (8, 16):
            paths[f"C{width}"] = cpu_kernel.maxsim_c(q, c, qm, cm, width=width)
    for name, got in paths.items():
        assert torch.equal(got.isnan(), want.isnan()), (name, got)
        torch.testing.assert_close(got.double().nan_to_num(0.0), want.nan_to_num(0.0), atol=1e-4, rtol=0, msg=name)
    assert want.isnan().any() and not want.isnan().all()


@WIDTHS
def test_c_kernel_covers_every_candidate_of_a_tile(width):
    """r_c = 1 tiles hold 48 candidates in groups of NB (6 or 12) while that many are left, then of
    4: a tail of 47 is 7 x 6 + 4 + 1, more groups than a tile holds, so the tile ends early and the
    next must start where it ended (an older kernel stepped a whole 48 and left candidate 46 and
    95 unwritten)."""
    maxsim_c = c_kernel(width)
    old = torch.get_num_threads()
    torch.set_num_threads(1)                            # one piece: the tails are exactly these
    try:
        for Nc in (45, 46, 47, 95, 143):
            q, c = torch.randn(2, 1, 8), torch.randn(Nc, 1, 8)
            torch.testing.assert_close(maxsim_c(q, c), maxsim_reference(q, c), atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(old)


def test_pairwise_scores_each_query_against_its_own_candidates():
    """maxsim_pairwise (the loss's hard negatives): s[b, k] = MaxSim(q_b, c_{b,k}), the diagonal
    blocks of the full B x B K matrix, computed without the rest."""
    from maxsim import maxsim_pairwise
    q, c = ragged(5, 3, 8, 70)[0], ragged(5 * 2, 4, 8, 71)[0].view(5, 2, 4, 8)
    want = torch.stack([brute_maxsim(q[b:b + 1], c[b])[0] for b in range(5)]).float()     # (B, K)
    torch.testing.assert_close(maxsim_pairwise(q, c), want, atol=1e-6, rtol=0)
    full = maxsim_reference(q, c.flatten(0, 1)).view(5, 5, 2)
    torch.testing.assert_close(maxsim_pairwise(q, c), full[torch.arange(5), torch.arange(5)], atol=1e-6, rtol=0)


def test_a_dispatch_probe_holds_only_what_it_times(monkeypatch):
    """The first-time probe of 'one query, 1x1, D > 256, bfloat16' times 10,000 candidates' first
    vectors (30 MB) as a prefix view of a (16, 64) index; it used to build the whole float32
    index first and raised the process's peak memory by 7.3 GiB."""
    if not c_kernel_builds():
        pytest.skip("the C kernel does not build here: no dispatch is measured")
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: None)
    with open("/proc/self/clear_refs", "w") as f:       # reset the peak (VmHWM) to the current RSS
        f.write("5")
    status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])  # noqa: E731
    base = status("VmRSS")
    cpu_kernel.measured_choice("one-query/rc1/D>256/bfloat16", maxsim_chunked)
    assert (status("VmHWM") - base) * 1024 < 512 << 20


# -----------------------------------------------------------------------------
# bf16 math, and int8 / binary indexes

def bf16_paths():
    """The bf16-math backends runnable here: 'torch-bf16' everywhere, the C kernel's 'c-bf16' /
    'c-amx' where the CPU has AVX512_BF16 / AMX-BF16."""
    return ["torch-bf16", *(cpu_kernel.bf16_units() if c_kernel_builds() else ())]


@pytest.mark.parametrize("backend", ["torch-bf16", "c-bf16", "c-amx"])
def test_bf16_math_rounds_only_the_query(backend):
    """bf16 math ('torch-bf16', 'c-amx'): float64 MaxSim of the query rounded to bf16 against the
    bf16 index, to float32 accuracy (products exact, sums and outputs float32: no dot product is
    rounded to bf16), and NOT the unrounded query's scores (so the test can tell them apart)."""
    if backend not in bf16_paths():
        pytest.skip(f"{backend} needs a CPU with its bf16 unit; this one has none (the C kernel's self-check covers it "
                    "where one has)")
    q, qm = ragged(6, 16, 64, 60)
    c, cm = ragged(40, 70, 64, 61)            # 70 vectors: the AMX path's row blocks and a short one
    c = c.bfloat16()
    for rq, rc in ((16, 70), (1, 1), (3, 16)):
        want = brute_maxsim(q[:, :rq].bfloat16(), c[:, :rc], qm[:, :rq], cm[:, :rc])
        got = maxsim(q[:, :rq], c[:, :rc], qm[:, :rq], cm[:, :rc], backend=backend)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-6)
    for cc in (c, c[:, :64]):     # no masks: AMX loads evenly spaced rows in place (a whole index, a prefix view)
        torch.testing.assert_close(maxsim(q, cc, backend=backend).double(), brute_maxsim(q.bfloat16(), cc),
                                   atol=2e-5, rtol=1e-6)
    q7, c7 = torch.randn(2, 16, 3584), torch.randn(20, 64, 3584).bfloat16()   # the paper's 7B width
    for rq, rc in ((16, 64), (1, 1)):
        torch.testing.assert_close(maxsim(q7[:, :rq], c7[:, :rc], backend=backend).double(),
                                   brute_maxsim(q7[:, :rq].bfloat16(), c7[:, :rc]), rtol=1e-5,
                                   atol=rq * 3584 * 2.0 ** -24 * 4)   # float32 sums of 3584 products ~1
    unrounded = brute_maxsim(q, c, qm, cm)
    assert (maxsim(q, c, qm, cm, backend=backend).double() - unrounded).abs().max() > 1e-4


def test_auto_path_lets_bf16_math_compete_only_where_it_loses_nothing(monkeypatch):
    """The auto path times the kernel's bf16 units (where this CPU has them) against float32 math on
    a bf16 index, by default, and takes one when it is faster; exact=True, a float32 index and a
    CPU without bf16 units time float32 paths only. 'torch-bf16' (a process-wide oneDNN mode) is
    never chosen, only asked for."""
    q, qm = ragged(6, 16, 64, 60)
    c, cm = ragged(40, 8, 64, 61)
    c = c.bfloat16()
    units = cpu_kernel.bf16_units() if c_kernel_builds() else ()
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: None)
    timed = []                                          # a bf16 unit measured fastest, when one is timed
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: timed.append(set(fns)) or
                        {k: 1.0 if k in cpu_kernel.UNITS else 2.0 for k in fns})
    got = maxsim(q, c, qm, cm)
    assert "torch-bf16" not in timed[-1] and set(units) <= timed[-1]
    if units:                                           # it scored in bf16 math: the query rounded
        assert cpu_kernel.regime(q, c).endswith("bfloat16/bf16math")
        torch.testing.assert_close(got.double(), brute_maxsim(q.bfloat16(), c, qm, cm), atol=2e-5, rtol=1e-6)
    else:                                               # no bf16 unit here: the regime and paths of before
        assert not cpu_kernel.regime(q, c).endswith("bf16math")
    for kwargs in ({"exact": True}, {}):                # float32 math only: exact=True, a float32 index
        timed.clear()
        got = maxsim(q, c if kwargs else c.float(), qm, cm, **kwargs)
        assert not set(cpu_kernel.UNITS) & set().union(*timed)
        torch.testing.assert_close(got.double(), brute_maxsim(q, c, qm, cm), atol=1e-5, rtol=0)
    monkeypatch.setattr(cpu_kernel, "bf16_units", lambda: ())   # a CPU without bf16 units (an AVX2 EPYC)
    assert not cpu_kernel.bf16_math_allowed(c, exact=False)


def test_a_dispatch_record_naming_a_path_unusable_here_is_measured_again(monkeypatch, tmp_path):
    """A kept winner this process cannot run (AMX recorded, then refused by Linux; a path no longer
    chosen) is dropped when the record is read, and the regime measured again."""
    q, c = torch.randn(2, 3, 64), torch.randn(20, 4, 64).bfloat16()
    name = cpu_kernel.regime(q, c)
    f = tmp_path / "dispatch.json"
    f.write_text(json.dumps({name: {"winner": "c-amx"}, "other/regime": {"winner": "torch-bf16"}}))
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: f)
    monkeypatch.setattr(cpu_kernel, "bf16_units", lambda: ())
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: {k: 1.0 for k in fns})
    winner, _ = cpu_kernel.measured_choice(name, maxsim_chunked)
    assert winner in ("c", "torch") and "other/regime" not in cpu_kernel.choices


def test_bf16_units_take_many_candidates_without_vectors():
    """A piece of over 128 candidates with no real vector (all masked) in one group of the bf16
    units: each scores 0 and the rest are right (it once wrote past the group's arrays). In a
    child process, one thread (a piece of 250 candidates), so a regression cannot take the suite down."""
    units = [u for u in ("c-bf16", "c-amx") if u in bf16_paths()]
    if not units:
        pytest.skip("this CPU has no bf16 unit")
    code = f"""
import torch
from maxsim import maxsim
from machinery.checks import maxsim_float64
torch.set_num_threads(1)
torch.manual_seed(0)
q, c = torch.randn(2, 3, 64), torch.randn(1000, 4, 64).bfloat16()
cm = torch.zeros(1000, 4, dtype=torch.bool)
cm[0], cm[-1, :2] = True, True
want = maxsim_float64(q.bfloat16().float(), c.float(), None, cm)
for unit in {units!r}:
    got = maxsim(q, c, None, cm, backend=unit)
    print(unit, float((got.double() - want).abs().max()), int((got[:, 1:-1] != 0).sum()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-500:]
    for line in r.stdout.split("\n")[:-1]:
        unit, err, nonzero = line.split()
        assert float(err) < 1e-4 and int(nonzero) == 0, line


@pytest.mark.parametrize("precision", ["bf16", "int8", "binary"])
def test_c_bf16_one_query_path(precision):
    """'c-bf16' with at most 16 real query vectors (one query: its one-block path, the 16 rows in one
    register against a stream of candidate rows read in place, or whole rows against whole rows for
    1-2 of them) scores as float64 MaxSim of the query rounded to bf16, for every budget prefix,
    with masks, D odd, short or not a multiple of 32, r_c up to 200, several small queries sharing
    the block, a candidate with no real vector, every query vector masked, and NaN in the index."""
    if "c-bf16" not in bf16_paths():
        pytest.skip("c-bf16 needs a CPU with AVX512_BF16; this one has none")
    from machinery.index import quantize
    for D in (1, 19, 64, 97):
        q, qm = ragged(16, 16, D, 70)
        c, cm = ragged(41, 200, D, 71)
        cm[3] = False                                   # no real vector: scores 0
        index = c.bfloat16() if precision == "bf16" else quantize(c, precision)
        values = c.bfloat16().double() if precision == "bf16" else index.dequantize(torch.float64)
        for nq, rq, rc in ((1, 1, 1), (1, 2, 4), (1, 4, 8), (1, 16, 64), (1, 16, 200), (1, 3, 1), (4, 4, 9),
                           (16, 1, 1), (8, 2, 3)):
            for masks in ((None, None), (qm[:nq, :rq], cm[:, :rc])):
                want = brute_maxsim(q[:nq, :rq].bfloat16(), values[:, :rc], *masks)
                got = maxsim(q[:nq, :rq], index[:, :rc], *masks, backend="c-bf16")
                assert got.dtype == torch.float32 and got.shape == (nq, 41)
                assert (got.double() - want).abs().max() <= 1e-5, (D, nq, rq, rc, masks[0] is not None)
            assert (maxsim(q[:nq, :rq], index[:, :rc], qm[:nq, :rq], cm[:, :rc], backend="c-bf16")[:, 3] == 0).all()
        none = torch.zeros(1, 16, dtype=torch.bool)      # every query vector masked: every score 0
        assert (maxsim(q[:1], index[:, :64], none, backend="c-bf16") == 0).all()
    c = torch.randn(30, 64, 100).bfloat16()
    c[7, 40, 99] = float("nan")                          # the last element: a masked load / the odd pair
    for rq in (1, 2, 16):
        got = maxsim(torch.randn(1, rq, 100), c, backend="c-bf16")[0]
        assert got[7].isnan() and not got[torch.arange(30) != 7].isnan().any()


@pytest.mark.parametrize("precision", ["int8", "binary"])
@pytest.mark.parametrize("backend", ["torch", "c", "torch-bf16", "c-bf16", "c-amx"])
def test_quantized_index_scores_as_its_dequantised_vectors(precision, backend):
    """int8 (a scale a vector) and binary (sign bits, a scale a vector; D = 21 leaves a partial
    byte) score as float64 MaxSim of the dequantised vectors, at every prefix, with masks (bf16
    math: of the query rounded to bf16)."""
    if backend.startswith("c") and not c_kernel_builds():
        pytest.skip("the C kernel does not build here")
    if backend in ("c-bf16", "c-amx") and backend not in bf16_paths():
        pytest.skip(f"{backend} needs a CPU with its bf16 unit; this one has none")
    from machinery.index import quantize
    q, qm = ragged(4, 5, 21, 62)
    c, cm = ragged(103, 9, 21, 63)              # 103 candidates: a full r_c = 1 tile and a short one
    packed = quantize(c, precision)
    deq = packed.dequantize(torch.float64)
    if precision == "int8":
        assert (deq - c.double()).abs().max() <= c.abs().max() / 254 + 1e-7
    else:
        assert torch.equal(deq.sign(), torch.where(c > 0, 1.0, -1.0).double())
    qr = q.bfloat16() if backend in ("torch-bf16", "c-bf16", "c-amx") else q
    for rc in (1, 4, 9):
        want = brute_maxsim(qr, deq[:, :rc], qm, cm[:, :rc])
        got = maxsim(q, packed[:, :rc], qm, cm[:, :rc], backend=backend)
        assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= 1e-5


@needs_triton
@pytest.mark.parametrize("precision", ["int8", "binary"])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16])
def test_triton_dequantises_in_the_kernel(monkeypatch, precision, qdtype):
    """The Triton kernel scores an int8 / binary index (codes or sign bits expanded in the kernel,
    each column scaled) as float64 MaxSim of the dequantised vectors; D = 21: a partial byte."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from machinery.index import quantize
    q, qm = ragged(3, 4, 21, 64)
    c, cm = ragged(6, 5, 21, 65)
    packed = quantize(c, precision)
    deq = packed.dequantize(torch.float64)
    tol = 1e-5 if qdtype == torch.float32 else 4 * 2.0 ** -11 * float(deq.abs().max()) * 21
    for rq, rc in ((1, 1), (4, 5), (2, 3)):
        want = brute_maxsim(q[:, :rq].to(qdtype), deq[:, :rc], qm[:, :rq], cm[:, :rc])
        got = triton_kernel.maxsim_triton(q[:, :rq].to(qdtype), packed[:, :rc], qm[:, :rq], cm[:, :rc])
        assert (got.double() - want).abs().max() <= tol


def test_a_dispatch_record_cannot_switch_exact_to_bf16_math(monkeypatch, tmp_path):
    """#41 case 5: a record naming a bf16 unit for a regime that does not allow bf16 math (exact=True,
    a 16-bit index) is measured again: exact=True never runs bf16 math, whatever the record says."""
    if not c_kernel_builds():
        pytest.skip("no C compiler: the dispatch has only the torch path")
    q = torch.nn.functional.normalize(torch.randn(1, 4, 64), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(30, 8, 64), dim=-1).bfloat16()
    name = cpu_kernel.regime(q, c, exact=True)
    assert "bf16math" not in name
    f = tmp_path / "dispatch.json"
    f.write_text(json.dumps({name: {"winner": "c-bf16", "width": 16}}))
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: f)
    monkeypatch.setattr(cpu_kernel, "bf16_units", lambda: ("c-bf16",))        # as on a CPU with AVX512_BF16
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: {k: 1.0 for k in fns})
    used = []
    monkeypatch.setattr(cpu_kernel, "maxsim_bf16", lambda q, c, qm=None, cm=None, unit=None:
                        used.append(unit) or maxsim_chunked(q, c, qm, cm, bf16=True))
    got = maxsim(q, c, exact=True)
    assert used == [] and (got.double() - brute_maxsim(q, c)).abs().max() < 1e-5
    assert json.loads(f.read_text())[name]["winner"] in ("c", "torch")          # rewritten


@pytest.mark.parametrize("damage", [{"winner": "c", "width": "abc"}, {"winner": "c", "width": 12},
                                    {"winner": "c-bf16"}, {"winner": "c-amx", "width": 16}])
def test_a_damaged_dispatch_record_is_measured_again_and_rewritten(monkeypatch, tmp_path, damage):
    """#41 case 6: a width the kernel has no build for ('abc' broke every search: 'the fused CPU kernel did
    not build'), a bf16 unit on a float32 regime ('takes a CPU bf16, int8 or binary index'): measured again,
    the file rewritten, the search right."""
    if not c_kernel_builds():
        pytest.skip("no C compiler: the dispatch has only the torch path")
    q, c = torch.randn(2, 3, 32), torch.randn(20, 4, 32)
    name = cpu_kernel.regime(q, c)
    f = tmp_path / "dispatch.json"
    f.write_text(json.dumps({name: damage}))
    monkeypatch.setattr(cpu_kernel, "choices", {})
    monkeypatch.setattr(cpu_kernel, "dispatch_file", lambda: f)
    monkeypatch.setattr(cpu_kernel, "_time", lambda fns, repeats=3: {k: 1.0 for k in fns})
    torch.testing.assert_close(maxsim(q, c), maxsim_reference(q, c), atol=1e-5, rtol=0)
    kept = json.loads(f.read_text())[name]
    assert kept["winner"] in ("c", "torch") and kept["width"] in cpu_kernel.widths()


def test_edge_inputs_are_the_same_on_every_path_or_one_line():
    """#41 smaller ones: r_c = 0 scores 0 on the torch path as on the others; a float mask (0.5 was True
    to torch and False to the C kernel) is refused; maxsim_topk's k and chunk below 1 are one line."""
    q, c = torch.randn(2, 3, 16), torch.randn(5, 4, 16)
    backends = ["torch"] + (["c"] if c_kernel_builds() else [])
    for backend in backends:
        assert torch.equal(maxsim(q, c[:, :0], backend=backend), torch.zeros(2, 5))
        with pytest.raises(ValueError, match=r"c_mask is torch.float32: give a bool mask"):
            maxsim(q, c, c_mask=torch.full((5, 4), 0.5), backend=backend)
    for k, chunk, said in ((-1, None, "k must be a whole number >= 1, got -1"),
                           (3, 0, "chunk must be a whole number >= 1, got 0")):
        with pytest.raises(ValueError, match=f"maxsim_topk: {said}"):
            maxsim_topk(q, c, k, chunk=chunk)


def test_the_environment_never_turns_exact_into_bf16_math(monkeypatch):
    """METAEMBED_MAXSIM names a path for experiments; exact=True keeps float32 math whatever it says
    (with torch-bf16 asked for, the exact reference drifted by 1e-3 after the env read moved into maxsim)."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 16, 256, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(50, 64, 256, generator=g), dim=-1).bfloat16()
    want = maxsim_reference(q.double(), c.double()).float()
    monkeypatch.setenv("METAEMBED_MAXSIM", "torch-bf16")
    assert (maxsim(q, c, exact=True) - want).abs().max() < 1e-5
    assert (maxsim(q, c) - want).abs().max() > 1e-5                 # the variable is read where exact is not asked
