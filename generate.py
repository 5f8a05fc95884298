"""Text generation from a trainer checkpoint (through deepy.py) or an export directory.

    python deepy.py generate.py config.yml            # text_gen_type, sample_input_file, maximum_tokens,
                                                      # temperature, top_p, top_k, sample_output_file from YAML
    python generate.py --model_dir EXPORT --text "Once upon a time" [--maximum_tokens 64] [--temperature 0.8]
    python generate.py --model_dir EXPORT --sample_input_file prompts.txt --sep_cache 4,64,256,512

Tokens are printed as they are generated. ``--sep_cache a,s,w,c`` decodes with a SepCache (only initial,
separator and local-window KVs kept). Only rank 0 generates when launched on several ranks.
"""
import argparse
import json
import os
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description="SepLLM text generation")
    parser.add_argument("--neox_config_file", default=None, help="set by deepy.py (trainer checkpoint mode)")
    parser.add_argument("--model_dir", default=None, help="export directory (HF mode)")
    parser.add_argument("--text", nargs="*", default=None, help="prompt(s)")
    parser.add_argument("--sample_input_file", default=None, help="prompts separated by --prompt_end")
    parser.add_argument("--sample_output_file", default=None, help="jsonl of prompts and continuations")
    parser.add_argument("--prompt_end", default=None)
    parser.add_argument("--maximum_tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--sep_cache", default=None, help="a,s,w,c sizes of a SepCache")
    parser.add_argument("--no_stream", action="store_true", help="print whole continuations only")
    parser.add_argument("--device", default=None)
    args, _ = parser.parse_known_args(argv)  # DeepSpeed adds --local_rank
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from megatron.hf.generation import generate_text, read_prompts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = {"maximum_tokens": 64, "temperature": 0.0, "top_p": 0.0, "top_k": 0, "prompt_end": "\n",
            "sample_input_file": None, "sample_output_file": None}
    if args.neox_config_file:
        from megatron.hf.loading import load_from_neox_args
        from megatron.neox_arguments import NeoXArgs

        neox_args = NeoXArgs.consume_neox_args(argv if argv is not None else None)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        for key in opts:
            value = getattr(neox_args, key, None)
            opts[key] = value if value is not None else opts[key]
        if getattr(neox_args, "text_gen_type", None) == "unconditional" and not args.text:
            args.text = [tokenizer_bos_text()]
        try:
            model, tokenizer = load_from_neox_args(neox_args, device)
        except (ValueError, FileNotFoundError) as err:
            print(f"generate.py: error: {err}", file=sys.stderr)
            return 2
    elif args.model_dir:
        from megatron.hf.loading import load_export

        model, tokenizer = load_export(args.model_dir, device)
    else:
        print("generate.py: error: give --model_dir EXPORT or launch through deepy.py with a config",
              file=sys.stderr)
        return 2
    for key in opts:
        value = getattr(args, key, None)
        opts[key] = value if value is not None else opts[key]
    try:
        prompts = read_prompts(args.text, opts["sample_input_file"], opts["prompt_end"])
    except ValueError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    cache_factory = None
    if args.sep_cache:
        cache_factory = sep_cache_factory(model, args.sep_cache)
    records = []
    for prompt in prompts:
        if not args.no_stream:
            print(prompt, end="", flush=True)
        text = generate_text(model, tokenizer, prompt, opts["maximum_tokens"], opts["temperature"], opts["top_p"],
                             opts["top_k"], stream=not args.no_stream, cache_factory=cache_factory)
        if args.no_stream:
            print(prompt + text)
        records.append({"context": prompt, "text": text})
    if opts["sample_output_file"]:
        tmp = opts["sample_output_file"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(rec) + "\n")
        os.replace(tmp, opts["sample_output_file"])
    return 0


def tokenizer_bos_text() -> str:
    """Unconditional generation starts from the end-of-document token's text."""
    return "<|endoftext|>"


def sep_cache_factory(model, spec: str):
    from megatron.hf.sep_cache import SepCache

    try:
        a, s, w, c = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"generate.py: error: --sep_cache wants four integers a,s,w,c, got {spec!r}")
    seps = getattr(model.config, "separator_token_ids", None)
    extra = {"separator_token_ids": seps, "PADDING_ID": getattr(model.config, "PADDING_ID", 0)} \
        if seps and seps != [-1] else {"model_type": "pythia"}
    SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c,
                               **extra)  # validate now, not at the first prompt
    return lambda: SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w,
                                              cache_size=c, **extra)


if __name__ == "__main__":
    sys.exit(main())
