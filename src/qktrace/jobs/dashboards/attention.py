"""Dashboards of attention-output SAE features (strategy 2's checkpoints), as the dashboards job sees an SAE's.

An attention feature of layer l is active where the SAE's encoding of layer l's attention output at its site
is positive -- what `graph.strategy2.encode_attention` gives the graph (`AttentionSAE.encode`). The site's
input of a batch is read off HF's own modules (`attention_inputs`): hook_z is what the attention's output
projection (o_proj / c_proj / dense) receives, the heads side by side; attn_out is what the attention module
returns (Gemma-2: what its post-attention norm returns). Its output is its decoder row as it joins the
residual: a hook_z row through W_O head by head, then any post-attention norm at unit scale; an attn_out row
as is. The top and bottom output tokens read that through the final norm and the unembedding, as an SAE
feature's decoder row is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import UnsupportedModelError
from ...models import Model
from ...models.capture import first_tensor, forward_hooks, output_tensor
from ...saes.attention import AttentionSAE, AttentionSAESet

OUT_PROJECTIONS = ("o_proj", "c_proj", "dense")  # the attention's W_O module, as `models.families` splits it


class _Enough(Exception):
    """Raised in a hook once every asked-for layer is read: the rest of the pass is skipped."""


@dataclass(frozen=True, eq=False)
class AttentionFeatures:
    """Layer `layer`'s attention-SAE features with what the dashboards ask of an SAE; `W_dec` [d_sae, d_model]
    is each feature's write into the residual (module docstring)."""

    layer: int
    sae: AttentionSAE
    W_dec: Tensor

    def encode(self, x: Tensor) -> Tensor:
        """x [..., d_in] at the SAE's site -> [..., d_sae]."""
        return self.sae.encode(x.to(self.sae.W_enc))

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    @property
    def W_enc(self) -> Tensor:  # [d_in, d_sae]
        return self.sae.W_enc

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.attn"

    @property
    def k(self) -> int | None:
        return self.sae.coder.k

    @property
    def site(self) -> str:
        return self.sae.site


@torch.no_grad()
def attention_features(model: Model, saes: AttentionSAESet, layer: int) -> AttentionFeatures:
    """Layer `layer`'s features, each decoder row taken to the residual (module docstring)."""
    sae, ly = saes[layer], model.anatomy.layers[layer]
    W = sae.W_dec
    if sae.site == "z":
        W = torch.einsum("fhe,hed->fd", sae.heads(W).to(ly.W_O), ly.W_O)
        if ly.post_attn is not None:
            W = ly.post_attn.linear(W, 1.0)
    return AttentionFeatures(layer, sae, W)


def _out_projection(attn: Any, layer: int) -> Any:
    for name in OUT_PROJECTIONS:
        if isinstance(getattr(attn, name, None), torch.nn.Module):
            return getattr(attn, name)
    raise UnsupportedModelError(
        f"layer {layer}'s attention has no output projection named {', '.join(OUT_PROJECTIONS)}: hook_z "
        "dashboards need one"
    )


def attention_inputs(model: Model, ids: Tensor, layers: Iterable[int], sites: Mapping[int, str]) -> dict[int, Tensor]:
    """{layer: [batch, pos, d_in]} what each asked-for layer's attention SAE reads at `sites[layer]` ("z" or
    "attn_out"), in one forward pass that stops after the last layer asked for."""
    wanted = sorted(set(layers))
    if not wanted:
        return {}
    store: dict[int, Tensor] = {}
    last = wanted[-1]

    def pre(layer: int) -> Any:
        def hook(mod: Any, args: Any, kwargs: Any) -> None:
            store[layer] = first_tensor(args, kwargs).detach()
            if layer == last:
                raise _Enough

        return hook

    def post(layer: int) -> Any:
        def hook(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
            store[layer] = output_tensor(out).detach()
            if layer == last:
                raise _Enough

        return hook

    m = model.modules
    pres = [(_out_projection(m.attn[ly], ly), pre(ly)) for ly in wanted if sites[ly] == "z"]
    after = [ly for ly in wanted if sites[ly] != "z"]
    posts = [((m.post_attn[ly] if m.post_attn is not None else m.attn[ly]), post(ly)) for ly in after]
    hooks = (forward_hooks(pres, pre=True), forward_hooks(posts))
    with torch.no_grad(), hooks[0], hooks[1], contextlib.suppress(_Enough):
        model.hf(input_ids=ids.to(model.device), use_cache=False)
    return {ly: store[ly] for ly in wanted}
