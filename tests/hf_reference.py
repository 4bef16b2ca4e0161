"""HF's own numbers, captured independently of qktrace's hooks: the softmax input of every eager
attention call (scores, masked positions as -inf), the patterns (output_attentions) and each
attention module's output. Tests compare qktrace's recomputations with these."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HFAttention:
    scores: list[Tensor]  # per layer [head, q_pos, k_pos], soft-capped, -inf where masked
    patterns: list[Tensor]  # per layer [head, q_pos, k_pos]
    attn_out: list[Tensor]  # per layer [pos, d_model] (the attention module's output, before post-norms)
    logits: Tensor  # [pos, vocab]


def hf_attention(model, ids: Tensor) -> HFAttention:
    """One plain forward of the HF model with a softmax spy and output_attentions."""
    seen: list[Tensor] = []
    real = torch.nn.functional.softmax

    def spy(x, *args, **kwargs):
        if x.dim() == 4 and x.shape[-1] == x.shape[-2] == ids.numel():
            seen.append(x.detach()[0])
        return real(x, *args, **kwargs)

    outs: list[Tensor] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: outs.append((out[0] if isinstance(out, tuple) else out)[0]))
        for m in model.attn_modules
    ]
    torch.nn.functional.softmax = spy
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids.reshape(1, -1), output_attentions=True, use_cache=False)
    finally:
        torch.nn.functional.softmax = real
        for h in handles:
            h.remove()
    assert len(seen) == model.n_layers, f"saw {len(seen)} softmax calls for {model.n_layers} layers"
    scores = [s.masked_fill(s <= torch.finfo(s.dtype).min / 2, float("-inf")) for s in seen]
    return HFAttention(scores, [a[0] for a in out.attentions], outs, out.logits[0])
