"""A dataset that interleaves several datasets following their weights exactly and deterministically."""
from __future__ import annotations

import numpy as np
import torch

from megatron.data import helpers


class BlendableDataset(torch.utils.data.Dataset):
    """Blend of `datasets` with `weights` (normalised here), in GPT-NeoX's order.

    Its length is the sum of the datasets' lengths. Sample k comes from dataset `dataset_index[k]`,
    which is chosen greedily so that after every step each dataset's share is as close as possible to
    its weight (`helpers.build_blending_indices`); within a dataset samples are taken in order. The
    order depends only on the weights and the total length, so it is the same on every rank and run.
    """

    def __init__(self, datasets, weights):
        datasets = list(datasets)
        weights = np.array(weights, dtype=np.float64)
        if len(datasets) == 0:
            raise ValueError("BlendableDataset needs at least one dataset")
        if weights.ndim != 1 or weights.shape[0] != len(datasets):
            raise ValueError(
                f"BlendableDataset got {len(datasets)} datasets but {weights.size} weights; they must match"
            )
        if len(datasets) >= 255:
            raise ValueError(f"BlendableDataset supports at most 254 datasets, got {len(datasets)}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"blending weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
        self.datasets = datasets
        self.weights = weights / weights.sum()
        self.size = sum(len(d) for d in datasets)
        self.dataset_index, self.dataset_sample_index = helpers.build_blending_indices(self.weights, self.size)
        self._warned_wrap = False

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        idx = int(idx)
        if not 0 <= idx < self.size:
            # GPT-NeoX wraps out-of-range indices instead of failing.
            wrapped = idx % self.size
            if not self._warned_wrap:
                print(f"WARNING: blended sample index {idx} is out of range, using {wrapped} (modulo)")
                self._warned_wrap = True
            idx = wrapped
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
