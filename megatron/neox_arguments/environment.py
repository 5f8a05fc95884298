"""What the machine offers: visible CUDA devices and the distributed environment variables.

Kept in one small object so derivation and validation can be tested with a fake machine.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError


@dataclass
class Environment:
    """Facts about the process that derivation depends on."""

    cuda_device_count: int = 0
    environ: dict = field(default_factory=dict)

    @property
    def has_cuda(self) -> bool:
        return self.cuda_device_count > 0

    def int_env(self, name: str) -> Optional[int]:
        value = self.environ.get(name)
        if value in (None, ""):
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def detect_environment() -> Environment:
    """The real machine: torch's CUDA device count (respects CUDA_VISIBLE_DEVICES) and os.environ."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    return Environment(cuda_device_count=count, environ=dict(os.environ))
