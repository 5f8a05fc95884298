"""Every command a user runs answers ``--help`` with a usage line and a help text for each option, instead of
a traceback (the README and docs name these commands)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ["deepy.py", "train.py", "generate.py", "eval.py"]


def entry_points():
    """The top-level scripts and every script under tools/ and data_prep/ that can be run (has a main guard)."""
    found = list(TOP_LEVEL)
    for folder in ("tools", "data_prep"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__name__ == \"__main__\"" in path.read_text() or "__name__ == '__main__'" in path.read_text():
                found.append(str(path.relative_to(REPO)))
    return found


def option_entries(help_text: str):
    """``(flags, description)`` of each option in argparse's help output."""
    entries = []
    in_options = False
    for line in help_text.splitlines():
        if re.match(r"^(options|optional arguments|[a-zA-Z ]+ arguments|[A-Za-z][\w ,/()-]*):$", line):
            in_options = True
            continue
        if not in_options:
            continue
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            entries.append([m.group(1), m.group(2) or ""])
        elif entries and re.match(r"^\s{6,}\S", line):
            entries[-1][1] += " " + line.strip()
    return entries


def test_the_list_is_complete():
    points = entry_points()
    for expected in ("tools/ckpts/convert_neox_to_hf.py", "tools/streaming_eval.py",
                     "data_prep/prepare_data.py", "data_prep/default_corpus.py", "tools/sepllm/get_separator_ids.py"):
        assert expected in points


@pytest.mark.parametrize("script", entry_points())
def test_help(script):
    env = dict(os.environ, PYTHONPATH="")  # run by path, as users do: the script must find the package itself
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout.startswith("usage:"), r.stdout[:500]
    entries = option_entries(r.stdout)
    assert entries, r.stdout
    missing = [flags for flags, text in entries if not text.strip()]
    assert not missing, f"options without a help text: {missing}"
