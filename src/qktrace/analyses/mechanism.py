"""What `explain` returns: the heads, the sites searched, every candidate with its curve, the confirmed
mechanism; with views as a DataFrame, JSON, a Markdown report section and a PNG.

Small frozen dataclasses, no computation beyond reading them: `explain.py` fills them in.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from ..errors import InputError
from ..files import atomic_open, atomic_write
from ..nodes import Kind
from ..steering.interventions import FreezeAttention, Intervention, SteerQK
from ..tables import markdown_table
from .null import Null, control_markdown, flips, halves, verdict

if TYPE_CHECKING:
    from ..options import ExplainSettings

log = logging.getLogger(__name__)
Side = Literal["query", "key"]


@dataclass(frozen=True)
class HeadEffect:
    """One head of the graph: its share of the answer's cross-position influence and its ablation."""

    layer: int
    head: int
    influence: float  # share of the cross-position influence towards the answer (Graph.top_heads)
    ablation: float  # change of m with its output zeroed, every other head frozen
    key_pos: int  # the key it attends to most from the last position (past position 0)
    attention: float  # its attention to that key

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class Site:
    """Where candidates are looked for: the heads of one layer that attend from the last position to one key."""

    layer: int
    key_pos: int
    heads: tuple[int, ...]  # heads of `layer` whose most attended key (past position 0) is `key_pos`
    attention: tuple[float, ...]  # their attention to it
    ablation: float  # change of m with all of them ablated together, every other head frozen
    head: int  # the graph's head that led here

    @property
    def name(self) -> str:
        return f"L{self.layer} " + "+".join(f"H{h}" for h in self.heads) + f" → {self.key_pos}"


@dataclass(frozen=True)
class Part:
    """One layer's share of a candidate: features of one side, steered in the QK circuit of some heads."""

    site: int  # index into Mechanism.sites
    layer: int
    heads: tuple[int, ...]  # the heads of `layer` it is steered in (its site's)
    side: Side
    position: int  # where it is steered: the last position (query side) or the key (key side)
    key_pos: int  # the key whose attention it should move
    features: tuple[int, ...]
    labels: tuple[str, ...]
    kind: Literal["feature", "transcoder", "attn"] = "feature"  # residual SAE, transcoder, attention-output SAE
    feature_layers: tuple[int, ...] = ()  # transcoder / attention features: the layer of each (below `layer`)

    @property
    def keys(self) -> tuple[tuple[int, int], ...]:
        """(layer, feature) of each feature: its checkpoint (SAE) or its layer (transcoder, attention SAE)."""
        layers = self.feature_layers if self.kind != "feature" else (self.layer,) * len(self.features)
        return tuple(zip(layers, self.features))

    def feature_names(self, table: bool = False) -> tuple[str, ...]:  # `table`: SAE features as L{checkpoint}f{f}
        sae = f"L{self.layer}f" if table else "f"
        prefix = {"transcoder": "t", "attn": "a"}.get(self.kind)
        return tuple(f"{prefix}{ly}/f{f}" if prefix else f"{sae}{f}" for ly, f in self.keys)

    @property
    def name(self) -> str:
        heads = "+".join(f"H{h}" for h in self.heads)
        return f"L{self.layer} {heads} {self.side}@{self.position} " + "+".join(self.feature_names())

    def interventions(self, scale: float) -> list[Intervention]:
        kind = Kind(self.kind)  # "feature", "transcoder" and "attn" are node kinds' values
        return [
            SteerQK(self.layer, self.heads, self.side, f, self.position, scale=float(scale),
                    kind=kind, feature_layer=None if kind is Kind.FEATURE else ly)
            for ly, f in self.keys
        ]  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One scale of a candidate's curve."""

    scale: float
    metric: float  # m = logit(answer) - logit(rival)
    margin: float  # logit(answer) - the largest other logit (< 0: the answer lost its place)
    p_answer: float
    p_rival: float
    attention: tuple[float, ...]  # each steered head's attention from the last position to its key
    top_token: str
    top_p: float


