"""DeepSpeed runner options used by deepy.py."""
from dataclasses import dataclass
from typing import Optional

from .field import arg

LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm")


@dataclass
class LauncherArgs:
    """Where the ranks run. Passed to `deepspeed.launcher.runner` by deepy.py (docs/multinode.md)."""

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
    master_addr: Optional[str] = arg(
        None, "Address of node 0. None: on a multi-node launch the first selected hostfile host, as ssh "
              "resolves it (`ssh -G`, so an ssh-config alias gives its HostName), never DeepSpeed's "
              "`hostname -I` guess; 127.0.0.1 on one node.")
    launcher: str = arg(
        "pdsh", "Multi-node launcher backend for the hosts of a hostfile (without one DeepSpeed's runner starts "
                "the ranks on this machine, whatever the backend).", choices=LAUNCHERS)
    force_multi: bool = arg(False, "Use the multi-node launcher even for a single node.")
    no_ssh_check: bool = arg(
        False, "Skip the pre-launch ssh check of a multi-node launch: deepy.py's (every selected host answers "
               "ssh and reports the size and mtime of each dataset's .idx, which must match this host's) and "
               "DeepSpeed's (the first host only). Slurm launches are not checked (srun starts their ranks).")
    ssh_port: Optional[int] = arg(
        None, "ssh port of the hosts, passed to DeepSpeed's runner (pdsh gets `-p PORT`) and used by "
              "deepy.py's ssh check. None: ssh's default or the ssh config's Port.")
    deepspeed_slurm: bool = arg(
        False, "GPT-NeoX key: ranks started by srun take RANK, LOCAL_RANK, WORLD_SIZE from SLURM_PROCID, "
               "SLURM_LOCALID, SLURM_NTASKS and MASTER_ADDR (if unset) from the first host of "
               "SLURM_JOB_NODELIST; with a hostfile it implies force_multi. Also on with `launcher: slurm`.")
    deepspeed_mpi: bool = arg(
        False, "GPT-NeoX key: ranks started by mpirun take RANK, LOCAL_RANK, WORLD_SIZE from OpenMPI's "
               "OMPI_COMM_WORLD_* (or MVAPICH's MV2_COMM_WORLD_*) variables (MASTER_ADDR / MASTER_PORT from "
               "deepy.py's environment file); with a hostfile it implies force_multi. Also on with `launcher: "
               "openmpi` or `mvapich`.")
    comment: Optional[str] = arg(
        None, "GPT-NeoX key: `srun --comment` of a Slurm launch (launcher: slurm); refused with other launchers.")
    account: Optional[str] = arg(
        None, "GPT-NeoX key: `srun --account` of a Slurm launch (launcher: slurm); refused with other launchers.")
    check_hostfile_hosts: bool = arg(
        True, "Project key: before launching, check that every selected hostfile host resolves (DNS, "
              "/etc/hosts or a Host entry of ~/.ssh/config).")
