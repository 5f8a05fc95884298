"""KV-retention ratio and attention-map density (``PRINT_KV_RATIO``, ``print_ratio_intervals``).

For each layer, from the micro-batch's metadata and the layer's window, in closed form
(:func:`megatron.model.sepllm.rule.kept_counts`, O(B*S) per distinct window, on the tokens' device):

- KV kept: allowed keys of the **last query row**, over ``B * S`` (the KV cache a generator would keep
  at the end of the sequence);
- attention-map density: allowed entries of the whole mask, over ``B * (1 + S) * S / 2`` (the causal
  entries);

and both summed over layers for the overall ratio, each as ``(kept + 1e-6) / (total + 1e-6)`` like the
reference. Unlike the reference, counts stay on the device as tensors (no sync per layer) until the log
step reads them once, and the batch reported is the one just trained (no one-batch lag).

Wiring: the trainer owns one :class:`KVRatioTracker` (``megatron.training.Trainer``). It feeds it the
token ids of every training micro-batch it reads (never evaluation batches), and at each log step asks
:meth:`KVRatioTracker.report_if_due` for the statistics of the micro-batches since the last report, once
``print_ratio_intervals`` forwards were seen (else nothing); they go to the log under ``sepllm/``. The
model's metadata builder knows nothing of it. Use::

    tracker = KVRatioTracker(neox_args)            # tracker.enabled is False when off
    tracker.observe(tokens)                         # every micro-batch, tokens [B, S] fed to the model
    if tracker.due(iteration): metrics.update(tracker.summary())   # one host sync
"""
from typing import Dict, List, Optional

import torch

from megatron.model.sepllm import rule
from megatron.model.sepllm.meta import AttnMeta, build_attn_meta


def layer_counts(meta: AttnMeta, windows: List[int], num_init: int, exclude_diagonal: bool = True,
                 use_separators: bool = True, intervals: Optional[List[int]] = None) -> torch.Tensor:
    """``[L, 2]`` int64 on the metadata's device: (last-row kept, map kept) summed over the batch.
    ``intervals`` (FixLLM, one per layer): the fixed-interval keys take the separators' place."""
    sep_flags = meta.sep_flags if use_separators else torch.zeros_like(meta.sep_flags)
    positions = torch.arange(sep_flags.shape[1], device=sep_flags.device)
    by_setting: Dict[tuple, torch.Tensor] = {}
    rows = []
    for layer, window in enumerate(windows):
        interval = None if intervals is None else int(intervals[layer])
        if (window, interval) not in by_setting:
            flags = sep_flags if interval is None else rule.fixed_interval_flags(positions, meta.init_start, interval)
            last, full = rule.kept_counts(flags, meta.init_start, num_init, window, exclude_diagonal)
            by_setting[(window, interval)] = torch.stack([last.sum(), full.sum()])
        rows.append(by_setting[(window, interval)])
    return torch.stack(rows)


def summarize(kept: torch.Tensor, batch: int, seq: int, prefix: str = "") -> Dict[str, float]:
    """Scalars for logging from ``kept`` ``[L, 2]`` counts of ``batch`` rows of length ``seq``.

    Keys: ``{prefix}kv_ratio``, ``{prefix}attn_density`` (overall) and ``.../layer_XX`` per layer.
    """
    kv_total, map_total = rule.kv_ratio_totals(batch, seq)
    values = kept.detach().double().cpu().tolist()  # the single host sync
    layers = len(values)
    out = {
        f"{prefix}kv_ratio": rule.ratio(sum(v[0] for v in values), kv_total * layers),
        f"{prefix}attn_density": rule.ratio(sum(v[1] for v in values), map_total * layers),
    }
    for i, (last, full) in enumerate(values):
        out[f"{prefix}kv_ratio/layer_{i:02d}"] = rule.ratio(last, kv_total)
        out[f"{prefix}attn_density/layer_{i:02d}"] = rule.ratio(full, map_total)
    return out


def kv_statistics(tokens: torch.Tensor, neox_args) -> Dict[str, float]:
    """The statistics of one batch of token ids ``[B, S]`` under the configuration (one sync)."""
    tracker = KVRatioTracker(neox_args, force=True)
    tracker.observe(tokens)
    return tracker.summary(include_cumulative=False)


class KVRatioTracker:
    """Accumulates per-layer counts over micro-batches on the device; summarises at log time."""

    def __init__(self, neox_args, force: bool = False):
        self.args = neox_args
        mode = neox_args.attention_variant
        self.enabled = (force or bool(neox_args.PRINT_KV_RATIO)) and mode != "full"
        self.interval = int(neox_args.print_ratio_intervals)
        if self.interval < 1:
            raise ValueError(f"print_ratio_intervals must be >= 1, got {self.interval}")
        self.use_separators = rule.keeps_separators(mode)
        self.intervals = list(neox_args.fixed_sep_intervals_list) if mode == "fixllm" and self.enabled else None
        self.num_layers = int(neox_args.num_layers)
        self.windows = rule.layer_windows(neox_args, self.num_layers, "prefill") if self.enabled else []
        self.num_init = rule.num_initial_tokens(neox_args.init_tok_max_idx)
        self.exclude_diagonal = bool(neox_args.EXCLUDE_DIAGONAL)
        self._since: Optional[torch.Tensor] = None  # counts since the last summary
        self._since_shape = [0, 0]  # rows, seq
        self._total: Optional[torch.Tensor] = None  # counts since the start
        self._total_rows = 0
        self._seq = 0
        self._calls_since = 0  # forward calls since the last summary

    def observe(self, tokens: torch.Tensor, meta: Optional[AttnMeta] = None):
        """Adds one micro-batch (``tokens [B, S]`` as fed to the model, or its ``meta``)."""
        if not self.enabled:
            return
        if meta is None:
            meta = build_attn_meta(tokens, None, self.args)
        counts = layer_counts(meta, self.windows, self.num_init, self.exclude_diagonal, self.use_separators,
                              self.intervals)
        bsz, seq = meta.sep_flags.shape
        if self._seq and seq != self._seq:
            raise ValueError(f"KV statistics: sequence length changed from {self._seq} to {seq}")
        self._seq = seq
        self._since = counts if self._since is None else self._since + counts
        self._total = counts if self._total is None else self._total + counts
        self._since_shape[0] += bsz
        self._total_rows += bsz
        self._calls_since += 1

    def due(self, iteration: int) -> bool:
        """True when statistics should be reported at this iteration (``print_ratio_intervals``)."""
        return self.enabled and self._since is not None and iteration % self.interval == 0

    def summary(self, include_cumulative: bool = True) -> Dict[str, float]:
        """Ratios of the micro-batches since the last summary (and cumulative ones); resets the window."""
        if not self.enabled or self._since is None:
            return {}
        out = summarize(self._since, self._since_shape[0], self._seq)
        if include_cumulative:
            cumulative = summarize(self._total, self._total_rows, self._seq, prefix="cum_")
            out["cum_kv_ratio"] = cumulative["cum_kv_ratio"]
            out["cum_attn_density"] = cumulative["cum_attn_density"]
        self._since = None
        self._since_shape = [0, 0]
        self._calls_since = 0
        return out

    def report_if_due(self) -> Dict[str, float]:
        """The summary once ``print_ratio_intervals`` training forwards were observed since the last one."""
        if self._calls_since < self.interval:
            return {}
        return self.summary()