@dataclass(frozen=True)
class Candidate:
    """Features of one side steered inside the QK circuits of some heads (one part per layer), and what that did.

    `kind`: "feature" (one feature), "top-k" (the k strongest together), "supernode" (every active feature
    of that side sharing a label), "sites" (the strongest predicted candidate of every site, together)."""

    kind: Literal["feature", "top-k", "supernode", "sites"]
    parts: tuple[Part, ...]
    prob_effect: float  # first-order effect of its terms on its heads' summed attention to their keys
    predicted: float  # the change of m predicted at the most negative scale (attribution only, no pass)
    predicted_attention: tuple[float, ...]  # each steered head's attention to its key there, recomputed exactly
    curve: tuple[Point, ...] = ()

    @property
    def side(self) -> Side:
        return self.parts[0].side

    @property
    def heads(self) -> tuple[tuple[int, int], ...]:
        """(layer, head) of every head it is steered in, in the order of `Point.attention`."""
        return tuple((p.layer, h) for p in self.parts for h in p.heads)

    @property
    def features(self) -> tuple[tuple[int, int], ...]:
        """(layer, feature) of every feature it steers (`Part.keys`)."""
        return tuple(k for p in self.parts for k in p.keys)

    @property
    def name(self) -> str:
        return " | ".join(p.name for p in self.parts)

    @property
    def label(self) -> str:
        labels = list(dict.fromkeys(lab for p in self.parts for lab in p.labels))
        return labels[0] if self.kind == "supernode" else " + ".join(labels)

    def interventions(self, scale: float) -> list[Intervention]:
        """What confirms it at `scale`: its features steered in its heads' QK circuits, every other head frozen."""
        return [*(iv for p in self.parts for iv in p.interventions(scale)), FreezeAttention()]

    def at(self, scale: float) -> Point:
        for p in self.curve:
            if p.scale == float(scale):
                return p
        raise InputError(f"scale {scale} is not on this curve: use one of {[p.scale for p in self.curve]}")

    def lowest(self, by: str = "metric") -> Point:
        """The point of its curve with the lowest `by` ("metric" or "margin")."""
        return min(self.curve, key=lambda p: float(getattr(p, by)))

    def frame(self) -> pd.DataFrame:
        """Its curve: one row per scale."""
        rows = []
        for p in self.curve:
            row: dict[str, Any] = {k: getattr(p, k) for k in ("scale", "metric", "margin", "p_answer", "p_rival")}
            row.update({"top_token": p.top_token, "top_p": p.top_p})
            row.update({f"attn:L{ly}H{h}": a for (ly, h), a in zip(self.heads, p.attention)})
            rows.append(row)
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class Mechanism:
    """What `explain` found for one prompt and answer: the heads, the sites, every candidate tried, the best.

    The best candidate is the one whose curve lowers m the most; when the rival was not given (the
    clean runner-up), the lead of the answer over whichever token is strongest at each scale (`margin`)
    instead, so that a mechanism handing the answer to a third token counts. Both are the same number
    on the clean run."""

    prompt: str
    str_tokens: tuple[str, ...]
    answer: str
    answer_id: int
    rival: str
    rival_id: int
    rival_given: bool
    prediction: str  # the clean top-1 token
    p_answer: float
    p_rival: float
    metric: float  # clean logit(answer) - logit(rival)
    margin: float  # clean logit(answer) - the largest other logit
    heads: tuple[HeadEffect, ...]
    sites: tuple[Site, ...]
    candidates: tuple[Candidate, ...]
    scales: tuple[float, ...]
    n_passes: int  # intervened forward passes of the search (the controls count theirs: Null.n_passes)
    seconds: float
    settings: ExplainSettings
    nulls: tuple[Null, ...] = ()  # the controls run, in the order tried: the winner's first (`null`)

    # -- verdicts ----------------------------------------------------------------------------------
    @property
    def criterion(self) -> str:
        """What chooses the best candidate: "metric" (m against the given rival) or "margin"."""
        return "metric" if self.rival_given else "margin"

    def effect(self, candidate: Candidate) -> float:
        """How far a candidate's curve lowers the criterion below its clean value (negative: towards losing)."""
        by = self.criterion
        return float(getattr(candidate.lowest(by), by)) - float(getattr(self, by))

    @property
    def correct(self) -> bool:
        """The model's clean top-1 token is the answer."""
        return self.prediction == self.answer

    @property
    def winner(self) -> Candidate | None:
        """The candidate whose curve lowers the criterion the most (None without candidates)."""
        return min(self.candidates, key=self.effect, default=None)

    @property
    def best(self) -> Candidate | None:
        """The mechanism: the first candidate tried against its control that beats it; else the winner."""
        for n in self.nulls:
            if n.specific:
                return self.candidates[n.candidate]
        return self.winner

    @property
    def null(self) -> Null | None:
        """The control of the mechanism (`best`), when one was run."""
        best = self.best
        return next((n for n in self.nulls if self.candidates[n.candidate] is best), None)

    @property
    def flips(self) -> bool:
        """The clean top-1 token is the answer, and at some scale of the best curve it is not."""
        b = self.best
        return b is not None and flips(b.curve, self.answer, self.correct)

    @property
    def halves(self) -> bool:
        """At some scale of the best curve p(answer) is at most half its clean value."""
        b = self.best
        return b is not None and halves(b.curve, self.p_answer)

    @property
    def confirmed(self) -> bool:
        """The best candidate flips the answer or at least halves p(answer)."""
        return self.flips or self.halves

    @property
    def specific(self) -> bool:
        """The mechanism beats its control (`Null.specific`: see `qktrace.analyses.null` for the threshold)."""
        n = self.null
        return n is not None and n.specific

    @property
    def goes_to(self) -> str:
        """Where the answer goes at the best curve's strongest scale where it is no longer top: "rival", "other"
        (a third token, `goes_to_token`), "nowhere" (p(answer) halved but still top), or "" (neither, or the
        model does not give the answer)."""
        if not self.correct:
            return ""  # the answer was never on top: it goes nowhere it had not gone already
        if self.flips:
            return "rival" if self.goes_to_token == self.rival else "other"
        return "nowhere" if self.halves else ""

    @property
    def goes_to_token(self) -> str | None:
        """The top token at the best curve's strongest scale where the answer lost its place (None if nowhere)."""
        b = self.best
        lost = [p for p in b.curve if p.top_token != self.answer] if b is not None and self.correct else []
        return min(lost, key=lambda p: float(getattr(p, self.criterion))).top_token if lost else None

    def verdict(self) -> str:
        """One line: what the mechanism does to the answer, where the answer goes, and its control."""
        return verdict(self)

    # -- views -------------------------------------------------------------------------------------
    def frame(self) -> pd.DataFrame:
        """Every candidate tried, one row each, strongest (most negative `effect`) first."""
        best = self.best
        rows = []
        for i, c in enumerate(self.candidates):
            by = c.lowest(self.criterion)
            row: dict[str, Any] = {
                "candidate": i,
                "best": c is best,
                "kind": c.kind,
                "side": c.side,
                "sites": "+".join(str(p.site) for p in c.parts),
                "heads": "+".join(f"L{ly}H{h}" for ly, h in c.heads),
                "positions": "+".join(str(p.position) for p in c.parts),
                "keys": "+".join(str(p.key_pos) for p in c.parts),
                "features": "+".join(n for p in c.parts for n in p.feature_names(table=True)),
                "label": c.label,
                "prob_effect": c.prob_effect,
                "predicted": c.predicted,
                "effect": self.effect(c),
                "lowest_at": by.scale,
                "p_answer_min": min(p.p_answer for p in c.curve),
                "flips": flips(c.curve, self.answer, self.correct),
            }
            row.update({f"m@{p.scale:g}": p.metric for p in c.curve})
            rows.append(row)
        df = pd.DataFrame(rows)
        return df.sort_values("effect", kind="stable").reset_index(drop=True) if len(df) else df

    def heads_frame(self) -> pd.DataFrame:
        """The graph's top heads, each ablated alone."""
        return pd.DataFrame([{"name": h.name, **asdict(h)} for h in self.heads])

    def sites_frame(self) -> pd.DataFrame:
        """The sites searched: heads of one layer attending to one key, ablated together."""
        return pd.DataFrame([{"name": s.name, **asdict(s)} for s in self.sites])

    def to_json(self) -> dict[str, Any]:
        """Everything but the time taken (`seconds`), so that the same prompt gives the same bytes."""
        best = self.best
        return {
            "prompt": self.prompt,
            "str_tokens": list(self.str_tokens),
            "answer": self.answer,
            "answer_id": self.answer_id,
            "rival": self.rival,
            "rival_id": self.rival_id,
            "rival_given": self.rival_given,
            "prediction": self.prediction,
            "p_answer": self.p_answer,
            "p_rival": self.p_rival,
            "metric": self.metric,
            "margin": self.margin,
            "criterion": self.criterion,
            "correct": self.correct,
            "flips": self.flips,
            "halves": self.halves,
            "confirmed": self.confirmed,
            "specific": self.specific,
            "goes_to": self.goes_to,
            "goes_to_token": self.goes_to_token,
            "verdict": self.verdict(),
            "heads": [asdict(h) for h in self.heads],
            "sites": [asdict(x) for x in self.sites],
            "candidates": [{**asdict(c), "effect": self.effect(c)} for c in self.candidates],
            "best": None if best is None else self.candidates.index(best),
            "winner": None if self.winner is None else self.candidates.index(self.winner),
            "nulls": [  # without the time taken: the same prompt gives the same bytes
                {k: v for k, v in asdict(n).items() if k != "seconds"}
                | {"n": n.n, "stronger": n.stronger, "specific": n.specific}
                for n in self.nulls
            ],
            "scales": list(self.scales),
            "n_passes": self.n_passes,
            "null_passes": sum(n.n_passes for n in self.nulls),
            "settings": asdict(self.settings),
        }

    def markdown(self, top: int = 12) -> str:
        """A report section: the heads, the sites, the confirmed mechanism with its curve, the candidates."""
        a, r = self.answer, self.rival
        md = [
            f"Prompt `{self.prompt!r}` → `{self.prediction!r}`; p({a!r}) = {self.p_answer:.3f}, "
            f"m = logit({a!r}) − logit({r!r}) = {self.metric:+.3f}. "
            f"{len(self.candidates)} candidates, {self.n_passes} intervened passes "
            f"(+{sum(n.n_passes for n in self.nulls)} for controls), {self.seconds:.1f} s.\n\n",
            "Heads by share of the answer's cross-position influence, each ablated with every other head frozen "
            "(Δm), and the key each attends to from the last position:\n\n",
            markdown_table(
                [
                    {
                        "head": h.name,
                        "influence": h.influence,
                        "ablated Δm": h.ablation,
                        "key": f"{h.key_pos} {self._tok(h.key_pos)}",
                        "attention": h.attention,
                    }
                    for h in self.heads
                ],
                {"influence": ".1%", "ablated Δm": "+.3f", "attention": ".3f"},
            ),
            "\nSites searched (the heads of one layer attending to one key, ablated together):\n\n",
            markdown_table(
                [
                    {
                        "site": i,
                        "heads": "+".join(f"L{x.layer}H{h}" for h in x.heads),
                        "key": f"{x.key_pos} {self._tok(x.key_pos)}",
                        "attention": " ".join(f"{v:.2f}" for v in x.attention),
                        "ablated Δm": x.ablation,
                    }
                    for i, x in enumerate(self.sites)
                ],
                {"ablated Δm": "+.3f"},
            ),
        ]
        best = self.best
        if best is None:
            md.append("\nNo active feature moves any site's attention to its key: no candidate.\n")
            return "".join(md)
        where = "; ".join(
            f"L{p.layer} heads {list(p.heads)} at {p.position} {self._tok(p.position)} (key {p.key_pos} "
            f"{self._tok(p.key_pos)}): " + " + ".join(f"{n} {lab}" for n, lab in zip(p.feature_names(), p.labels))
            for p in best.parts
        )
        what = "the answer's lead over the strongest other token" if self.criterion == "margin" else "m"
        md.append(
            f"\n**Mechanism** ({best.kind}, {best.side} side): {where}. Steered inside those heads' QK circuits, "
            f"every other head frozen, it lowers {what} by {-self.effect(best):.3f} (predicted change of m at the "
            f"most negative scale {best.predicted:+.3f}): {self.verdict()}.\n\n"
        )
        df = best.frame()
        md.append(markdown_table(df.to_dict(orient="records"), {c: ".3f" for c in df.columns if c != "top_token"}))
        md.append(control_markdown(self))
        md.append(f"\nCandidates tried (the {min(top, len(self.candidates))} strongest of {len(self.candidates)}):\n\n")
        cols = [
            "kind",
            "side",
            "heads",
            "positions",
            "features",
            "label",
            "prob_effect",
            "predicted",
            "effect",
            "flips",
        ]
        fr = self.frame().head(top)
        md.append(
            markdown_table(
                fr[cols].to_dict(orient="records"),
                {"prob_effect": "+.3g", "predicted": "+.3f", "effect": "+.3f"},
            )
        )
        return "".join(md)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A PNG: m along every candidate's curve (the mechanism in bold), then the mechanism's p(answer),
        p(rival) and attention against the scale, with the top-1 token at each scale."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        best = self.best
        fig = Figure(figsize=(7.5, 6.5))
        top, bottom = fig.subplots(2, 1, sharex=True)
        for c in self.candidates:
            top.plot([p.scale for p in c.curve], [p.metric for p in c.curve], color="0.75", lw=0.8, zorder=1)
        top.axhline(0, color="0.5", lw=0.8)
        top.set_ylabel(f"logit({self.answer!r}) − logit({self.rival!r})")
        top.set_title(f"{len(self.candidates)} candidates; the mechanism in bold", fontsize=10)
        if best is not None:
            xs = [p.scale for p in best.curve]
            top.plot(xs, [p.metric for p in best.curve], color="C3", lw=2.2, marker="o", zorder=3)
            n = self.null
            if n is not None and n.quantiles and n.criterion == "metric":  # the control's band, on m's axis
                lo, mid, hi = zip(*n.quantiles)
                top.fill_between(xs, lo, hi, color="C0", alpha=0.2, zorder=2, label=f"control, 10-90% of {n.n}")
                top.plot(xs, mid, color="C0", lw=1.2, ls="--", zorder=2)
                top.legend(fontsize=7, loc="best")
            top.set_title(self.verdict()[:110], fontsize=8)
            bottom.plot(xs, [p.p_answer for p in best.curve], marker="o", label=f"p({self.answer!r})")
            bottom.plot(xs, [p.p_rival for p in best.curve], marker="o", label=f"p({self.rival!r})")
            keys = [p.key_pos for p in best.parts for _ in p.heads]
            for i, ((ly, h), k) in enumerate(zip(best.heads, keys)):
                att = [p.attention[i] for p in best.curve]
                bottom.plot(xs, att, ls="--", marker=".", lw=1, label=f"L{ly}H{h} → key {k}")
            for p in best.curve:
                bottom.annotate(repr(p.top_token), (p.scale, 1.02), ha="center", fontsize=8)
            bottom.set_title(f"{best.kind}, {best.side} side: {best.label}"[:90], fontsize=10)
        bottom.set_ylim(0, 1.1)
        bottom.set_ylabel("probability / attention")
        bottom.set_xlabel("steering scale (1 = clean, 0 = removed, < 0 = reversed)")
        bottom.legend(fontsize=7, loc="best")
        for ax in (top, bottom):
            ax.axvline(1.0, color="0.85", lw=1, ls="--", zorder=0)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        FigureCanvasAgg(fig)
        out = Path(path)
        with atomic_open(out) as f:  # a temp file beside `out`, renamed over it: never a half-written PNG
            fig.savefig(f, format="png", dpi=110)
        log.info("wrote %s", out)
        return out

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """`to_json()` written atomically."""
        return atomic_write(path, json.dumps(self.to_json(), allow_nan=False))

    def _tok(self, pos: int) -> str:
        return repr(self.str_tokens[pos]) if 0 <= pos < len(self.str_tokens) else "?"
