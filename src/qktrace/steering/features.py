"""What steering one feature adds, by kind: its activation in the clean run, and the vectors it writes.

A steerable feature is addressed as a graph node is (`qktrace.nodes`): its kind, the layer or checkpoint
that reads it, its index, and the positions it is steered at. Steering it by c (c = (scale - 1) * a, or
value - a, per position) adds c times its write vectors:

- `Kind.FEATURE`, a residual-SAE feature at checkpoint c: reads and writes the residual at c, so c * W_dec[f]
  is added to the residual at c (its output), and a head of layer c reads exactly that (`into_residual`).
- `Kind.TRANSCODER`, a transcoder feature read at layer l's MLP input: writes decoder(l, j)[f] into the MLP
  output of every layer j it writes (`TranscoderSet.writes`: l alone for a per-layer transcoder, l and every
  later layer for a cross-layer one). The rest of each MLP's output (the other features, b_dec, the skip
  term, the MLP error) is unchanged, so at the layers it writes this is the replacement model with that one
  activation changed; later layers run as the model runs them. At the output site "mlp_out" (what the
  block adds) a write is added to the residual at checkpoint j + 1; at "mlp_module_out" under a post-MLP
  norm, to the MLP module's own output (the norm then runs as the model runs it). A head of layer L > l
  reads the writes into layers j < L, each through the post-MLP norm at its clean frozen scale where the set
  writes before it: exactly the feature's part of the residual in `qktrace.graph.transcoder_qk`.

Attention-output SAE features (`Kind.ATTN_FEATURE`) would be one more kind here: their activation at the
attention output, their decoder written into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ..errors import InputError, check_index
from ..models.model import Model
from ..models.trace import Trace
from ..nodes import Kind
from ..saes.sae import sae_at

if TYPE_CHECKING:
    from ..saes.transcoder import TranscoderSet

STEERABLE = (Kind.FEATURE, Kind.TRANSCODER)


class SAELike(Protocol):
    """What interventions need from an SAE (qktrace.saes.SAE satisfies it)."""

    @property
    def checkpoint(self) -> int: ...
    @property
    def W_dec(self) -> Tensor: ...  # [d_sae, d_model]

    def encode(self, resid: Tensor) -> Tensor: ...  # [pos, d_model] -> [pos, d_sae]


def steerable_kind(kind: Kind | str) -> Kind:
    """`kind` as a Kind that can be steered, or InputError naming the ones that can."""
    try:
        k = Kind(kind)
    except ValueError:
        k = None
    if k not in STEERABLE:
        names = ", ".join(s.value for s in STEERABLE)
        raise InputError(f"features of kind {kind!r} cannot be steered: steer one of kind {names}")
    return k


@dataclass
class Writes:
    """What steering adds, at activation coefficients c [n] at positions [n]: vectors [n, d_model] per site."""

    resid: dict[int, Tensor] = field(default_factory=dict)  # checkpoint -> added to the residual there
    mlp: dict[int, Tensor] = field(default_factory=dict)  # layer -> added to the MLP module's output


class Features:
    """The feature dictionaries of one run (residual SAEs by checkpoint, transcoders) against its clean trace;
    each dictionary's activations are encoded once."""

    def __init__(
        self, model: Model, saes: Mapping[int, SAELike], transcoders: TranscoderSet | None, clean: Trace
    ) -> None:
        self.model, self.saes, self.transcoders, self.clean = model, saes, transcoders, clean
        self._acts: dict[tuple[Kind, int], Tensor] = {}
        self._x: tuple[Tensor, ...] | None = None

    def _ts(self) -> TranscoderSet:
        if self.transcoders is None:
            raise InputError("a transcoder feature was steered but no transcoders are loaded: load them (transcoders=)")
        return self.transcoders

    def check(self, kind: Kind, layer: int, feature: int) -> int:
        """The checkpoint (residual SAE) or layer (transcoder) `layer`, checked with its feature; returns it."""
        L = self.model.n_layers
        if kind is Kind.FEATURE:
            c = check_index(layer, L + 1, "checkpoint")
            check_index(feature, int(sae_at(self.saes, c).W_dec.shape[0]), f"feature (SAE at checkpoint {c})")
            return c
        ts = self._ts()
        layer = check_index(layer, L, "transcoder layer")
        if layer not in ts.layers:
            raise InputError(f"no transcoder reads layer {layer}: loaded are layers {list(ts.layers)}")
        d_sae = ts.clt.d_sae if ts.clt is not None else ts[layer].d_sae
        check_index(feature, d_sae, f"feature (transcoder at layer {layer})")
        return layer

    def acts(self, kind: Kind, layer: int) -> Tensor:
        """Dense activations [pos, d_sae] of the dictionary at `layer` in the clean run (not zeroed anywhere)."""
        if (kind, layer) not in self._acts:
            resid = self.clean.resid[min(layer, self.model.n_layers)]
            with torch.no_grad():
                if kind is Kind.FEATURE:
                    a = sae_at(self.saes, layer).encode(resid)
                else:
                    a = self._ts().encode(layer, self._site_inputs()[layer])
            self._acts[kind, layer] = a.to(device=resid.device, dtype=resid.dtype)
        return self._acts[kind, layer]

    def _site_inputs(self) -> tuple[Tensor, ...]:
        if self._x is None:
            from ..graph.replacement import sites

            self._x = sites(self.model, self.clean, self._ts()).x
        return self._x

    def _decoder(self, layer: int, j: int, feature: int) -> Tensor:
        ts = self._ts()
        dec = ts.clt.decoder(layer, j) if ts.clt is not None else ts[layer].W_dec
        return dec[feature]

    def output(self, kind: Kind, layer: int, feature: int, pos: list[int], coef: Tensor) -> Writes:
        """What steering the feature's output by `coef` [n] at `pos` adds (module docstring)."""
        out, ref = Writes(), self.clean.resid[0]
        coef = coef.to(ref.device)  # under a device map the activations sit with their layer
        if kind is Kind.FEATURE:
            out.resid[layer] = coef[:, None] * sae_at(self.saes, layer).W_dec[feature].to(ref)
            return out
        ts, an = self._ts(), self.model.anatomy
        for j in ts.writes(layer):
            v = coef[:, None] * self._decoder(layer, j, feature).to(ref)
            if ts.output_site == "mlp_module_out" and an.layers[j].post_mlp is not None:
                out.mlp[j] = v
            else:
                out.resid[j + 1] = v
        return out

    def into_residual(
        self, kind: Kind, layer: int, feature: int, pos: list[int], coef: Tensor, checkpoint: int
    ) -> Tensor:
        """[n, d_model]: what steering the feature by `coef` at `pos` adds to the residual that layer
        `checkpoint`'s heads read, through frozen post-MLP norms (module docstring); InputError when it adds
        nothing there."""
        ref = self.clean.resid[checkpoint]
        coef = coef.to(ref.device)
        if kind is Kind.FEATURE:
            if layer != checkpoint:
                raise InputError(
                    f"heads of layer {checkpoint} read the SAE at checkpoint {checkpoint}, not {layer}: "
                    f"steer a feature of checkpoint {checkpoint}"
                )
            return coef[:, None] * sae_at(self.saes, layer).W_dec[feature].to(ref)
        ts, an = self._ts(), self.model.anatomy
        below = [j for j in ts.writes(layer) if j < checkpoint]
        if not below:
            raise InputError(
                f"transcoder features read at layer {layer} write no residual that layer {checkpoint}'s heads read: "
                f"steer a feature of a layer below {checkpoint}"
            )
        total = torch.zeros(len(pos), ref.shape[-1], dtype=ref.dtype, device=ref.device)
        p = torch.as_tensor(pos, dtype=torch.long, device=ref.device)
        for j in below:
            v = coef[:, None] * self._decoder(layer, j, feature).to(ref)
            post = an.layers[j].post_mlp
            if ts.output_site == "mlp_module_out" and post is not None:
                assert self.clean.scale_post_mlp is not None
                scale = self.clean.scale_post_mlp[j]
                v = post.linear(v, scale[p.to(scale.device)].to(v))
            total += v
        return total
