#!/usr/bin/env python
"""Rewrites the golden-loss files on purpose and prints what moved.

    python tests/golden/regenerate.py              # every mode
    python tests/golden/regenerate.py full bipe_alibi

Run it only for a change that is meant to alter the numerics, and say why in the commit message.
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import golden_utils as g  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modes", nargs="*", choices=[[]] + sorted(g.MODES), help="modes to regenerate (default: all)")
    args = parser.parse_args(argv)
    for mode in args.modes or sorted(g.MODES):
        work = g.scratch_dir()
        try:
            new = g.run_mode(mode, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        old = g.load_golden(mode)["losses"] if g.golden_path(mode).exists() else {}
        changed = [i for i in sorted(set(old) | set(new)) if old.get(i) != new.get(i)]
        g.write_golden(mode, new)
        if not old:
            print(f"{mode}: new file, {len(new)} losses")
        elif not changed:
            print(f"{mode}: unchanged")
        else:
            print(f"{mode}: {len(changed)} of {len(new)} losses changed")
            for i in changed:
                print(f"  iteration {i:3d}: {old.get(i)!r} -> {new.get(i)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
