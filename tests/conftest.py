"""Shared test set-up: repository paths, the shared Pythia tokenizer, and GPU test skipping."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
PYTHIA_TOKENIZER = SHARED_DIR / "data" / "20B_tokenizer.json"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# DeepSpeed JIT-builds a comm op on first start; keep it cached inside the checkout so repeated runs reuse it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def pythia_tokenizer_path() -> Path:
    if not PYTHIA_TOKENIZER.exists():
        pytest.skip(f"Pythia tokenizer not found at {PYTHIA_TOKENIZER}")
    return PYTHIA_TOKENIZER
