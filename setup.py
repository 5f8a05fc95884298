from setuptools import find_packages, setup

setup(
    name="sepllm-neox",
    version="0.1.0",
    description="GPT-NeoX-style distributed pretraining framework for SepLLM",
    packages=find_packages(include=["megatron", "megatron.*", "tools", "tools.*"]),
    python_requires=">=3.10",
)
