"""Attention-output SAEs: SAEs on one attention layer's output, the paper's strategy-2 checkpoints.

Two sites (`ATTENTION_SITES`, hooks mapped as data in `releases.json` `attention_sites`):
- "z": the heads' outputs before W_O, concatenated head by head (TransformerLens `attn.hook_z` flattened,
  SAELens's hook_z SAEs, Gemma Scope's "att" releases): x [pos, n_heads * d_head], head h at
  columns h*d_head:(h+1)*d_head. Since attn_out = sum_h z_h W_O[h] + b_O, an edge into a z-SAE feature
  splits exactly over heads.
- "attn_out": the attention output after W_O (and after Gemma-2's post-attention norm), x [pos, d_model].

The encoder and decoder are an `SAE` (`coder`), so activations, conventions folded at load and the exact
`sparse` split are the residual SAEs' own.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import OutOfRangeError, SAELoadError, SAEMismatchError
from .releases import registry
from .sae import SAE, CoderView, FeatureActs
from .transcoder_formats import layer_number

ATTENTION_SITES = ("z", "attn_out")
_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def attention_site(hook_name: str, where: str) -> tuple[int, str]:
    """`blocks.L.attn.hook_z` -> (L, "z"), `blocks.L.hook_attn_out` -> (L, "attn_out"); else one line."""
    m = _LAYER_HOOK.match(hook_name)
    sites: dict[str, str] = registry()["attention_sites"]["hooks"]
    if m is None or m.group(2) not in sites:
        known = ", ".join(f"blocks.L.{h}" for h in sites)
        raise SAEMismatchError(f"{where} reads hook '{hook_name}', not an attention output: use an SAE on {known}")
    return layer_number(m.group(1), f"{where}: hook '{hook_name}'"), sites[m.group(2)]


@dataclass(frozen=True, eq=False)
class AttentionSAE(CoderView):
    """An SAE on layer `layer`'s attention output at `site` ("z" or "attn_out")."""

    layer: int
    site: str
    coder: SAE  # W_enc [d_in, d_sae], d_in = n_heads * d_head (z) or d_model (attn_out)
    n_heads: int | None = None  # z only: how the input splits into heads
    d_head: int | None = None

    def __post_init__(self) -> None:
        where = f"attention SAE from {self.coder.source or self.coder.hook_name}"
        if self.site not in ATTENTION_SITES:
            raise SAELoadError(f"{where} reads site '{self.site}': known sites are {', '.join(ATTENTION_SITES)}")
        if self.site == "z" and (
            self.n_heads is None or self.d_head is None or self.n_heads * self.d_head != self.d_in
        ):
            raise SAEMismatchError(
                f"{where} reads hook_z with d_in={self.d_in}, but n_heads={self.n_heads} x d_head={self.d_head} "
                "does not equal it: use an SAE trained on this model's attention"
            )

    @property
    def d_in(self) -> int:
        return self.coder.d_model

    def flatten(self, z: Tensor) -> Tensor:
        """z [..., pos, head, d_head] -> [..., pos, head * d_head], the SAE's input layout."""
        if self.site != "z" or tuple(z.shape[-2:]) != (self.n_heads, self.d_head):
            raise SAEMismatchError(
                f"flatten() needs z of shape [..., {self.n_heads}, {self.d_head}] for a hook_z SAE, got "
                f"{list(z.shape)} (site {self.site}): pass the per-head attention outputs before W_O"
            )
        return z.flatten(-2)

    def heads(self, x: Tensor) -> Tensor:
        """[..., pos, head * d_head] -> [..., pos, head, d_head] (a hook_z SAE's input or decoder rows by head)."""
        if self.site != "z":
            raise SAEMismatchError(f"heads() splits hook_z inputs, but this SAE reads '{self.site}'")
        return x.unflatten(-1, (self.n_heads, self.d_head))

    def encode(self, x: Tensor) -> Tensor:
        """x [..., pos, d_in] -> dense feature acts [..., pos, d_sae]."""
        return self.coder.encode(x)

    def decode(self, acts: Tensor) -> Tensor:
        return self.coder.decode(acts)

    def sparse(self, x: Tensor, chunk: int = 4096) -> FeatureActs:
        """x [pos, d_in] -> active features, with x == sum_i a_i W_dec[f_i] + b_dec + error exactly."""
        return self.coder.sparse(x, chunk)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AttentionSAE:
        return dataclasses.replace(self, coder=self.coder.to(device, dtype))

    def label(self, feature: int) -> str:
        return self.labels.get(feature, f"a{self.layer}/f{feature}")


class AttentionSAESet(Mapping[int, AttentionSAE]):
    """layer -> attention-output SAE; not every layer needs one."""

    def __init__(self, saes: Mapping[int, AttentionSAE]) -> None:
        self._saes = dict(sorted(saes.items()))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self._saes)

    def __getitem__(self, layer: int) -> AttentionSAE:
        if layer not in self._saes:
            have = ", ".join(map(str, self._saes)) or "none"
            raise OutOfRangeError(f"no attention SAE at layer {layer}: loaded layers are {have}")
        return self._saes[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    def __repr__(self) -> str:
        return f"AttentionSAESet(layers={self.layers})"

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"layer": s.layer, "site": s.site, "hook_name": s.hook_name, "d_sae": s.d_sae, "source": s.source}
            for s in self._saes.values()
        ]
