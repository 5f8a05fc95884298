"""The README's commands, top to bottom, on a fresh clone of this checkout, as a new user runs them.

About 15 minutes on 2 CPU cores (a new virtual environment, the default corpus, two quickstart trainings, an
export, generation, streaming and evaluation), so it runs only when asked:

    SEPLLM_README_TEST=1 python -m pytest tests/test_readme.py -m readme

The commands that cannot run here are listed in SKIPPED with the reason; every other line of every ```bash
block runs, in order, in one shell (so `source .venv/bin/activate` holds for the lines after it).
"""
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.readme, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

# A README command containing one of these is not run, for the reason given.
SKIPPED = {
    "bash scripts/test.sh": "the test suite itself",
    "configs/data/pile-deduped.yml": "trains Pythia-160M on the Pile: a GPU and the Pile's download",
    "configs/125M.yml": "GPT-NeoX's own 125M config trains in fp16: a CUDA GPU (refused on CPU by name)",
    "--hostfile": "needs the hosts of a hostfile (the multi-node test covers the launch)",
    "--eval_tasks piqa": "lm-eval downloads the task from the HuggingFace hub",
    "--tasks piqa": "lm-eval downloads the task from the HuggingFace hub",
}


def readme_commands(text: str):
    """Each command of each ```bash block (continuation lines joined), in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if not line.strip() or (line.lstrip().startswith("#") and not pending):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.append((pending + line).strip())
            pending = ""
    return commands


def test_readme_parser_keeps_continuations_and_order():
    text = "x\n```bash\n# comment\na \\\n    b  # note\n\nc\n```\n```bash\nd\n```\n"
    assert readme_commands(text) == ["a      b  # note", "c", "d"]


@pytest.mark.skipif(os.environ.get("SEPLLM_README_TEST") != "1", reason="set SEPLLM_README_TEST=1 (about 15 min)")
def test_readme_commands_run_as_written(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commands = readme_commands((clone / "README.md").read_text())
    script = ["set -eo pipefail"]
    ran = []
    for cmd in commands:
        reason = next((why for pattern, why in SKIPPED.items() if pattern in cmd), None)
        if reason:
            print(f"skipped: {cmd}  ({reason})")
            continue
        ran.append(cmd)
        script.append(f"printf '%s\\n' {quote('>>> README: ' + cmd)}")
        script.append(cmd)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env.pop("TORCH_EXTENSIONS_DIR", None)
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=3600)
    (tmp_path / "readme_run.log").write_text(proc.stdout)
    last = [line for line in proc.stdout.splitlines() if line.startswith(">>> README: ")]
    assert proc.returncode == 0, f"README command failed: {last[-1] if last else '?'}\n{proc.stdout[-4000:]}"
    assert len(last) == len(ran) >= 12, last
    assert (clone / "checkpoints" / "quickstart" / "latest").read_text().strip() == "global_step200"
    assert (clone / "exports" / "quickstart" / "config.json").is_file()


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
