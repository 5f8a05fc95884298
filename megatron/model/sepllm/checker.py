"""The SepLLM argument checker: the reference's ``SepLLMArgumentsChecker`` rules, with its defects fixed.

``check_sepllm_args(args)`` is called by the configuration's validation step (before launch and on every
rank). It rewrites fields on ``args`` where the reference rewrites them, prints every rewrite as
``>> KEY: old ----changed to----> new`` and returns those lines; each violation raises ``ValueError``
naming the key.

Rules, in the reference's order (docs/sepllm.md has the table):

1. Mode exclusivity. Mode flags: ``USE_ORIGINAL_FULL_ATTEN``, ``streamingLLM``, ``USE_FIXED_SEP_INTERVALs``
   (FixLLM), ``USE_SA_SOFTMAX``, ``USE_SA_SOFTMAX_NO_DENO`` and ``USE_SEP_ATTN_KERNEL_ACCELERATOR``. Fix of the
   reference's unreachable reset: the kernel flag defaults to True, so it gives way to any other mode: when one
   of the first five is True, a True kernel flag is rewritten to False (printed). At most one of the first five
   may be True.
2. Full attention: rewrite every SepLLM key to its neutral value (separators ``[-1]``, windows =
   ``seq_length``, no initial tokens, per-layer lists off, kernel/BiPE/adaptive/KV-ratio off) and every
   ``attention_config`` entry to ``global``.
3. StreamingLLM: separators forced to ``[-1]``; BiPE off, ``init_tok_max_idx >= 0``, no per-layer
   windows, global attention config.
4. Self-Adjusting softmax: global attention config. FixLLM: ``fixed_sep_intervals_list`` has one integer
   >= 1 per layer; global attention config; separators are not read.
5. SepLLM (kernel or mask): kernel needs torch >= 2.5; ``separator_token_ids`` a non-empty list other
   than ``[-1]`` (derived from the tokenizer when absent, printed).
6. ``PADDING_ID == 0``; both scalar windows >= 1.
7. ``RECOMPILE_SEP_ATTN_KERNEL`` needs the kernel flag.
8. Scalar windows differ: a recommendation is printed.
9. Per-layer lists: length ``num_layers``, every entry >= 1 (and a recommendation for the generate list).
10. ``init_tok_max_idx >= -1``.
11. BiPE: ``BiPE_seps`` a non-empty list other than ``[-1]``, ``rope_fusion`` off, ``pos_emb`` rotary or
    alibi.
12. ``BATCH_ADAPTIVE_INIT_POS``: a warning that pretraining should keep it False.
"""
from typing import Any, List, Optional

import torch

MODE_FLAGS = ("USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "USE_SEP_ATTN_KERNEL_ACCELERATOR",
              "USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO", "USE_FIXED_SEP_INTERVALs")
KERNEL_FLAG = "USE_SEP_ATTN_KERNEL_ACCELERATOR"
MIN_KERNEL_TORCH = (2, 5)


