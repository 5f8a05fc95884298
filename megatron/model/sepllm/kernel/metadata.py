"""Per-micro-batch metadata of the Sep-Attention kernel.

Built once per forward from the separator flags and the initial-token offsets and shared by every layer (it
does not depend on the window, so per-layer windows reuse it). Everything is ``O(B * S)``, built with a few
vectorised GPU ops and no host synchronisation: no ``B x S x S`` tensor, nothing whose shape depends on the
number of separators, hence no recompilation when separator positions change.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SepMetadata(NamedTuple):
    """Where the always-visible (separator or initial) keys are, per batch row.

    ``positions[b, :cum[b, S]]`` lists the positions ``k`` with ``listed[b, k]`` in increasing order (the rest of
    the row is 0 padding, never read). ``cum[b, x]`` counts listed positions ``< x``, so for a query block the
    kernel finds how many listed keys lie left of its window with one load, and ``cum[b, k]`` is the slot of a
    listed key ``k`` in the compact list.
    """

    positions: torch.Tensor  # [B, S] int32
    cum: torch.Tensor  # [B, S + 1] int32
    listed: torch.Tensor  # [B, S] bool: separator or initial token


def build_sep_metadata(sep_flags: torch.Tensor, init_start: torch.Tensor, n_init: int) -> SepMetadata:
    """Builds :class:`SepMetadata` from ``sep_flags [B, S]`` (bool) and ``init_start [B]`` (int64).

    ``n_init`` initial tokens start at ``init_start[b]`` in row ``b`` (positions past the end are ignored).
    """
    if sep_flags.dim() != 2:
        raise ValueError(f"sep_flags must be [B, S], got shape {tuple(sep_flags.shape)}")
    bsz, seq = sep_flags.shape
    if init_start.shape != (bsz,):
        raise ValueError(f"init_start must be [B]=[{bsz}], got shape {tuple(init_start.shape)}")
    if n_init < 0:
        raise ValueError(f"n_init must be >= 0, got {n_init}")
    dev = sep_flags.device
    k_idx = torch.arange(seq, device=dev).view(1, seq)
    start = init_start.to(device=dev, dtype=torch.long).view(bsz, 1)
    listed = sep_flags.bool() | ((k_idx >= start) & (k_idx < start + n_init))
    # A leading zero column then the running count (no ``out=`` into a strided view: torch.compile breaks on it).
    cum = torch.nn.functional.pad(torch.cumsum(listed, dim=1, dtype=torch.int32), (1, 0))
    # Scatter every listed position to its slot; unlisted ones go to a spare column that is cut off.
    slot = torch.where(listed, cum[:, :-1].long(), torch.full_like(k_idx, seq).expand(bsz, seq))
    positions = torch.zeros(bsz, seq + 1, dtype=torch.int32, device=dev)
    positions.scatter_(1, slot, k_idx.expand(bsz, seq).to(torch.int32))
    return SepMetadata(positions[:, :seq].contiguous(), cum, listed)
