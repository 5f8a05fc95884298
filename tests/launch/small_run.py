"""A small valid run for the in-process deepy.py tests of tests/launch: config, dataset, script, 2-host hostfile."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_arguments.helpers import make_dataset, small, write  # noqa: E402


def small_run(tmp_path: Path, slots: int = 1):
    """(config path, script path, hostfile path, dataset prefix)."""
    data = make_dataset(tmp_path)
    cfg = write(tmp_path / "run.yml", "\n".join(f"{k}: {v}" for k, v in small().items())
                + f"\ntrain_iters: 2\noptimizer: {{type: Adam, params: {{lr: 0.001}}}}\ndata_path: {data}\n"
                  "tokenizer_type: CharLevelTokenizer\n")
    script = write(tmp_path / "train.py", "")
    hostfile = write(tmp_path / "hostfile", f"node-a slots={slots}\nnode-b slots={slots}\n")
    return cfg, script, hostfile, data
