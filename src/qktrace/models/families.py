"""The one place that knows how each Hugging Face family names and packs its weights.

A family is a row of `FAMILIES`: where the blocks live, what each sub-module is called, which norm
it uses and how its q/k/v projection is packed. Adding a family is one row (plus, if its q/k/v
packing is new, one small split function) and one tiny-config test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .anatomy import Anatomy, Layer, Norm, NormKind, Rotary

# (W_Q [head, d_model, d_head], W_K, W_V [kv_head, d_model, d_head], b_Q, b_K, b_V, W_O, b_O)
Split = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompositions accumulate in float32 (float64 models, used by exactness tests, stay float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias(linear: Any, n: int, like: Tensor) -> Tensor:
    b = getattr(linear, "bias", None)
    return b.detach() if b is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


def _split_linear(attn: Any, n_heads: int, n_kv: int, d_head: int) -> Split:
    """Llama-style separate q_proj/k_proj/v_proj/o_proj nn.Linear (weight [out, in])."""

    def heads(lin: Any, n: int) -> tuple[Tensor, Tensor]:
        w = lin.weight.detach()  # [n * d_head, d_model]
        W = w.T.reshape(w.shape[1], n, d_head).permute(1, 0, 2)  # [n, d_model, d_head]
        return W.contiguous(), _bias(lin, n * d_head, w).reshape(n, d_head)

    W_Q, b_Q = heads(attn.q_proj, n_heads)
    W_K, b_K = heads(attn.k_proj, n_kv)
    W_V, b_V = heads(attn.v_proj, n_kv)
    wo = attn.o_proj.weight.detach()  # [d_model, head * d_head]
    W_O = wo.T.reshape(n_heads, d_head, wo.shape[0]).contiguous()
    return W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, _bias(attn.o_proj, wo.shape[0], wo)


def _split_gpt2(attn: Any, n_heads: int, n_kv: int, d_head: int) -> Split:
    """GPT-2 Conv1D c_attn (weight [d_model, 3 * d_model], y = x W + b), columns q | k | v."""
    w = attn.c_attn.weight.detach()
    d_model = w.shape[0]
    b = attn.c_attn.bias.detach()
    Ws = w.reshape(d_model, 3, n_heads, d_head).permute(1, 2, 0, 3)  # [3, head, d_model, d_head]
    bs = b.reshape(3, n_heads, d_head)
    wo = attn.c_proj.weight.detach()  # [head * d_head, d_model]
    W_O = wo.reshape(n_heads, d_head, d_model).contiguous()
    return (*(Ws[i].contiguous() for i in range(3)), bs[0], bs[1], bs[2], W_O, attn.c_proj.bias.detach())


def _split_neox(attn: Any, n_heads: int, n_kv: int, d_head: int) -> Split:
    """GPT-NeoX fused query_key_value: output viewed as [head, 3 * d_head] and chunked q | k | v."""
    lin = attn.query_key_value
    w = lin.weight.detach()  # [3 * d_model, d_model]
    d_model = w.shape[1]
    Ws = w.T.reshape(d_model, n_heads, 3, d_head).permute(2, 1, 0, 3)  # [3, head, d_model, d_head]
    bs = _bias(lin, 3 * d_model, w).reshape(n_heads, 3, d_head).permute(1, 0, 2)
    wo = attn.dense.weight.detach()
    W_O = wo.T.reshape(n_heads, d_head, d_model).contiguous()
    return (*(Ws[i].contiguous() for i in range(3)), bs[0], bs[1], bs[2], W_O, _bias(attn.dense, d_model, wo))


@dataclass(frozen=True)
class Family:
    """Where one family keeps its modules and how its weights split into heads. The defaults are the
    Llama layout (which Mistral and Qwen share); each family states only how it differs."""

    name: str
    model_types: tuple[str, ...]
    split: Callable[[Any, int, int, int], Split] = _split_linear
    base: str = "model"  # attribute of the CausalLM holding the decoder
    layers: str = "layers"
    embed: str = "embed_tokens"
    pos_embed: str | None = None
    final_norm: str = "norm"
    attn: str = "self_attn"
    mlp: str = "mlp"
    ln_attn: str = "input_layernorm"
    ln_mlp: str = "post_attention_layernorm"
    post_attn: str | None = None
    post_mlp: str | None = None
    norm: NormKind = "rmsnorm"
    gemma_norm: bool = False  # RMSNorm gain is (1 + w)
    parallel: Callable[[object], bool] = lambda cfg: False
    softmax_float32: bool = True  # eager attention soft-maxes in float32 (GPT-2's: in the scores' dtype)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt2",
        model_types=("gpt2",),
        split=_split_gpt2,
        base="transformer",
        layers="h",
        embed="wte",
        pos_embed="wpe",
        final_norm="ln_f",
        attn="attn",
        ln_attn="ln_1",
        ln_mlp="ln_2",
        norm="layernorm",
        softmax_float32=False,
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        split=_split_neox,
        base="gpt_neox",
        embed="embed_in",
        final_norm="final_layer_norm",
        attn="attention",
        norm="layernorm",
        parallel=lambda cfg: bool(getattr(cfg, "use_parallel_residual", False)),
    ),
    Family(name="llama", model_types=("llama", "mistral")),
    Family(name="qwen2", model_types=("qwen2",)),
    Family(name="qwen3", model_types=("qwen3",)),
    Family(
        name="gemma2",
        model_types=("gemma2",),
        ln_mlp="pre_feedforward_layernorm",
        post_attn="post_attention_layernorm",
        post_mlp="post_feedforward_layernorm",
        gemma_norm=True,
    ),
)

SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(f"model type '{model_type}' is not supported: qktrace supports {', '.join(SUPPORTED)}")


def _norm(module: Any, kind: NormKind, gemma: bool, dtype: torch.dtype) -> Norm:
    w = module.weight.detach().to(dtype)
    eps: Any = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", 1e-6)
    bias = getattr(module, "bias", None)
    return Norm(
        kind=kind,
        weight=1.0 + w if gemma else w,
        bias=bias.detach().to(dtype) if bias is not None else None,
        eps=float(eps),
    )


def _rotary(hf: Any, fam: Family, d_head: int) -> Rotary | None:
    base = getattr(hf, fam.base)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        return None
    buffers = list(rot.buffers())
    device = buffers[0].device if buffers else next(hf.parameters()).device

    def cos_sin(positions: Tensor) -> tuple[Tensor, Tensor]:
        # HF's rotary module computes in float32 and casts to the probe's dtype: ask for float32
        x = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = rot(x, positions.to(device).reshape(1, -1))
        return cos[0], sin[0]  # [pos, rotary_dim]

    rotary_dim = cos_sin(torch.zeros(1, dtype=torch.long, device=device))[0].shape[-1]
    return Rotary(rotary_dim=int(rotary_dim), cos_sin=cos_sin)


def read_anatomy(hf: Any) -> Anatomy:
    """Build the uniform anatomy of a loaded HF causal LM (weights are views, not copies, where possible)."""
    cfg = hf.config
    fam = family_for(cfg.model_type)
    dtype = next(hf.parameters()).dtype
    cdt = compute_dtype(dtype)
    norm = lambda module: _norm(module, fam.norm, fam.gemma_norm, cdt)  # noqa: E731
    base = getattr(hf, fam.base)
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = []
    for i, block in enumerate(getattr(base, fam.layers)):
        attn = getattr(block, fam.attn)
        split = fam.split(attn, n_heads, n_kv, d_head)
        W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O = (t.to(cdt) for t in split)  # copies for half precision
        group = n_heads // n_kv
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        softcap = getattr(attn, "attn_logit_softcapping", None)
        layers.append(
            Layer(
                index=i,
                ln_attn=norm(getattr(block, fam.ln_attn)),
                ln_mlp=norm(getattr(block, fam.ln_mlp)),
                post_attn=norm(getattr(block, fam.post_attn)) if fam.post_attn else None,
                post_mlp=norm(getattr(block, fam.post_mlp)) if fam.post_mlp else None,
                W_Q=W_Q,
                W_K=W_K,
                W_V=W_V,
                W_O=W_O,
                b_Q=b_Q,
                b_K=b_K,
                b_V=b_V,
                b_O=b_O,
                kv_head=tuple(h // group for h in range(n_heads)),
                q_norm=_norm(q_norm, "rmsnorm", fam.gemma_norm, cdt) if q_norm is not None else None,
                k_norm=_norm(k_norm, "rmsnorm", fam.gemma_norm, cdt) if k_norm is not None else None,
                scale=float(attn.scaling),
                softcap=float(softcap) if softcap else None,
                sliding_window=getattr(attn, "sliding_window", None),
                parallel=fam.parallel(cfg),
                mlp=getattr(block, fam.mlp),
            )
        )
    embed = getattr(base, fam.embed)
    embed_scale = getattr(embed, "embed_scale", None)
    pos = getattr(base, fam.pos_embed).weight.detach() if fam.pos_embed else None
    head = hf.get_output_embeddings()
    logit_softcap = getattr(cfg, "final_logit_softcapping", None)
    return Anatomy(
        family=fam.name,
        layers=tuple(layers),
        rotary=_rotary(hf, fam, d_head),
        final_norm=norm(getattr(base, fam.final_norm)),
        W_E=embed.weight.detach(),
        embed_scale=float(embed_scale) if embed_scale is not None else None,
        W_pos=pos,
        W_U=head.weight.detach().T,
        b_U=head.bias.detach().to(cdt) if getattr(head, "bias", None) is not None else None,
        logit_softcap=float(logit_softcap) if logit_softcap else None,
        dtype=dtype,
        compute_dtype=cdt,
        softmax_float32=fam.softmax_float32,
        max_positions=_max_positions(cfg),
    )


def _max_positions(cfg: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True, eq=False)
class ModuleHandles:
    """The HF modules qktrace hooks, per layer, addressed by the model's own names (nnsight-style)."""

    blocks: tuple[nn.Module, ...]  # block c's input is checkpoint c
    attn: tuple[nn.Module, ...]  # what `capture.attention_seam` wraps
    mlp: tuple[nn.Module, ...]
    ln_attn: tuple[nn.Module, ...]
    ln_mlp: tuple[nn.Module, ...]
    post_attn: tuple[nn.Module, ...] | None  # Gemma-2's post-norms
    post_mlp: tuple[nn.Module, ...] | None
    q_norm: tuple[nn.Module, ...] | None  # Qwen3's QK-norm (on the attention module)
    k_norm: tuple[nn.Module, ...] | None
    final_norm: nn.Module
    embed: nn.Module


def module_handles(hf: Any) -> ModuleHandles:
    fam = family_for(hf.config.model_type)
    base = getattr(hf, fam.base)
    blocks = tuple(getattr(base, fam.layers))

    def each(name: str | None) -> tuple[nn.Module, ...] | None:
        return None if name is None else tuple(getattr(b, name) for b in blocks)

    attn = tuple(getattr(b, fam.attn) for b in blocks)
    qk_norm = getattr(attn[0], "q_norm", None) is not None
    return ModuleHandles(
        blocks=blocks,
        attn=attn,
        mlp=each(fam.mlp),  # type: ignore[arg-type]
        ln_attn=each(fam.ln_attn),  # type: ignore[arg-type]
        ln_mlp=each(fam.ln_mlp),  # type: ignore[arg-type]
        post_attn=each(fam.post_attn),
        post_mlp=each(fam.post_mlp),
        q_norm=tuple(a.q_norm for a in attn) if qk_norm else None,
        k_norm=tuple(a.k_norm for a in attn) if qk_norm else None,
        final_norm=getattr(base, fam.final_norm),
        embed=getattr(base, fam.embed),
    )
