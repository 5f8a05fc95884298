"""Console, TensorBoard and wandb logging."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class LoggingArgs:
    """What is logged where, and the peak FLOP/s used for MFU."""

    log_interval: int = arg(100, "Print/log training metrics every this many iterations.")
    log_dir: Optional[str] = arg(
        None, "Directory for text logs: each rank appends its stdout and stderr to "
              "<log_dir>/<host>_rank<R>_stdout.txt and _stderr.txt.")
    tensorboard_dir: Optional[str] = arg(None, "Directory for TensorBoard event files (None: no TensorBoard).")
    use_wandb: bool = arg(False, "Log to Weights & Biases (offline unless an API key is configured).")
    wandb_project: str = arg("neox", "wandb project name.")
    wandb_group: Optional[str] = arg(None, "wandb group name.")
    wandb_team: Optional[str] = arg(None, "wandb team (the run's entity).")
    wandb_host: str = arg("https://api.wandb.ai", "wandb server URL (wandb's base_url setting).")
    wandb_dir: Optional[str] = arg(None, "Directory for wandb's local files (None: tensorboard_dir, else save).")
    wandb_init_all_ranks: bool = arg(
        False, "Initialise wandb on every rank (one run per rank in one group, for system metrics); scalars are "
               "logged by rank 0.")
    log_grad_norm: bool = arg(
        False, "Also log each parameter's gradient norm as gradient_norms/<name> (GPT-NeoX); the global norm is "
               "always logged as grad_norm. Needs ZeRO stage 0 and fp32 (whole per-parameter gradients).")
    log_param_norm: bool = arg(False, "Log each parameter's norm as parameter_norms/<name> (not with ZeRO stage 3).")
    log_grad_pct_zeros: bool = arg(
        False, "Log the percentage of exactly-zero gradient entries per parameter as pct_grad_zeros/<name>. "
               "Needs ZeRO stage 0 and fp32.")
    log_optimizer_states: bool = arg(
        False, "Log the norms of the optimizer states per parameter as optimizer_state_norms/<state>_<name> "
               "(Adam: exp_avg, exp_avg_sq). Needs ZeRO stage 0 and fp32.")
    peak_tflops_per_gpu: float = arg(
        989.0, "Project key: peak dense TFLOP/s of one device for MFU (989.0 = H100 SXM dense bf16).")
