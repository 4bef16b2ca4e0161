"""`explain(tracer, prompt, answer)`: the QK mechanism behind one answer, found by attribution and
confirmed by intervention.

The algorithm (every number comes from the library's own pieces: `Traced.graph`, `Traced.qk`,
`interventions.run_with`):

1. Metric: m = logit(answer) - logit(rival) at the last position. The rival defaults to the clean
   runner-up (the most likely token other than the answer).
2. Heads: the attribution graph towards the answer alone (`targets=[answer]`) ranks heads by their
   share of its cross-position influence (`Graph.top_heads`). Each of the top `settings.ablate` is
   ablated (`ScaleHead(l, h, 0)`), every other head frozen (`FreezeAttention()`); the change of m is
   its ablation effect (negative: the head carries the answer).
3. Sites: each top head attends from the last position to one key most (position 0, the attention
   sink, is skipped unless it is all the head can see). Its *site* is that key and every head of its
   layer that attends there most (at least `settings.member_attention`): heads that do one job
   together and so must be steered together. Each site is ablated as a whole (one pass). The first
   `settings.sites` distinct sites are searched.
4. Candidates, ranked by attribution, not by trial. The QK attribution of every head of a site over
   its whole row gives each active feature's first-order effect on the attention probability of the
   site's key (`QKAttribution.prob_effects`, summed over the other side and over the site's heads),
   on the query side (features at the last position) and on the key side (features at the key).
   Candidates: single features; the top k by that effect together (k in `settings.top_k`), so that
   redundant features go together; and supernodes, every active feature of that side sharing a
   label (the SAE's labels). Each candidate's prediction needs no forward pass: a side's QK terms are
   exact parts of the score, so each site head's attention with the candidate's terms multiplied by
   the most negative scale is a softmax recomputed exactly (it equals the attention the intervention
   produces, since steering one layer's QK circuit leaves its input unchanged); the change of the
   site's summed attention times the site's ablation effect per unit of attention predicts the
   change of m. The `settings.candidates` best predictions per site and side are kept.
5. Confirmation: each candidate is steered only inside the QK circuit of its site's heads (`SteerQK`
   on those heads, at its side's position), every other head frozen, at every scale of
   `settings.scales` (1 is the clean run, no pass; 0 removes; negative scales reverse). At each
   scale: m, the answer's lead over the strongest other token, p(answer), p(rival), the heads'
   attention to the key and the top-1 token.
6. The mechanism is the candidate whose curve lowers m the most; with the default rival, the answer's
   lead over whichever token is strongest at that scale (the same number on the clean run), so that
   a mechanism handing the answer to a third token counts. Only when no single site's candidate
   flips the answer or halves p(answer), every site's strongest predicted candidate is steered
   together ("sites", one more candidate per side) and competes too. Every candidate tried is kept.
7. Control (`qktrace.analyses.null`): the winner is steered against `settings.null_draws` random draws
   of as many other active features at the same layers and positions, in the same heads at the same
   scales. When it does not beat them, the next confirmed candidates in the order of step 6 are
   tested the same way (at most 3 in all) until one does; that one becomes the mechanism.

On a tracer of transcoders (no residual SAEs) the same steps run over transcoder features: the graph is the
plain transcoder graph, which has no head loadings, so step 2 ranks heads by the cross-position influence
they carry most directly (`control.carrier_heads`); a site's heads read the features of every layer below
theirs (layer 0's heads none, so they found no site); step 4 ranks those features by the transcoder QK terms
(`qktrace.graph.transcoder_qk`), step 5 steers their writes inside the site's QK circuits (`SteerQK` of kind
transcoder), and step 7 draws other transcoder features active at the same position and read below the site.
On a checkpointed tracer (transcoders and attention-output SAEs, `qktrace.graph.strategy2`) the graph has the
real head loadings of every edge into an attention feature, so step 2 ranks heads by them (`Graph.top_heads`,
as on residual-SAE graphs); candidates are the transcoder features and the attention features of the layers
below a site (`qktrace.analyses.candidates`; each candidate's features of one kind), steered as such
(`SteerQK` of kind transcoder or attn), and each control draws features of its part's kind.

Budget: at most `ablate + sites + sides * (sites * candidates + 1) * (len(scales) - 1)` intervened
forward passes (8 + 4 + 2 * 25 * 4 = 212 with the defaults; fewer when candidates coincide), plus
`null_draws * (len(scales) - 1)` per control (32; at most 3 controls), one clean run, one graph and one
QK row per site head. Every pass reuses the one clean run (activations, frozen patterns).
`Mechanism.n_passes` counts the search's (steps 2-6), `Null.n_passes` each control's; `Mechanism.seconds`
times the whole.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InputError
from ..models.tokens import Contrast
from ..options import ExplainSettings  # re-exported: explain's settings, declared with the others
from ..qk import QKAttribution
from ..steering.interventions import FreezeAttention, Intervention, ScaleHead, run_with
from .candidates import identity, propose, together
from .candidates import scaled_row as scaled_row  # re-exported: explain's exact prediction
from .control import carrier_heads, has_features, null_for
from .mechanism import Candidate, HeadEffect, Mechanism, Point, Side, Site
from .null import Null, flips, halves

if TYPE_CHECKING:
    from ..graph import Graph
    from ..tracer import Traced, Tracer

log = logging.getLogger(__name__)
SIDES = ("auto", "query", "key")
MAX_NULLS = 3  # candidates tested against a control at most: the winner and two more


# -- the pipeline ----------------------------------------------------------------------------------


def explain(
    tracer: Tracer,
    prompt: str | Sequence[int] | Tensor,
    answer: str | int,
    rival: str | int | None = None,
    side: str = "auto",
    *,
    settings: ExplainSettings | None = None,
    graph: Graph | None = None,
) -> Mechanism:
    """Find and confirm the QK mechanism that makes `answer` (a token string or id) win over `rival`
    (default: the clean runner-up) at the prompt's last position; see the module docstring.

    `side`: "auto" tries query- and key-side features, "query" or "key" only that side. `graph`: an
    attribution graph of this prompt towards the answer, to reuse (else one is built)."""
    start = time.perf_counter()
    settings = settings or ExplainSettings()
    if side not in SIDES:
        raise InputError(f"side '{side}' is not one of {', '.join(SIDES)}: use auto to try both")
    sides: tuple[Side, ...] = ("query", "key") if side == "auto" else (side,)  # type: ignore[assignment]
    probe = measure_metric(tracer, prompt, answer, rival)  # 1
    heads = ablate_heads(probe, graph, settings)  # 2
    sites = find_sites(probe, heads, settings)  # 3
    ranked, together = rank_candidates(probe.traced, sites, sides, settings)  # 4
    candidates = confirm_candidates(probe, ranked, settings)  # 5
    assemble = functools.partial(_assemble, prompt, probe, heads, sites, settings, start)
    chosen = choose_mechanism(probe, candidates, together, settings, assemble)  # 6
    return test_against_null(probe, chosen, settings, start)  # 7


def measure_metric(
    tracer: Tracer, prompt: str | Sequence[int] | Tensor, answer: str | int, rival: str | int | None
) -> _Probe:
    """Step 1: the clean run and m = logit(answer) - logit(rival) at its last position."""
    Contrast.tokens(tracer.model, answer, rival)  # each a single token, the rival not the answer: before any pass
    traced = tracer.run(prompt)
    pair = Contrast.resolve(tracer.model, answer, rival, traced.trace.last_logits.float())
    probe = _Probe(traced, pair)
    log.info("explain: m = %+.3f (%r over %r) over %d tokens", probe.clean, pair.answer, pair.rival, traced.trace.n_pos)
    return probe


def ablate_heads(probe: _Probe, graph: Graph | None, settings: ExplainSettings) -> list[HeadEffect]:
    """Step 2: the heads the graph towards the answer ranks first, each ablated (every other head frozen)."""
    traced = probe.traced
    q = traced.trace.n_pos - 1
    if graph is None:
        graph = traced.graph(targets=[probe.a], progress=False, qk_terms=False)
    elif tuple(graph.tokens) != tuple(traced.trace.tokens.tolist()):
        raise InputError("the graph given is of another prompt: build it with traced.graph(targets=[answer])")
    n_top = max(settings.ablate, settings.sites)
    ranked = (
        graph.top_heads(n_top) if graph.settings.get("graph") != "transcoder" else carrier_heads(traced, graph, n_top)
    )
    if not ranked:
        log.warning("explain: the graph has no cross-position influence; no head to search")
    heads: list[HeadEffect] = []
    for top in ranked:
        layer, head = int(top["layer"]), int(top["head"])
        m = probe.metric([ScaleHead(layer, head, 0.0), FreezeAttention()])
        key = attended_key(traced, layer, head, q)
        att = float(traced.pattern(layer, head, q)[key])
        heads.append(HeadEffect(layer, head, float(top["influence"]), m - probe.clean, key, att))
    log.info("explain: ablated %d heads ranked by the graph", len(heads))
    return heads


def find_sites(probe: _Probe, heads: list[HeadEffect], settings: ExplainSettings) -> list[Site]:
    """Step 3: each top head's key and the heads of its layer attending there with it, ablated together."""
    traced = probe.traced
    q = traced.trace.n_pos - 1
    sites: list[Site] = []
    for h in heads:
        if len(sites) == settings.sites:
            break
        if not has_features(traced, h.layer) or any(x.layer == h.layer and h.head in x.heads for x in sites):
            continue
        members, attention = [], []
        for o in range(traced.model.anatomy.layers[h.layer].n_heads):
            a = float(traced.pattern(h.layer, o, q)[h.key_pos])
            if o == h.head or (a >= settings.member_attention and attended_key(traced, h.layer, o, q) == h.key_pos):
                members.append(o)
                attention.append(a)
        ivs: list[Intervention] = [ScaleHead(h.layer, o, 0.0) for o in members]
        joint = h.ablation if len(members) == 1 else probe.metric([*ivs, FreezeAttention()]) - probe.clean
        sites.append(Site(h.layer, h.key_pos, tuple(members), tuple(attention), joint, h.head))
    log.info("explain: %d sites from %d heads", len(sites), len(heads))
    return sites


