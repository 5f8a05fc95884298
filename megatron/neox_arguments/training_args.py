"""Batch sizes, iterations, evaluation and checkpointing."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class TrainingArgs:
    """How long to train, with what batch, and when to evaluate and save."""

    train_batch_size: Optional[int] = arg(
        None, "Global batch in sequences = micro batch x accumulation x data-parallel size. Give any two of "
              "the three; the third is derived and all three are checked.")
    train_micro_batch_size_per_gpu: Optional[int] = arg(None, "Sequences per rank per forward pass (alias `batch_size`).")
    gradient_accumulation_steps: Optional[int] = arg(None, "Micro batches accumulated per step (alias `gas`).")
    train_iters: Optional[int] = arg(None, "Number of optimizer steps (required for training).")
    eval_interval: int = arg(1000, "Run validation every this many iterations.")
    eval_iters: int = arg(100, "Validation / test micro-batch iterations per evaluation.")
    seed: int = arg(1234, "Random seed for python, numpy and torch.")
    save: Optional[str] = arg(None, "Directory checkpoints are written to.")
    load: Optional[str] = arg(
        None, "Directory to resume from; must hold a `latest` file or a global_step* directory. As in GPT-NeoX's "
              "local_setup.yml, `load` may be the `save` directory before its first checkpoint (or before it "
              "exists): training then starts from iteration 0 with a notice (recorded as load_was_empty). A "
              "different directory without a checkpoint is an error, so a typo never trains from scratch.")
    checkpoint_factor: Optional[int] = arg(
        None, "Save every this many iterations (alias `save_interval`). None: only at the end / on signal.")
    extra_save_iters: Optional[list] = arg(None, "Additional iterations at which to save.")
    keep_last_n_checkpoints: Optional[int] = arg(
        None, "Keep only the newest N complete global_step* directories (and always the one `latest` names); older "
              "ones are deleted after the new checkpoint and `latest` are in place.")
    no_save_optim: bool = arg(
        False, "Save checkpoints without optimizer states (smaller); resuming one needs no_load_optim or finetune.")
    no_save_rng: bool = arg(False, "Save checkpoints without RNG states (a resume then keeps the seed's streams).")
    no_load_optim: bool = arg(False, "Resume with a fresh optimizer (weights, iteration and data position loaded).")
    no_load_rng: bool = arg(False, "Resume without restoring the checkpoint's RNG states.")
    finetune: bool = arg(False, "Load weights only and restart at iteration 0.")
    checkpoint_tensor_names: str = arg(
        "v2.0", "Project key: how checkpoints name an ungated (gelu) MLP's tensors. `v2.0`: `mlp.dense_h_to_4h` / "
                "`mlp.dense_4h_to_h`, as Pythia-era GPT-NeoX writes and reads them; `current`: `mlp.linear1` / "
                "`mlp.linear2`, as GPT-NeoX since 0d4bdb96 (Sep 2024) does, so that it resumes the checkpoint. "
                "Checkpoints of either naming load; gated (swiglu) MLPs are `linear1` / `linear2` in both.",
        choices=("v2.0", "current"))
    checkpoint_validation_with_forward_pass: bool = arg(
        False, "GPT-NeoX: save a forward pass with the checkpoint and compare it after loading. Not implemented: "
               "true is refused (resumes are tested bitwise instead).")
    checkpoint_save_failure: str = arg(
        "exit", "Project key: what a failed checkpoint save (full disk, I/O error) does. The partial checkpoint is "
                "removed and the previous one and `latest` are kept either way; `exit` then stops the run with exit "
                "code 3, `continue` logs the failure and trains on (the next scheduled save tries again).",
        choices=("exit", "continue"))
    exit_interval: Optional[int] = arg(None, "Exit (after saving) when the iteration is divisible by this.")
    max_consecutive_bad_steps: int = arg(
        10, "Project key: stop training after this many consecutive steps with NaN/inf loss (skipped steps).")
    deepspeed_activation_checkpointing: bool = arg(
        True, "GPT-NeoX: use DeepSpeed's activation checkpointing. No effect: activation checkpointing here is "
              "torch.utils.checkpoint (non-reentrant) either way.")
