"""Interventions that test a QK explanation: steer features, steer them inside chosen QK circuits only,
freeze or scale attention heads -- all at once, by ordinary hooks that are always removed.

The algorithm of `run_with(model, saes, prompt, interventions)`:

1. Run the prompt cleanly (only when an intervention needs it): the residual at every checkpoint, the
   frozen norm scales, q/k after rotary and QK-norm, and every head's pattern.
2. Turn each intervention into explicit numbers, all from the clean run. A feature f with activation a
   at position p (the SAE encoding of the clean residual) and decoder row v is steered by adding
   c * v with c = (scale - 1) * a, or c = value - a to set (or inject) the activation.
   - `SteerFeature`: c * v is added to the residual at checkpoint c (forward-pre hook on block c, or
     a forward hook on the last block for the final residual). A transcoder feature (kind=Kind.TRANSCODER)
     is read at its layer's MLP input site and writes the MLP output of every layer it writes
     (`qktrace.steering.features`): residual adds at checkpoint j + 1, or a forward hook on the MLP module.
     An attention-output SAE feature (kind=Kind.ATTN_FEATURE) of layer l writes l's attention output: a
     hook_z row is added to the heads' z before W_O (a forward hook on the attention module adding its image
     through W_O), an attn_out row to the attention output as it joins the residual (after a post-norm).
   - `SteerQK`: c * v is pushed through the QK circuit only, linearised at the clean run's frozen
     scales: attention-input norm, W_Q (or W_K of the head's kv head), QK-norm, rotary at p. The
     result is a delta on the query (or key) of each chosen head, kept per *query* head. For a transcoder
     or attention feature v is its writes into the residual the heads' layer reads (`Features.into_residual`).
3. Run again with the hooks in place. At the attention seam each steered head's scores are recomputed
   from HF's own q and k plus the deltas (same scale, soft-cap and mask as HF), and soft-maxed; every
   other head keeps exactly the pattern HF computed. Frozen heads then get their clean pattern
   (recomputed from the clean trace's q and k, one layer at a time), `PatchAttention` gives a head its
   pattern in another prompt's trace, and `ScaleHead` multiplies a head's pattern (the same as scaling
   its z before W_O).

Memory: a result keeps the residual stream and logits; attention scores and patterns only of the
layers asked for (`record_attention`), never of every layer.

Why scores are recomputed instead of editing HF's key tensor: in GQA models several query heads share
one key tensor, so editing it would steer heads that were not chosen. A per-query-head delta on the
scores steers exactly the chosen heads, and for q (or k) only scores depend on it, so this equals
running the model with that head's own steered q (or k).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..errors import InputError, check_index
from ..models.model import Model
from ..models.replay import project, qk_norm_and_rotate
from ..models.tokens import Positions, resolve_positions
from ..models.trace import PerLayer, Trace
from ..nodes import Kind
from .features import Features, SAELike, steerable_kind
from .hooks import Plan, applied

if TYPE_CHECKING:
    from ..saes.attention import AttentionSAESet
    from ..saes.transcoder import TranscoderSet

log = logging.getLogger(__name__)


class ScalePlaceholder:
    """Stands for the swept value in interventions given to `sweep` (use the `SCALE` instance)."""

    def __repr__(self) -> str:
        return "SCALE"


SCALE = ScalePlaceholder()
Amount = float | ScalePlaceholder | None


def _freeze_positions(obj: Any) -> None:
    p = obj.positions
    if not isinstance(p, int | slice | range):
        object.__setattr__(obj, "positions", tuple(int(i) for i in p))
    if (obj.scale is None) == (obj.value is None):
        raise InputError(f"{type(obj).__name__} needs exactly one of scale= or value=, got {obj.scale}, {obj.value}")


@dataclass(frozen=True)
class SteerFeature:
    """Steer one feature's output: an SAE feature at checkpoint c (the input of layer c; n_layers = final), its
    decoder added to the residual there; or, with kind=Kind.TRANSCODER, the transcoder feature read at layer
    `checkpoint`'s MLP input, its decoder added to the MLP output of every layer it writes; or, with
    kind=Kind.ATTN_FEATURE, the attention-output SAE feature of layer `checkpoint`, its decoder added to that
    layer's attention output at the SAE's site (`qktrace.steering.features`)."""

    checkpoint: int  # the SAE's checkpoint, the layer whose MLP input the transcoder reads, or the attention layer
    feature: int
    positions: Positions  # int, list of ints, slice or range; negative counts from the end of the prompt
    scale: Amount = None  # activation becomes scale * a
    value: Amount = None  # activation becomes value (injects where the feature is inactive)
    kind: Kind = Kind.FEATURE  # Kind.FEATURE (residual SAE), Kind.TRANSCODER or Kind.ATTN_FEATURE

    def __post_init__(self) -> None:
        _freeze_positions(self)
        object.__setattr__(self, "kind", steerable_kind(self.kind))


@dataclass(frozen=True)
class SteerQK:
    """Steer a feature only inside the QK circuit of `heads` of `layer`: an SAE feature of checkpoint `layer`,
    or, with kind=Kind.TRANSCODER, the transcoder feature read at layer `feature_layer` (< `layer`), or with
    kind=Kind.ATTN_FEATURE the attention-output SAE feature of layer `feature_layer` (< `layer`), whose writes
    into the residual that `layer` reads are steered for those heads alone."""

    layer: int
    heads: int | tuple[int, ...]
    side: Literal["query", "key"]
    feature: int
    positions: Positions  # query positions (side="query") or key positions (side="key")
    scale: Amount = None
    value: Amount = None
    kind: Kind = Kind.FEATURE  # Kind.FEATURE (residual SAE), Kind.TRANSCODER or Kind.ATTN_FEATURE
    feature_layer: int | None = None  # the transcoder / attention feature's layer (None for an SAE feature)

    def __post_init__(self) -> None:
        _freeze_positions(self)
        object.__setattr__(self, "kind", steerable_kind(self.kind))
        if (self.kind is not Kind.FEATURE) != (self.feature_layer is not None):
            raise InputError(
                f"SteerQK of kind {self.kind.value} with feature_layer={self.feature_layer}: a transcoder or "
                "attention feature needs its layer (feature_layer=), an SAE feature none (it is of checkpoint `layer`)"
            )
        heads = (self.heads,) if isinstance(self.heads, int) else tuple(int(h) for h in self.heads)
        object.__setattr__(self, "heads", heads)
        if self.side not in ("query", "key"):
            raise InputError(f"SteerQK side must be 'query' or 'key', got '{self.side}'")


@dataclass(frozen=True)
class FreezeAttention:
    """Keep clean patterns: of every head no SteerQK steers (heads=None), or of the given (layer, head)s."""

    heads: frozenset[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.heads is not None:
            object.__setattr__(self, "heads", frozenset((int(ly), int(h)) for ly, h in self.heads))


@dataclass(frozen=True)
class ScaleHead:
    """Multiply one head's output (its pattern, hence its z before W_O) by `scale`; 0 ablates it."""

    layer: int
    head: int
    scale: float | ScalePlaceholder