def rank_candidates(
    traced: Traced, sites: list[Site], sides: tuple[Side, ...], settings: ExplainSettings
) -> tuple[list[Candidate], list[Candidate]]:
    """Step 4: each site's candidates per side, ranked by attribution (no forward pass), each once; and per
    side, every site's strongest together, unless that is one of them (kept for step 6)."""
    q = traced.trace.n_pos - 1
    atts: dict[tuple[int, int], QKAttribution] = {}

    def row(layer: int, head: int) -> QKAttribution:
        if (layer, head) not in atts:
            atts[layer, head] = traced.qk(layer, head, q)
        return atts[layer, head]

    proposed: dict[tuple[Any, ...], Candidate] = {}
    combined: list[Candidate] = []
    for s in sides:
        leaders = []  # the strongest predicted candidate of each site, on this side
        for i, site in enumerate(sites):
            ranked_here = propose(traced, row, i, site, s, q, settings)
            leaders += ranked_here[:1]
            for c in ranked_here:
                proposed.setdefault(identity(c), c)
        if len(leaders) > 1:
            combined.append(together(leaders))
    log.info("explain: ranked %d candidates from %d QK rows", len(proposed), len(atts))
    return list(proposed.values()), [c for c in combined if identity(c) not in proposed]


def confirm_candidates(probe: _Probe, candidates: list[Candidate], settings: ExplainSettings) -> list[Candidate]:
    """Step 5: each candidate steered at every scale, its curve measured."""
    before = probe.passes
    confirmed = [probe.confirm(c, settings.scales) for c in candidates]
    log.info("explain: confirmed %d candidates in %d passes", len(confirmed), probe.passes - before)
    return confirmed


