"""The SAE itself: encoder semantics, exact feature decomposition, and a set of SAEs keyed by checkpoint.

A *checkpoint* c in 0..n_layers is the residual stream at the input of layer c; checkpoint n_layers is
the final residual before the last norm. `blocks.L.hook_resid_pre` maps to checkpoint L and
`blocks.L.hook_resid_post` to L + 1.

Every SAE here reads the model's raw (Hugging Face) residual: a release's input conventions (centring,
activation scaling) are folded into its weights at load time (see `qktrace.saes.conventions`), so
`encode` gives the activations the release's own code gives, and `decode` returns to residual units.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import Fix, MissingSAEError, SAELoadError, SAEMismatchError, check_index, quoted

ARCHITECTURES = ("standard", "jumprelu", "topk")
_RESID_HOOK = re.compile(r"^blocks\.([0-9]{1,6})\.hook_resid_(pre|post)$")  # a 5,000-digit layer is no layer


def hook_checkpoint(hook_name: str, where: str = "SAE") -> int:
    """`blocks.L.hook_resid_pre` -> L, `blocks.L.hook_resid_post` -> L + 1; anything else is a mismatch."""
    m = _RESID_HOOK.match(hook_name) if isinstance(hook_name, str) else None
    if m is None:
        raise SAEMismatchError(
            f"{where} reads hook {quoted(hook_name)}: only residual-stream SAEs are supported "
            "(blocks.L.hook_resid_pre or blocks.L.hook_resid_post): use a residual-stream SAE"
        )
    return int(m.group(1)) + (m.group(2) == "post")


def hook_layer(hook_name: str) -> int | None:
    """L of `blocks.L.hook_resid_{pre,post}` (the layer number tools like Neuronpedia use), else None."""
    m = _RESID_HOOK.match(hook_name)
    return None if m is None else int(m.group(1))


@dataclass(frozen=True, eq=False)
class FeatureActs:
    """Active features of one checkpoint over a prompt, COO layout sorted by (pos, feature)."""

    pos: Tensor  # [n] long
    feature: Tensor  # [n] long
    act: Tensor  # [n] in the SAE's dtype, as SAELens would compute it
    error: Tensor  # [pos, d_model] resid - decode(acts), in float32 (float64 for float64 input)

    @property
    def n_pos(self) -> int:
        return int(self.error.shape[0])

    def at(self, p: int) -> tuple[Tensor, Tensor]:
        """(features, acts) active at position p (negative counts from the end)."""
        p = check_index(p, self.n_pos, "position", allow_negative=True)
        lo, hi = torch.searchsorted(self.pos, torch.tensor([p, p + 1], device=self.pos.device)).tolist()
        return self.feature[lo:hi], self.act[lo:hi]


def activate(pre: Tensor, architecture: str, threshold: Tensor | None, k: int | None) -> Tensor:
    """Pre-activations [..., d_sae] -> feature acts, all >= 0: relu (standard), relu where pre > threshold
    (jumprelu), or the k largest kept and relu'd (topk). Shared by every sparse coder (SAEs, transcoders)."""
    if architecture == "standard":
        return pre.relu()
    if architecture == "jumprelu":
        assert threshold is not None
        return pre.relu() * (pre > threshold)
    assert k is not None
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def split_features(
    encode: Callable[[Tensor], Tensor], W_dec: Tensor, b_dec: Tensor, x: Tensor, target: Tensor, chunk: int = 4096
) -> FeatureActs:
    """x [pos, d_in] -> the active features of `encode(x)`, with target == sum_i a_i W_dec[f_i] + b_dec + error.

    An SAE's target is its input; a transcoder's is its layer's MLP output. Activations come in the coder's
    dtype; the reconstruction and the error in float32 (float64 input: float64), so the split is exact
    whatever the coder's precision. Positions are encoded `chunk` at a time: a [pos, d_sae] tensor is never
    held for a long prompt."""
    cdt = torch.promote_types(target.dtype, torch.float32)
    W, b = W_dec.to(cdt), b_dec.to(cdt)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    errors = []
    for p0 in range(0, x.shape[0], chunk):
        dense = encode(x[p0 : p0 + chunk])  # [chunk, d_sae]
        pos, feature = dense.nonzero(as_tuple=True)  # row-major, so sorted by (pos, feature)
        parts.append((pos + p0, feature, dense[pos, feature]))
        recon = dense.to(cdt) @ W + b
        errors.append(target[p0 : p0 + chunk].to(device=recon.device, dtype=cdt) - recon)
    pos, feature, act = (torch.cat(c) for c in zip(*parts))
    return FeatureActs(pos=pos, feature=feature, act=act, error=torch.cat(errors))


