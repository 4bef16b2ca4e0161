"""What the CLI and the server both ask of the library, checked once: prompt text and steering sweeps.
The front ends only translate their arguments; every check lives here, every default in `qktrace.options`
(graph builds take a `GraphOptions`, which checks itself).

- `check_text(prompt)`: prompt text a tokenizer can take, checked before tokenizing.
- Steering, one builder for both front ends. A front end turns its arguments into a `SteerRequest`
  (what to steer, and how: `SweepOptions`, whose scales, side and mode checked themselves):
  1. `check_request(req)` -- no model needed, so it runs before anything is loaded or locked: list
     lengths within `config.LIMITS`, no repeated head, the heads of one layer, no negative feature,
     `freeze_others` only with heads; `also` (more feature sets steered at the same scale, each inside
     its own heads' QK circuit, as a mechanism of several sites is) only with heads, each part's heads of
     one layer, at most `LIMITS.max_steer_parts` parts of at most `LIMITS.max_steer_features` features.
  2. `build_steering(traced, req)` -- against the traced prompt: layer, heads, checkpoint with an SAE,
     feature below the SAE's width, positions inside the prompt (none twice), watched tokens and
     attention weights, and (when scaling) the feature active at one of the positions at least, since
     scaling an inactive feature changes nothing. Returns a `Steering`: the library's interventions
     (`SteerQK` / `SteerFeature`, `FreezeAttention`) and everything `sweep.sweep` needs.
  3. `Steering.run()` -- `sweep.sweep`, one row per scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..config import LIMITS
from ..errors import Fix, InputError, check_index
from ..models.tokens import Positions, resolve_positions
from ..options import SweepOptions

if TYPE_CHECKING:
    import pandas as pd

    from ..nodes import Kind
    from ..tracer import Traced
    from .interventions import Intervention

log = logging.getLogger(__name__)


def check_text(prompt: str, what: str = "prompt") -> str:
    """Prompt text that a tokenizer can take: non-empty, valid Unicode (no lone surrogates, which is what
    bytes that are not UTF-8 become in argv), no NUL byte."""
    if not isinstance(prompt, str):
        raise InputError(f"the {what} must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"the {what} is empty: give at least one token of text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"the {what} holds {prompt[e.start : e.start + 1]!r} at character {e.start}, which is not valid "
            "UTF-8 text: re-encode it as UTF-8"
        ) from None
    if "\x00" in prompt:
        raise InputError(f"the {what} holds a NUL character at {prompt.index(chr(0))}: remove it")
    return prompt


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} {value!r} is not an integer")
    return value


@dataclass(frozen=True)
class SteerPart:
    """More features steered with a request's own and at the same scale: `features` (of checkpoint `layer`)
    at `positions`, inside the QK circuit of `heads` of that layer, on `side` (None: the request's side)."""

    heads: Sequence[tuple[int, int]]
    features: Sequence[int]
    positions: Positions
    side: Literal["query", "key"] | None = None


def _check_part(part: SteerPart) -> None:
    if not part.heads or len(part.heads) > LIMITS.max_heads:
        raise InputError(f"a steered part names {len(part.heads)} heads: give 1 to {LIMITS.max_heads} heads")
    if len({_int(ly, "layer") for ly, _ in part.heads}) > 1:
        raise InputError("a steered part's heads span layers: give each layer's heads as a part of its own")
    if not part.features or len(part.features) > LIMITS.max_steer_features:
        raise InputError(
            f"a steered part names {len(part.features)} features: give 1 to {LIMITS.max_steer_features} features"
        )
    for f in part.features:
        if _int(f, "feature") < 0:
            raise InputError(f"feature {f} is negative: features are numbered from 0 (up to the SAE's width - 1)")
    if part.side not in (None, "query", "key"):
        raise InputError(f"a steered part's side {part.side!r} is neither 'query' nor 'key'")


@dataclass(frozen=True)
class SteerRequest:
    """Steer SAE feature `feature` at `positions`, inside the QK circuit of `heads` ((layer, head) pairs of
    one layer; the feature is read at that layer's input checkpoint) or, without heads, in the residual at
    `checkpoint`. `watch_attention=None`: the first steered head's attention from the last position to the
    steered positions (QK steering only). `options`: scales, side, mode, freeze_others, top_k.

    `kind`: "feature" (a residual-SAE feature), "transcoder" (a transcoder feature) or "attn" (an attention-output
    SAE feature); None: "transcoder" when the tracer holds transcoders and no residual SAEs, else "feature". A
    transcoder (attention) feature is of layer `feature_layer` (with heads: below the heads' layer) or, without
    heads, of layer `checkpoint`; steering its output changes the MLP output of every layer it writes (the
    attention output of its layer, at its SAE's site)."""

    feature: int
    positions: Positions
    heads: Sequence[tuple[int, int]] = ()
    checkpoint: int | None = None
    watch_tokens: Sequence[str | int] = ()
    watch_attention: Sequence[tuple[int, int, int, int]] | None = ()
    options: SweepOptions = field(default_factory=SweepOptions)
    also: Sequence[SteerPart] = ()  # more features steered at the same scale (QK steering only)
    kind: str | None = None  # "feature" | "transcoder" | "attn" | None (the tracer's kind)
    feature_layer: int | None = None  # a transcoder / attention feature's layer, when steered in heads' QK circuits


@dataclass(frozen=True)
class Checked:
    """A request after `check_request`: scales parsed, heads as a tuple, the checkpoint known."""

    request: SteerRequest
    checkpoint: int
    layer: int | None  # the heads' layer; None for residual steering
    heads: tuple[int, ...]
    scales: tuple[float, ...]


def check_request(req: SteerRequest) -> Checked:
    """Every check that needs no model (step 1 of the module docstring)."""
    if not isinstance(req.options, SweepOptions):
        raise InputError(f"the sweep's options {req.options!r} are not SweepOptions: give SweepOptions(...)")
    scales = req.options.values
    feature = _int(req.feature, "feature")
    if feature < 0:
        raise InputError(f"feature {feature} is negative: features are numbered from 0 (up to the SAE's width - 1)")
    if len(req.heads) > LIMITS.max_heads:
        raise InputError(f"{len(req.heads)} heads given: steer at most {LIMITS.max_heads} heads at once")
    if any(isinstance(p, str | bytes) or not isinstance(p, Sequence) or len(p) != 2 for p in req.heads):
        raise InputError("heads are (layer, head) pairs, e.g. [[2, 5], [2, 7]]")
    pairs = [(_int(ly, "layer"), _int(h, "head")) for ly, h in req.heads]
    seen: set[tuple[int, int]] = set()
    for pair in pairs:
        if pair in seen:
            raise InputError(f"head {pair[1]} of layer {pair[0]} is given twice: name each head once")
        seen.add(pair)
    layers = sorted({ly for ly, _ in pairs})
    if len(layers) > 1:
        raise InputError(f"heads span layers {layers}: QK steering steers heads of one layer at a time")
    layer = layers[0] if layers else None
    transcoder = _check_kind(req, layer)
    if transcoder:
        checkpoint = req.feature_layer if layer is not None else req.checkpoint
    else:
        checkpoint = req.checkpoint if req.checkpoint is not None else layer
    if checkpoint is None:
        raise InputError("give heads [[layer, head], ...] to steer inside QK circuits, or a checkpoint to steer")
    checkpoint = _int(checkpoint, "checkpoint")
    if layer is not None and checkpoint != layer and not transcoder:
        raise InputError(
            f"heads of layer {layer} read checkpoint {layer}, not {checkpoint}: "
            f"pick a feature of checkpoint {layer} or leave checkpoint out"
        )
    if req.options.freeze_others and layer is None:
        raise InputError(
            "freezing the other heads needs heads to steer (QK-only steering): residual steering moves all"
        )
    if req.also and layer is None:
        raise InputError("steering more parts ('also') needs heads: it steers inside QK circuits only")
    if len(req.also) > LIMITS.max_steer_parts:
        raise InputError(f"{len(req.also)} more parts given: steer at most {LIMITS.max_steer_parts} at once")
    for part in req.also:
        _check_part(part)
    if isinstance(req.positions, int):
        _int(req.positions, "position")
    elif not isinstance(req.positions, slice):
        if len(req.positions) > LIMITS.max_positions:
            raise InputError(f"{len(req.positions)} positions given: give at most {LIMITS.max_positions} (or a range)")
        for p in req.positions:
            _int(p, "position")
    if len(req.watch_tokens) > LIMITS.max_watch_tokens:
        raise InputError(f"{len(req.watch_tokens)} watched tokens given: watch at most {LIMITS.max_watch_tokens}")
    for t in req.watch_tokens:
        if isinstance(t, bool) or not isinstance(t, str | int):
            raise InputError(f"watched token {t!r} is neither text nor a token id")
        if isinstance(t, int) and t < 0:
            raise InputError(f"watched token id {t} is negative: token ids start at 0")
    watch = req.watch_attention or ()
    if len(watch) > LIMITS.max_watch_attention:
        raise InputError(f"{len(watch)} watched attention weights given: watch at most {LIMITS.max_watch_attention}")
    for w in watch:
        if len(w) != 4:
            raise InputError(f"watched attention {tuple(w)!r} is not (layer, head, query_pos, key_pos)")
        for x in w:
            _int(x, "watched attention index")
    return Checked(req, checkpoint, layer, tuple(h for _, h in pairs), scales)


FEATURE_LAYER = ("feature_layer", "--feature-layer")  # the request's field, the command's flag


def _needs_layer(kind: str) -> InputError:
    return InputError(
        f"a {kind} feature steered inside QK circuits needs its layer", Fix.option("give", *FEATURE_LAYER)
    )


def _check_kind(req: SteerRequest, layer: int | None) -> bool:
    """The request's kind checked against its fields; True when it names a transcoder or attention feature."""
    if req.kind not in (None, "feature", "transcoder", "attn"):
        raise InputError(
            f"feature kind {req.kind!r} is not 'feature' (residual SAE), 'transcoder' or 'attn' (attention SAE)"
        )
    if req.feature_layer is None:
        if req.kind in ("transcoder", "attn") and layer is not None:
            raise _needs_layer(req.kind)
        return req.kind in ("transcoder", "attn")
    if req.kind == "feature":
        raise InputError(
            "a feature layer names a transcoder feature's layer, not an SAE feature's",
            Fix.option("drop", *FEATURE_LAYER),
        )
    if layer is None:
        raise InputError(
            "a feature layer is for steering inside heads' QK circuits",
            Fix(
                api="give heads, or use checkpoint",
                cli="give --heads, or drop --feature-layer (without heads, --layer is the feature's layer)",
                http="give heads, or use checkpoint instead",
            ),
        )
    if _int(req.feature_layer, "feature layer") < 0 or req.feature_layer >= layer:
        raise InputError(
            f"a {req.kind or 'transcoder'} feature of layer {req.feature_layer} writes nothing layer {layer}'s heads "
            + (
                f"read: give a feature layer in 0..{layer - 1}"
                if layer > 0
                else "read: no feature layer is below layer 0; give heads of a later layer"
            )
        )
    if req.also:
        raise InputError("steering more parts ('also') is for residual-SAE features: steer this feature alone")
    return True


def feature_kind(traced: Traced, kind: str | None) -> Kind:
    """The kind of feature a request names: `kind`, or the tracer's (transcoders and no residual SAEs)."""
    from ..nodes import Kind

    if kind is None:
        kind = "transcoder" if traced.transcoders is not None and not len(traced.saes) else "feature"
    if kind == "transcoder" and traced.transcoders is None:
        raise InputError(
            "a transcoder feature was asked for but no transcoders are loaded",
            Fix.loaded("transcoders", "--transcoders"),
        )
    if kind == "attn" and traced.attention_saes is None:
        raise InputError(
            "an attention feature was asked for but no attention SAEs are loaded",
            Fix.loaded("attention_saes", "--attention-saes", also="--transcoders DIR"),
        )
    return Kind(kind)


@dataclass(frozen=True, eq=False)
class Steering:
    """Checked interventions on one traced prompt, ready for `sweep.sweep`."""

    traced: Traced
    interventions: tuple[Intervention, ...]
    scales: tuple[float, ...]
    watch_tokens: tuple[int, ...]
    watch_attention: tuple[tuple[int, int, int, int], ...]
    top_k: int
    title: str

    def run(self) -> pd.DataFrame:
        from .sweep import sweep

        t = self.traced
        return sweep(
            t.model,
            t.saes,
            t.trace.tokens,
            list(self.interventions),
            list(self.scales),
            watch_tokens=self.watch_tokens,
            watch_attention=self.watch_attention,
            top_k=self.top_k,
            transcoders=t.transcoders,
            attention_saes=t.attention_saes,
        )


def _positions(spec: Positions, n_pos: int) -> list[int]:
    """The positions a person asked for: a range must lie in the prompt and have no step (what the front
    ends' "a:b" can say); then `resolve_positions`, refusing repeats."""
    if isinstance(spec, slice):
        for end in (spec.start, spec.stop):
            if end is not None and not -n_pos <= _int(end, "position") <= n_pos:
                raise InputError(
                    f"positions {spec.start}:{spec.stop} run past the prompt of {n_pos} tokens: "
                    f"give a range within {-n_pos}..{n_pos}"
                )
        if spec.step is not None:
            raise InputError("positions with a step are not supported: give start:stop or a list")
    return resolve_positions(spec, n_pos, repeats="refuse")


def build_steering(traced: Traced, req: SteerRequest | Checked) -> Steering:
    """Every check against the traced prompt (step 2 of the module docstring), then the interventions."""
    from .interventions import SCALE, FreezeAttention, SteerFeature, SteerQK

    checked = req if isinstance(req, Checked) else check_request(req)
    r = checked.request
    o = r.options
    model, n_pos = traced.model, traced.trace.n_pos
    L = model.n_layers
    kind = feature_kind(traced, r.kind or ("transcoder" if r.feature_layer is not None else None))
    if kind.value != "feature" and checked.layer is not None and r.feature_layer is None:
        raise _needs_layer(kind.value)
    c = check_index(checked.checkpoint, L + 1, "checkpoint")
    if checked.layer is not None:
        layer = check_index(checked.layer, L, "layer")
        n_heads = model.anatomy.layers[layer].n_heads
        heads = tuple(check_index(h, n_heads, "head") for h in checked.heads)
    feature, active = _active(traced, kind, c, r.feature)
    where = {"feature": f"checkpoint {c}", "attn": f"attention layer {c}"}.get(kind.value, f"transcoder layer {c}")
    pos = _positions(r.positions, n_pos)
    if o.mode == "scale" and not set(active) & set(pos):
        at = f"positions {active[:20]}" if active else "no position of this prompt"
        raise InputError(
            f"feature {feature} is not active at positions {pos[:20]} of {where}, so scaling it changes "
            f"nothing: it is active at {at} (or set its value instead of scaling it)"
        )
    tokens = [model.to_single_token(t, "watched token") for t in r.watch_tokens]
    if r.watch_attention is None:
        watch = [(layer, heads[0], n_pos - 1, p) for p in pos[:4]] if checked.layer is not None else []
    else:
        watch = []
        for ly, h, q, k in r.watch_attention:
            ly = check_index(ly, L, "watched layer")
            h = check_index(h, model.anatomy.layers[ly].n_heads, "watched head")
            q = check_index(q, n_pos, "watched query position", allow_negative=True)
            watch.append((ly, h, q, check_index(k, n_pos, "watched key position", allow_negative=True)))
    amount: dict[str, Any] = {o.mode: SCALE}  # the swept number scales the activation, or replaces it
    ivs: list[Intervention]
    f_layer = c if kind.value != "feature" and checked.layer is not None else None
    if checked.layer is not None:
        ivs = [SteerQK(layer, heads, o.side, feature, tuple(pos), **amount, kind=kind, feature_layer=f_layer)]
        ivs += [
            SteerQK(ly, hs, side, f, tuple(at), **amount)
            for ly, hs, side, fs, at in _parts(traced, r.also, o.side)
            for f in fs
        ]
        if o.freeze_others:
            ivs.append(FreezeAttention())
        title = f"steer {_name(kind, c, feature)} (QK {o.side}, L{layer} heads {list(heads)})"
        if r.also:
            title += f" and {len(ivs) - 1 - o.freeze_others} more"
    else:
        ivs = [SteerFeature(c, feature, tuple(pos), **amount, kind=kind)]
        title = f"steer {_name(kind, c, feature)} ({'residual' if kind.value == 'feature' else 'output'})"
    return Steering(traced, tuple(ivs), checked.scales, tuple(tokens), tuple(watch), o.top_k, title)


def _name(kind: Kind, c: int, feature: int) -> str:
    if kind.value == "feature":
        return f"feature {feature} of checkpoint {c}"
    return f"{'attention' if kind.value == 'attn' else 'transcoder'} feature {c}/{feature}"


def _active(traced: Traced, kind: Kind, c: int, feature: int) -> tuple[int, list[int]]:
    """The feature checked against its dictionary's width, and the positions where it is active."""
    if kind.value == "feature":
        d_sae = traced.sae(c).d_sae  # MissingSAEError when the checkpoint has no SAE
        feature = check_index(feature, d_sae, f"checkpoint {c} feature")
        acts = traced.acts(c)
        return feature, sorted(set(acts.pos[acts.feature == feature].tolist()))
    from .features import Features

    feats = Features(traced.model, traced.saes, traced.transcoders, traced.trace, traced.attention_saes)
    feats.check(kind, c, feature)
    return feature, (feats.acts(kind, c)[:, feature] != 0).nonzero().flatten().tolist()


def _parts(
    traced: Traced, parts: Sequence[SteerPart], side: Literal["query", "key"]
) -> list[tuple[int, tuple[int, ...], Literal["query", "key"], list[int], list[int]]]:
    """Each extra part checked against the prompt: (layer, heads, side), features, positions."""
    model, out = traced.model, []
    for part in parts:
        layer = check_index(part.heads[0][0], model.n_layers, "layer")
        heads = tuple(check_index(h, model.anatomy.layers[layer].n_heads, "head") for _, h in part.heads)
        d_sae = traced.sae(layer).d_sae
        features = [check_index(f, d_sae, f"checkpoint {layer} feature") for f in part.features]
        out.append((layer, heads, part.side or side, features, _positions(part.positions, traced.trace.n_pos)))
    return out
