"""Transcoders: sparse coders that read an MLP's input and write its output, per layer or across layers.

A per-layer transcoder (PLT) at layer L reads the MLP's input as its release defines it (the *input site*)
and writes layer L's MLP output (the *output site*):

    acts = activation(x W_enc + b_enc)                      x [pos, d_model] at the input site
    out  = acts W_dec + b_dec (+ x W_skip, skip transcoders)  out [pos, d_model] at the output site

A cross-layer transcoder (CLT) has one encoder per layer; the features read at layer l write into the MLP
output of l and of every later layer: out[l'] = sum_{l <= l'} acts[l] W_dec[l][:, l' - l] + b_dec[l'].

Input sites (`INPUT_SITES`), each a function of the residual after attention (`resid_mid`) and the frozen
pre-MLP norm (`site_input`):
- "resid_mid": the residual itself (TransformerLens `hook_resid_mid`);
- "mlp_in": the MLP's own input, the pre-MLP norm's output with its gain and bias (circuit-tracer `mlp.hook_in`);
- "normalized": the pre-MLP norm without gain or bias, (x - mean) / sigma or x / rms (TransformerLens
  `ln2.hook_normalized` of an RMSNorm model, as circuit-tracer feeds Gemma Scope transcoders).
Output sites (`OUTPUT_SITES`): "mlp_out", what the block adds to the residual (after Gemma-2's post-MLP
norm; `hook_mlp_out`), and "mlp_module_out", the MLP module's own output (before that norm; circuit-tracer
`mlp.hook_out`). For models without post-MLP norms the two are the same. Which hook means which site is
data in `releases.json` (`transcoder_sites`).

Every activation function is `sae.activate`; a PLT's encoder and decoder are an `SAE` (`coder`) whose
`b_dec` lives in output space and is never subtracted from the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import OutOfRangeError, SAELoadError, SAEMismatchError
from ..models.anatomy import Norm
from .sae import ARCHITECTURES, SAE, CoderView, FeatureActs, activate, split_features

INPUT_SITES = ("resid_mid", "mlp_in", "normalized")
OUTPUT_SITES = ("mlp_out", "mlp_module_out")


def check_sites(input_site: str, output_site: str, where: str) -> None:
    if input_site not in INPUT_SITES:
        raise SAELoadError(f"{where} reads input site '{input_site}': known sites are {', '.join(INPUT_SITES)}")
    if output_site not in OUTPUT_SITES:
        raise SAELoadError(f"{where} writes output site '{output_site}': known sites are {', '.join(OUTPUT_SITES)}")


def site_input(site: str, norm: Norm, resid_mid: Tensor, scale: Tensor | None = None) -> Tensor:
    """The transcoder input at `site` from the residual after attention [..., pos, d_model].

    `norm` is the layer's pre-MLP norm; `scale` its frozen 1/sqrt(var + eps) per position (computed from
    `resid_mid` when None), so with a frozen scale every site is an affine map of the residual."""
    if site == "resid_mid":
        return resid_mid
    s = norm.scale(resid_mid) if scale is None else scale
    if site == "mlp_in":
        return norm(resid_mid, s)
    if site == "normalized":
        x = resid_mid - resid_mid.mean(-1, keepdim=True) if norm.kind == "layernorm" else resid_mid
        return x * s.unsqueeze(-1)
    raise SAEMismatchError(f"input site '{site}' is unknown: known sites are {', '.join(INPUT_SITES)}")


def _skip(W_skip: Tensor | None, x: Tensor | None, where: str) -> Tensor | None:
    """x @ W_skip in W_skip's dtype (None without a skip term); a skip transcoder needs x."""
    if W_skip is None:
        return None
    if x is None:
        raise SAEMismatchError(f"{where} is a skip transcoder: pass its input x to decode so the skip term is added")
    return x.to(device=W_skip.device, dtype=W_skip.dtype) @ W_skip


