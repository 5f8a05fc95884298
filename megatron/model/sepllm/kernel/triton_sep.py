"""Triton kernels of Sep-Attention: forward and backward, work proportional to the kept entries.

For query ``q`` with ``lo_off = window - E`` the visible keys split into two disjoint sets:

* the *band* ``[q - lo_off, q]`` (the local window, diagonal included), visited as contiguous key blocks;
* the *compact* set: listed (separator or initial) keys ``pos < q - lo_off``, read through the per-row sorted
  position list of :class:`~megatron.model.sepllm.kernel.metadata.SepMetadata`. A query block needs only the
  first ``cum[b, last_q - lo_off]`` list entries, because the list is sorted.

Both sets feed one online softmax, so the merge is exact. Backward: a dQ kernel (query-block major, same two
loops), a kernel for dK/dV of the compact list (one program per block of list entries, over all later query
blocks; results in a float32 compact buffer), and a band dK/dV kernel (key-block major) that also adds the
compact contribution of its listed keys, so every gradient is rounded once.

Compact loops are split in two: list entries left of the window of the block's *first* query are visible to
every row of the block and run without any mask (the bulk of the work at long S); only the last few tiles are
masked. With ``GATHERED`` the listed K/V rows were first copied, in list order, into contiguous ``[B, H, S, D]``
buffers by :func:`_sep_gather_kernel`, so the compact loop reads plain strided tiles instead of rows addressed
through the position list. Programs run longest-first (``program_id(0)`` is the batch-head, the block index is
reversed where the work grows with it), which shortens the tail of the launch.

Scores live in base 2 (``qk * scale * log2(e)``); ``LSE`` holds ``m + log2(l)`` in those units.
"""
from __future__ import annotations

import triton
import triton.language as tl

