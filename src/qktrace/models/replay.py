"""Recompute a layer from the anatomy at the frozen scales and patterns of a Trace.

These pure functions are the executable statement of what "linearised at frozen scales" means, and
the exactness tests compare them with what HF computed: queries and keys, scores, the attention output,
a whole layer. Each seam is its own function, named as in the attention diagram: input->query,
input->key, input->value, (query, key)->scores, (pattern, value)->output. `frozen_layer` is the one
definition of a layer with everything but the MLP frozen; the graph's closed-form edges are its exact
linearisation, and its autograd Jacobian is what the graph tests compare them with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from .anatomy import Anatomy, Layer
from .trace import Trace


def project(layer: Layer, side: str, xn: Tensor, bias: bool = True) -> Tensor:
    """input->{query,key,value}: normed input xn [pos, d_model] -> [head or kv_head, pos, d_head]."""
    W, b = {"q": (layer.W_Q, layer.b_Q), "k": (layer.W_K, layer.b_K), "v": (layer.W_V, layer.b_V)}[side]
    out = torch.einsum("pd,hde->hpe", xn, W)
    return out + b[:, None, :] if bias else out


def qk_norm_frozen(layer: Layer, side: str, x: Tensor, scale: Tensor) -> Tensor:
    """QK-norm at its frozen scale: x [..., d_head], scale [...] -> x * scale * weight (identity if none)."""
    norm = layer.q_norm if side == "q" else layer.k_norm
    return x if norm is None else x * scale[..., None] * norm.weight


def qk_norm_and_rotate(
    anatomy: Anatomy, layer: Layer, side: str, x: Tensor, positions: Tensor, trace: Trace, rotate: bool = True
) -> Tensor:
    """QK-norm at its frozen scale, then rotary at `positions`: x [h, pos, d_head] -> same.

    `x` may be any linear share of the projected q (or k) at those positions: both steps are linear
    once the scale is frozen.
    """
    scales = trace.scale_q_norm if side == "q" else trace.scale_k_norm
    if scales is not None:
        x = qk_norm_frozen(layer, side, x, scales[layer.index][:, positions])
    if rotate and anatomy.rotary is not None:
        x = anatomy.rotary.rotate(x, positions)
    return x


def queries_keys(anatomy: Anatomy, trace: Trace, layer_idx: int) -> tuple[Tensor, Tensor]:
    """q [head, pos, d_head] and k [kv_head, pos, d_head] recomputed from the residual stream."""
    layer = anatomy.layers[layer_idx]
    x = trace.resid[layer_idx]
    xn = layer.ln_attn(x, trace.scale_ln_attn[layer_idx])
    pos = torch.arange(trace.n_pos, device=x.device)
    q = qk_norm_and_rotate(anatomy, layer, "q", project(layer, "q", xn), pos, trace)
    k = qk_norm_and_rotate(anatomy, layer, "k", project(layer, "k", xn), pos, trace)
    return q, k


def scores_from(layer: Layer, q: Tensor, k: Tensor, capped: bool = True) -> Tensor:
    """(query, key)->scores: [head, q_pos, k_pos] for every pair (no mask)."""
    kh = k[layer.kv_index()]  # [head, pos, d_head]
    s = torch.einsum("hqe,hke->hqk", q, kh) * layer.scale
    if capped and layer.softcap is not None:
        s = layer.softcap * torch.tanh(s / layer.softcap)
    return s


def float_mlp(anatomy: Anatomy, layer: int) -> Callable[[Tensor], Tensor]:
    """The layer's HF MLP as a function in the compute dtype (a float32 copy for half-precision models)."""
    mlp = anatomy.layers[layer].mlp
    if anatomy.dtype == anatomy.compute_dtype:
        return mlp
    return copy.deepcopy(mlp).to(anatomy.compute_dtype)


def frozen_layer(anatomy: Anatomy, trace: Trace, layer: int, x: Tensor) -> Tensor:
    """Layer `layer` at frozen patterns and norm scales, calling the HF MLP (in the compute dtype):
    x [..., pos, d_model] -> resid_{l+1} [..., pos, d_model]. At x = trace.resid[layer] it reproduces
    HF's output (up to the model's own rounding in half precision)."""
    ly = anatomy.layers[layer]
    xn = ly.ln_attn(x, trace.scale_ln_attn[layer])
    v = torch.einsum("...pd,kde->...kpe", xn, ly.W_V) + ly.b_V[:, None, :]
    v = v[..., ly.kv_index(), :, :]  # [..., head, pos, d_head]
    z = torch.einsum("hqk,...hke->...hqe", trace.pattern(layer), v)
    attn = torch.einsum("...hqe,hed->...qd", z, ly.W_O) + ly.b_O
    if ly.post_attn is not None:
        assert trace.scale_post_attn is not None
        attn = ly.post_attn(attn, trace.scale_post_attn[layer])
    mid = x if ly.parallel else x + attn
    mlp_in = ly.ln_mlp(mid, trace.scale_ln_mlp[layer])
    mlp = float_mlp(anatomy, layer)(mlp_in)
    if ly.post_mlp is not None:
        assert trace.scale_post_mlp is not None
        mlp = ly.post_mlp(mlp, trace.scale_post_mlp[layer])
    return x + attn + mlp if ly.parallel else mid + mlp


def attention_output(anatomy: Anatomy, trace: Trace, layer_idx: int) -> Tensor:
    """(pattern, value)->output at frozen patterns: per-head writes summed, plus b_O: [pos, d_model]
    (before any post-norm; what HF's o_proj returned)."""
    layer = anatomy.layers[layer_idx]
    xn = layer.ln_attn(trace.resid[layer_idx], trace.scale_ln_attn[layer_idx])
    v = project(layer, "v", xn)[layer.kv_index()]  # [head, pos, d_head]
    z = torch.einsum("hqk,hke->hqe", trace.pattern(layer_idx), v)
    return torch.einsum("hqe,hed->qd", z, layer.W_O) + layer.b_O


def logits_from(anatomy: Anatomy, resid: Tensor, scale: Tensor) -> Tensor:
    """Final norm at its frozen scale and unembedding: resid [pos, d_model] -> logits [pos, vocab]."""
    logits = anatomy.final_norm(resid, scale) @ anatomy.W_U.to(resid.dtype)
    if anatomy.b_U is not None:
        logits = logits + anatomy.b_U
    if anatomy.logit_softcap is not None:
        logits = anatomy.logit_softcap * torch.tanh(logits / anatomy.logit_softcap)
    return logits
