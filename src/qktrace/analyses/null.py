"""The control of a mechanism: is steering *these* features more than steering any features of that size?

The algorithm (explain's step 7, `qktrace.analyses.control.null_for`; this module holds what it returns):

1. Draws: `settings.null_draws` times (seeded by `settings.null_seed`), for each part of the candidate,
   as many other active features as it has (fewer when fewer are active) at the same layer and
   position, drawn without replacement from the SAE's active features there minus the part's own.
2. Each draw is steered exactly as the candidate is: the same heads' QK circuits, the same side and
   position, every scale of `settings.scales` (1 is the clean run, no pass), every other head frozen.
3. A draw's strength is its `effect`: how far its curve lowers the criterion (m, or the answer's lead
   over the strongest other token) below its clean value, as `Mechanism.effect` measures the
   candidate's. The p-value is (1 + #draws at least as strong) / (1 + N), the permutation p-value
   of the candidate among the draws; the control's curve is summarised by its 10%, 50% and 90%
   quantiles of the criterion at every scale, and by the shares of draws that flip or halve.

Threshold: the candidate is *specific* when it is confirmed (it flips or halves the answer itself)
and p <= max(0.05, 1 / (N + 1)). With the default N = 8 the smallest p attainable is 1/9 = 0.11, so
the candidate must beat every draw: were it exchangeable with random features of its size, that
happens with probability 1/9. From N = 19 on, the conventional 5% applies (at N = 39 one draw may
tie or beat it). A single draw as strong as the winner out of 8 is enough to refuse the word
"specific": a researcher reading it should not have to discount it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..tables import markdown_table

if TYPE_CHECKING:
    from .mechanism import Mechanism, Point

QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class Null:
    """The control distribution of one candidate (see the module docstring)."""

    candidate: int  # index into Mechanism.candidates
    criterion: str  # "metric" or "margin", as the Mechanism chooses
    effect: float  # the candidate's own effect (change of the criterion at its strongest scale)
    draws: tuple[tuple[tuple[int, int], ...], ...]  # per draw: the (layer, feature)s steered
    effects: tuple[float, ...]  # per draw: its effect
    curves: tuple[tuple[Point, ...], ...]  # per draw: its curve, at the Mechanism's scales
    quantiles: tuple[tuple[float, float, float], ...]  # per scale: 10/50/90% of the draws' criterion (none: no draws)
    flip_share: float  # share of draws that flip the answer
    halve_share: float  # share of draws that halve p(answer)
    p_value: float  # (1 + #draws at least as strong) / (1 + N); 1.0 without draws
    threshold: float  # max(0.05, 1 / (N + 1))
    confirmed: bool  # the candidate itself flips or halves the answer
    n_passes: int  # intervened passes the control ran
    seconds: float

    @property
    def n(self) -> int:
        return len(self.draws)

    @property
    def specific(self) -> bool:
        """Confirmed, and at least as strong as no more draws than the threshold allows."""
        return self.confirmed and self.n > 0 and self.p_value <= self.threshold

    @property
    def stronger(self) -> int:
        """Draws at least as strong as the candidate."""
        return sum(e <= self.effect for e in self.effects)


def flips(curve: Sequence[Point], answer: str, correct: bool) -> bool:
    """The clean top token is the answer (`correct`) and at some scale of `curve` it is not."""
    return correct and any(p.top_token != answer for p in curve)


def halves(curve: Sequence[Point], p_clean: float) -> bool:
    """At some scale of `curve` p(answer) is at most half its clean value `p_clean`."""
    return bool(curve) and min(p.p_answer for p in curve) <= 0.5 * p_clean


def curve_effect(curve: Sequence[Point], criterion: str, clean: float) -> float:
    """How far a curve lowers the criterion below its clean value (negative: towards losing)."""
    return min(float(getattr(p, criterion)) for p in curve) - clean


# -- reading it beside the verdict (Mechanism.verdict, Mechanism.markdown) --------------------------------


def verdict(self: Mechanism) -> str:
    """`Mechanism.verdict`: one line, what the mechanism does to the answer, where the answer goes, and its control."""
    did = "flips the answer" if self.flips else "halves p(answer)" if self.halves else "does not flip it"
    where = {
        "rival": f", to the rival {self.rival!r}",
        "other": f", to another token {self.goes_to_token!r}",
        "nowhere": " (the answer stays on top)",
    }.get(self.goes_to, "")
    if not self.correct:
        did += f" (the model answers {self.prediction!r}, not {self.answer!r}: nothing to flip)"
    n = self.null
    if n is None:
        return f"it {did}{where}; no control was run"
    control = (
        f"{n.stronger} of {n.n} random draws of as many other active features are as strong (p = "
        f"{n.p_value:.3f}, threshold {n.threshold:.3f}); {n.flip_share:.0%} of draws flip the answer, "
        f"{n.halve_share:.0%} halve p(answer)"
        if n.n
        else "no other active feature to draw a control from"
    )
    return f"it {did}{where}; {'specific' if self.specific else 'not specific'}: {control}"


def control_markdown(self: Mechanism) -> str:
    """A section of `Mechanism.markdown`: each control run (its p-value) and the mechanism's control curve."""
    if not self.nulls:
        return ""
    rows = [
        {
            "tested": f"{n.candidate} {self.candidates[n.candidate].name}"[:80],
            "effect": n.effect,
            "draws": n.n,
            "as strong": n.stronger,
            "p": n.p_value,
            "draws flip": n.flip_share,
            "draws halve": n.halve_share,
            "specific": n.specific,
        }
        for n in self.nulls
    ]
    fmt = {"effect": "+.3f", "p": ".3f", "draws flip": ".0%", "draws halve": ".0%"}
    md = ["\nControls (random active features of the same count, layer and position, same heads and scales):\n\n"]
    md.append(markdown_table(rows, fmt))
    n, best = self.null, self.best
    if n is not None and n.quantiles and best is not None:
        q = [{"scale": p.scale, "mechanism": float(getattr(p, n.criterion)), "control 10%": lo, "control 50%": mid,
              "control 90%": hi} for p, (lo, mid, hi) in zip(best.curve, n.quantiles)]  # fmt: skip
        md.append(f"\nThe mechanism's {n.criterion} against its control's, by scale:\n\n")
        md.append(markdown_table(q, {k: "+.3f" for k in q[0] if k != "scale"}))
    return "".join(md)
