"""DeepSpeed runner options used by deepy.py."""
from dataclasses import dataclass
from typing import Optional

from .field import arg

LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm")


@dataclass
class LauncherArgs:
    """Where the ranks run. Passed to `deepspeed.launcher.runner` by deepy.py."""

    hostfile: Optional[str] = arg(None, "MPI-style hostfile (`host slots=N` lines); None: this machine only.")
    include: Optional[str] = arg(
        None, "Resources to use: NODE_SPEC[@NODE_SPEC...], NODE_SPEC = host[:slot[,slot...]].")
    exclude: Optional[str] = arg(None, "Resources to leave out (same format as include).")
    num_nodes: int = arg(-1, "Use the first N hosts of the hostfile (-1: all).")
    num_gpus: Optional[int] = arg(
        None, "Devices per node (None: all visible GPUs; on a machine without GPUs, CPU processes, default 1).")
    master_port: Optional[int] = arg(
        None, "torch.distributed rendezvous port. None: a free port on single-node runs (so concurrent local "
              "runs do not collide), 29500 (DeepSpeed's default) on multi-node runs.")
    master_addr: Optional[str] = arg(None, "Address of node 0 (None: DeepSpeed infers it).")
    launcher: str = arg("pdsh", "Multi-node launcher backend.", choices=LAUNCHERS)
    force_multi: bool = arg(False, "Use the multi-node launcher even for a single node.")
    no_ssh_check: bool = arg(False, "Skip DeepSpeed's passwordless-ssh check of the first host.")
    check_hostfile_hosts: bool = arg(
        True, "Project key: before launching, check that every selected hostfile host resolves (DNS, "
              "/etc/hosts or a Host entry of ~/.ssh/config).")