class _Checker:
    """One pass over ``args``; collects change lines and prints on the first rank only."""

    def __init__(self, args):
        self.args = args
        self.changes: List[str] = []
        self.verbose = args.rank in (None, 0)

    # -- helpers -----------------------------------------------------------------------------------
    def get(self, key: str) -> Any:
        return getattr(self.args, key)

    def say(self, line: str):
        if self.verbose:
            print(line, flush=True)

    def set(self, key: str, value: Any):
        old = self.get(key)
        if old == value:
            return
        setattr(self.args, key, value)
        line = f">> {key}: {old!r} ----changed to----> {value!r}"
        self.changes.append(line)
        self.say(line)

    @staticmethod
    def fail(key: str, message: str):
        raise ValueError(f"SepLLM argument check failed for '{key}': {message}")

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def attention_entries(self) -> Optional[List[str]]:
        """``attention_config`` as one entry per layer (NeoX compact ``[[types, n], ...]`` or flat)."""
        config = self.get("attention_config")
        if config is None:
            return None
        entries: List[str] = []
        for item in config:
            if isinstance(item, str):
                entries.append(item)
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int):
                types = list(item[0])
                entries.extend(types * item[1] if len(types) == 1 else types * (item[1] // len(types)))
            else:
                self.fail("attention_config", f"unrecognised entry {item!r}")
        return entries

    def require_global_attention(self, mode: str):
        entries = self.attention_entries()
        if entries is not None and any(e != "global" for e in entries):
            self.fail("attention_config", f"{mode} needs every layer to be 'global', got {sorted(set(entries))}")

    def make_attention_global(self):
        config = self.get("attention_config")
        if config is None:
            return
        entries = self.attention_entries()
        if all(e == "global" for e in entries):
            return
        if all(isinstance(item, str) for item in config):
            self.set("attention_config", ["global"] * len(entries))
        else:
            self.set("attention_config", [[["global"], len(entries)]])

    # -- rules ---------------------------------------------------------------------------------------
    def run(self) -> List[str]:
        self.say("> SepLLM: checking arguments")
        others = [key for key in MODE_FLAGS if key != KERNEL_FLAG and self.flag(key)]
        kernel = self.flag(KERNEL_FLAG)
        if len(others) > 1:
            self.fail(others[1], f"at most one of {MODE_FLAGS} may be true; {others} are all true")
        if others and kernel:
            # The kernel flag defaults to True; any explicitly chosen other mode takes precedence.
            self.set(KERNEL_FLAG, False)
        mode = others[0] if others else KERNEL_FLAG if kernel else "SepLLM"

        if mode == "USE_ORIGINAL_FULL_ATTEN":
            self.full_attention_rewrites()
        elif mode == "streamingLLM":
            self.streaming_rules()
        elif mode == "USE_FIXED_SEP_INTERVALs":
            self.fixllm_rules()
        elif mode in ("USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO"):
            self.require_global_attention(mode)
        else:
            self.sepllm_rules(kernel=mode == KERNEL_FLAG)
        self.common_rules()
        self.say(f"> SepLLM: argument check finished ({len(self.changes)} value(s) changed)")
        return self.changes

    def full_attention_rewrites(self):
        seq = self.get("seq_length")
        seps = self.get("separator_token_ids")
        if seps is not None and list(seps) != [-1]:
            self.set("separator_token_ids", [-1])
        self.set("PADDING_ID", 0)
        self.set("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", False)
        self.set("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", False)
        if seq is not None:
            self.set("prefill_local_window_size", seq)
            self.set("generate_local_window_size", seq)
        self.set("init_tok_max_idx", -1)
        self.set(KERNEL_FLAG, False)
        self.set("RECOMPILE_SEP_ATTN_KERNEL", False)
        self.set("USE_BiPE", False)
        self.set("BiPE_seps", None)
        self.set("BATCH_ADAPTIVE_INIT_POS", False)
        self.set("PRINT_KV_RATIO", False)
        self.make_attention_global()

    def streaming_rules(self):
        seps = self.get("separator_token_ids")
        if seps is None or list(seps) != [-1]:
            self.set("separator_token_ids", [-1])
        if self.flag("USE_BiPE"):
            self.fail("USE_BiPE", "StreamingLLM training does not support BiPE; set it false")
        init = self.get("init_tok_max_idx")
        if not isinstance(init, int) or init < 0:
            self.fail("init_tok_max_idx", f"StreamingLLM needs initial tokens (>= 0), got {init!r}")
        for key in ("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS"):
            if self.flag(key):
                self.fail(key, "StreamingLLM uses one window for all layers; set it false")
        self.require_global_attention("streamingLLM")

    def fixllm_rules(self):
        num_layers = self.get("num_layers")
        intervals = self.get("fixed_sep_intervals_list")
        if not isinstance(intervals, (list, tuple)) or not intervals:
            self.fail("fixed_sep_intervals_list", f"USE_FIXED_SEP_INTERVALs is true, so it must be a list of one "
                      f"interval per layer, got {intervals!r}")
        if num_layers is not None and len(intervals) != num_layers:
            self.fail("fixed_sep_intervals_list", f"has {len(intervals)} entries but num_layers is {num_layers}")
        bad = [n for n in intervals if not isinstance(n, int) or isinstance(n, bool) or n < 1]
        if bad:
            self.fail("fixed_sep_intervals_list", f"every interval must be an integer >= 1, got {bad}")
        self.require_global_attention("USE_FIXED_SEP_INTERVALs")

    def sepllm_rules(self, kernel: bool):
        if kernel:
            version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
            if version < MIN_KERNEL_TORCH:
                self.fail(KERNEL_FLAG, f"the Sep-Attention kernel needs torch >= 2.5 (found {torch.__version__}); "
                          "set it false to run the logically identical mask-based path")
        seps = self.get("separator_token_ids")
        if seps is None:
            seps = derive_separator_ids(self.args)
            self.set("separator_token_ids", seps)
        if not isinstance(seps, (list, tuple)) or len(seps) < 1:
            self.fail("separator_token_ids", f"SepLLM needs a non-empty list of token ids, got {seps!r}")
        if list(seps) == [-1]:
            self.fail("separator_token_ids", "[-1] disables separators, which SepLLM mode needs; "
                      "use streamingLLM for initial tokens + window only")
        if not all(isinstance(t, int) and t >= 0 for t in seps):
            self.fail("separator_token_ids", f"entries must be non-negative integer ids, got {list(seps)!r}")

    def common_rules(self):
        if self.get("PADDING_ID") != 0:
            self.fail("PADDING_ID", f"must be 0 for Pythia / GPT-NeoX tokenizers, got {self.get('PADDING_ID')!r}")
        for key in ("generate_local_window_size", "prefill_local_window_size"):
            value = self.get(key)
            if not isinstance(value, int) or value < 1:
                self.fail(key, f"must be an integer >= 1 (a window of 1 keeps the diagonal), got {value!r}")
        if self.flag("RECOMPILE_SEP_ATTN_KERNEL") and not self.flag(KERNEL_FLAG):
            self.fail("RECOMPILE_SEP_ATTN_KERNEL", f"only meaningful with {KERNEL_FLAG}: true")
        if self.get("generate_local_window_size") != self.get("prefill_local_window_size"):
            self.say("> SepLLM note: generate_local_window_size differs from prefill_local_window_size; "
                     "keeping them equal is recommended")
        num_layers = self.get("num_layers")
        for flag_key, list_key in (("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "prefill_loc_win_size_list"),
                                   ("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "generate_win_loc_size_list")):
            if not self.flag(flag_key):
                continue
            windows = self.get(list_key)
            if not isinstance(windows, (list, tuple)) or not windows:
                self.fail(list_key, f"{flag_key} is true, so it must be a list of windows, got {windows!r}")
            if num_layers is not None and len(windows) != num_layers:
                self.fail(list_key, f"has {len(windows)} entries but num_layers is {num_layers}")
            bad = [w for w in windows if not isinstance(w, int) or w < 1]
            if bad:
                self.fail(list_key, f"every window must be an integer >= 1, got {bad}")
        if self.flag("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS") and \
                self.get("generate_win_loc_size_list") != self.get("prefill_loc_win_size_list"):
            self.say("> SepLLM note: generate_win_loc_size_list differs from prefill_loc_win_size_list; "
                     "keeping them equal is recommended")
        init = self.get("init_tok_max_idx")
        if not isinstance(init, int) or init < -1:
            self.fail("init_tok_max_idx", f"must be an integer >= -1 (-1 keeps no initial token), got {init!r}")
        if self.flag("USE_BiPE"):
            seps = self.get("BiPE_seps")
            if not isinstance(seps, (list, tuple)) or not seps or list(seps) == [-1]:
                self.fail("BiPE_seps", f"USE_BiPE needs a non-empty list of separator ids, got {seps!r}")
            if self.get("rope_fusion"):
                self.fail("rope_fusion", "must be false with USE_BiPE (rotary is gathered at BiPE positions)")
            if self.get("pos_emb") not in ("rotary", "alibi"):
                self.fail("pos_emb", f"USE_BiPE needs rotary or alibi, got {self.get('pos_emb')!r}")
        if self.flag("BATCH_ADAPTIVE_INIT_POS"):
            self.say("> SepLLM warning: BATCH_ADAPTIVE_INIT_POS is meant for left-padded evaluation; "
                     "pretraining (no padding) should keep it false")


def derive_separator_ids(args) -> List[int]:
    """The default separators ('.', ',', '?', '!', ';', ':', space, tab, newline) of the run's tokenizer."""
    try:
        from megatron.tokenizer import build_tokenizer
        from megatron.tokenizer.separators import separator_ids
    except ImportError as err:
        raise ValueError("SepLLM argument check failed for 'separator_token_ids': it is not set and the "
                         f"tokenizer module to derive it is unavailable ({err}); set it explicitly") from err
    if args.tokenizer_type is None:
        raise ValueError("SepLLM argument check failed for 'separator_token_ids': it is not set and no "
                         "tokenizer_type is configured to derive it from")
    ids = [int(t) for t in separator_ids(build_tokenizer(args))]
    print(f"> SepLLM: separator_token_ids derived from the {args.tokenizer_type} tokenizer: {ids}", flush=True)
    return ids


def check_sepllm_args(args) -> List[str]:
    """Check and normalise the SepLLM keys of ``args`` in place; returns the printed change lines."""
    return _Checker(args).run()
