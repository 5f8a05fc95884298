"""The environment file that makes remote ranks see what the launching shell sees.

DeepSpeed's multi-node runners (pdsh, openmpi, mvapich, slurm) forward only some variables to the ranks:
those starting with PYTHON, MLFLOW, MV2 or UCX (plus NCCL on CUDA) and the KEY=VALUE lines of
`~/.deepspeed_env` and `./.deepspeed_env` (the name is `$DS_ENV_FILE` when set). A rank started over ssh
would otherwise miss the environment's `bin/` on PATH (the JIT build runs ninja from PATH),
`TORCH_EXTENSIONS_DIR` (the ops would be rebuilt per host into ~/.cache) and GPT-NeoX's WANDB_API_KEY.

deepy.py writes one file per launch beside the resolved config: the user's own files first, exactly as
DeepSpeed would read them (the working directory's lines win over the home directory's), then the entries
below for every key the user's files do not set. The runner reads only that file (DS_ENV_FILE points at it),
so the user's files are read, never written.
"""
import collections
import os
import re

from megatron.atomic_files import atomic_write_text
from megatron.neox_arguments.errors import ConfigError

DEFAULT_NAME = ".deepspeed_env"
# Passed on when the launching shell sets them: the user's interface choice (GPT-NeoX's users set NCCL's
# through .deepspeed_env; DeepSpeed forwards NCCL_* only when the launch host has CUDA), and GPT-NeoX's
# forwarded wandb key (its deepy.py appends WANDB_API_KEY to DeepSpeed's EXPORT_ENVS).
PASSED_ON = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "WANDB_API_KEY")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def user_env_files(environ, cwd: str, home: str) -> list:
    """The files DeepSpeed's runner would read, in its order (home, then the working directory)."""
    name = environ.get("DS_ENV_FILE") or DEFAULT_NAME
    paths = [os.path.join(home, name), os.path.join(cwd, name)]
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def read_env_file(path: str) -> "collections.OrderedDict[str, str]":
    """KEY=VALUE lines (blank lines and # comments skipped, which DeepSpeed's own reader would choke on)."""
    entries = collections.OrderedDict()
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            key = key.strip()
            if key.startswith("export "):
                key = key[len("export "):].strip()
            if not sep or not _KEY.match(key):
                raise ConfigError(f"{path}:{lineno}: bad environment line {raw.strip()!r}; expected KEY=VALUE")
            entries[key] = value.strip()
    return entries


def _path_list(*parts) -> str:
    seen = []
    for part in parts:
        for p in (part or "").split(os.pathsep):
            if p and p not in seen:
                seen.append(p)
    return os.pathsep.join(seen)


def launch_entries(environ, repo_root: str, cwd: str, master_addr: str, master_port: int) -> dict:
    """What every rank needs from the launching process (deepy.py has put the environment's bin/ first on PATH
    and set TORCH_EXTENSIONS_DIR). MASTER_ADDR / MASTER_PORT are for srun and mpirun ranks, which DeepSpeed's
    launcher does not start (on pdsh launches it sets the same values itself)."""
    entries = collections.OrderedDict()
    entries["PATH"] = environ.get("PATH", "")
    # DeepSpeed forwards PYTHONPATH with its working directory in front; the checkout comes first here.
    entries["PYTHONPATH"] = _path_list(repo_root, cwd, environ.get("PYTHONPATH"))
    if environ.get("TORCH_EXTENSIONS_DIR"):
        entries["TORCH_EXTENSIONS_DIR"] = environ["TORCH_EXTENSIONS_DIR"]
    entries["MASTER_ADDR"] = str(master_addr)
    entries["MASTER_PORT"] = str(master_port)
    for key in PASSED_ON:
        if environ.get(key):
            entries[key] = environ[key]
    return entries


def merged_entries(user_files, ours) -> tuple:
    """(entries, {key: source}) with the user's files read in order (later wins) and ours only for keys they
    lack."""
    entries, source = collections.OrderedDict(), {}
    for path in user_files:
        if os.path.isfile(path):
            for key, value in read_env_file(path).items():
                entries[key] = value
                source[key] = path
    for key, value in ours.items():
        if key not in entries:
            entries[key] = value
            source[key] = "deepy.py"
    return entries, source


def write_env_file(path: str, entries) -> str:
    """Write KEY=VALUE lines atomically, readable by the owner only (it may hold WANDB_API_KEY)."""
    for key, value in entries.items():
        if "\n" in value:
            raise ConfigError(f"environment entry {key} holds a newline, which {DEFAULT_NAME} cannot carry")
    # atomic_write_text's temporary file is created 0600 and keeps that mode through the rename.
    return atomic_write_text(path, "".join(f"{key}={value}\n" for key, value in entries.items()), suffix=".env")


def env_file_path(resolved_path: str) -> str:
    return os.path.splitext(resolved_path)[0] + ".deepspeed_env"
