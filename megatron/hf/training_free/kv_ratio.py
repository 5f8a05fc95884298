"""``PRINT_KV_RATIO`` for the training-free path, counted and printed as the reference does (§3.7).

Per forward, over all layers, from the allowed masks the layers used:

- KV kept: allowed keys of the **last query row** over ``B * T`` (``T`` = keys seen, padding included);
- attention map: allowed entries of the whole ``B x q x T`` mask over ``B * (1 + T) * q / 2``.

A batch is one prefill and the decode steps after it; each forward overwrites the batch's counts, so a batch
contributes the state of its last step. At the start of each prefill the previous batch is added to the running
totals and the prefill is counted; every ``print_ratio_intervals``-th prefill prints four lines (that batch and
the totals, KV then map), each ratio ``(kept + 1e-6) / (total + 1e-6)``. The totals therefore lag one batch, as
the reference's do; :meth:`KVRatioPrinter.summary` gives the values with the current batch included. Counts stay
tensors on the model's device until a line is printed.
"""
from typing import Callable, Dict, List, Optional

import torch

from megatron.hf import rule  # the rule module, without the trainer's imports

PREFIX = "[SepLLM training-free]"


class KVRatioPrinter:
    def __init__(self, interval: int, out: Callable[[str], None] = None):
        if interval < 1:
            raise ValueError(f"print_ratio_intervals must be >= 1, got {interval}")
        self.interval = int(interval)
        self.out = out or (lambda line: print(line, flush=True))
        self.batch: Optional[List] = None  # [kv kept, kv total, map kept, map total] of the latest forward
        self.totals: List = [0, 0, 0, 0]
        self.prefills = 0

    def start_prefill(self) -> None:
        """A new batch begins: fold the previous one into the totals, count the prefill, maybe print."""
        if self.batch is not None:
            self.totals = [t + b for t, b in zip(self.totals, self.batch)]
        self.prefills += 1
        if self.prefills % self.interval == 0 and self.batch is not None:
            self._print(self.batch, self.totals)
        self.batch = None

    def record(self, counts: List) -> None:
        """The counts of one forward (its layers summed), replacing the batch's previous step."""
        self.batch = list(counts)

    def summary(self) -> Dict[str, float]:
        """Cumulative ratios including the current batch."""
        totals = self.totals if self.batch is None else [t + b for t, b in zip(self.totals, self.batch)]
        kv_kept, kv_total, map_kept, map_total = (float(v) for v in totals)
        return {"kv_ratio": rule.ratio(kv_kept, kv_total), "attn_density": rule.ratio(map_kept, map_total),
                "kv_kept": kv_kept, "kv_total": kv_total}

    def _print(self, batch, totals) -> None:
        b = [int(v) for v in batch]
        t = [int(v) for v in totals]
        self.out(f"{PREFIX} Kept/Total tokens for this batch: ({b[0]}, {b[1]}), ratio = {rule.ratio(b[0], b[1]):.4f}")
        self.out(f"{PREFIX} Kept/Total tokens for all the inputs: ({t[0]}, {t[1]}), "
                 f"ratio = {rule.ratio(t[0], t[1]):.4f}")
        self.out(f"{PREFIX} Kept/Total attention-map entries for this batch: ({b[2]}, {b[3]}), "
                 f"ratio = {rule.ratio(b[2], b[3]):.4f}")
        self.out(f"{PREFIX} Kept/Total attention-map entries for all the inputs: ({t[2]}, {t[3]}), "
                 f"ratio = {rule.ratio(t[2], t[3]):.4f}")


def mask_counts(allowed: torch.Tensor, seen: int) -> List:
    """``[kv kept, kv total, map kept, map total]`` of one layer's allowed mask ``[B, q, kv]`` over ``seen`` keys."""
    bsz, q_len, _ = allowed.shape
    kv_total, _ = rule.kv_ratio_totals(bsz, seen)
    return [allowed[:, -1, :].sum(), kv_total, allowed.sum(), bsz * (1 + seen) * q_len // 2]
