"""Slow, obviously-correct twins of the Sep-Attention kernel.

Two references live here:

* :func:`dense_sep_mask` / :func:`sep_attention_reference` build the dense ``[B, S, S]`` allowed-mask from the
  SepLLM predicate and run plain softmax attention on it. This is the CPU fallback of
  :func:`~megatron.model.sepllm.kernel.sep_attention` and the ground truth of the tests.
* :func:`sep_attention_decomposed` computes the same result the way the Triton kernel does: a compact list of
  separator/initial keys outside the local window plus a banded window, merged through their log-sum-exp.
  It exists so the decomposition (and the metadata it reads) can be checked on CPU against the dense mask.

The predicate (SEPLLM_REFERENCE section 3.3): key ``k`` is visible to query ``q`` of row ``b`` iff ``k <= q`` and
(``init_start[b] <= k < init_start[b] + n_init`` or ``sep_flags[b, k]`` or ``q - k <= window - E``), with
``E = int(exclude_diagonal)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.model.sepllm.rule import dense_mask


def dense_sep_mask(
    sep_flags: torch.Tensor, init_start: torch.Tensor, n_init: int, window: int, exclude_diagonal: bool = True
) -> torch.Tensor:
    """Boolean ``[B, S, S]`` mask, True where query (dim 1) may attend key (dim 2): the project's one SepLLM
    rule (:func:`megatron.model.sepllm.rule.dense_mask`), so the kernel is tested against the same predicate
    as every other path."""
    return dense_mask(sep_flags.bool(), init_start, n_init, window, exclude_diagonal)


def expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, H_kv, S, D]`` -> ``[B, heads, S, D]``, each key/value head repeated for its group of query heads."""
    if t.shape[1] == heads:
        return t
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def sep_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep_flags: torch.Tensor,
    init_start: torch.Tensor,
    n_init: int,
    window: int,
    exclude_diagonal: bool = True,
    scale: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Dense-mask attention (``O(S^2)`` memory). ``compute_dtype`` defaults to float32 for 16-bit inputs.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention): query head ``h`` reads head
    ``h // (H / H_kv)``; this slow twin simply repeats them."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    mask = dense_sep_mask(sep_flags, init_start, n_init, window, exclude_diagonal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(q.dtype)


def _masked_lse_attention(scores: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
    """Softmax attention over the visible entries; returns (output, log-sum-exp), safe for empty rows."""
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - finite_lse.unsqueeze(-1))
    return torch.matmul(probs, values), lse


def sep_attention_decomposed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta,
    window: int,
    exclude_diagonal: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The kernel's algorithm in plain torch (float32): compact part + banded part, merged by log-sum-exp.

    ``meta`` is a :class:`~megatron.model.sepllm.kernel.metadata.SepMetadata`. The compact part sees the listed
    (separator or initial) keys strictly left of the window, ``pos < q - (window - E)``; the band sees every key
    in ``[q - (window - E), q]``. The two sets are disjoint, so nothing is counted twice.
    """
    bsz, heads, seq, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    lo_off = window - int(exclude_diagonal)
    qf, kf, vf = (expand_kv_heads(t, heads).float() for t in (q, k, v))
    q_pos = torch.arange(seq, device=q.device)

    # Compact part: gather the listed keys of each row (padded to the longest row).
    counts = meta.cum[:, seq].long()
    n_max = max(int(counts.max()), 1)
    slots = torch.arange(n_max, device=q.device)
    pos = meta.positions[:, :n_max].long()  # [B, N]
    listed = slots.view(1, n_max) < counts.view(bsz, 1)
    gather_idx = pos.clamp(max=seq - 1).view(bsz, 1, n_max, 1).expand(bsz, heads, n_max, dim)
    kc = torch.gather(kf, 2, gather_idx)
    vc = torch.gather(vf, 2, gather_idx)
    vis_c = listed.view(bsz, 1, 1, n_max) & (pos.view(bsz, 1, 1, n_max) < (q_pos - lo_off).view(1, 1, seq, 1))
    out_c, lse_c = _masked_lse_attention(torch.matmul(qf, kc.transpose(-1, -2)) * scale, vc, vis_c)

    # Band part: the window, as an explicit key range per query.
    k_pos = q_pos.view(1, seq)
    vis_b = (k_pos <= q_pos.view(seq, 1)) & (k_pos >= (q_pos - lo_off).view(seq, 1))
    out_b, lse_b = _masked_lse_attention(torch.matmul(qf, kf.transpose(-1, -2)) * scale, vf, vis_b.view(1, 1, seq, seq))

    lse = torch.logaddexp(lse_c, lse_b)
    w_c = torch.exp(lse_c - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (w_c * out_c + w_b * out_b).to(q.dtype)