@dataclass(frozen=True, eq=False)
class PatchAttention:
    """Give heads (layer, head) the patterns they have in another prompt of the same length: `source` is that
    prompt's clean trace (activation patching of attention patterns; the values stay this prompt's)."""

    heads: frozenset[tuple[int, int]]
    source: Trace

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", frozenset((int(ly), int(h)) for ly, h in self.heads))


Intervention = SteerFeature | SteerQK | FreezeAttention | ScaleHead | PatchAttention


@dataclass(frozen=True, eq=False)
class InterventionResult:
    """One intervened forward pass."""

    tokens: Tensor  # [pos]
    logits: Tensor  # [pos, vocab], or [1, vocab] (the last position) when run with last_only
    patterns: Mapping[int, Tensor]  # layer -> [head, q_pos, k_pos] the patterns used (after freezing, scaling)
    scores: Mapping[int, Tensor]  # layer -> [head, q_pos, k_pos] softmax input (soft-capped), masked = -inf
    resid: PerLayer  # [checkpoint][pos, d_model] residual stream with every steer applied

    def probs(self, pos: int = -1) -> Tensor:
        """Next-token probabilities [vocab] at `pos`."""
        return torch.softmax(self.logits[pos].float(), dim=-1)


# -- turning interventions into numbers ------------------------------------------------------------


def _coefficients(iv: SteerFeature | SteerQK, acts: Tensor, pos: list[int]) -> Tensor:
    """c per position [n]: (scale - 1) * a, or value - a."""
    a = acts[pos, iv.feature]
    if isinstance(iv.scale, ScalePlaceholder) or isinstance(iv.value, ScalePlaceholder):
        raise InputError(f"{iv} still holds the SCALE placeholder: only sweep() fills it in")
    return (iv.scale - 1.0) * a if iv.scale is not None else float(iv.value) - a  # type: ignore[arg-type]


