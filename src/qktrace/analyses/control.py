"""Explain's step 7: each tested candidate's control, drawn and measured (the algorithm and the threshold
are in `qktrace.analyses.null`)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import torch

from .mechanism import Candidate
from .null import QUANTILES, Null, curve_effect, flips, halves

if TYPE_CHECKING:
    from ..options import ExplainSettings
    from ..tracer import Traced

log = logging.getLogger(__name__)


class Prober(Protocol):
    """What the null needs from explain's probe: the traced prompt, a pass counter and a confirmation."""

    traced: Traced
    passes: int

    def confirm(self, c: Candidate, scales: Sequence[float]) -> Candidate: ...


def draw_controls(traced: Traced, c: Candidate, n: int, seed: int) -> list[Candidate]:
    """`n` candidates like `c`, each part's features replaced by as many other active features at its layer
    and position (fewer when fewer are active); none when no part has another active feature."""
    rng = random.Random(f"{seed}:{c.name}")  # a string seed is hashed deterministically (sha512)
    pools = []
    for p in c.parts:
        active, _ = traced.acts(p.layer).at(p.position)
        pools.append(sorted(set(int(f) for f in active.tolist()) - set(p.features)))
    if not any(pools):
        return []
    out = []
    for _ in range(n):
        parts = []
        for p, pool in zip(c.parts, pools):
            feats = tuple(sorted(rng.sample(pool, min(len(p.features), len(pool)))))
            sae = traced.sae(p.layer)
            parts.append(replace(p, features=feats, labels=tuple(map(sae.label, feats))))
        out.append(Candidate(kind=c.kind, parts=tuple(parts), prob_effect=0.0, predicted=0.0, predicted_attention=()))
    return out


def null_for(
    probe: Prober,
    index: int,
    c: Candidate,
    settings: ExplainSettings,
    criterion: str,
    clean: dict[str, float],
    answer: str,
    correct: bool,
) -> Null:
    """Step 7 for one candidate (index `index` of the Mechanism's): its control, measured (module docstring).
    `clean`: the clean value of each criterion and "p_answer"."""
    start, before = time.perf_counter(), probe.passes
    controls = draw_controls(probe.traced, c, settings.null_draws, settings.null_seed)
    curves = [probe.confirm(x, settings.scales).curve for x in controls]
    effects = [curve_effect(curve, criterion, clean[criterion]) for curve in curves]
    effect = curve_effect(c.curve, criterion, clean[criterion])
    n = len(curves)
    quantiles: list[tuple[float, float, float]] = []  # none without draws
    for i in range(len(settings.scales) if n else 0):
        values = torch.tensor(
            [float(getattr(curve[i], criterion)) for curve in curves], dtype=torch.float64, device="cpu"
        )
        q = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64, device="cpu")).tolist()
        quantiles.append((q[0], q[1], q[2]))
    null = Null(
        candidate=index,
        criterion=criterion,
        effect=effect,
        draws=tuple(x.features for x in controls),
        effects=tuple(effects),
        curves=tuple(tuple(curve) for curve in curves),
        quantiles=tuple(quantiles),
        flip_share=sum(flips(curve, answer, correct) for curve in curves) / n if n else 0.0,
        halve_share=sum(halves(curve, clean["p_answer"]) for curve in curves) / n if n else 0.0,
        p_value=(1 + sum(e <= effect for e in effects)) / (1 + n) if n else 1.0,
        threshold=max(0.05, 1.0 / (n + 1)),
        confirmed=flips(c.curve, answer, correct) or halves(c.curve, clean["p_answer"]),
        n_passes=probe.passes - before,
        seconds=time.perf_counter() - start,
    )
    log.info(
        "explain: null of %s: p = %.3f over %d draws (%d at least as strong), %s",
        c.name,
        null.p_value,
        n,
        null.stronger,
        "specific" if null.specific else "not specific",
    )
    return null
