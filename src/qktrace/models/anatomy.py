"""The uniform anatomy of a decoder-only transformer, read off a Hugging Face model.

Every family looks the same from here on: per layer an attention-input norm, per-head weights
`W_Q [head, d_model, d_head]`, `W_K`/`W_V [kv_head, d_model, d_head]`, `W_O [head, d_head, d_model]`,
biases, a head -> kv_head map, optional QK-norm, the score scale, soft-capping, and an MLP that we
always *call* (the HF module) rather than reimplement.

Weights are held in float32 whatever the model's dtype (a copy for half-precision models; float64
models, which exactness tests use, stay float64), so every decomposition accumulates in float32. The
MLP stays the HF module, and the embedding and unembedding stay views in the model's dtype (columns
are cast where they are read). Each layer's tensors live on that layer's device (a model dispatched
with `device_map` spreads them).

Norms are the one non-linearity between the residual stream and the QK/OV circuits. `Norm.scale`
gives the per-position factor 1/sqrt(var + eps); at that frozen scale a norm is the linear map
`Norm.linear` (LayerNorm's centering is linear too) plus the constant `Norm.bias`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

NormKind = Literal["layernorm", "rmsnorm"]


@dataclass(frozen=True)
class Norm:
    """LayerNorm (centering, bias) or RMSNorm; `weight` is the effective gain (Gemma's 1 + w folded in)."""

    kind: NormKind
    weight: Tensor  # [d]
    bias: Tensor | None  # [d] or None
    eps: float

    def scale(self, x: Tensor) -> Tensor:
        """The frozen factor 1/sqrt(var + eps) per row of x [..., d] -> [...], at HF's precision: RMSNorms
        compute in float32 (HF casts to it, a float64 model too), LayerNorm (torch's kernel) in float32 or the
        input's own wider dtype."""
        xf = x.double() if self.kind == "layernorm" and x.dtype == torch.float64 else x.float()
        if self.kind == "layernorm":
            var = xf.var(-1, unbiased=False)
        else:
            var = xf.pow(2).mean(-1)
        return torch.rsqrt(var + self.eps).to(x.dtype)

    def linear(self, x: Tensor, scale: Tensor | float) -> Tensor:
        """The norm linearised at `scale` (no bias): x [..., d], scale [...] -> [..., d]."""
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        s = scale.unsqueeze(-1) if isinstance(scale, Tensor) else scale
        return x * s * self.weight

    def __call__(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        out = self.linear(x, self.scale(x) if scale is None else scale)
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding on the first `rotary_dim` dims of each head (rotate-half layout).

    `cos_sin` calls the HF model's own rotary module, so scaling variants (linear, llama3, yarn, ...)
    come for free; `rotate` applies the rotation at given positions.
    """

    rotary_dim: int
    cos_sin: Callable[[Tensor], tuple[Tensor, Tensor]]  # positions [pos] -> cos, sin [pos, rotary_dim]

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [..., pos, d_head] rotated to `positions` [pos] (cos and sin in float32, then x's dtype)."""
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.to(device=x.device, dtype=x.dtype), sin.to(device=x.device, dtype=x.dtype)
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@dataclass(frozen=True)
class Layer:
    """One transformer block. Shapes use the axis vocabulary: head, kv_head, d_model, d_head."""

    index: int
    ln_attn: Norm
    ln_mlp: Norm
    post_attn: Norm | None  # Gemma-2: normalises the attention output before it joins the residual
    post_mlp: Norm | None
    W_Q: Tensor  # [head, d_model, d_head]
    W_K: Tensor  # [kv_head, d_model, d_head]
    W_V: Tensor  # [kv_head, d_model, d_head]
    W_O: Tensor  # [head, d_head, d_model]
    b_Q: Tensor  # [head, d_head]
    b_K: Tensor  # [kv_head, d_head]
    b_V: Tensor  # [kv_head, d_head]
    b_O: Tensor  # [d_model]
    kv_head: tuple[int, ...]  # head -> kv_head (GQA)
    q_norm: Norm | None  # QK-norm over d_head (Qwen3)
    k_norm: Norm | None
    scale: float  # scores = q.k * scale (Gemma: query_pre_attn_scalar**-0.5)
    softcap: float | None  # Gemma-2: score = softcap * tanh(score / softcap)
    sliding_window: int | None
    parallel: bool  # GPT-NeoX/Pythia: attention and MLP both read the layer input
    mlp: nn.Module  # the HF MLP module, called as is

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def device(self) -> torch.device:
        return self.W_Q.device

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[2]

    def kv_index(self) -> Tensor:
        return torch.tensor(self.kv_head, dtype=torch.long, device=self.W_Q.device)


@dataclass(frozen=True)
class Anatomy:
    """Everything model-wide: the layers, rotary, embedding, final norm and unembedding."""

    family: str
    layers: tuple[Layer, ...]
    rotary: Rotary | None
    final_norm: Norm
    dtype: torch.dtype  # the HF model's own dtype
    compute_dtype: (
        torch.dtype
    )  # what the anatomy's weights and every decomposition use: float32 (float64 models: float64)
    softmax_float32: bool  # HF's eager attention soft-maxes in float32 (else in the scores' dtype)
    max_positions: int | None  # the longest prompt the model takes (max_position_embeddings), if it says
    W_E: Tensor  # [vocab, d_model] a view of the HF table, in the model's dtype
    embed_scale: float | None  # Gemma multiplies embeddings by sqrt(d_model)
    W_pos: Tensor | None  # [n_ctx, d_model] learned positions (GPT-2), the model's dtype
    W_U: Tensor  # [d_model, vocab] a view, the model's dtype (columns are cast to float32 where read)
    b_U: Tensor | None  # [vocab]
    logit_softcap: float | None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    def describe(self) -> dict[str, object]:
        first = self.layers[0]
        return {
            "family": self.family,
            "layers": self.n_layers,
            "d_model": self.d_model,
            "heads": first.n_heads,
            "kv_heads": first.n_kv_heads,
            "d_head": first.d_head,
            "norm": first.ln_attn.kind,
            "rotary": f"{self.rotary.rotary_dim}/{first.d_head} dims" if self.rotary else "none",
            "qk_norm": first.q_norm is not None,
            "softcap": first.softcap,
            "parallel_attn_mlp": first.parallel,
            "post_norms": first.post_attn is not None,
            "vocab": self.W_U.shape[1],
        }