def _plan(
    model: Model,
    saes: Mapping[int, SAELike],
    clean: Trace | None,
    ivs: Sequence[Intervention],
    transcoders: TranscoderSet | None = None,
    attention_saes: AttentionSAESet | None = None,
) -> Plan:
    L, H = model.n_layers, model.n_heads
    plan = Plan()
    feats = None if clean is None else Features(model, saes, transcoders, clean, attention_saes)
    declared: set[tuple[int, int]] = set()
    for iv in ivs:
        if isinstance(iv, SteerFeature):
            assert feats is not None
            _plan_output(plan, feats, iv)
        elif isinstance(iv, SteerQK):
            assert feats is not None
            declared |= _plan_qk(plan, feats, iv)
        elif isinstance(iv, ScaleHead):
            key = (check_index(iv.layer, L, "layer"), check_index(iv.head, H, "head"))
            if isinstance(iv.scale, ScalePlaceholder):
                raise InputError(f"{iv} still holds the SCALE placeholder: only sweep() fills it in")
            plan.head_scale[key] = plan.head_scale.get(key, 1.0) * float(iv.scale)
        elif isinstance(iv, PatchAttention):
            if clean is not None and iv.source.n_pos != clean.n_pos:
                raise InputError(
                    f"PatchAttention's source has {iv.source.n_pos} tokens and the prompt {clean.n_pos}: "
                    "patch between prompts whose tokens align"
                )
            for ly_, h in iv.heads:
                key = (check_index(ly_, L, "layer"), check_index(h, H, "head"))
                plan.patched[key] = iv.source
                declared.add(key)  # patched, so not frozen
    _plan_frozen(plan, ivs, declared, L, H)
    return plan


def _add(store: dict[int, Tensor], at: int, like: Tensor, pos: list[int], v: Tensor) -> None:
    add = store.setdefault(at, torch.zeros_like(like))
    add[pos] += v.to(add)


def _plan_output(plan: Plan, feats: Features, iv: SteerFeature) -> None:
    """A feature's output steered: its writes at every site it writes (`Features.output`)."""
    clean = feats.clean
    at = feats.check(iv.kind, iv.checkpoint, iv.feature)
    pos = resolve_positions(iv.positions, clean.n_pos)
    coef = _coefficients(iv, feats.acts(iv.kind, at), pos)
    if not bool((coef != 0).any()):
        return
    writes = feats.output(iv.kind, at, iv.feature, pos, coef)
    for c, v in writes.resid.items():
        _add(plan.resid_add, c, clean.resid[c], pos, v)
    for j, v in writes.mlp.items():
        _add(plan.mlp_add, j, clean.mlp_out[j], pos, v)
    for j, v in writes.attn.items():
        _add(plan.attn_add, j, clean.resid[j], pos, v)
    for j, v in writes.post_attn.items():
        _add(plan.post_attn_add, j, clean.resid[j], pos, v)


def _plan_qk(plan: Plan, feats: Features, iv: SteerQK) -> set[tuple[int, int]]:
    """A feature steered inside some heads' QK circuits: its part of the residual those heads read, pushed
    through the frozen attention-input norm, W_Q or W_K, QK-norm and rotary; returns the heads."""
    model, clean = feats.model, feats.clean
    an, L = model.anatomy, model.n_layers
    layer = check_index(iv.layer, L, "layer")
    heads = [check_index(h, an.layers[layer].n_heads, "head") for h in iv.heads]  # type: ignore[union-attr]
    source = layer if iv.feature_layer is None else iv.feature_layer
    at = feats.check(iv.kind, source, iv.feature)
    pos = resolve_positions(iv.positions, clean.n_pos)
    coef = _coefficients(iv, feats.acts(iv.kind, at), pos)
    vec = feats.into_residual(iv.kind, at, iv.feature, pos, coef, layer)  # [n, d_model]; checks it reaches them
    if not bool((coef != 0).any()):
        return {(layer, h) for h in heads}
    ly, side = an.layers[layer], "q" if iv.side == "query" else "k"
    pos_t = torch.tensor(pos, device=clean.resid[layer].device)
    xn = ly.ln_attn.linear(vec, clean.scale_ln_attn[layer, pos_t])  # [n, d_model]
    d = qk_norm_and_rotate(an, ly, side, project(ly, side, xn, bias=False), pos_t, clean)
    if side == "k":
        d = d[ly.kv_index()]  # [kv_head, n, d_head] -> [head, n, d_head]
    store = plan.q_delta if side == "q" else plan.k_delta
    delta = store.setdefault(layer, torch.zeros_like(clean.q[layer]))  # [head, pos, d_head]
    for h in heads:
        delta[h, pos_t] += d[h]
    plan.recompute.setdefault(layer, set()).update(heads)
    return {(layer, h) for h in heads}


