"""Text generation (generate.py) and evaluation (eval.py)."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class TextGenArgs:
    """Sampling settings of generate.py and the task list of eval.py (GPT-NeoX names)."""

    text_gen_type: Optional[str] = arg(
        None, "How generate.py samples: unconditional (num_samples samples from the end-of-document token), "
              "input-file (the prompts of sample_input_file) or interactive (prompts read from stdin until EOF). "
              "None: the --text prompts and/or sample_input_file.",
        choices=("unconditional", "input-file", "interactive"))
    maximum_tokens: int = arg(64, "Maximum number of generated tokens.")
    prompt_end: str = arg("\n", "String that ends a prompt in interactive / input-file mode.")
    temperature: float = arg(0.0, "Sampling temperature (0: greedy).")
    top_p: float = arg(0.0, "Nucleus sampling threshold (0: off).")
    top_k: int = arg(0, "Top-k sampling (0: off).")
    recompute: bool = arg(
        False, "Generate without a KV cache, recomputing the whole sequence at each step (same tokens, slower); "
               "cannot be combined with --sep_cache.")
    sample_input_file: Optional[str] = arg(None, "Prompts, one per line (text_gen_type input-file).")
    sample_output_file: str = arg("samples.txt", "Where generated samples are written.")
    num_samples: int = arg(1, "Number of samples of text_gen_type unconditional.")
    eval_tasks: Optional[list] = arg(None, "lm-eval task names (or task YAML files) for eval.py.")
    eval_include_path: Optional[str] = arg(
        None, "Project key: a folder of local lm-eval task YAMLs (lm-eval's --include_path); its tasks are then "
              "named in eval_tasks like built-in ones. deepy.py's --include_path sets it.")
    eval_bootstrap_iters: Optional[int] = arg(
        None, "Project key: bootstrap resamples for lm-eval's standard errors (lm-eval's bootstrap_iters); unset: "
              "lm-eval's default; 0 skips the standard errors of bootstrapped metrics.")
    eval_results_prefix: str = arg("", "Prefix of the eval.py results file.")
