"""Text generation from a trainer checkpoint (through deepy.py) or an export directory.

    python deepy.py generate.py config.yml            # text_gen_type, sample_input_file, maximum_tokens,
                                                      # temperature, top_p, top_k, sample_output_file from YAML
    python generate.py --model_dir EXPORT --text "Once upon a time" [--maximum_tokens 64] [--temperature 0.8]
    python generate.py --model_dir EXPORT --sample_input_file prompts.txt --sep_cache 4,64,256,512

Tokens are printed as they are generated. ``--sep_cache a,s,w,c`` decodes with a SepCache (only initial,
separator and local-window KVs kept). Only rank 0 generates when launched on several ranks.

Bad input (a missing model directory or prompt file, ``--maximum_tokens`` < 1, a negative temperature or top_k,
top_p outside [0, 1] (0: off), a truncated ``model.safetensors``, SepCache sizes that do not fit) is one line on
stderr and exit status 2, checked before any model is loaded where it can be.
"""
import json
import os
import sys

from megatron.cli import OneLineParser



def parse_args(argv):
    parser = OneLineParser(tool="generate.py",
                           description="SepLLM text generation, from an HF export (--model_dir) or, through "
                                       "deepy.py, from a trainer checkpoint. Options left out take the config's "
                                       "text-generation keys (docs/configuration.md), or those keys' defaults.")
    parser.add_argument("--neox_config_file", default=None, help="set by deepy.py (trainer checkpoint mode)")
    parser.add_argument("--model_dir", default=None, help="export directory (HF mode)")
    parser.add_argument("--text", nargs="*", default=None, help="prompt(s)")
    parser.add_argument("--sample_input_file", default=None, help="prompts separated by --prompt_end")
    parser.add_argument("--sample_output_file", default=None, help="jsonl of prompts and continuations")
    parser.add_argument("--prompt_end", default=None,
                        help="the string that ends a prompt in input files and interactive mode (config key "
                             "prompt_end, default a newline)")
    parser.add_argument("--maximum_tokens", type=int, default=None,
                        help="tokens generated per prompt (config key maximum_tokens, default 64)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 for greedy decoding (config key temperature, default 0)")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus sampling threshold, 0 for off (config key top_p, default 0)")
    parser.add_argument("--top_k", type=int, default=None,
                        help="sample from the k most likely tokens, 0 for off (config key top_k, default 0)")
    parser.add_argument("--sep_cache", default=None, help="a,s,w,c sizes of a SepCache")
    parser.add_argument("--recompute", action="store_true", default=None,
                        help="no KV cache: recompute all attention at every step (GPT-NeoX's recompute)")
    parser.add_argument("--text_gen_type", default=None, choices=("unconditional", "input-file", "interactive"),
                        help="unconditional: num_samples samples from the end-of-document token; input-file: "
                             "the prompts of --sample_input_file; interactive: prompts read from stdin until EOF")
    parser.add_argument("--num_samples", type=int, default=None, help="samples of text_gen_type unconditional")
    parser.add_argument("--no_stream", action="store_true", help="print whole continuations only")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    args, _ = parser.parse_known_args(argv)  # DeepSpeed adds --local_rank
    return args


class BadInput(ValueError):
    """Bad generate.py input; printed as one line, exit status 2."""


def check_options(opts: dict) -> None:
    """Sampling and length options, whichever source (YAML or command line) gave them."""
    if opts["maximum_tokens"] < 1:
        raise BadInput(f"--maximum_tokens must be >= 1, got {opts['maximum_tokens']}")
    if opts["temperature"] < 0:
        raise BadInput(f"--temperature must be >= 0 (0: greedy), got {opts['temperature']}")
    if not 0 <= opts["top_p"] <= 1:
        raise BadInput(f"--top_p must be in (0, 1], or 0 for off, got {opts['top_p']}")
    if opts["top_k"] < 0:
        raise BadInput(f"--top_k must be >= 0 (0: off), got {opts['top_k']}")
    if opts["num_samples"] < 1:
        raise BadInput(f"--num_samples must be >= 1, got {opts['num_samples']}")
    prompts = opts["sample_input_file"]
    if prompts is not None and not os.path.isfile(prompts):
        raise BadInput(f"prompt file {prompts} (--sample_input_file) does not exist")


def load_model_dir(model_dir: str, device: str):
    from megatron.hf.loading import load_export

    if not os.path.isdir(model_dir):
        raise BadInput(f"--model_dir {model_dir} does not exist or is not a directory")
    weights = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(weights):
        check_safetensors(weights)
    try:
        return load_export(model_dir, device)
    except (OSError, ValueError, RuntimeError) as err:  # transformers' own loading errors
        raise BadInput(f"cannot load the export {model_dir}: {str(err).splitlines()[0]}") from err