@dataclass(frozen=True, eq=False)
class Transcoder(CoderView):
    """One per-layer transcoder (PLT), optionally with a linear skip term (skip transcoders)."""

    layer: int
    coder: SAE  # W_enc [d_model, d_sae], b_enc, W_dec [d_sae, d_model], b_dec [d_model] (output space)
    input_site: str
    output_site: str = "mlp_out"
    W_skip: Tensor | None = None  # [d_model, d_model]: skip = x @ W_skip
    hook_name_out: str = ""

    def __post_init__(self) -> None:
        where = f"transcoder from {self.source or self.coder.hook_name}"
        check_sites(self.input_site, self.output_site, where)
        if self.coder.apply_b_dec_to_input:
            raise SAELoadError(f"{where} subtracts b_dec from its input, but a transcoder's b_dec is an output bias")
        if self.W_skip is not None and tuple(self.W_skip.shape) != (self.d_model, self.d_model):
            raise SAELoadError(
                f"{where} has W_skip of shape {list(self.W_skip.shape)}, expected [{self.d_model}, {self.d_model}]: "
                "re-export the transcoder with consistent weights"
            )

    @property
    def d_model(self) -> int:
        return self.coder.d_model

    def encode(self, x: Tensor) -> Tensor:
        """x [..., pos, d_model] at the input site -> dense feature acts [..., pos, d_sae]."""
        return self.coder.encode(x)

    def skip(self, x: Tensor) -> Tensor:
        """The skip term x @ W_skip [..., pos, d_model] (zeros for a transcoder without one)."""
        out = _skip(self.W_skip, x, f"transcoder at layer {self.layer}")
        return torch.zeros_like(x, dtype=self.W_dec.dtype, device=self.W_dec.device) if out is None else out

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """acts [..., pos, d_sae] -> output [..., pos, d_model] (b_dec included; skip transcoders need x)."""
        out = self.coder.decode(acts)
        skip = _skip(self.W_skip, x, f"transcoder at layer {self.layer}")
        return out if skip is None else out + skip

    def sparse(self, x: Tensor, target: Tensor, chunk: int = 4096) -> FeatureActs:
        """x [pos, d_model] at the input site, target [pos, d_model] the MLP's true output at the output site ->
        the active features, with target == sum_i a_i W_dec[f_i] + b_dec + x @ W_skip + error (error exact,
        in float32; float64 input: float64)."""
        if x.dim() != 2 or target.shape != x.shape:
            raise SAEMismatchError(
                f"sparse() needs x and target of one shape [pos, d_model], got {list(x.shape)} and "
                f"{list(target.shape)}: pass one prompt's transcoder input and MLP output"
            )
        self.coder._input(x[:0])  # width check
        if self.W_skip is not None:
            cdt = torch.promote_types(target.dtype, torch.float32)
            skip = x.to(device=self.W_skip.device, dtype=cdt) @ self.W_skip.to(cdt)
            target = target.to(device=skip.device, dtype=cdt) - skip
        return split_features(self.encode, self.W_dec, self.b_dec, x, target, chunk)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Transcoder:
        skip = None if self.W_skip is None else self.W_skip.to(device=device, dtype=dtype)
        return dataclasses.replace(self, coder=self.coder.to(device, dtype), W_skip=skip)

    def label(self, feature: int) -> str:
        """Short human label: from labels.json when known, else `t{layer}/f{feature}`."""
        return self.labels.get(feature, f"t{self.layer}/f{feature}")