def _plan_frozen(plan: Plan, ivs: Sequence[Intervention], declared: set[tuple[int, int]], L: int, H: int) -> None:
    for iv in ivs:
        if isinstance(iv, FreezeAttention):
            if iv.heads is None:
                plan.frozen |= {(i, h) for i in range(L) for h in range(H)} - declared
            else:
                both = sorted(iv.heads & declared)
                if both:
                    raise InputError(f"heads {both} are both steered and frozen: drop them from FreezeAttention")
                for i, h in iv.heads:
                    plan.frozen.add((check_index(i, L, "layer"), check_index(h, H, "head")))


def _needs_clean(ivs: Sequence[Intervention]) -> bool:
    return any(isinstance(iv, SteerFeature | SteerQK | FreezeAttention | PatchAttention) for iv in ivs)


# -- public entry points ---------------------------------------------------------------------------


def run_with(
    model: Model,
    saes: Mapping[int, SAELike],
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention],
    clean: Trace | None = None,
    *,
    record_attention: bool | Iterable[int] = False,
    last_only: bool = False,
    transcoders: TranscoderSet | None = None,
    attention_saes: AttentionSAESet | None = None,
) -> InterventionResult:
    """One forward pass of `prompt` under all `interventions` (pass `clean` to reuse a clean run).

    `record_attention`: keep the scores and patterns of every layer (True) or of the layers given;
    `last_only`: logits of the last position only; `transcoders` / `attention_saes`: the dictionaries whose
    features interventions of kind Kind.TRANSCODER / Kind.ATTN_FEATURE steer."""
    ids = model.tokenize(prompt)
    ivs = list(interventions)
    if clean is None and _needs_clean(ivs):
        clean = model.run(ids)
    if clean is not None and not torch.equal(clean.tokens, ids):
        raise InputError("the clean trace is of a different prompt: pass model.run(prompt) of this prompt")
    L = model.n_layers
    record = (
        set(range(L)) if record_attention is True else set() if record_attention is False else set(record_attention)
    )
    plan = _plan(model, saes, clean, ivs, transcoders, attention_saes)
    with applied(model, plan, clean, record) as rec:
        logits = model.forward(ids, last_only=last_only)
    return InterventionResult(
        tokens=ids,
        logits=logits.detach().float(),
        patterns=dict(sorted(rec.patterns.items())),
        scores=dict(sorted(rec.scores.items())),
        resid=PerLayer(rec.resid[c].float() for c in range(L + 1)),
    )


def _pin_positions(ivs: Sequence[Intervention], n_pos: int) -> list[Intervention]:
    """Resolve every position spec against the prompt, so that it keeps meaning while tokens are added."""
    out: list[Intervention] = []
    for iv in ivs:
        if isinstance(iv, SteerFeature | SteerQK):
            iv = dataclasses.replace(iv, positions=tuple(resolve_positions(iv.positions, n_pos)))
        out.append(iv)
    return out


def generate_with(
    model: Model,
    saes: Mapping[int, SAELike],
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention],
    max_new_tokens: int = 5,
    transcoders: TranscoderSet | None = None,
    attention_saes: AttentionSAESet | None = None,
) -> str:
    """Greedy continuation with the interventions re-applied at every step (use_cache off).

    Positions are resolved against the prompt once, so they keep naming prompt tokens; activations and
    frozen patterns come from a clean run of the sequence so far, redone at each step.
    """
    ids = model.tokenize(prompt)
    n = int(ids.shape[0])
    ivs = _pin_positions(interventions, n)
    for _ in range(max_new_tokens):
        res = run_with(model, saes, ids, ivs, last_only=True, transcoders=transcoders, attention_saes=attention_saes)
        ids = torch.cat([ids, res.logits[-1].argmax().reshape(1)])
    return model.to_string(ids[n:], special_tokens=True)
