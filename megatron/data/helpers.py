"""Index builders for the packed GPT dataset and for blending: the C++ extension and its numpy twins.

`build_sample_idx` and `build_blending_indices` produce exactly the arrays GPT-NeoX's
`megatron/data/helpers.cpp` produces. The C++ module (`helpers.cpp` beside this file) is compiled
just in time with the system C++ compiler and pybind11's headers, cached under
`$TORCH_EXTENSIONS_DIR/megatron_data_helpers/<hash>/` (default: `.torch_extensions/` in the checkout),
and built by one process at a time under a file lock. Where it cannot be compiled, the numpy twins
are used after a printed warning; they give identical arrays (tests compare them).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

_MODULE_NAME = "megatron_data_helpers"
_SOURCE = Path(__file__).with_name("helpers.cpp")
_REPO_ROOT = Path(__file__).resolve().parents[2]
# -ffp-contract=off: the blending error terms must be computed as a separate multiply and subtract
# (no FMA) so every architecture reproduces the same choices as the numpy twin and GPT-NeoX on x86.
_CXX_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fvisibility=hidden"]

_cpp_module: ModuleType | None = None
_cpp_failed: str | None = None


# --------------------------------------------------------------------------------------------------
# Just-in-time build of the C++ module
# --------------------------------------------------------------------------------------------------
def _build_root() -> Path:
    """``TORCH_EXTENSIONS_DIR``; else the checkout's ``.torch_extensions`` when running from one, else the user's
    cache (an installed package's folder may not be writable)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        if (_REPO_ROOT / "setup.py").is_file():
            root = str(_REPO_ROOT / ".torch_extensions")
        else:
            root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sepllm-neox")
    return Path(root) / _MODULE_NAME


def _compile_command(output: Path) -> list[str]:
    import pybind11

    cxx = shlex.split(os.environ.get("CXX", "g++"))
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    return cxx + _CXX_FLAGS + includes + [str(_SOURCE), "-o", str(output)]


def _build_dir() -> Path:
    """Cache folder keyed by the source text, compiler command and Python ABI."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(_compile_command(Path("out"))).encode())
    key.update(suffix.encode())
    return _build_root() / key.hexdigest()[:16]


def _load_extension(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def compile_cpp_helpers(verbose: bool = False) -> ModuleType:
    """Compile (if not cached) and import the C++ module; raises RuntimeError when that fails.

    Several ranks may call this at once: the first takes the lock and compiles to a temporary name,
    renames it into place, and the others find the finished file when they get the lock.
    """
    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / (_MODULE_NAME + importlib.machinery.EXTENSION_SUFFIXES[0])
    with open(build_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not target.exists():
                tmp = build_dir / f"tmp.{os.getpid()}.so"
                cmd = _compile_command(tmp)
                if verbose:
                    print(" > compiling megatron/data/helpers.cpp:", " ".join(cmd), flush=True)
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                except OSError as exc:
                    raise RuntimeError(f"cannot run the C++ compiler {cmd[0]!r}: {exc}") from exc
                if proc.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(
                        f"compiling {_SOURCE} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
                    )
                os.replace(tmp, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _load_extension(target)


def get_cpp_helpers() -> ModuleType | None:
    """The compiled module, or None (after one printed warning) when it cannot be built."""
    global _cpp_module, _cpp_failed
    if _cpp_module is None and _cpp_failed is None:
        try:
            _cpp_module = compile_cpp_helpers()
        except Exception as exc:  # any failure (no compiler, no headers) falls back to numpy
            _cpp_failed = str(exc)
            msg = (
                "megatron.data.helpers: the C++ index builder could not be built, using the numpy "
                f"twin instead (identical results, slower blending). Reason: {exc}"
            )
            warnings.warn(msg, RuntimeWarning)
            print("WARNING: " + msg, file=sys.stderr, flush=True)
    return _cpp_module


# --------------------------------------------------------------------------------------------------
# Sample index
# --------------------------------------------------------------------------------------------------
def sample_idx_dtype(num_epochs: int, tokens_per_epoch: int, seq_length: int) -> np.dtype:
    """GPT-NeoX's choice: int32 while 2 * (num_samples + 1) fits int32, else int64.

    The float division mirrors GPT-NeoX (`/`, not `//`) so the boundary falls exactly where it does there.
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length
    return np.dtype(np.int32) if 2 * (num_samples + 1) < np.iinfo(np.int32).max else np.dtype(np.int64)


def _check_sample_idx_args(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    sizes = np.asarray(sizes)
    doc_idx = np.asarray(doc_idx)
    if sizes.dtype != np.int32 or sizes.ndim != 1:
        raise ValueError(f"sizes must be a 1-D int32 array, got {sizes.dtype} with shape {sizes.shape}")
    if doc_idx.dtype != np.int32 or doc_idx.ndim != 1:
        raise ValueError(f"doc_idx must be a 1-D int32 array, got {doc_idx.dtype} with shape {doc_idx.shape}")
    if seq_length < 1 or num_epochs < 1 or tokens_per_epoch < 1:
        raise ValueError(
            f"seq_length ({seq_length}), num_epochs ({num_epochs}) and tokens_per_epoch "
            f"({tokens_per_epoch}) must all be >= 1"
        )
    return np.ascontiguousarray(sizes), np.ascontiguousarray(doc_idx)


def build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, dtype=None):
    """Numpy twin of the C++ builder (same array, vectorised).

    Sample i starts at global token position i * seq_length of the stream of documents in doc_idx
    order (consecutive samples share one token). The C++ walk records, for that position, the document
    holding it, which is the unique non-empty document whose token range contains it; row 0 is (0, 0)
    even where the first document is empty, as in the walk.
    """
    sizes, doc_idx = _check_sample_idx_args(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    if dtype is None:
        dtype = sample_idx_dtype(num_epochs, tokens_per_epoch, seq_length)
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)  # exclusive end position of each doc_idx entry
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and (doc_ends.size == 0 or starts[-1] >= doc_ends[-1]):
        raise ValueError(
            f"build_sample_idx: doc_idx holds {int(doc_ends[-1]) if doc_ends.size else 0} tokens, fewer "
            f"than the {int(starts[-1]) + 1} needed; tokens_per_epoch does not match sizes[doc_idx]"
        )
    which = np.searchsorted(doc_ends, starts, side="right")
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = 0
    out[1:, 0] = which
    out[1:, 1] = starts - (doc_ends[which] - sizes[doc_idx[which]])
    return out


def build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, impl="auto"):
    """The sample index `[num_samples + 1, 2]` (int32 or int64 as GPT-NeoX), C++ or numpy.

    impl: "auto" (C++ when it builds, else numpy), "cpp" (error if unavailable) or "numpy".
    """
    sizes, doc_idx = _check_sample_idx_args(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    dtype = sample_idx_dtype(num_epochs, tokens_per_epoch, seq_length)
    module = _select(impl)
    if module is None:
        return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, dtype)
    fn = module.build_sample_idx_int32 if dtype == np.int32 else module.build_sample_idx_int64
    return fn(sizes, doc_idx, int(seq_length), int(num_epochs), int(tokens_per_epoch))