@dataclass(frozen=True, eq=False)
class CrossLayerTranscoder:
    """A cross-layer transcoder (CLT): one encoder per layer, decoders into this and every later MLP output."""

    architecture: str  # "standard" | "jumprelu" | "topk"
    W_enc: Tensor  # [layer, d_model, d_sae]
    b_enc: Tensor  # [layer, d_sae]
    W_dec: tuple[Tensor, ...]  # W_dec[l]: [d_sae, n_layers - l, d_model]
    b_dec: Tensor  # [layer, d_model]
    input_site: str
    output_site: str = "mlp_out"
    threshold: Tensor | None = None  # [layer, d_sae], jumprelu only
    k: int | None = None  # topk only
    W_skip: Tensor | None = None  # [layer, d_model, d_model]: skip into layer l = x_l @ W_skip[l]
    source: str = ""
    labels: Mapping[tuple[int, int], str] = field(default_factory=dict)  # (layer, feature) -> label

    def __post_init__(self) -> None:
        where = f"cross-layer transcoder from {self.source or 'memory'}"
        check_sites(self.input_site, self.output_site, where)
        if self.architecture not in ARCHITECTURES:
            raise SAELoadError(
                f"{where} has architecture '{self.architecture}': supported are {', '.join(ARCHITECTURES)}"
            )
        n, d_model, d_sae = self.W_enc.shape if self.W_enc.dim() == 3 else (-1, -1, -1)
        expected: dict[str, tuple[Tensor | None, tuple[int, ...]]] = {
            "b_enc": (self.b_enc, (n, d_sae)),
            "b_dec": (self.b_dec, (n, d_model)),
            "W_skip": (self.W_skip, (n, d_model, d_model)),
            "threshold": (self.threshold, (n, d_sae)),
        }
        expected |= {f"W_dec[{i}]": (w, (d_sae, n - i, d_model)) for i, w in enumerate(self.W_dec)}
        bad = [(k, list(t.shape), list(s)) for k, (t, s) in expected.items() if t is not None and tuple(t.shape) != s]
        if n < 0 or len(self.W_dec) != n or bad:
            name, got, want = bad[0] if bad else ("W_enc / W_dec", list(self.W_enc.shape), [n, d_model, d_sae])
            raise SAELoadError(
                f"{where} has {name} of shape {got}, expected {want} (W_enc [layer, d_model, d_sae], one W_dec per "
                f"layer, {len(self.W_dec)} given): re-export the transcoder with consistent weights"
            )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise SAELoadError(f"{where} is jumprelu but has no threshold: add a [layer, d_sae] threshold")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise SAELoadError(f"{where} is topk with k={self.k!r}: k must be an integer in 1..d_sae={d_sae}")

    @property
    def n_layers(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[2])

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise OutOfRangeError(f"layer {layer} is out of range: this CLT covers layers 0..{self.n_layers - 1}")
        return layer

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """x [..., pos, d_model] at layer's input site -> dense acts [..., pos, d_sae] of the features read there."""
        layer = self._layer(layer)
        if x.shape[-1] != self.d_model:
            raise SAEMismatchError(
                f"x has width {x.shape[-1]} but the CLT has d_model={self.d_model}: pass this model's activations"
            )
        x = x.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        threshold = None if self.threshold is None else self.threshold[layer]
        return activate(x @ self.W_enc[layer] + self.b_enc[layer], self.architecture, threshold, self.k)

    def decoder(self, layer_in: int, layer_out: int) -> Tensor:
        """[d_sae, d_model]: how features read at `layer_in` write into `layer_out`'s MLP output."""
        if not self._layer(layer_in) <= self._layer(layer_out):
            raise OutOfRangeError(f"features read at layer {layer_in} do not write into earlier layer {layer_out}")
        return self.W_dec[layer_in][:, layer_out - layer_in]

    def skip(self, layer: int, x: Tensor) -> Tensor:
        W = None if self.W_skip is None else self.W_skip[self._layer(layer)]
        out = _skip(W, x, "this CLT")
        return torch.zeros_like(x, dtype=self.b_dec.dtype, device=self.b_dec.device) if out is None else out

    def decode_into(
        self, layer_out: int, acts_by_layer: Mapping[int, Tensor] | Sequence[Tensor], x: Tensor | None = None
    ) -> Tensor:
        """The reconstruction of `layer_out`'s MLP output [..., pos, d_model]: sum over source layers
        l <= layer_out of acts_by_layer[l] [..., pos, d_sae] @ decoder(l, layer_out), plus b_dec[layer_out],
        plus the skip term when the CLT has one (then pass layer_out's input x). Missing layers count as zero."""
        acts = dict(acts_by_layer) if isinstance(acts_by_layer, Mapping) else dict(enumerate(acts_by_layer))
        out = self.b_dec[self._layer(layer_out)]
        for l_in, a in sorted(acts.items()):
            if l_in <= layer_out:
                out = out + a.to(device=self.b_dec.device, dtype=self.b_dec.dtype) @ self.decoder(l_in, layer_out)
        skip = _skip(None if self.W_skip is None else self.W_skip[layer_out], x, "this CLT")
        return out if skip is None else out + skip

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CrossLayerTranscoder:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return dataclasses.replace(
            self,
            W_enc=self.W_enc.to(device=device, dtype=dtype),
            b_enc=self.b_enc.to(device=device, dtype=dtype),
            W_dec=tuple(w.to(device=device, dtype=dtype) for w in self.W_dec),
            b_dec=self.b_dec.to(device=device, dtype=dtype),
            threshold=move(self.threshold),
            W_skip=move(self.W_skip),
        )

    def label(self, layer: int, feature: int) -> str:
        return self.labels.get((layer, feature), f"clt{layer}/f{feature}")