def choose_mechanism(
    probe: _Probe,
    candidates: list[Candidate],
    together: list[Candidate],
    settings: ExplainSettings,
    assemble: Callable[[list[Candidate]], Mechanism],
) -> Mechanism:
    """Step 6: the candidate that lowers m the most (`assemble` makes the Mechanism of the candidates
    tried); only when no single site's candidate suffices, every site's strongest together competes too."""
    result = assemble(candidates)
    if not result.confirmed and together:  # no single site suffices: every site's strongest together
        candidates = candidates + confirm_candidates(probe, together, settings)
        result = assemble(candidates)
    best = result.best
    log.info(
        "explain: %d heads, %d candidates, %d passes, %.1f s; best %s (%+.3f)",
        len(result.heads),
        len(candidates),
        probe.passes,
        result.seconds,
        best.name if best else None,
        result.effect(best) if best else float("nan"),
    )
    return result


def test_against_null(probe: _Probe, m: Mechanism, settings: ExplainSettings, start: float) -> Mechanism:
    """Step 7: the winner against its control; when it fails, the next confirmed candidates in order (at
    most `MAX_NULLS` in all) until one beats its own, which becomes the mechanism (`Mechanism.best`)."""
    if settings.null_draws == 0 or not m.candidates:
        return m
    clean = {"metric": m.metric, "margin": m.margin, "p_answer": m.p_answer}
    ranked = sorted(range(len(m.candidates)), key=lambda i: m.effect(m.candidates[i]))
    nulls: list[Null] = []
    for i in ranked:
        c = m.candidates[i]
        if nulls and not (flips(c.curve, m.answer, m.correct) or halves(c.curve, m.p_answer)):
            continue  # after the winner, only a candidate that moves the answer itself can become the mechanism
        nulls.append(null_for(probe, i, c, settings, m.criterion, clean, m.answer, m.correct))
        if nulls[-1].specific or len(nulls) == MAX_NULLS:
            break
    out = replace(m, nulls=tuple(nulls), seconds=time.perf_counter() - start)  # n_passes: the search's
    log.info("explain: %d controls, %d passes in them; %s", len(nulls), sum(n.n_passes for n in nulls), out.verdict())
    return out


