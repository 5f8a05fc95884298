"""Shared helpers of the Sep-Attention kernel tests: random and real-text separator flags, error measure."""
from pathlib import Path

import torch

# The 9 training separators of the Pythia 20B tokenizer ('.', ',', '?', '!', ';', ':', space, tab, newline).
PYTHIA_SEPARATOR_IDS = (15, 13, 32, 2, 28, 27, 209, 186, 187)

# Public-domain-style English prose written for these tests (no external text is shipped).
SAMPLE_TEXT = (
    "The river ran slowly past the mill, and the miller, who had lived there all his life, watched it every "
    "morning. Was it higher today? He could not say; the rain had stopped, but the hills were still grey. "
    "He wrote three words in his notebook: water, wheat, weather. Then he went inside!\n"
    "In the evening the children came home from school.\tThey talked about numbers, maps and old kings; "
    "one of them asked why the sea is salt, another why the moon changes shape. Nobody knew, so they "
    "laughed, ate their bread and went to sleep.\n"
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def random_flags(bsz: int, seq: int, p: float = 0.15, seed: int = 0, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(bsz, seq, generator=gen) < p).to(device)


def text_flags(tokenizer_path: Path, bsz: int, seq: int, device="cpu") -> torch.Tensor:
    """Separator flags of the sample text tokenised with the Pythia tokenizer, tiled to ``[bsz, seq]``."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(SAMPLE_TEXT).ids
    reps = (bsz * seq) // len(ids) + 2
    tiled = torch.tensor(ids * reps, dtype=torch.long)
    rows = torch.stack([tiled[i * 37: i * 37 + seq] for i in range(bsz)])  # different offsets per row
    return torch.isin(rows, torch.tensor(PYTHIA_SEPARATOR_IDS)).to(device)
