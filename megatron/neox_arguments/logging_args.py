"""Console, TensorBoard and wandb logging."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class LoggingArgs:
    """What is logged where, and the peak FLOP/s used for MFU."""

    log_interval: int = arg(100, "Print/log training metrics every this many iterations.")
    log_dir: Optional[str] = arg(None, "Directory for text logs.")
    tensorboard_dir: Optional[str] = arg(None, "Directory for TensorBoard event files (None: no TensorBoard).")
    use_wandb: bool = arg(False, "Log to Weights & Biases (offline unless an API key is configured).")
    wandb_project: str = arg("neox", "wandb project name.")
    wandb_group: Optional[str] = arg(None, "wandb group name.")
    wandb_team: Optional[str] = arg(None, "wandb team (entity).")
    wandb_host: str = arg("https://api.wandb.ai", "wandb server URL.")
    wandb_dir: Optional[str] = arg(None, "Directory for wandb's local files (None: tensorboard_dir, else save).")
    wandb_init_all_ranks: bool = arg(False, "Initialise wandb on every rank, not only rank 0.")
    log_grad_norm: bool = arg(False, "Log the gradient norm to TensorBoard/wandb (always printed).")
    log_param_norm: bool = arg(False, "Log the parameter norm.")
    log_grad_pct_zeros: bool = arg(False, "Log the percentage of zero gradients per parameter.")
    log_optimizer_states: bool = arg(False, "Log the norms of the optimizer states.")
    peak_tflops_per_gpu: float = arg(
        989.0, "Project key: peak dense TFLOP/s of one device for MFU (989.0 = H100 SXM dense bf16).")
