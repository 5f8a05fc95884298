"""What a rank learns from the program that started it, when that program is not DeepSpeed's launcher.

DeepSpeed's pdsh and local launches start each rank through `deepspeed.launcher.launch`, which sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. `srun` and `mpirun` start the ranks themselves and set
only their own variables; GPT-NeoX reads those under `deepspeed_slurm` / `deepspeed_mpi`
(`NeoXArgs.configure_distributed_args`). `launcher_rank_env` is the one rule for that translation: derivation
reads it for the rank numbers, and `megatron.initialize` exports it before the process group starts.

Also here: the gloo network interface, chosen per rank from its own route to the master (interface names
differ between machines, so the launch host cannot choose for the others).
"""
import fcntl
import os
import re
import socket
import struct

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT

_SLURM = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}
_MPI = ({"RANK": "OMPI_COMM_WORLD_RANK", "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK",
         "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE"},
        {"RANK": "MV2_COMM_WORLD_RANK", "LOCAL_RANK": "MV2_COMM_WORLD_LOCAL_RANK",
         "WORLD_SIZE": "MV2_COMM_WORLD_SIZE"})


class RankEnvError(ValueError):
    """A launcher variable is missing or malformed (the message names it)."""


def expand_hostlist(nodelist: str) -> list:
    """Slurm's compressed host list (`SLURM_JOB_NODELIST`): ``gpu[01-03,7],login-1`` -> gpu01 gpu02 gpu03 gpu7
    login-1. Ranges keep their zero padding; several bracket groups in one name multiply out."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            if nodelist[start:i].strip():
                names.extend(_expand_name(nodelist[start:i].strip(), nodelist))
            start = i + 1
    if depth != 0 or not names:
        raise RankEnvError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm host list")
    return names


def _expand_name(name: str, whole: str) -> list:
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise RankEnvError(f"SLURM_JOB_NODELIST={whole!r}: bad range {part!r}")
        width = len(lo)
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(_expand_name(f"{head}{n:0{width}d}{tail}", whole))
    return out


def rank_source(args):
    """'slurm', 'mpi' or None: which launcher's variables a rank of this config may read."""
    if args.deepspeed_slurm:
        return "slurm"
    if args.deepspeed_mpi:
        return "mpi"
    return None


def launcher_rank_env(args, environ) -> dict:
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for a rank that srun or mpirun started.

    Empty when RANK is already set (DeepSpeed's launcher, or the user), when the config enables no launcher
    variables, or when the launcher's rank variable is absent (not started by srun / mpirun). MASTER_ADDR /
    MASTER_PORT already set (deepy.py's environment file sets them for multi-node launches) are kept; otherwise
    Slurm's first host and the config's master_port (29500)."""
    source = rank_source(args)
    if source is None or "RANK" in environ:
        return {}
    tables = (_SLURM,) if source == "slurm" else _MPI
    names = next((t for t in tables if t["RANK"] in environ), None)
    if names is None:
        # Not started by srun / mpirun (a tool reading the resolved config, `python train.py` by hand): one
        # process, as without the key.
        return {}
    out = {}
    for ours, theirs in names.items():
        value = environ.get(theirs)
        if value is None and ours == "WORLD_SIZE" and source == "slurm":
            # GPT-NeoX's fallback when srun was given nodes x tasks-per-node instead of -n.
            nodes, per_node = environ.get("SLURM_NNODES"), environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
            if nodes and per_node.isdigit():
                value = str(int(nodes) * int(per_node))
        if value is None or not value.strip().isdigit():
            raise RankEnvError(f"{'deepspeed_slurm' if source == 'slurm' else 'deepspeed_mpi'}: environment "
                               f"variable {theirs}={value!r} is not a non-negative integer")
        out[ours] = value.strip()
    if "MASTER_ADDR" not in environ:
        if source != "slurm" or not environ.get("SLURM_JOB_NODELIST"):
            raise RankEnvError("MASTER_ADDR is not set" + (" and neither is SLURM_JOB_NODELIST"
                                                           if source == "slurm" else "")
                               + ": set master_addr, or launch through deepy.py (its environment file sets it)")
        out["MASTER_ADDR"] = expand_hostlist(environ["SLURM_JOB_NODELIST"])[0]
    if "MASTER_PORT" not in environ:
        out["MASTER_PORT"] = str(args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT)
    return out


# ---------------------------------------------------------------------------------------------- gloo interface
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def _interface_address(name: str):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def source_address(master_addr: str, port: int = DEFAULT_MASTER_PORT) -> str:
    """The local IPv4 address this host's routing table uses to reach `master_addr`. A UDP socket's connect()
    only consults the routing table: no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, port))
        return s.getsockname()[0]


def interface_for_address(address: str, interfaces=None, address_of=_interface_address):
    """Name of the interface holding `address` (None if none does)."""
    for _, name in (interfaces if interfaces is not None else socket.if_nameindex()):
        if address_of(name) == address:
            return name
    return None


def gloo_interface(master_addr: str, port: int = DEFAULT_MASTER_PORT):
    """The interface gloo should bind on this host so the master's peers can reach it: the one the route to
    `master_addr` leaves by. None when it cannot be told (no IPv4 route, name unresolvable)."""
    try:
        return interface_for_address(source_address(master_addr, port))
    except OSError:
        return None
