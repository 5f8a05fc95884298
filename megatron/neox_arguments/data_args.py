"""Training data: mmap datasets, blending, splits and the loader."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class DataArgs:
    """Where the tokenised data lives and how it is split and loaded."""

    data_path: Optional[str] = arg(
        None, "Prefix of one mmap dataset (<prefix>.bin/.idx) split into train/valid/test by `split`. "
              "Exclusive with train_data_paths.")
    train_data_paths: Optional[list] = arg(None, "Prefixes of the training datasets (blended).")
    valid_data_paths: Optional[list] = arg(None, "Prefixes of the validation datasets.")
    test_data_paths: Optional[list] = arg(None, "Prefixes of the test datasets.")
    train_data_weights: Optional[list] = arg(
        None, "Blending weights, one per train_data_paths entry. None means equal weights.")
    valid_data_weights: Optional[list] = arg(None, "Blending weights for valid_data_paths.")
    test_data_weights: Optional[list] = arg(None, "Blending weights for test_data_paths.")
    weight_by_num_documents: bool = arg(
        False, "Derive blending weights from document counts (p ~ n^alpha), overriding given weights.")
    weighted_sampler_alpha: float = arg(0.3, "Alpha of weight_by_num_documents.")
    split: str = arg("969, 30, 1", "Train, valid, test proportions of `data_path`, comma separated.")
    data_impl: str = arg("infer", "Indexed dataset implementation.", choices=("infer", "mmap", "cached"))
    mmap_warmup: bool = arg(False, "Read the mmap files once at start to warm the page cache.")
    use_shared_fs: bool = arg(
        True, "All nodes see the same filesystem: index caches are built once by global rank 0 "
              "(else once per node by local rank 0).")
    index_cache_naming: str = arg(
        "current", "Project key: the names under which new index caches are written. `current`: GPT-NeoX's since "
                   "c7863673 (Aug 2024) and the SepLLM reference's, `<prefix>_<name>_indexmap_<N>ns_<L>sl_<seed>s_"
                   "packedpi_ac_{doc,sample,shuffle}_idx.npy`; `v2.0`: the Pythia-era names without "
                   "`_packedpi_ac`, for Pythia replays. An existing cache under either name is used first.",
        choices=("current", "v2.0"))
    num_workers: int = arg(2, "DataLoader worker processes per rank.")
    eod_mask_loss: bool = arg(False, "Mask the loss on end-of-document tokens.")