def check_safetensors(path: str) -> None:
    """A truncated weights file fails here, naming it, instead of deep inside from_pretrained."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = handle.read(header_len) if header_len is not None and header_len <= size - 8 else b""
    try:
        end = max(int(t["data_offsets"][1]) for k, t in json.loads(header).items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{path} is not a readable safetensors file (truncated or corrupt header)") from None
    if size < 8 + header_len + end:
        raise BadInput(f"{path} is truncated: {size} bytes, its header describes {8 + header_len + end}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return generate(args, argv)
    except BadInput as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2


def generate(args, argv) -> int:
    import torch

    from megatron.hf.generation import generate_text

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = {"maximum_tokens": 64, "temperature": 0.0, "top_p": 0.0, "top_k": 0, "prompt_end": "\n",
            "sample_input_file": None, "sample_output_file": None, "recompute": False, "text_gen_type": None,
            "num_samples": 1}
    if args.neox_config_file:
        from megatron.hf.loading import load_from_neox_args
        from megatron.neox_arguments import ConfigError, NeoXArgs

        try:
            neox_args = NeoXArgs.consume_neox_args(argv if argv is not None else None)
        except ConfigError as err:
            raise BadInput(str(err)) from None
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        opts.update(maximum_tokens=neox_args.maximum_tokens, temperature=neox_args.temperature,
                    top_p=neox_args.top_p, top_k=neox_args.top_k, prompt_end=neox_args.prompt_end,
                    sample_input_file=neox_args.sample_input_file, sample_output_file=neox_args.sample_output_file,
                    recompute=neox_args.recompute, text_gen_type=neox_args.text_gen_type,
                    num_samples=neox_args.num_samples)
        model_loader = lambda: load_from_neox_args(neox_args, device)  # noqa: E731
    elif args.model_dir:
        model_loader = lambda: load_model_dir(args.model_dir, device)  # noqa: E731
    else:
        raise BadInput("give --model_dir EXPORT or launch through deepy.py with a config")
    for key in opts:
        value = getattr(args, key)
        opts[key] = value if value is not None else opts[key]
    check_options(opts)  # before the model is loaded: bad options cost nothing
    if args.sep_cache:
        sep_cache_sizes(args.sep_cache)
        if opts["recompute"]:
            raise BadInput("--sep_cache and recompute contradict each other: recompute generates without a KV cache")
    try:
        prompts = prompts_for(opts, args.text)
        model, tokenizer = model_loader()
        if prompts is None:  # unconditional: the samples start from the tokenizer's end-of-document token
            prompts = [end_of_document_text(tokenizer)] * opts["num_samples"]
        cache_factory = sep_cache_factory(model, args.sep_cache) if args.sep_cache else None
    except (ValueError, FileNotFoundError) as err:
        raise BadInput(str(err)) from err
    records = []
    for prompt in prompts:
        if not args.no_stream:
            print(prompt, end="", flush=True)
        text = generate_text(model, tokenizer, prompt, opts["maximum_tokens"], opts["temperature"], opts["top_p"],
                             opts["top_k"], stream=not args.no_stream, cache_factory=cache_factory,
                             use_cache=not opts["recompute"])
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


def prompts_for(opts: dict, text):
    """The prompts GPT-NeoX's text_gen_type asks for; without one, --text and/or the prompt file. Interactive
    prompts are read lazily, one line of stdin at a time."""
    from megatron.hf.generation import read_prompts

    kind = opts["text_gen_type"]
    if kind == "unconditional":
        return None  # the prompt is the tokenizer's end-of-document token, known once it is loaded
    if kind == "interactive":
        return _stdin_prompts()
    if kind == "input-file" and not opts["sample_input_file"]:
        raise BadInput("text_gen_type input-file needs sample_input_file")
    return read_prompts(text, opts["sample_input_file"], opts["prompt_end"])


def _stdin_prompts():
    while True:
        try:
            line = input("Please enter a prompt (end with EOF): ")
        except EOFError:
            return
        if line.strip():
            yield line


def end_of_document_text(tokenizer) -> str:
    """The text of the tokenizer's end-of-document token (GPT-NeoX starts unconditional samples from it)."""
    try:
        eod = tokenizer.eod
    except (TypeError, ValueError):
        eod = None
    if eod is None:
        raise BadInput("text_gen_type unconditional starts from the end-of-document token, and this model's "
                       "tokenizer has none")
    return tokenizer.decode([eod])


def sep_cache_sizes(spec: str):
    try:
        a, s, w, c = (int(v) for v in spec.split(","))
    except ValueError:
        raise BadInput(f"--sep_cache wants four integers a,s,w,c, got {spec!r}") from None
    return a, s, w, c


def sep_cache_factory(model, spec: str):
    from megatron.hf.sep_cache import SepCache

    a, s, w, c = sep_cache_sizes(spec)
    # A stock export's config has no SepLLM keys: it gets the Pythia preset.
    seps = getattr(model.config, "separator_token_ids", None)
    extra = {"separator_token_ids": seps, "PADDING_ID": getattr(model.config, "PADDING_ID", 0)} \
        if seps and seps != [-1] else {"model_type": "pythia"}
    try:  # validate now, not at the first prompt
        SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c,
                                   **extra)
    except ValueError as err:
        raise BadInput(f"--sep_cache {spec}: {err}") from None
    return lambda: SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w,
                                              cache_size=c, **extra)


if __name__ == "__main__":
    sys.exit(main())
