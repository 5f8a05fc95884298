"""Configuration: typed argument dataclasses by topic, YAML loading and merging, derived values,
validation, the DeepSpeed config, and hostfile handling. See docs/configuration.md."""
from .environment import Environment, detect_environment
from .errors import ConfigError
from .neox_args import NeoXArgs

__all__ = ["NeoXArgs", "ConfigError", "Environment", "detect_environment"]
