"""Text generation helpers shared by ``generate.py``: prompt reading, sampling options, token streaming."""
import sys
from typing import Callable, List, Optional

import torch

from megatron.hf.loading import TextTokenizer


class PrintStreamer:
    """``generate(streamer=...)`` sink that prints text as tokens arrive (the prompt is skipped).

    Decodes the whole continuation each time and prints the new suffix, so multi-token characters print
    correctly once complete.
    """

    def __init__(self, tokenizer: TextTokenizer, out=None):
        self.tok = tokenizer
        self.out = out or sys.stdout
        self.ids: List[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def read_prompts(text: Optional[List[str]] = None, input_file: Optional[str] = None,
                 prompt_end: str = "\n") -> List[str]:
    """Prompts from the command line and/or a file (separated by ``prompt_end``); empty ones are errors."""
    prompts = list(text or [])
    if input_file:
        with open(input_file, encoding="utf-8") as handle:
            content = handle.read()
        parts = content.split(prompt_end) if prompt_end else [content]
        prompts += [p for p in parts if p.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass --text TEXT or --sample_input_file FILE")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty: give some text to continue")
    return prompts


def sampling_kwargs(temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0) -> dict:
    """HF ``generate`` options: temperature 0 means greedy; top_p / top_k 0 mean off."""
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling options: temperature={temperature} (>= 0), top_p={top_p} (0..1), "
                         f"top_k={top_k} (>= 0)")
    if temperature == 0:
        return {"do_sample": False}
    kwargs = {"do_sample": True, "temperature": float(temperature), "top_k": int(top_k) or None}
    if top_p:
        kwargs["top_p"] = float(top_p)
    return kwargs


def generate_text(model, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, stream: bool = False,
                  cache_factory: Optional[Callable] = None, use_cache: bool = True) -> str:
    """One continuation of ``prompt``; ``cache_factory()`` may supply a KV cache (e.g. a SepCache);
    ``use_cache=False`` recomputes the whole sequence at every step (GPT-NeoX's ``recompute``)."""
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt: give some text to continue")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    device = next(model.parameters()).device
    inp = torch.tensor([ids], device=device)
    kwargs = dict(sampling_kwargs(temperature, top_p, top_k), max_new_tokens=int(max_new_tokens),
                  attention_mask=torch.ones_like(inp), pad_token_id=tokenizer.pad, eos_token_id=tokenizer.eod,
                  use_cache=use_cache)
    if stream:
        kwargs["streamer"] = PrintStreamer(tokenizer)
    cache = cache_factory() if cache_factory is not None else None
    if cache is not None:
        kwargs["cache"] = cache  # transformers 5: generate(cache=...), past_key_values is deprecated
    with torch.no_grad():
        out = model.generate(inp, **kwargs)
    return tokenizer.decode(out[0, len(ids):].tolist())