class TranscoderSet(Mapping[int, Transcoder]):
    """The transcoders of a model: per-layer transcoders keyed by layer, or one cross-layer transcoder.

    Both kinds answer the same questions (`encode`, `decode_into`, `skip`, `writes`), so graph code need not
    ask which it holds; indexing by layer gives a PLT's `Transcoder` (a CLT has none per layer)."""

    def __init__(self, per_layer: Mapping[int, Transcoder] | None = None, clt: CrossLayerTranscoder | None = None):
        if (per_layer is None) == (clt is None) or (per_layer is not None and not per_layer):
            raise SAELoadError("a TranscoderSet holds per-layer transcoders or one cross-layer transcoder: pass one")
        self._plt = dict(sorted((per_layer or {}).items()))
        self.clt = clt
        sites = {(t.input_site, t.output_site) for t in self._plt.values()} or {(clt.input_site, clt.output_site)}  # type: ignore[union-attr]
        if len(sites) > 1:
            raise SAELoadError(
                f"transcoders read and write different sites {sorted(sites)}: load transcoders of one release"
            )
        self.input_site, self.output_site = sites.pop()

    @property
    def kind(self) -> str:
        return "cross_layer" if self.clt is not None else "per_layer"

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose MLP input is encoded."""
        return tuple(range(self.clt.n_layers)) if self.clt is not None else tuple(self._plt)

    @property
    def has_skip(self) -> bool:
        if self.clt is not None:
            return self.clt.W_skip is not None
        return any(t.W_skip is not None for t in self._plt.values())

    def __getitem__(self, layer: int) -> Transcoder:
        if layer not in self._plt:
            have = "a cross-layer transcoder (use encode / decode_into)" if self.clt else ", ".join(map(str, self._plt))
            raise OutOfRangeError(f"no per-layer transcoder at layer {layer}: loaded are {have}")
        return self._plt[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._plt)

    def __len__(self) -> int:
        return len(self._plt)

    def __contains__(self, layer: object) -> bool:
        return layer in self._plt

    def __repr__(self) -> str:
        return f"TranscoderSet(kind={self.kind}, layers={self.layers}, input={self.input_site})"

    def encode(self, layer: int, x: Tensor) -> Tensor:
        return self.clt.encode(layer, x) if self.clt is not None else self[layer].encode(x)

    def writes(self, layer_in: int) -> tuple[int, ...]:
        """The layers whose MLP output features read at `layer_in` write into."""
        return tuple(range(layer_in, self.clt.n_layers)) if self.clt is not None else (layer_in,)

    def decode_into(
        self, layer_out: int, acts_by_layer: Mapping[int, Tensor] | Sequence[Tensor], x: Tensor | None = None
    ) -> Tensor:
        """The reconstruction of `layer_out`'s MLP output from the acts of every layer (a PLT uses its own)."""
        if self.clt is not None:
            return self.clt.decode_into(layer_out, acts_by_layer, x)
        acts = dict(acts_by_layer) if isinstance(acts_by_layer, Mapping) else dict(enumerate(acts_by_layer))
        return self[layer_out].decode(acts[layer_out], x)

    def skip(self, layer: int, x: Tensor) -> Tensor:
        return self.clt.skip(layer, x) if self.clt is not None else self[layer].skip(x)

    def describe(self) -> list[dict[str, Any]]:
        """One row per layer (one row for a CLT) for `qktrace info`."""
        if self.clt is not None:
            c = self.clt
            return [{"kind": "cross_layer", "layers": c.n_layers, "d_sae": c.d_sae, "architecture": c.architecture,
                     "input_site": c.input_site, "skip": c.W_skip is not None, "source": c.source}]  # fmt: skip
        return [
            {
                "layer": t.layer,
                "d_sae": t.d_sae,
                "architecture": t.architecture,
                "input_site": t.input_site,
                "skip": t.W_skip is not None,
                "source": t.source,
            }  # fmt: skip
            for t in self._plt.values()
        ]
