"""lm-evaluation-harness with training-free SepLLM: lm-eval's own command line plus the SepLLM model arguments.

    python -m megatron.hf.lm_eval --model sepllm_hf \\
        --model_args pretrained=DIR,sepllm_config=configs/training_free/pythia160m_sepllm_a3_n256.yml,attn_implementation=sdpa \\
        --tasks gsm8k_cot --batch_size 8
    python -m megatron.hf.lm_eval --model sepllm_hf --model_args pretrained=DIR,sep_cache=4,64,256,512 --tasks ...

Every other argument is lm-eval's (``--include_path`` for local tasks, ``--limit``, ``--output_path``, ...).
The reference's spelling ``--model hf --model_args pretrained=...,sepllm_config=...`` works here too: ``hf`` with
``sepllm_config`` or ``sep_cache`` in its arguments becomes ``sepllm_hf`` (stock ``lm_eval`` itself cannot load
the class, so this command replaces ``lm_eval``). ``sep_cache=a,s,w,c`` keeps its commas (lm-eval alone splits
them). See docs/training_free.md.
"""
import sys
from typing import List, Optional

from megatron.hf.lm_eval_model import MODEL_NAME, join_sep_cache

SEPLLM_KEYS = ("sepllm_config=", "sep_cache=")


def rewrite_argv(argv: List[str]) -> List[str]:
    """lm-eval arguments with ``sep_cache=a,s,w,c`` joined and ``--model hf`` + SepLLM keys mapped to sepllm_hf."""
    out: List[str] = []
    in_model_args = False
    for arg in argv:
        if arg.startswith("-"):
            in_model_args = arg in ("--model_args", "-a")
            if arg.startswith("--model_args="):
                arg = "--model_args=" + join_sep_cache(arg.split("=", 1)[1])
            out.append(arg)
            continue
        out.append(join_sep_cache(arg) if in_model_args else arg)
    if not any(key in arg for arg in out for key in SEPLLM_KEYS):
        return out
    if "--model" not in out and not any(a.startswith("--model=") for a in out):
        return ["--model", MODEL_NAME] + out
    for i, arg in enumerate(out):
        if arg == "--model" and i + 1 < len(out) and out[i + 1] == "hf":
            out[i + 1] = MODEL_NAME
            print(f"> megatron.hf.lm_eval: --model hf with SepLLM arguments runs as --model {MODEL_NAME}",
                  file=sys.stderr)
        elif arg == "--model=hf":
            out[i] = f"--model={MODEL_NAME}"
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = rewrite_argv(list(sys.argv[1:] if argv is None else argv))
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
