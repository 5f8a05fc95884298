"""Reading the model weights of a trainer checkpoint (``<save>/global_stepN``) in any layout it is written in.

* Pipeline layer files ``layer_XX-model_YY-model_states.pt`` (one per pipeline layer and tensor-parallel rank).
* The sequential ``mp_rank_YY_model_states.pt`` (keys ``sequential.<idx>.``).
* ZeRO-3 ``zero_pp_rank_*`` shards, gathered through DeepSpeed's own consolidation.

Layer indices are the pipeline layer list's: 0 embedding, 2..L+1 blocks, L+3 final norm, L+4 output layer.
The exporter, in-memory inference loading and the trainer's resume checks read checkpoints through here, so a
damaged checkpoint gives the same one-line :class:`CheckpointError` (naming the file) everywhere.
"""
import os
import re
from typing import Dict, List, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the config describes it (the message names the file or tensor)."""


def load_state_file(path: str):
    """``torch.load`` of one checkpoint file; truncated or corrupt files raise :class:`CheckpointError` naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        # torch reports a truncated zip archive as RuntimeError ('PytorchStreamReader failed ...') and an empty
        # or cut legacy pickle as EOFError / UnpicklingError (a ValueError subclass is not guaranteed).
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(exc).__name__}: {exc})") from exc


class CheckpointReader:
    """Reads per-layer state dicts from either checkpoint layout, one list entry per TP rank."""

    LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
    MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
    ZERO3_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
    SEQ_KEY = re.compile(r"sequential\.(\d+)\.")

    def __init__(self, input_dir: str, num_layers: int):
        if not os.path.isdir(input_dir):
            raise CheckpointError(f"--input_dir {input_dir} is not a directory")
        self.input_dir = input_dir
        self.num_layers = num_layers
        names = os.listdir(input_dir)
        layer_files = [n for n in names if self.LAYER_FILE.match(n)]
        mp_files = sorted(n for n in names if self.MP_FILE.match(n))
        self.sequential = not layer_files
        self._seq_states: List[Dict] = []
        self.zero3 = self.sequential and not mp_files and any(self.ZERO3_FILE.match(n) for n in names)
        if self.zero3:
            mp = {int(m.group(2)) for n in names for m in [self.ZERO3_FILE.match(n)] if m}
            if mp != {0}:
                raise CheckpointError(f"{input_dir}: ZeRO-3 shards of {len(mp)} model-parallel ranks; DeepSpeed's "
                                      "consolidation gathers one model-parallel rank only")
            self._seq_states.append(self._gather_zero3(input_dir))
            self.tp = 1
        elif self.sequential:
            if not mp_files:
                raise CheckpointError(f"{input_dir} holds neither layer_XX-model_YY-model_states.pt files nor "
                                      "mp_rank_XX_model_states.pt nor ZeRO-3 zero_pp_rank_* shards")
            for name in mp_files:
                blob = load_state_file(os.path.join(input_dir, name))
                module = blob.get("module") if isinstance(blob, dict) else None
                if not module:
                    raise CheckpointError(f"{os.path.join(input_dir, name)} has no 'module' state dict (a pipeline "
                                          "checkpoint whose layer files are missing?)")
                self._seq_states.append(module)
            self.tp = len(self._seq_states)
        else:
            ranks = {int(self.LAYER_FILE.match(n).group(2)) for n in layer_files}
            self.tp = max(ranks) + 1
            missing = [r for r in range(self.tp) if r not in ranks]
            if missing:
                raise CheckpointError(f"{input_dir}: layer files of model-parallel ranks {missing} are missing")

    @staticmethod
    def _gather_zero3(input_dir: str) -> Dict:
        """ZeRO-3 keeps every parameter partitioned across the data-parallel ranks' shards; DeepSpeed's own
        consolidation rebuilds the full fp32 module state dict (``sequential.<idx>.`` keys)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        path = os.path.abspath(input_dir)
        try:
            return dict(get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path)))
        except Exception as exc:  # DeepSpeed raises assorted types for incomplete shard sets
            raise CheckpointError(f"{input_dir}: cannot gather the ZeRO-3 shards: {exc}") from exc

    def layer_indices(self) -> List[int]:
        """Pipeline layer indices present (of TP rank 0), without loading any layer file."""
        if self.sequential:
            found = {int(m.group(1)) for k in self._seq_states[0] for m in [self.SEQ_KEY.match(k)] if m}
        else:
            found = {int(m.group(1)) for n in os.listdir(self.input_dir) for m in [self.LAYER_FILE.match(n)]
                     if m and int(m.group(2)) == 0}
        return sorted(found)

    def source(self, idx: int) -> str:
        """The file that holds layer ``idx`` (TP rank 0), for messages."""
        if self.sequential:
            name = "ZeRO-3 shards zero_pp_rank_*" if self.zero3 else "mp_rank_00_model_states.pt"
            return os.path.join(self.input_dir, f"{name} (sequential.{idx}.*)")
        return os.path.join(self.input_dir, f"layer_{idx:02d}-model_00-model_states.pt")

    def layer(self, idx: int, required: bool = True, file_names: bool = False) -> Optional[List[Dict]]:
        """State dicts of pipeline layer ``idx`` for every TP rank (prefix stripped). An ungated MLP is under the
        module names whichever GPT-NeoX naming the file has (megatron/model/neox_names.py), unless
        ``file_names``."""
        from megatron.model.neox_names import normalise_layer

        found = self._layer(idx, required)
        if found is None or file_names:
            return found
        return [normalise_layer(state) for state in found]

    def _layer(self, idx: int, required: bool) -> Optional[List[Dict]]:
        if self.sequential:
            prefix = f"sequential.{idx}."
            out = [{k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} for sd in self._seq_states]
            if not out[0]:
                if required:
                    raise CheckpointError(f"{self.input_dir}: no keys 'sequential.{idx}.*' (layer {idx}) in "
                                          "mp_rank_XX_model_states.pt")
                return None
            return out
        out = []
        for rank in range(self.tp):
            path = os.path.join(self.input_dir, f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
            if not os.path.isfile(path):
                if required:
                    raise CheckpointError(f"missing layer file {path} (layer {idx}, model-parallel rank {rank})")
                return None
            out.append(load_state_file(path))
        return out
