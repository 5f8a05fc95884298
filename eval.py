"""lm-evaluation-harness evaluation of a trainer checkpoint (through deepy.py) or an export directory.

    python deepy.py eval.py config.yml                 # tasks from the YAML key eval_tasks
    python eval.py --neox_config_file RESOLVED.yml --eval_tasks piqa sciq
    python eval.py --model_dir EXPORT --eval_tasks lambada_openai --include_path my_tasks/ --limit 100

An export also works with lm-eval's own HF backend:
    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True --tasks piqa

Results are printed as lm-eval's table and written to ``<eval_results_prefix>_eval_results_<time>.json``.
Only rank 0 evaluates when launched on several ranks.
"""
import argparse
import json
import os
import sys
import time

from megatron.cli import HelpFormatter


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="lm-evaluation-harness over a SepLLM model: an HF export (--model_dir) or, through deepy.py, a "
                    "trainer checkpoint. Options left out take the config's keys (eval_tasks, "
                    "eval_results_prefix).", formatter_class=HelpFormatter)
    parser.add_argument("--neox_config_file", default=None, help="set by deepy.py (trainer checkpoint mode)")
    parser.add_argument("--model_dir", default=None, help="export directory")
    parser.add_argument("--eval_tasks", nargs="+", default=None,
                        help="lm-eval task names, or task YAML files (config key eval_tasks)")
    parser.add_argument("--include_path", default=None,
                        help="folder of local lm-eval task YAMLs; its tasks are named in --eval_tasks "
                             "(config key eval_include_path)")
    parser.add_argument("--bootstrap_iters", type=int, default=None,
                        help="bootstrap resamples for the standard errors (default: lm-eval's own; 0 skips them; "
                             "config key eval_bootstrap_iters)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (for quick checks)")
    parser.add_argument("--num_fewshot", type=int, default=None,
                        help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--eval_results_prefix", default=None,
                        help="results go to <prefix>_eval_results_<time>.json (config key eval_results_prefix)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args, _ = parser.parse_known_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from megatron.hf.lm_eval_adapter import run_lm_eval

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks, prefix = args.eval_tasks, args.eval_results_prefix
    include_path, bootstrap = args.include_path, args.bootstrap_iters
    if args.neox_config_file:
        from megatron.hf.loading import load_from_neox_args
        from megatron.neox_arguments import NeoXArgs

        neox_args = NeoXArgs.consume_neox_args(argv if argv is not None else None)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        tasks = tasks or neox_args.eval_tasks
        prefix = prefix if prefix is not None else neox_args.eval_results_prefix
        include_path = include_path or neox_args.eval_include_path
        bootstrap = bootstrap if bootstrap is not None else neox_args.eval_bootstrap_iters
        model, tokenizer = load_from_neox_args(neox_args, device)
    elif args.model_dir:
        from megatron.hf.loading import load_export

        model, tokenizer = load_export(args.model_dir, device)
    else:
        print("eval.py: error: give --model_dir EXPORT or launch through deepy.py with a config", file=sys.stderr)
        return 2
    if not tasks:
        print("eval.py: error: no tasks: set eval_tasks in the YAML or pass --eval_tasks", file=sys.stderr)
        return 2
    results = run_lm_eval(model, tokenizer, tasks, include_path, args.limit, args.batch_size, args.num_fewshot,
                          bootstrap_iters=bootstrap)
    from lm_eval.utils import make_table

    print(make_table(results))
    path = f"{prefix or ''}{'_' if prefix else ''}eval_results_{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"results": results["results"], "config": {"tasks": tasks, "limit": args.limit}}, handle,
                  indent=2, default=str)
    os.replace(tmp, path)
    print(f"eval.py: results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
