"""Self-Adjusting softmax attention (``USE_SA_SOFTMAX`` / ``USE_SA_SOFTMAX_NO_DENO``).

Per head and query row i, with scaled scores ``s`` (ALiBi bias included, before masking) and the
SepLLM mask of the layer (the reference applies it in SA mode too, whatever its README says):

- ``P = masked_softmax(s)``; ``T = tril(s)`` (zeros above the diagonal, sparse-masked entries kept);
- normalised (``USE_SA_SOFTMAX``): ``m = min(0, min_j T)``, ``M = max(0, max_j T + eps_d) + eps_d``,
  ``P' = tril(P * (s - m + eps_n) / (M - m))`` with eps_n = ``SA_Numerator_Bias``,
  eps_d = ``SA_Denominator_Bias`` (added twice, as in the reference);
- no denominator (``USE_SA_SOFTMAX_NO_DENO``): ``P' = tril(P * s)``.

Rows are not renormalised. Scores, softmax and the SA factor are computed in float32 (at least) and ``P'`` is cast
to the run's dtype before ``P' V`` (the reference casts to fp16 unconditionally, which breaks bf16).
"""
import torch
import torch.nn.functional as F

from megatron.model.attention.sepllm_mask import SepLLMMaskAttention
from megatron.model.attention_math import sa_probabilities  # noqa: F401  (the one definition; re-exported)


class SASoftmaxAttention(SepLLMMaskAttention):
    """``"sa_softmax"``: both SA variants, combined with the layer's SepLLM mask."""

    def __init__(self, neox_args, layer_number: int):
        super().__init__(neox_args, layer_number)
        plain = bool(neox_args.USE_SA_SOFTMAX)
        no_deno = bool(neox_args.USE_SA_SOFTMAX_NO_DENO)
        if plain == no_deno:
            raise ValueError("sa_softmax attention needs exactly one of USE_SA_SOFTMAX and "
                             f"USE_SA_SOFTMAX_NO_DENO set (got {plain} and {no_deno})")
        self.normalised = plain
        self.numerator_bias = float(neox_args.SA_Numerator_Bias)
        self.denominator_bias = float(neox_args.SA_Denominator_Bias)

    def forward(self, q, k, v, meta):
        scale = q.shape[-1] ** -0.5
        work = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays fp64
        bsz, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        # Grouped-query attention: query heads [B, KV, G, S, D] against their key/value head [B, KV, 1, S, D]
        # by broadcasting, so K and V are never copied per query head.
        qg = q.to(work).view(bsz, kv_heads, heads // kv_heads, seq, dim)
        scores = torch.matmul(qg, k.to(work).unsqueeze(2).transpose(-1, -2)).view(bsz, heads, seq, -1) * scale
        bias = self.bias(q, meta)
        if bias is not None:
            scores = scores + bias.to(work)
        probs = sa_probabilities(scores, self.allowed_mask(meta), self.normalised,
                                 self.numerator_bias, self.denominator_bias)
        probs = F.dropout(probs.to(v.dtype), p=self.dropout_p(), training=self.training)
        out = torch.matmul(probs.view(bsz, kv_heads, heads // kv_heads, seq, -1), v.unsqueeze(2))
        return out.view(bsz, heads, seq, dim)
