"""Dashboards of transcoder features: each layer's features as the dashboards job sees an SAE's.

A transcoder feature read at layer l is active where the transcoder's encoding of layer l's MLP input at the
set's input site (`qktrace.saes.transcoder.site_input`: the residual after attention, the MLP's own input,
or the pre-MLP norm without gain) is positive -- exactly what `TranscoderSet.encode` gives the graph. Its
outputs are its decoder rows: a per-layer transcoder's W_dec row, a cross-layer transcoder's rows into every
layer it writes, summed (what it adds to the residual, at unit frozen scales); the top and bottom output
tokens read that through the final norm and the unembedding, as an SAE feature's decoder row is read.

`transcoder_inputs(model, ids, layers, site)`: the site's input of each layer for a batch [batch, pos],
read off HF's own modules (the pre-MLP norm's input is the residual after attention; the MLP's input is
what it read) in one forward pass that stops after the last layer asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...models import Model
from ...models.capture import first_tensor, forward_hooks
from ...saes import SAE, TranscoderSet
from ...saes.transcoder import site_input
from .attention import AttentionFeatures


class _Enough(Exception):
    """Raised in a hook once every asked-for layer is read: the rest of the pass is skipped."""


@dataclass(frozen=True, eq=False)
class TranscoderFeatures:
    """Layer `layer`'s transcoder features, with what the dashboards ask of an SAE (encode, widths, decoder)."""

    layer: int
    transcoders: TranscoderSet

    def encode(self, x: Tensor) -> Tensor:
        """x [..., d_model] at the input site -> [..., d_sae]."""
        return self.transcoders.encode(self.layer, x)

    @property
    def d_sae(self) -> int:
        ts = self.transcoders
        return ts.clt.d_sae if ts.clt is not None else ts[self.layer].d_sae

    @property
    def W_enc(self) -> Tensor:  # [d_model, d_sae]
        ts = self.transcoders
        return ts.clt.W_enc[self.layer] if ts.clt is not None else ts[self.layer].W_enc

    @property
    def W_dec(self) -> Tensor:  # [d_sae, d_model]: every write summed
        ts = self.transcoders
        if ts.clt is None:
            return ts[self.layer].W_dec
        return sum(ts.clt.decoder(self.layer, j) for j in ts.writes(self.layer))  # type: ignore[return-value]

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.transcoder"

    @property
    def k(self) -> int | None:
        ts = self.transcoders
        return ts.clt.k if ts.clt is not None else ts[self.layer].coder.k


# what the dashboards encode with: an SAE, or one layer's transcoder or attention-SAE features
Coder = SAE | TranscoderFeatures | AttentionFeatures


def transcoder_inputs(model: Model, ids: Tensor, layers: Iterable[int], site: str) -> dict[int, Tensor]:
    """{layer: [batch, pos, d_model]} the transcoder input at `site` of every layer asked for (module docstring)."""
    wanted = sorted(set(layers))
    if not wanted:
        return {}
    mid: dict[int, Tensor] = {}
    into: dict[int, Tensor] = {}

    def read(store: dict[int, Tensor], layer: int, last: bool) -> Any:
        def hook(mod: Any, args: Any, kwargs: Any) -> None:
            store[layer] = first_tensor(args, kwargs).detach()
            if last:
                raise _Enough

        return hook

    last = wanted[-1]
    pre = [(model.modules.ln_mlp[ly], read(mid, ly, False)) for ly in wanted]
    pre += [(model.modules.mlp[ly], read(into, ly, ly == last)) for ly in wanted]
    with torch.no_grad(), forward_hooks(pre, pre=True), contextlib.suppress(_Enough):
        model.hf(input_ids=ids.to(model.device), use_cache=False)
    if site == "mlp_in":
        return {ly: into[ly] for ly in wanted}
    return {ly: site_input(site, model.anatomy.layers[ly].ln_mlp, mid[ly]) for ly in wanted}
