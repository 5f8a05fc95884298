"""``pip install .`` installs the ``megatron`` package and the ``tools`` command-line package.

The launcher and per-rank scripts (deepy.py, train.py, generate.py, eval.py) stay scripts of the checkout,
as in GPT-NeoX; the tools also get console entries. Requirements come from requirements/requirements.txt.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def requirements(name: str) -> list:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


setup(
    name="sepllm-neox",
    version="0.1.0",
    description="GPT-NeoX-style distributed pretraining framework for SepLLM",
    packages=find_packages(include=["megatron", "megatron.*", "tools", "tools.*"]),
    # The C++ index builder is compiled on first use; the HF modeling files are copied into exports.
    package_data={"megatron.data": ["helpers.cpp"]},
    python_requires=">=3.10",
    install_requires=requirements("requirements.txt"),
    extras_require={"test": requirements("requirements-test.txt")},
    entry_points={"console_scripts": [
        "sepllm-convert-neox-to-hf = tools.ckpts.convert_neox_to_hf:main",
        "sepllm-convert-hf-to-neox = tools.ckpts.convert_hf_to_neox:main",
        "sepllm-separator-ids = tools.sepllm.get_separator_ids:main",
        "sepllm-streaming-eval = tools.streaming_eval:main",
        "sepllm-inspect-dataset = tools.datasets.inspect_dataset:main",
        "sepllm-merge-datasets = tools.datasets.merge_datasets:main",
    ]},
)
