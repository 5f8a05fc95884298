"""Breaks chosen comparisons of the SepLLM rule and of the kernel's CPU twins, one at a time, in a scratch copy
of the checkout, and checks that the mask tests catch each one.

    python scripts/mutation_check.py [--keep]

A mutation the tests survive means a test that cannot fail. The Triton kernels' own masks need a GPU and are
not mutated here (their GPU tests compare them with the reference). Each mutation names its text exactly: when
the code changes, update the mutation rather than loosen it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/sepllm/test_rule.py", "tests/sepllm/test_stats.py", "tests/sepllm/test_variants.py",
         "tests/kernel/test_sep_kernel_cpu.py"]

# (file, exact text, replacement, what it breaks)
MUTATIONS = [
    ("megatron/model/sepllm/rule.py", "in_window = (q_idx - k_idx) <= (window - int(bool(exclude_diagonal)))",
     "in_window = (q_idx - k_idx) < (window - int(bool(exclude_diagonal)))", "window one key short"),
    ("megatron/model/sepllm/rule.py", "return (k_idx <= q_idx) & (is_init_k | is_sep_k | in_window)",
     "return (k_idx < q_idx) & (is_init_k | is_sep_k | in_window)", "query cannot see itself"),
    ("megatron/model/sepllm/rule.py", "inside = (k_idx >= init_start) & (k_idx < init_start + num_init)",
     "inside = (k_idx >= init_start) & (k_idx <= init_start + num_init)", "one initial token too many"),
    ("megatron/model/sepllm/rule.py", "last_row = (special | ((seq - 1 - k_idx) <= span)).sum(dim=-1)",
     "last_row = (special | ((seq - 1 - k_idx) < span)).sum(dim=-1)", "closed-form KV count off by one"),
    ("megatron/model/sepllm/kernel/reference.py",
     "(pos.view(bsz, 1, 1, n_max) < (q_pos - lo_off).view(1, 1, seq, 1))",
     "(pos.view(bsz, 1, 1, n_max) <= (q_pos - lo_off).view(1, 1, seq, 1))",
     "decomposed kernel twin counts a key in both the compact and the band part"),
    ("megatron/model/sepllm/kernel/reference.py", "vis_b = (k_pos <= q_pos.view(seq, 1))",
     "vis_b = (k_pos < q_pos.view(seq, 1))", "decomposed kernel twin's band misses the diagonal"),
    ("megatron/model/sepllm/kernel/metadata.py", "(k_idx < start + n_init)", "(k_idx <= start + n_init)",
     "kernel metadata lists one initial token too many"),
]


def copy_checkout(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout, as they are in the working tree."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run_tests(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="sepllm-mutation-"))
    try:
        copy_checkout(scratch)
        baseline = run_tests(scratch)
        if baseline.returncode != 0:
            print("mutation check: the unmutated tests fail; fix them first\n" + baseline.stdout[-3000:])
            return 2
        survived = []
        for path, old, new, what in MUTATIONS:
            target = scratch / path
            text = target.read_text()
            if text.count(old) != 1:
                print(f"mutation check: {path} no longer holds exactly one {old!r}: update the mutation list")
                return 2
            target.write_text(text.replace(old, new))
            caught = run_tests(scratch).returncode != 0
            target.write_text(text)
            print(f"{'caught  ' if caught else 'SURVIVED'} {path}: {what}", flush=True)
            if not caught:
                survived.append(what)
        if survived:
            print(f"mutation check: {len(survived)} of {len(MUTATIONS)} mutations survived the tests")
            return 1
        print(f"mutation check: all {len(MUTATIONS)} mutations caught")
        return 0
    finally:
        if args.keep:
            print(f"scratch copy: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