# A finite "minus infinity": a row with nothing visible yet in a block gets exp2(0)=1 garbage that the
# rescale factor exp2(-1e30 - m) wipes out as soon as a visible score arrives (the band always holds the
# diagonal), and no inf - inf NaNs appear.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _sep_fwd_kernel(
    Q, K, V, KC, VC, O, LSE, POS, CUM,
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S, lo_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COMPACT: tl.constexpr,
    GATHERED: tl.constexpr,
):
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)  # late query blocks (most compact work) first
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < S
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    win_lo = offs_m - lo_off  # first band key of each query
    last_q = tl.minimum(start_m * BLOCK_M + BLOCK_M - 1, S - 1)

    if HAS_COMPACT:
        n_c = tl.load(CUM + b * (S + 1) + tl.minimum(tl.maximum(last_q - lo_off, 0), S))
        # Entries left of the first query's window are visible to every row: whole tiles of them go unmasked.
        n_full = tl.load(CUM + b * (S + 1) + tl.minimum(tl.maximum(start_m * BLOCK_M - lo_off, 0), S))
        n_full = (n_full // BLOCK_N) * BLOCK_N
        kc_base = KC + bh.to(tl.int64) * S * HEAD_DIM
        vc_base = VC + bh.to(tl.int64) * S * HEAD_DIM
        for j in range(0, n_full, BLOCK_N):
            offs_j = j + offs_n0
            if GATHERED:
                k = tl.load(kc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :])
                v = tl.load(vc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :])
            else:
                kpos = tl.load(POS + b * S + offs_j)
                k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :])
                v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :])
            s = tl.dot(q, tl.trans(k)) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        for j in range(n_full, n_c, BLOCK_N):
            offs_j = j + offs_n0
            ok_j = offs_j < n_c
            kpos = tl.load(POS + b * S + offs_j, mask=ok_j, other=0)
            if GATHERED:
                k = tl.load(kc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=ok_j[:, None], other=0.0)
                v = tl.load(vc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=ok_j[:, None], other=0.0)
            else:
                k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :], mask=ok_j[:, None], other=0.0)
                v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :], mask=ok_j[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            vis = ok_j[None, :] & (kpos[None, :] < win_lo[:, None])
            s = tl.where(vis, s, NEG_BIG)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    lo = tl.maximum(start_m * BLOCK_M - lo_off, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m * BLOCK_M + BLOCK_M, S)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=(offs_n < S)[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=(offs_n < S)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= win_lo[:, None])
        s = tl.where(vis, s, NEG_BIG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _sep_bwd_dq_kernel(
    Q, K, V, KC, VC, O, DO, DQ, LSE, DELTA, POS, CUM,
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    H, S, lo_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COMPACT: tl.constexpr,
    GATHERED: tl.constexpr,
):
    """dQ of a query block; also computes and stores delta = rowsum(dO * O) for the dK/dV kernels that follow."""
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)  # late query blocks (most compact work) first
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < S
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o = tl.load(o_base + offs_m[:, None] * stride_os + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, delta, mask=row_ok)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    win_lo = offs_m - lo_off
    last_q = tl.minimum(start_m * BLOCK_M + BLOCK_M - 1, S - 1)

    if HAS_COMPACT:
        n_c = tl.load(CUM + b * (S + 1) + tl.minimum(tl.maximum(last_q - lo_off, 0), S))
        n_full = tl.load(CUM + b * (S + 1) + tl.minimum(tl.maximum(start_m * BLOCK_M - lo_off, 0), S))
        n_full = (n_full // BLOCK_N) * BLOCK_N
        kc_base = KC + bh.to(tl.int64) * S * HEAD_DIM
        vc_base = VC + bh.to(tl.int64) * S * HEAD_DIM
        # Rows past S have q = dO = 0 and lse = delta = 0, so their unmasked ds is exactly 0.
        for j in range(0, n_full, BLOCK_N):
            offs_j = j + offs_n0
            if GATHERED:
                k = tl.load(kc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :])
                v = tl.load(vc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :])
            else:
                kpos = tl.load(POS + b * S + offs_j)
                k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :])
                v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :])
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        for j in range(n_full, n_c, BLOCK_N):
            offs_j = j + offs_n0
            ok_j = offs_j < n_c
            kpos = tl.load(POS + b * S + offs_j, mask=ok_j, other=0)
            if GATHERED:
                k = tl.load(kc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=ok_j[:, None], other=0.0)
                v = tl.load(vc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=ok_j[:, None], other=0.0)
            else:
                k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :], mask=ok_j[:, None], other=0.0)
                v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :], mask=ok_j[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            vis = ok_j[None, :] & (kpos[None, :] < win_lo[:, None]) & row_ok[:, None]
            p = tl.where(vis, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)

    lo = tl.maximum(start_m * BLOCK_M - lo_off, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m * BLOCK_M + BLOCK_M, S)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=(offs_n < S)[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=(offs_n < S)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= win_lo[:, None]) & row_ok[:, None]
        p = tl.where(vis, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _sep_bwd_dkdv_compact_kernel(
    Q, K, V, DO, DKC, DVC, LSE, DELTA, POS, CUM,
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    H, S, lo_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of the listed keys from the queries that see them outside their window (compact part)."""
    bh = tl.program_id(0)
    start_j = tl.program_id(1)  # early list entries (seen by the most queries) first
    b = bh // H
    h = bh % H
    n_c = tl.load(CUM + b * (S + 1) + S)
    if start_j * BLOCK_N < n_c:
        offs_j = start_j * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        ok_j = offs_j < n_c
        # Padding slots get position S, which no query sees through the compact part.
        kpos = tl.load(POS + b * S + offs_j, mask=ok_j, other=S)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :], mask=ok_j[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :], mask=ok_j[:, None], other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        first_q = tl.min(kpos, 0) + lo_off + 1
        lo = (first_q // BLOCK_M) * BLOCK_M
        # From the block after the last entry's window on, every query sees every entry of this tile: no mask.
        # (Padding entries have k = v = 0 and are never stored; rows past S have q = dO = 0, lse = delta = 0.)
        last_k = tl.max(tl.where(ok_j, kpos, 0), 0)
        mid = tl.minimum(((last_k + lo_off + 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, S)
        mid = tl.maximum(mid, lo)
        for start_m in range(lo, mid, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < S
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
            vis = (kpos[:, None] < (offs_m - lo_off)[None, :]) & row_ok[None, :]
            p_t = tl.where(vis, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
        for start_m in range(mid, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < S
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
            p_t = tl.math.exp2(s_t - lse[None, :])
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
        c_off = bh.to(tl.int64) * S * HEAD_DIM + offs_j[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DKC + c_off, dk, mask=ok_j[:, None])
        tl.store(DVC + c_off, dv, mask=ok_j[:, None])


@triton.jit
def _sep_bwd_dkdv_band_kernel(
    Q, K, V, DO, DK, DV, DKC, DVC, LSE, DELTA, CUM,
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    H, S, lo_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COMPACT: tl.constexpr,
):
    """dK/dV of a contiguous key block from the queries whose window holds it, plus its compact share."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = ((start_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(start_n * BLOCK_N + BLOCK_N + lo_off, S)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        vis = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] >= (offs_m - lo_off)[None, :]) & row_ok[None, :]
        p_t = tl.where(vis, tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)

    if HAS_COMPACT:
        c_lo = tl.load(CUM + b * (S + 1) + offs_n, mask=col_ok, other=0)
        c_hi = tl.load(CUM + b * (S + 1) + offs_n + 1, mask=col_ok, other=0)
        listed = c_hi > c_lo
        c_off = bh.to(tl.int64) * S * HEAD_DIM + c_lo[:, None] * HEAD_DIM + offs_d[None, :]
        dk += tl.load(DKC + c_off, mask=listed[:, None], other=0.0)
        dv += tl.load(DVC + c_off, mask=listed[:, None], other=0.0)

    dk_base = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])



@triton.jit
def _sep_gather_kernel(
    K, V, KC, VC, POS, CUM,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Copies the listed K/V rows of one batch-head, in list order, into contiguous ``[B, H, S, D]`` buffers.

    Only the first ``cum[b, S]`` rows of each buffer are written; the rest is never read unmasked.
    """
    bh = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    b = bh // H
    h = bh % H
    n_c = tl.load(CUM + b * (S + 1) + S)
    if start < n_c:
        offs = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        ok = offs < n_c
        kpos = tl.load(POS + b * S + offs, mask=ok, other=0)
        k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + kpos[:, None] * stride_ks
                    + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + kpos[:, None] * stride_vs
                    + offs_d[None, :], mask=ok[:, None], other=0.0)
        c_off = bh.to(tl.int64) * S * HEAD_DIM + offs[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(KC + c_off, k, mask=ok[:, None])
        tl.store(VC + c_off, v, mask=ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Fused backward (sep_attn_kernel_backward: fused). Each kept (query block, key tile) pair is visited once, with
# 5 matmuls (S, dP, dV, dK, dQ) instead of the split backward's 7 (its dQ kernel recomputes P a second time), as
# FlashAttention-2 does: dK/dV accumulate in registers of the key-tile program, dQ is added in float32 to DQA by
# atomics. Two launches, band first:
#   1. _sep_bwd_fused_band_kernel: key blocks x their window's queries; it also computes delta = rowsum(dO * O)
#      of every query block it visits (each query block is visited by the key block holding its first row; all
#      visitors write the same value), and leaves the band share of a listed key's dK/dV in DKVC (float32, slot
#      cum[k]); other keys' dK/dV are final.
#   2. _sep_bwd_fused_compact_kernel: list tiles x the queries that see them outside their window; it adds the
#      band share from DKVC and writes the listed keys' dK/dV once (one rounding per gradient, as the split path).
# No gathered K/V is needed: a compact program loads its own list tile once.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sep_bwd_fused_band_kernel(
    Q, K, V, O, DO, DK, DV, DQA, DKVC, LSE, DELTA, CUM,
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    H, S, lo_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COMPACT: tl.constexpr,
):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    dqa_base = DQA + bh.to(tl.int64) * S * HEAD_DIM
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = ((start_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(start_n * BLOCK_N + BLOCK_N + lo_off, S)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        o = tl.load(o_base + offs_m[:, None] * stride_os + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * S + offs_m, delta, mask=row_ok)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        vis = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] >= (offs_m - lo_off)[None, :]) & row_ok[None, :]
        p_t = tl.where(vis, tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        dq = tl.dot(tl.trans(ds_t), k) * sm_scale
        tl.atomic_add(dqa_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=row_ok[:, None],
                      sem="relaxed")

    final = col_ok
    if HAS_COMPACT:
        c_lo = tl.load(CUM + b * (S + 1) + offs_n, mask=col_ok, other=0)
        c_hi = tl.load(CUM + b * (S + 1) + offs_n + 1, mask=col_ok, other=0)
        listed = c_hi > c_lo
        c_off = bh.to(tl.int64) * S * HEAD_DIM + c_lo[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DKVC + c_off, dk, mask=listed[:, None])
        tl.store(DKVC + tl.num_programs(1).to(tl.int64) * S * HEAD_DIM + c_off, dv, mask=listed[:, None])
        final = col_ok & (c_hi == c_lo)
    dk_base = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=final[:, None])
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=final[:, None])


@triton.jit
def _sep_bwd_fused_compact_kernel(
    Q, K, V, DO, DK, DV, DQA, DKVC, LSE, DELTA, POS, CUM,
    sm_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    H, S, lo_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    start_j = tl.program_id(1)  # early list entries (seen by the most queries) first
    b = bh // H
    h = bh % H
    n_c = tl.load(CUM + b * (S + 1) + S)
    if start_j * BLOCK_N < n_c:
        offs_j = start_j * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        ok_j = offs_j < n_c
        # Padding slots get position S, which no query sees through the compact part.
        kpos = tl.load(POS + b * S + offs_j, mask=ok_j, other=S)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        dqa_base = DQA + bh.to(tl.int64) * S * HEAD_DIM
        k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :], mask=ok_j[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :], mask=ok_j[:, None], other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        first_q = tl.min(kpos, 0) + lo_off + 1
        lo = (first_q // BLOCK_M) * BLOCK_M
        last_k = tl.max(tl.where(ok_j, kpos, 0), 0)
        mid = tl.minimum(((last_k + lo_off + 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, S)
        mid = tl.maximum(mid, lo)
        for start_m in range(lo, mid, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < S
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
            vis = (kpos[:, None] < (offs_m - lo_off)[None, :]) & row_ok[None, :]
            p_t = tl.where(vis, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q)
            dq = tl.dot(tl.trans(ds_t), k) * sm_scale
            tl.atomic_add(dqa_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
        # Every query from `mid` on sees every entry of the tile. Padding entries (k = v = 0) are masked anyway:
        # their exp2(0 - lse) can overflow for a row whose scores are all very negative, and inf * 0 in the dQ
        # product would be NaN. Rows past S have q = dO = 0 and lse = delta = 0 (finite, and never stored).
        for start_m in range(mid, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < S
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
            p_t = tl.where(ok_j[:, None], tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q)
            dq = tl.dot(tl.trans(ds_t), k) * sm_scale
            tl.atomic_add(dqa_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
        # Add the band share the band kernel left in slot j, then write each listed key's gradient once.
        c_off = bh.to(tl.int64) * S * HEAD_DIM + offs_j[:, None] * HEAD_DIM + offs_d[None, :]
        dk += tl.load(DKVC + c_off, mask=ok_j[:, None], other=0.0)
        dv += tl.load(DKVC + tl.num_programs(0).to(tl.int64) * S * HEAD_DIM + c_off, mask=ok_j[:, None], other=0.0)
        dk_base = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
        dv_base = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
        tl.store(dk_base + kpos[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=ok_j[:, None])
        tl.store(dv_base + kpos[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=ok_j[:, None])
