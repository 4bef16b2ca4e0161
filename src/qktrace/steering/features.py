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

- `Kind.ATTN_FEATURE`, an attention-output SAE feature of layer l (`qktrace.saes.attention`): its activation
  is the SAE's encoding of l's attention output in the clean run (at hook_z, or after W_O and a post-attention
  norm), and it writes its decoder row there. A hook_z row is added to the heads' z before W_O, which is
  adding its image through W_O (head by head, no b_O) to the attention module's output (a post-attention norm
  then runs as the model runs it); an attn_out row is added to the attention output as it joins the
  residual (after the post-attention norm, else the attention module's output). A head of layer L > l reads
  that write, a hook_z one through the post-attention norm at its clean frozen scale: exactly the feature's
  part of the residual in `qktrace.graph.transcoder_qk` (a checkpointed graph's writers).
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
    from ..saes.attention import AttentionSAE, AttentionSAESet
    from ..saes.transcoder import TranscoderSet

STEERABLE = (Kind.FEATURE, Kind.TRANSCODER, Kind.ATTN_FEATURE)


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
    attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> added to the attention module's output
    post_attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> added after the post-attention norm


class Features:
    """The feature dictionaries of one run (residual SAEs by checkpoint, transcoders, attention-output SAEs)
    against its clean trace; each dictionary's activations are encoded once."""

    def __init__(
        self, model: Model, saes: Mapping[int, SAELike], transcoders: TranscoderSet | None, clean: Trace,
        attention_saes: AttentionSAESet | None = None,
    ) -> None:  # fmt: skip
        self.model, self.saes, self.transcoders, self.clean = model, saes, transcoders, clean
        self.attention_saes = attention_saes
        self._acts: dict[tuple[Kind, int], Tensor] = {}
        self._x: tuple[Tensor, ...] | None = None
        self._att_x: tuple[Tensor, ...] | None = None

    def _ts(self) -> TranscoderSet:
        if self.transcoders is None:
            raise InputError("a transcoder feature was steered but no transcoders are loaded: load them (transcoders=)")
        return self.transcoders

    def _att(self, layer: int) -> AttentionSAE:
        if self.attention_saes is None:
            raise InputError(
                "an attention feature was steered but no attention SAEs are loaded: load them (attention_saes=)"
            )
        if layer not in self.attention_saes:
            raise InputError(f"no attention SAE at layer {layer}: loaded are layers {list(self.attention_saes)}")
        return self.attention_saes[layer]

    def check(self, kind: Kind, layer: int, feature: int) -> int:
        """The checkpoint (residual SAE) or layer (transcoder, attention SAE) `layer`, checked with its feature;
        returns it."""
        L = self.model.n_layers
        if kind is Kind.FEATURE:
            c = check_index(layer, L + 1, "checkpoint")
            check_index(feature, int(sae_at(self.saes, c).W_dec.shape[0]), f"feature (SAE at checkpoint {c})")
            return c
        if kind is Kind.ATTN_FEATURE:
            layer = check_index(layer, L, "attention layer")
            check_index(feature, self._att(layer).d_sae, f"feature (attention SAE at layer {layer})")
            return layer
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
                elif kind is Kind.ATTN_FEATURE:
                    sae = self._att(layer)
                    a = sae.encode(self._attention_inputs()[layer].to(sae.W_enc))
                else:
                    a = self._ts().encode(layer, self._site_inputs()[layer])
            self._acts[kind, layer] = a.to(device=resid.device, dtype=resid.dtype)
        return self._acts[kind, layer]

    def _site_inputs(self) -> tuple[Tensor, ...]:
        if self._x is None:
            from ..graph.replacement import sites

            self._x = sites(self.model, self.clean, self._ts()).x
        return self._x

    def _attention_inputs(self) -> tuple[Tensor, ...]:
        if self._att_x is None:
            from ..graph.strategy2 import attention_inputs

            assert self.attention_saes is not None
            self._att_x = attention_inputs(self.model.anatomy, self.clean, self.attention_saes)
        return self._att_x

    def _attention_write(self, layer: int, feature: int, coef: Tensor, ref: Tensor) -> Tensor:
        """[n, d_model]: coef times the feature's decoder row, a hook_z row through W_O (before any post-norm)."""
        sae = self._att(layer)
        v = coef[:, None].to(ref) * sae.W_dec[feature].to(ref)  # [n, d_in]
        if sae.site == "z":
            v = torch.einsum("nhe,hed->nd", sae.heads(v), self.model.anatomy.layers[layer].W_O.to(ref))
        return v

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
        if kind is Kind.ATTN_FEATURE:
            v = self._attention_write(layer, feature, coef, ref)
            after_norm = self._att(layer).site == "attn_out" and self.model.anatomy.layers[layer].post_attn is not None
            (out.post_attn if after_norm else out.attn)[layer] = v
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
        if kind is Kind.ATTN_FEATURE:
            return self._attention_into_residual(layer, feature, pos, coef, checkpoint, ref)
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

    def _attention_into_residual(
        self, layer: int, feature: int, pos: list[int], coef: Tensor, checkpoint: int, ref: Tensor
    ) -> Tensor:
        """[n, d_model]: an attention feature's write as it joins the residual (a hook_z one through the
        post-attention norm at its frozen scale); InputError unless `checkpoint` is above its layer."""
        if layer >= checkpoint:
            raise InputError(
                f"attention features of layer {layer} write no residual that layer {checkpoint}'s heads read: "
                f"steer a feature of a layer below {checkpoint}"
            )
        v = self._attention_write(layer, feature, coef, ref)
        post = self.model.anatomy.layers[layer].post_attn
        if self._att(layer).site == "z" and post is not None:
            assert self.clean.scale_post_attn is not None
            scale = self.clean.scale_post_attn[layer]
            p = torch.as_tensor(pos, dtype=torch.long, device=scale.device)
            v = post.linear(v, scale[p].to(v))
        return v
