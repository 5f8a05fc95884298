"""Values set by the launcher or on each rank, never by a user's YAML."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class RuntimeArgs:
    """Launch-time and rank-time state carried in the resolved config."""

    global_num_gpus: Optional[int] = arg(
        None, "Total ranks: hostfile slots, visible GPUs, or CPU processes (WORLD_SIZE on a rank).",
        role="internal")
    data_parallel_size: Optional[int] = arg(None, "global_num_gpus / (pp x mp).", role="internal")
    is_pipe_parallel: bool = arg(False, "pipe_parallel_size >= 1.", role="internal")
    rank: Optional[int] = arg(None, "Global rank (RANK on a rank).", role="internal")
    local_rank: Optional[int] = arg(None, "Rank on this node (LOCAL_RANK).", role="internal")
    world_size: Optional[int] = arg(None, "WORLD_SIZE on a rank.", role="internal")
    iteration: Optional[int] = arg(None, "Current iteration (set by the training loop).", role="internal")
    user_script: Optional[str] = arg(None, "Script deepy.py launched (train.py, eval.py, generate.py).",
                                     role="internal")
    config_paths: Optional[list] = arg(
        None, "Absolute paths of the user's YAML files, in merge order.", role="internal")
    config_files: Optional[dict] = arg(
        None, "File name -> text of the user's YAML files (the checkpoint code writes them to "
              "<save>/global_stepN/configs/).", role="internal")
    user_keys: Optional[list] = arg(
        None, "Keys the user gave explicitly (after normalisation); lets a rank re-run derivation exactly.",
        role="internal")
    gpt_neox_keys_off: Optional[list] = arg(
        None, "GPT-NeoX keys of features this project does not have, given at GPT-NeoX's default (the feature off): "
              "dropped when the config loads and named once at launch (megatron/neox_arguments/gpt_neox_features.py).",
        role="internal")
    load_was_empty: Optional[str] = arg(
        None, "The `load` directory, the same as `save`, that held no checkpoint when the launcher resolved the "
              "config: training started from iteration 0 and `load` was cleared.", role="internal")
    missing_hostfile: Optional[str] = arg(
        None, "The config file's `hostfile` that names no file: the launch used local resources only, as "
              "DeepSpeed's runner does (a --hostfile given on the command line must exist).", role="internal")
    neox_config_file: Optional[str] = arg(
        None, "Path of the resolved config this rank was started with.", role="internal")