# --------------------------------------------------------------------------------------------------
# Blending
# --------------------------------------------------------------------------------------------------
def build_blending_indices_numpy(weights, size):
    """Python twin of the C++ greedy blending (identical float operations, so identical choices)."""
    weights = [float(w) for w in np.asarray(weights, dtype=np.float64)]
    current = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.uint8)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for sample in range(size):
        scale = max(float(sample), 1.0)
        best = 0
        best_error = weights[0] * scale - current[0]
        for d in range(1, len(weights)):
            err = weights[d] * scale - current[d]
            if err > best_error:
                best_error = err
                best = d
        dataset_index[sample] = best
        dataset_sample_index[sample] = current[best]
        current[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights, size, impl="auto"):
    """(dataset_index uint8[size], dataset_sample_index int64[size]) following normalised `weights`."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not 1 <= weights.size <= 255:
        raise ValueError(f"blending needs between 1 and 255 weights, got shape {weights.shape}")
    if size < 0:
        raise ValueError(f"blending size must be >= 0, got {size}")
    module = _select(impl)
    if module is None:
        return build_blending_indices_numpy(weights, size)
    dataset_index = np.zeros(size, dtype=np.uint8)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    module.build_blending_indices(dataset_index, dataset_sample_index, weights, int(weights.size), int(size))
    return dataset_index, dataset_sample_index


def _select(impl: str) -> ModuleType | None:
    if impl == "numpy":
        return None
    if impl == "cpp":
        global _cpp_module
        if _cpp_module is None:
            _cpp_module = compile_cpp_helpers()
        return _cpp_module
    if impl == "auto":
        return get_cpp_helpers()
    raise ValueError(f"impl must be 'auto', 'cpp' or 'numpy', got {impl!r}")
