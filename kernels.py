"""
Late interaction (ColBERT MaxSim) for multi-vector embeddings:

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q^i, E_c^j>

maxsim_reference: plain PyTorch, dense, differentiable (used by the training loss).
maxsim:           inference entry point, any number of candidates in bounded memory.
"""
import os

import torch


def maxsim_reference(q, c, q_mask=None, c_mask=None):
    """q (N_q, R_q, D), c (N_c, R_c, D), masks (N, R) bool (True = real) -> (N_q, N_c) float32.

    Materialises (N_q, R_q, N_c, R_c): use for training batches, not for a corpus."""
    Nq, Rq, D = q.shape
    Nc, Rc, _ = c.shape
    s = (q.reshape(Nq * Rq, D).float() @ c.reshape(Nc * Rc, D).float().T).view(Nq, Rq, Nc, Rc)
    if c_mask is not None:  # a padded candidate vector never wins a max
        s = s.masked_fill(~c_mask[None, None].to(s.device, torch.bool), float("-inf"))
    m = s.amax(-1)                                                    # (N_q, R_q, N_c)
    if c_mask is not None:  # a candidate with no real vector contributes 0
        m = m.masked_fill(m == float("-inf"), 0.0)
    if q_mask is not None:  # a padded query vector adds nothing
        m = m * q_mask[:, :, None].to(m.device, m.dtype)
    return m.sum(1)                                                   # (N_q, N_c)


def _check(q, c, q_mask, c_mask):
    if q.dim() != 3 or c.dim() != 3:
        raise ValueError(f"maxsim wants q (N_q, R_q, D) and c (N_c, R_c, D), got {tuple(q.shape)} "
                         f"and {tuple(c.shape)}")
    if q.shape[-1] != c.shape[-1]:
        raise ValueError(f"embedding sizes differ: q has D={q.shape[-1]}, c has D={c.shape[-1]}")
    for name, x, m in (("q_mask", q, q_mask), ("c_mask", c, c_mask)):
        if m is not None and tuple(m.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {tuple(x.shape[:2])}")


def maxsim_chunked(q, c, q_mask=None, c_mask=None, chunk=None, out=None):
    """The reference, over candidate chunks: never more than (N_q, R_q, chunk, R_c) at once."""
    _check(q, c, q_mask, c_mask)
    Nq, Rq, D = q.shape
    Nc, Rc, _ = c.shape
    if chunk is None:  # ~32 MiB of float32 scores per chunk
        chunk = max(1, (8 << 20) // max(1, Nq * Rq * Rc))
    out = torch.empty(Nq, Nc, dtype=torch.float32, device=q.device) if out is None else out
    with torch.no_grad():
        for j in range(0, Nc, chunk):
            cm = c_mask[j:j + chunk] if c_mask is not None else None
            out[:, j:j + chunk] = maxsim_reference(q, c[j:j + chunk], q_mask, cm)
    return out


def maxsim(q, c, q_mask=None, c_mask=None, backend=None):
    """MaxSim scores (N_q, N_c) float32 for any budget: pass prefix views q[:, :r_q], c[:, :r_c].

    backend: None (auto: 'triton' on CUDA, 'torch' otherwise), 'torch' or 'triton'; the
    environment variable METAEMBED_MAXSIM overrides auto."""
    backend = backend or os.environ.get("METAEMBED_MAXSIM") or ("triton" if q.is_cuda else "torch")
    if backend == "torch":
        return maxsim_chunked(q, c, q_mask, c_mask)
    if backend == "triton":
        return maxsim_triton(q, c, q_mask, c_mask)
    raise ValueError(f"unknown maxsim backend {backend!r}: use 'torch' or 'triton'")


def maxsim_triton(q, c, q_mask=None, c_mask=None):
    raise NotImplementedError("the fused Triton MaxSim kernel is not built yet; use backend='torch'")


def maxsim_topk(q, c, k, q_mask=None, c_mask=None, chunk=65536, backend=None):
    """Top-k candidates per query over a corpus too large for one score matrix.

    -> (scores (N_q, k) float32, indices (N_q, k) int64), best first; a running top-k merged
    chunk by chunk, so memory is O(N_q * (k + chunk))."""
    _check(q, c, q_mask, c_mask)
    k = min(k, c.shape[0])
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for j in range(0, c.shape[0], chunk):
        cm = c_mask[j:j + chunk] if c_mask is not None else None
        s = maxsim(q, c[j:j + chunk], q_mask, cm, backend)                    # (N_q, chunk)
        idx = torch.arange(j, j + s.shape[1], device=q.device).expand(q.shape[0], -1)
        best_s, pos = torch.cat([best_s, s], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, idx], 1).gather(1, pos)
    return best_s, best_i
