"""
Late interaction (ColBERT MaxSim) for multi-vector embeddings, at any budget (r_q, r_c):

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q^i, E_c^j>          (no division by r_q)

A budget is a pair of prefix views, q[:, :r_q] and c[:, :r_c]: one encoding serves them all.

maxsim_reference  dense, differentiable: the training loss's in-batch scores
maxsim_pairwise   each query against its own candidates only: the loss's hard negatives
maxsim_chunked    the reference over candidate chunks, in bounded memory (any device, any dtype,
                  int8 / binary indexes dequantised a chunk at a time); float32 math, or bf16
                  math (bf16=True: the query rounded to bf16, the GEMM at the bf16 rate)
maxsim            the inference entry point: the fused Triton kernel on CUDA; on the CPU the
                  fused C kernel (float32 math, or bf16 math on AMX) or the chunked path,
                  whichever was measured fastest here (METAEMBED_MAXSIM=torch|c|... forces one)
maxsim_topk       the best k candidates of a corpus too large for one score matrix
warm_up           one untimed call, so a timing after it holds no first-time dispatch measurement

bf16 math, as the issue of 16-bit indexes defines it: the query rounded to bf16 (the index is
bf16 or fewer bits already), each product exact, sums and outputs in float32; the one difference
from float32 math is the query's rounding (2^-9 of each element). It is what the CPU's bf16
units (AMX tiles, AVX512_BF16 dot products) compute, at up to 4x float32's rate here.

The fused kernels (their builds, self-check, measured dispatch, oneDNN's bf16 mode) are in machinery/.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from machinery import cpu_kernel
from machinery.checks import check_maxsim_inputs
from machinery.index import Prefix, Quantized, QuantizedPrefix


def maxsim_reference(q: torch.Tensor, c: torch.Tensor, q_mask: torch.Tensor | None = None,
                     c_mask: torch.Tensor | None = None) -> torch.Tensor:
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


def maxsim_pairwise(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """q (B, r_q, D), c (B, K, r_c, D): query b against ITS OWN K candidates -> (B, K) float32.

    s[b, k] = sum_i max_j <q_b^i, c_{b,k}^j>: B K pairs, not the B x B K of maxsim_reference."""
    s = torch.einsum("bid,bkjd->bkij", q.float(), c.float())         # (B, K, r_q, r_c)
    return s.amax(-1).sum(-1)


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


def maxsim_chunked(q: torch.Tensor, c: torch.Tensor | Quantized, q_mask: torch.Tensor | None = None,
                   c_mask: torch.Tensor | None = None, chunk: int | None = None, bf16: bool = False) -> torch.Tensor:
    """The reference over candidate chunks, never more than (N_q, r_q, chunk, r_c) at once.

    One matmul per chunk into a reused buffer (fresh large allocations cost page faults), max
    over r_c on a view of it, then sum over r_q (in float32). float32 math; bf16=True: bf16 math
    (the query rounded to bf16; on a bf16 index the float32 GEMM run by oneDNN in its bf16 mode,
    AMX / AVX512_BF16 where the CPU has them; float32 sums and outputs). c: a tensor or a Quantized
    index (each chunk dequantised). With few query vectors
    (N_q r_q < 64) the candidate chunk is the matmul's tall operand, (n r_c, D) @ (D, N_q r_q),
    which streams the corpus best, and the max is taken by halving; otherwise
    (N_q r_q, D) @ (D, n r_c)."""
    check_maxsim_inputs(q, c, q_mask, c_mask)
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    M = Nq * r_q
    # oneDNN's bf16 mode rounds both operands to bf16: exact only for a bf16 index (a dequantised
    # int8 / binary chunk, code x scale, is not bf16: there, and off the CPU, the float32 GEMM takes
    # the rounded query: the same numbers in float32 math). The mode is process-wide, so the auto
    # path (maxsim) never takes this one: cpu_kernel.onednn_bf16 says why and holds its lock.
    if bf16:
        in_bf16_mode = q.device.type == "cpu" and c.dtype == torch.bfloat16
        with cpu_kernel.onednn_bf16() if in_bf16_mode else nullcontext():
            return maxsim_chunked(q.bfloat16(), c, q_mask, c_mask, chunk)
    if r_c == 0 or r_q == 0:   # no candidate (or query) vector: every score 0, as a fully masked one
        return torch.zeros(Nq, Nc, dtype=torch.float32, device=q.device)
    tall = M < 64
    dt = torch.float32                                                    # the math's dtype
    packed = isinstance(c, Quantized)
    in_place = not packed and c.dtype == dt and (c.is_contiguous() or r_c == 1)
    if chunk is None:  # score blocks of about 1 MiB on the CPU (its L2), 256 MiB on a GPU
        block = (1 << 18) if q.device.type == "cpu" else (1 << 26)
        chunk = max(1, min(Nc, block // max(1, M * r_c)))
        if not in_place:                                            # each chunk is copied:
            chunk = min(chunk, max(8, (1 << 20) // (r_c * D)))      # keep it in cache (4 MiB of float32)
    out = torch.empty(Nq, Nc, dtype=torch.float32, device=q.device)
    qf = q.reshape(M, D).to(dt)                                           # (N_q r_q, D)
    qT = qf.T.contiguous() if tall else None                              # (D, N_q r_q)
    qm = ~q_mask.to(q.device, torch.bool)[:, :, None] if q_mask is not None else None   # True = padded
    buf = torch.empty(M * chunk * r_c, dtype=dt, device=q.device)
    cbuf = torch.empty(chunk * r_c * D, dtype=dt, device=q.device) \
        if not in_place else None                                          # a chunk widened / dequantised
    scratch = torch.empty(M * chunk * ((r_c + 1) // 2), dtype=dt, device=q.device) if tall else None
    with torch.no_grad():
        for j in range(0, Nc, chunk):
            n = min(chunk, Nc - j)
            cj = c[j:j + n]
            if packed:     # int8 / binary: dequantised in one pass into the reused buffer
                cf = cbuf[:n * r_c * D].view(n * r_c, D)
                cj.dequantize(dt, out=cf.view(n, r_c, D))
            elif cj.dtype == dt:
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
            out[:, j:j + n] = m.sum(1, dtype=torch.float32)               # sum_i -> (N_q, n)
    return out


def maxsim(q: torch.Tensor, c: torch.Tensor | Quantized, q_mask: torch.Tensor | None = None,
           c_mask: torch.Tensor | None = None, backend: str | None = None, exact: bool = False) -> torch.Tensor:
    """MaxSim scores (N_q, N_c) float32 for any budget: pass prefix views q[:, :r_q] of (N_q, R_q, D)
    and c[:, :r_c] of (N_c, R_c, D). c: a tensor, or an int8 / binary index (machinery.index.Quantized).

    backend: None (the environment's METAEMBED_MAXSIM if set, else auto: 'triton' on CUDA; on the
    CPU the path measured fastest for this class of shape on this machine), 'torch', 'c', 'c-bf16' /
    'c-amx' (bf16 math on AVX512_BF16 / AMX), 'torch-bf16' (bf16 math through oneDNN's
    process-wide mode: asked for only, never chosen) or 'triton'. On a bf16 or low-bit index the
    auto path lets bf16 math (the query rounded to bf16, see the top) compete with float32 math;
    exact=True keeps float32 math (references and tests). A float32 index is never scored in bf16.

    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])              # 1 query, r_q = 2, D = 2
    >>> c = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, -1.0]]])   # 2 candidates, r_c = 2
    >>> maxsim(q, c, backend="torch")                             # sum_i max_j <q^i, c^j>
    tensor([[1.8000, 1.0000]])
    >>> maxsim(q[:, :1], c[:, :1], backend="torch")               # the budget 1x1: prefixes
    tensor([[1., 0.]])"""
    width = None
    if backend is None and not exact:             # an asked-for path, for experiments; exact=True keeps float32 math
        backend = os.environ.get("METAEMBED_MAXSIM") or None
    if backend is None:
        if q.is_cuda:
            backend = "triton"
        else:
            backend, width = cpu_kernel.choose(q, c, maxsim_chunked, exact)
    if backend in cpu_kernel.UNITS:                  # 'c-bf16', 'c-amx': bf16 math in the C kernel
        return cpu_kernel.maxsim_bf16(q, c, q_mask, c_mask, unit=backend)
    if backend == "torch":
        return maxsim_chunked(q, c, q_mask, c_mask)
    if backend == "torch-bf16":
        return maxsim_chunked(q, c, q_mask, c_mask, bf16=True)
    if backend == "c":
        return cpu_kernel.maxsim_c(q, c, q_mask, c_mask, width=width)
    if backend == "triton":
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("maxsim backend 'triton' needs CUDA tensors and these are on the CPU: use 'torch' or "
                             "'c' (or TRITON_INTERPRET=1, Triton's slow CPU interpreter, for tests)")
        from machinery.triton_kernel import maxsim_triton
        return maxsim_triton(q, c, q_mask, c_mask)
    raise ValueError(f"unknown maxsim backend {backend!r}: use 'torch', 'torch-bf16', 'c' (the fused C kernel), "
                     f"'c-bf16', 'c-amx' or 'triton'")


def maxsim_topk(q: torch.Tensor, c: torch.Tensor | Quantized | Prefix | QuantizedPrefix, k: int,
                c_mask: torch.Tensor | None = None, chunk: int | None = None, backend: str | None = None,
                exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates per query over a corpus too large for one score matrix.

    q (N_q, r_q, D); c: a tensor (N_c, r_c, D) on any device, or an on-disk index that slices like one
    (machinery.index). A corpus already on q's device is scored in place, 65,536
    candidates at a time; any other is copied (or read) to q's device a chunk of about 256 MiB at
    a time, in its own dtype, so a host or on-disk corpus is scored in bounded memory.
    -> (scores (N_q, k) float32, indices (N_q, k) int64), best first; a running top-k merged
    chunk by chunk, so memory is O(N_q * (k + chunk)) plus one chunk of the corpus."""
    check_maxsim_inputs(q, c, None, c_mask)
    for name, v in (("k", k), ("chunk", chunk)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"maxsim_topk: {name} must be a whole number >= 1, got {v!r}")
    Nq, Nc = q.shape[0], c.shape[0]
    if chunk is None:
        in_place = isinstance(c, torch.Tensor) and c.device == q.device
        row_bytes = c.row_bytes if hasattr(c, "row_bytes") else c.shape[1] * c.shape[2] * c.dtype.itemsize
        chunk = 65536 if in_place else max(1, min(65536, (256 << 20) // row_bytes))
    k = min(k, Nc)
    best_s = torch.full((Nq, 0), float("-inf"), device=q.device)
    best_i = torch.zeros((Nq, 0), dtype=torch.long, device=q.device)
    for j in range(0, Nc, chunk):
        cj = c[j:j + chunk].to(q.device, non_blocking=True)
        cm = c_mask[j:j + chunk].to(q.device) if c_mask is not None else None
        s = maxsim(q, cj, None, cm, backend, exact)                            # (N_q, chunk)
        idx = torch.arange(j, j + s.shape[1], device=q.device).expand(Nq, -1)
        s, idx = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        best_s, pos = s.topk(min(k, s.shape[1]), dim=1)                       # k may exceed a chunk
        best_i = idx.gather(1, pos)
        del cj                                         # freed before the next chunk is read
    return best_s, best_i


def warm_up(q: torch.Tensor, c: torch.Tensor | Quantized | Prefix | QuantizedPrefix, backend: str | None = None) -> None:
    """Score q against c's first candidate, untimed: the first call of a class of shape may measure
    the CPU dispatch (machinery/cpu_kernel.py) or compile a kernel; a timing that follows holds neither."""
    maxsim(q, c[0:1].to(q.device), backend=backend)
