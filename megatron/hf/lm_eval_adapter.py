"""lm-evaluation-harness adapter: scores any causal HF model of this project (export or trainer checkpoint).

Implements ``lm_eval.api.model.LM``: ``loglikelihood`` (context/continuation pairs, batched, right-padded,
no cache), ``loglikelihood_rolling`` (disjoint windows of ``max_length`` tokens with lm-eval's rolling-window
helper) and ``generate_until`` (greedy, stop strings). Sequences are scored from the model's logits in fp32.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.hf.loading import TextTokenizer


def _lm_base():
    from lm_eval.api.model import LM

    return LM


class SepLLMEvalLM(_lm_base()):
    """``LM`` over ``model`` (an HF causal LM) and a :class:`TextTokenizer`."""

    def __init__(self, model, tokenizer: TextTokenizer, batch_size: int = 8, max_length: Optional[int] = None,
                 max_gen_tokens: int = 64, device: Optional[str] = None):
        super().__init__()
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
        self.max_gen_tokens = int(max_gen_tokens)
        self._device = torch.device(device) if device else next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, pairs: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(sum log p(continuation | context), greedy?) per pair; context is left-truncated to fit."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            seqs, spans = [], []
            for ctx, cont in chunk:
                if not cont:
                    raise ValueError("lm-eval request with an empty continuation")
                full = (ctx + cont)[-(self.max_length + 1):]
                inp = full[:-1]
                seqs.append(inp)
                spans.append((len(inp) - len(cont), len(inp), full[-len(cont):]))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.tok.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logits = self.model(ids.to(self._device), attention_mask=mask.to(self._device), use_cache=False).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            for i, (lo, hi, target) in enumerate(spans):
                rows = logp[i, lo:hi]
                tgt = torch.tensor(target, device=rows.device)
                total = rows.gather(-1, tgt.unsqueeze(-1)).sum().item()
                greedy = bool((rows.argmax(-1) == tgt).all().item())
                results.append((total, greedy))
        return results

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                ctx = [self.eot_token_id]
            else:
                # Score whitespace with the continuation, as lm-eval's HF model does.
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    continuation = context[-n_spaces:] + continuation
                    context = context[:-n_spaces]
                ctx = self.tok.encode(context)
            whole = self.tok.encode(context + continuation)
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)
            pairs.append((ctx, cont))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            tokens = self.tok.encode(text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(score for score, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> List[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_tokens))
            ids = self.tok.encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            inp = torch.tensor([ids], device=self._device)
            gen = self.model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new,
                                      do_sample=False, pad_token_id=self.tok.pad, eos_token_id=self.tok.eod)
            text = self.tok.decode(gen[0, len(ids):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out


def evaluation_model(model, tokenizer: TextTokenizer, batch_size: int = 8):
    """lm-eval's own ``HFLM`` where the tokenizer is an HF one (exports, and checkpoints trained with
    ``HFTokenizer``); this module's adapter for the other tokenizers (char-level, GPT-2 BPE and SentencePiece
    vocabularies of trainer checkpoints), which ``HFLM`` cannot take."""
    if tokenizer.hf is not None:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer.hf, batch_size=batch_size)
    return SepLLMEvalLM(model, tokenizer, batch_size=batch_size)


def run_lm_eval(model, tokenizer: TextTokenizer, tasks: List[str], include_path: Optional[str] = None,
                limit: Optional[int] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
                include_defaults: bool = True, bootstrap_iters: Optional[int] = None) -> dict:
    """``lm_eval.simple_evaluate`` over :func:`evaluation_model`; ``include_path`` adds local task YAMLs
    (``include_defaults=False`` skips indexing lm-eval's built-in tasks, which takes seconds).
    ``bootstrap_iters=None`` keeps lm-eval's default, so results carry its standard errors."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no eval_tasks given (e.g. --eval_tasks lambada_openai piqa)")
    lm = evaluation_model(model, tokenizer, batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults) if include_path \
        else TaskManager()
    extra = {} if bootstrap_iters is None else {"bootstrap_iters": int(bootstrap_iters)}
    return evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                     num_fewshot=num_fewshot, log_samples=False, **extra)
