"""The fused Triton MaxSim kernel (CUDA; on the CPU under TRITON_INTERPRET=1, for tests).

One program scores QB queries x CB candidates. It streams D in BLOCK_D slices through one
tl.dot, S = Q (QB*RQ, D) @ C^T (D, CB*RC), then max over each candidate's RC vectors and sum
over each query's RQ vectors, all in registers: the (N_q, N_c, r_q, r_c) tensor never exists.
Budgets are prefixes (r_q, r_c) read through the full tensors' strides, so no copy is made.
An int8 / binary index (machinery.index.Quantized) is dequantised in the kernel: its codes (or
sign bits, expanded to +-1) are multiplied in the query's dtype, and each candidate vector's
column of products is scaled by its scale before the max (scale * <q, code> = <q, scale * code>).
"""
import torch

from machinery.checks import check_maxsim_inputs
from machinery.index import Quantized

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still have the reference
    triton = None

if triton is not None:
    @triton.jit
    def _maxsim_kernel(q_ptr, c_ptr, qm_ptr, cm_ptr, out_ptr, s_ptr, Nq, Nc, r_q, r_c, D,
                       sqn, sqr, sqd, scn, scr, scd, sqmn, sqmr, scmn, scmr, son, soc, ssn, ssr,
                       HAS_QM: tl.constexpr, HAS_CM: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
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
            if QUANT == 0:
                ct = tl.load(c_base[None, :] + d[:, None] * scd,
                             mask=c_ok[None, :] & (d[:, None] < D), other=0.0)     # (BLOCK_D, CB*RC)
            elif QUANT == 1:                                                       # int8 codes
                ct = tl.load(c_base[None, :] + d[:, None] * scd,
                             mask=c_ok[None, :] & (d[:, None] < D), other=0).to(qt.dtype)
            else:                                                                  # sign bits -> +-1
                byte = tl.load(c_base[None, :] + (d[:, None] // 8) * scd,
                               mask=c_ok[None, :] & (d[:, None] < D), other=0).to(tl.int32)
                bit = (byte >> (d[:, None] % 8).to(tl.int32)) & 1
                ct = tl.where(c_ok[None, :] & (d[:, None] < D), bit * 2 - 1, 0).to(qt.dtype)
            if IEEE:
                s = tl.dot(qt, ct, s, input_precision="ieee")
            else:
                s = tl.dot(qt, ct, s)
        if QUANT != 0:                                      # each candidate vector's scale
            s = s * tl.load(s_ptr + cn * ssn + cr * ssr, mask=c_ok, other=0.0)[None, :]
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
    check_maxsim_inputs(q, c, q_mask, c_mask)
    Nq, r_q, D = q.shape
    Nc, r_c, _ = c.shape
    if Nq == 0 or Nc == 0:
        return torch.zeros(Nq, Nc, dtype=torch.float32, device=q.device)
    quant, scale = 0, None
    if isinstance(c, Quantized):                           # dequantised in the kernel, in q's dtype
        quant, scale, c = (1 if c.precision == "int8" else 2), c.scale.float(), c.codes
    elif q.dtype != c.dtype:
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
        sp = scale if scale is not None else out
        _maxsim_kernel[grid](qa, c, qma, cm, out[a:a + n], sp, n, Nc, r_q, r_c, D,
                             *qa.stride(), *c.stride(), *qma.stride(), *cm.stride(), *out.stride(),
                             *(scale.stride() if scale is not None else (0, 0)),
                             HAS_QM=q_mask is not None, HAS_CM=c_mask is not None,
                             IEEE=q.dtype == torch.float32, QUANT=quant, QB=QB, RQ=RQ, CB=CB, RC=RC,
                             BLOCK_D=block_d)
    return out