@dataclass(frozen=True, eq=False)
class SAE:
    """One residual-stream SAE with SAELens / Gemma Scope encoder semantics, reading the raw residual."""

    checkpoint: int
    architecture: str  # "standard" | "jumprelu" | "topk"
    W_enc: Tensor  # [d_model, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_model]
    b_dec: Tensor  # [d_model]
    threshold: Tensor | None = None  # [d_sae], jumprelu only
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True
    hook_name: str = ""  # defaults to blocks.{checkpoint}.hook_resid_pre
    source: str = ""
    labels: Mapping[int, str] = field(default_factory=dict)
    model_name: str = ""  # the model it was trained on, as its config names it
    prepend_bos: bool | None = None  # trained with a BOS token first; None: unknown
    context_size: int | None = None  # trained context length in tokens; None: unknown
    neuronpedia_id: str = ""  # e.g. "gpt2-small/8-res-jb"
    conventions: tuple[str, ...] = ()  # input conventions folded into the weights at load, for humans

    def __post_init__(self) -> None:
        if not self.hook_name:
            object.__setattr__(self, "hook_name", f"blocks.{self.checkpoint}.hook_resid_pre")
        where = f"SAE from {self.source or self.hook_name}"
        if self.architecture not in ARCHITECTURES:
            raise SAELoadError(
                f"{where} has architecture '{self.architecture}': supported are {', '.join(ARCHITECTURES)}"
            )
        d_model, d_sae = self.W_enc.shape if self.W_enc.dim() == 2 else (-1, -1)
        expected = {"W_enc": (d_model, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_model)}
        expected["b_dec"] = (d_model,)
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise SAELoadError(f"{where} is jumprelu but has no threshold: add a [d_sae] threshold tensor")
            expected["threshold"] = (d_sae,)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if d_model < 0 or got != shape:
                raise SAELoadError(
                    f"{where} has {name} of shape {list(got)}, expected {list(shape)} "
                    "(W_enc [d_model, d_sae]): re-export the SAE with consistent weights"
                )
        if self.architecture == "topk" and (
            isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 < self.k <= d_sae
        ):
            raise SAELoadError(f"{where} is topk with k={self.k!r}: k must be an integer in 1..d_sae={d_sae}")

    @property
    def d_model(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def _input(self, resid: Tensor) -> Tensor:
        if resid.shape[-1] != self.d_model:
            raise SAEMismatchError(
                f"resid has width {resid.shape[-1]} but the SAE at checkpoint {self.checkpoint} has "
                f"d_in={self.d_model}: pass the residual of the model this SAE was trained on"
            )
        return resid.to(device=self.W_enc.device, dtype=self.W_enc.dtype)

    def encode(self, resid: Tensor) -> Tensor:
        """resid [..., pos, d_model] -> dense feature acts [..., pos, d_sae], all >= 0."""
        x = self._input(resid)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return activate(x @ self.W_enc + self.b_enc, self.architecture, self.threshold, self.k)

    def decode(self, acts: Tensor) -> Tensor:
        """acts [..., pos, d_sae] -> reconstruction [..., pos, d_model] (includes b_dec)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def sparse(self, resid: Tensor, chunk: int = 4096) -> FeatureActs:
        """resid [pos, d_model] -> the active features, with resid == sum_i a_i W_dec[f_i] + b_dec + error.

        Activations are computed in the SAE's dtype (as SAELens would); the reconstruction and the error
        in float32 (float64 input: float64), so the split is exact whatever the SAE's precision. Positions
        are encoded `chunk` at a time: a [pos, d_sae] tensor is never held for a long prompt."""
        if resid.dim() != 2:
            raise SAEMismatchError(
                f"sparse() needs resid of shape [pos, d_model], got {list(resid.shape)}: pass one prompt"
            )
        self._input(resid[:0])  # width check
        return split_features(self.encode, self.W_dec, self.b_dec, resid, resid, chunk)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """A copy with every tensor moved to `device` and/or cast to `dtype`."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if self.threshold is not None else ())
        return dataclasses.replace(self, **{n: getattr(self, n).to(device=device, dtype=dtype) for n in names})

    def label(self, feature: int) -> str:
        """Short human label of a feature: from labels.json when known, else `c{checkpoint}/f{feature}`."""
        return self.labels.get(feature, f"c{self.checkpoint}/f{feature}")


S = TypeVar("S")


def require_saes(saes: Mapping[int, Any], checkpoints: Iterable[int], why: str = "") -> None:
    """The one check that SAEs are loaded where they are needed: MissingSAEError (one line naming the
    missing checkpoints, the loaded ones and how to load one; `why` says what needs them) otherwise."""
    missing = [int(c) for c in checkpoints if c not in saes]
    if missing:
        have = ", ".join(map(str, sorted(saes))) or "none"
        where = f"checkpoint {missing[0]}" if len(missing) == 1 else f"checkpoints {', '.join(map(str, missing))}"
        hooks = ", ".join(f"blocks.{c}.hook_resid_pre" for c in missing[:3]) + (", ..." if len(missing) > 3 else "")
        what = "an SAE" if len(missing) == 1 else "SAEs"
        load = f"load {what} with hook_name {hooks}"
        raise MissingSAEError(
            f"no SAE at {where} (loaded: {have}){why}",
            Fix(
                api=f"{load} (saes=DIR), or pick a loaded checkpoint",
                cli=f"{load} (--saes DIR), or pick a loaded checkpoint",
                http=f"pick a loaded checkpoint, or {load} (start the server with `qktrace serve --model MODEL "
                "--saes DIR`)",
            ),
        )


def sae_at(saes: Mapping[int, S], checkpoint: int) -> S:
    """The SAE at `checkpoint`, or MissingSAEError (`require_saes`): the lookup behind `SAESet[c]`,
    `Traced.sae` and steering."""
    require_saes(saes, [checkpoint])
    return saes[checkpoint]


class SAESet(Mapping[int, SAE]):
    """checkpoint -> SAE; not every checkpoint needs one."""

    def __init__(self, saes: Mapping[int, SAE]) -> None:
        self._saes = dict(sorted(saes.items()))

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(self._saes)

    @property
    def prepend_bos(self) -> bool | None:
        """True when any SAE was trained with BOS first; False when all say no; None when unknown."""
        wants = [s.prepend_bos for s in self._saes.values()]
        if any(w is True for w in wants):
            return True
        return False if wants and all(w is False for w in wants) else None

    @property
    def context_size(self) -> int | None:
        """The shortest trained context among the SAEs that state one (None when none does)."""
        sizes = [s.context_size for s in self._saes.values() if s.context_size is not None]
        return min(sizes) if sizes else None

    def __getitem__(self, checkpoint: int) -> SAE:
        return sae_at(self._saes, checkpoint)

    def __contains__(self, checkpoint: object) -> bool:
        return checkpoint in self._saes

    def get(self, checkpoint: int, default: Any = None) -> Any:
        return self._saes.get(checkpoint, default)

    def __iter__(self) -> Iterator[int]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    def __repr__(self) -> str:
        return f"SAESet(checkpoints={self.checkpoints})"

    def with_labels(self, labels: Mapping[int, Mapping[int, str]]) -> SAESet:
        """A copy whose SAE at checkpoint c also carries labels[c] (new labels win over old ones)."""
        for c in labels:
            self[c]  # raises MissingSAEError for a checkpoint without an SAE
        return SAESet(
            {
                c: dataclasses.replace(s, labels={**s.labels, **labels[c]}) if c in labels else s
                for c, s in self._saes.items()
            }
        )

    def describe(self) -> list[dict[str, Any]]:
        """One row per SAE for `qktrace info`."""
        keys = ("hook_name", "d_sae", "architecture", "k", "source", "prepend_bos", "context_size")
        return [
            {"checkpoint": c} | {key: getattr(s, key) for key in keys} | {"conventions": ", ".join(s.conventions)}
            for c, s in self._saes.items()
        ]


class CoderView:
    """Read-through names for a wrapper whose features an `SAE` encodes (`Transcoder`, `AttentionSAE`):
    its tensors, width and labels are the coder's own."""

    coder: SAE

    W_enc = property(lambda self: self.coder.W_enc)
    b_enc = property(lambda self: self.coder.b_enc)
    W_dec = property(lambda self: self.coder.W_dec)
    b_dec = property(lambda self: self.coder.b_dec)
    threshold = property(lambda self: self.coder.threshold)
    architecture = property(lambda self: self.coder.architecture)
    source = property(lambda self: self.coder.source)
    hook_name = property(lambda self: self.coder.hook_name)
    labels = property(lambda self: self.coder.labels)

    @property
    def d_sae(self) -> int:
        return self.coder.d_sae