def _assemble(
    prompt: str | Sequence[int] | Tensor,
    probe: _Probe,
    heads: list[HeadEffect],
    sites: list[Site],
    settings: ExplainSettings,
    start: float,
    candidates: list[Candidate],
) -> Mechanism:
    """The Mechanism of the candidates tried, timed from `start`."""
    traced, pair = probe.traced, probe.pair
    logits = traced.trace.last_logits.float()
    probs = torch.softmax(logits, -1)
    return Mechanism(
        prompt=prompt if isinstance(prompt, str) else prompt_text(traced),
        str_tokens=traced.str_tokens,
        answer=pair.answer,
        answer_id=pair.answer_id,
        rival=pair.rival,
        rival_id=pair.rival_id,
        rival_given=pair.rival_given,
        prediction=traced.model.str_tokens([int(logits.argmax())])[0],
        p_answer=float(probs[pair.answer_id]),
        p_rival=float(probs[pair.rival_id]),
        metric=probe.clean,
        margin=_margin(logits, pair.answer_id),
        heads=tuple(heads),
        sites=tuple(sites),
        candidates=tuple(candidates),
        scales=settings.scales,
        n_passes=probe.passes,
        seconds=time.perf_counter() - start,
        settings=settings,
    )


def prompt_text(traced: Traced) -> str:
    """A traced prompt's text, decoded from its tokens with special tokens left out (what was typed)."""
    return traced.model.to_string(traced.trace.tokens, special_tokens=False)


def attended_key(traced: Traced, layer: int, head: int, query_pos: int) -> int:
    """The key head (layer, head) attends to most from `query_pos`, past position 0 (the attention sink)
    unless position 0 is all it can see."""
    keys = traced.trace.keys(layer, query_pos)
    row = traced.pattern(layer, head, query_pos)
    past = [k for k in keys if k != 0] or keys
    idx = torch.tensor(past, dtype=torch.long, device=row.device)
    return int(past[int(row[idx].argmax())])


# -- confirmation: intervened forward passes -------------------------------------------------------


class _Probe:
    """Runs interventions on one traced prompt and reads m, probabilities and attention; counts passes."""

    def __init__(self, traced: Traced, pair: Contrast) -> None:
        self.traced, self.pair, self.a, self.r = traced, pair, pair.answer_id, pair.rival_id
        self.passes = 0
        self.clean = pair.metric(traced.trace.last_logits.float())

    def run(self, ivs: list[Intervention], record: Sequence[int] = ()) -> Any:
        t = self.traced
        self.passes += 1
        return run_with(
            t.model, t.saes, t.trace.tokens, ivs, clean=t.trace, record_attention=record, last_only=True,
            transcoders=t.transcoders, attention_saes=t.attention_saes,
        )  # fmt: skip

    def metric(self, ivs: list[Intervention]) -> float:
        return self.pair.metric(self.run(ivs).logits[-1].float())

    def point(self, c: Candidate, scale: float) -> Point:
        t = self.traced
        q = t.trace.n_pos - 1
        where = [(p.layer, h, p.key_pos) for p in c.parts for h in p.heads]
        if scale == 1.0:  # steering by 1 changes nothing: the clean run
            logits = t.trace.last_logits.float()
            attention = tuple(float(t.pattern(ly, h, q)[k]) for ly, h, k in where)
        else:
            res = self.run(c.interventions(scale), record=sorted({p.layer for p in c.parts}))
            logits = res.logits[-1].float()
            attention = tuple(float(res.patterns[ly][h, q, k]) for ly, h, k in where)
        probs = torch.softmax(logits, -1)
        top = int(probs.argmax())
        return Point(
            scale=float(scale),
            metric=self.pair.metric(logits),
            margin=_margin(logits, self.a),
            p_answer=float(probs[self.a]),
            p_rival=float(probs[self.r]),
            attention=attention,
            top_token=t.model.str_tokens([top])[0],
            top_p=float(probs[top]),
        )

    def confirm(self, c: Candidate, scales: Sequence[float]) -> Candidate:
        return replace(c, curve=tuple(self.point(c, s) for s in scales))


def _margin(logits: Tensor, answer: int) -> float:
    """logit(answer) minus the largest other logit."""
    others = logits.clone()
    others[answer] = float("-inf")
    return float(logits[answer] - others.max())
