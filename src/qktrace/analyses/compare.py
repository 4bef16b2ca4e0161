"""`compare(a, b)`: two traced prompts whose tokens align (a minimal pair), compared head by head.

The algorithm (the paper's correctness study is one such comparison: concordance and discordance
heads, "yellow" against "red"):

1. Refuse prompts of different lengths (one line naming both) or traced by different models; report
   the positions whose tokens differ.
2. Per head, its attention from the query position (default: the last) to every key, in both
   prompts; the difference b - a, key by key (positions align).
3. Heads ranked by their largest |difference| at any key. For the `top` heads whose layer has an
   SAE (or, on a tracer of transcoders, every layer: components are the residual's writers): the key where
   it is largest, and the QK terms at (query, key) of both prompts matched
   component by component. A term is a (query component, key component) pair, each named by its
   positionless id and position (its node id); a term present in one prompt only counts against
   zero. The differences of all terms sum to the difference of the two pre-softmax scores.
4. Beside each head its W_QK eigenvalue sign skew (`heads.qk_spectrum`): positive skew attends where
   query and key carry the same directions (the paper's concordance heads), negative where they
   differ (discordance heads). With an answer (and rival), m = logit(answer) - logit(rival) in both.
5. With an answer, the `top` heads shown causally (`qktrace.analyses.patching`): each, then all of
   them, patched from B into A (every other head frozen); the change of m, and their share of m(B) - m(A).
   Needs the query position to be the last (m is read there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from ..errors import InputError, check_index
from ..models.tokens import Contrast
from ..nodes import Kind, Node
from ..options import CompareOptions, with_overrides
from ..steering.heads import qk_spectrum
from ..tables import markdown_table
from .patching import Patching, patch_heads

if TYPE_CHECKING:
    from ..tracer import Traced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadDiff:
    """One head's attention from the query position in both prompts, at the key where they differ most."""

    layer: int
    head: int
    key_pos: int
    attention_a: float
    attention_b: float
    diff: float  # attention_b - attention_a
    skew: float  # W_QK eigenvalue sign skew (positive: concordance-like, negative: discordance-like)

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class TermDiff:
    """One QK term (query component x key component) in both prompts."""

    query: str  # component id (its position is part of it)
    key: str
    query_label: str
    key_label: str
    value_a: float  # 0 where the term is absent from prompt a
    value_b: float
    diff: float  # value_b - value_a


@dataclass(frozen=True)
class HeadTerms:
    """The QK terms of one head at (query, key) that differ most between the prompts."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score_a: float  # sum of terms (pre-softmax, before soft-capping) in prompt a
    score_b: float
    terms: tuple[TermDiff, ...]  # the largest |diff| first, `top_terms` of them
    rest: float  # summed diff of the terms not listed: sum(diff) + rest = score_b - score_a
    n_terms: int  # every term of either prompt

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([t.__dict__ for t in self.terms])


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two aligned prompts compared head by head (see the module docstring)."""

    prompt_a: str
    prompt_b: str
    str_tokens_a: tuple[str, ...]
    str_tokens_b: tuple[str, ...]
    differing: tuple[int, ...]  # positions whose tokens differ
    query_pos: int
    attention_a: Tensor  # [layer, head, k_pos] attention from query_pos in prompt a
    attention_b: Tensor  # [layer, head, k_pos]
    skew: Tensor  # [layer, head] W_QK eigenvalue sign skew
    heads: tuple[HeadDiff, ...]  # every head, largest |diff| first
    terms: tuple[HeadTerms, ...]  # the top heads (with an SAE at their layer), in the order of `heads`
    answer: str | None = None
    rival: str | None = None
    metric_a: float | None = None  # logit(answer) - logit(rival) in prompt a
    metric_b: float | None = None
    patching: Patching | None = None  # the top heads patched from B into A (with an answer)

    @cached_property
    def attention_diff(self) -> Tensor:
        """[layer, head, k_pos] attention_b - attention_a."""
        return self.attention_b - self.attention_a

    def frame(self) -> pd.DataFrame:
        """One row per head, largest |difference| first: layer, head, key_pos, attention a and b, diff, skew."""
        return pd.DataFrame([{"name": h.name, **h.__dict__} for h in self.heads])

    def at_key(self, key_pos: int) -> pd.DataFrame:
        """Every head's attention from the query position to `key_pos` in both prompts, and its skew,
        sorted by the difference b - a (most negative first)."""
        k = check_index(key_pos, self.attention_a.shape[-1], "key position", allow_negative=True)
        a, b = self.attention_a[..., k], self.attention_b[..., k]
        rows = [
            {
                "name": f"L{ly}H{h}",
                "layer": ly,
                "head": h,
                "attention_a": float(a[ly, h]),
                "attention_b": float(b[ly, h]),
                "diff": float(b[ly, h] - a[ly, h]),
                "skew": float(self.skew[ly, h]),
            }
            for ly in range(a.shape[0])
            for h in range(a.shape[1])
        ]
        return pd.DataFrame(rows).sort_values("diff", kind="stable").reset_index(drop=True)

    def terms_for(self, layer: int, head: int) -> HeadTerms:
        for t in self.terms:
            if (t.layer, t.head) == (layer, head):
                return t
        have = ", ".join(f"L{t.layer}H{t.head}" for t in self.terms) or "none"
        raise InputError(f"no QK terms were compared for L{layer}H{head} (compared: {have}): raise `top`")

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        heads = self.heads if top is None else self.heads[:top]
        return {
            "prompt_a": self.prompt_a,
            "prompt_b": self.prompt_b,
            "str_tokens_a": list(self.str_tokens_a),
            "str_tokens_b": list(self.str_tokens_b),
            "differing": list(self.differing),
            "query_pos": self.query_pos,
            "answer": self.answer,
            "rival": self.rival,
            "metric_a": self.metric_a,
            "metric_b": self.metric_b,
            "patching": None if self.patching is None else self.patching.to_json(),
            "heads": [h.__dict__ for h in heads],
            "terms": [
                {**{k: v for k, v in t.__dict__.items() if k != "terms"}, "terms": [x.__dict__ for x in t.terms]}
                for t in self.terms
            ],
            "attention_a": self.attention_a.tolist(),
            "attention_b": self.attention_b.tolist(),
            "skew": self.skew.tolist(),
        }

    def markdown(self, top: int = 8, top_terms: int = 6) -> str:
        """A report section: the pair, the answer's logit difference, the heads that differ most, their terms."""

        def tok(toks: tuple[str, ...], i: int) -> str:
            return repr(toks[i]) if 0 <= i < len(toks) else "?"

        diffs = ", ".join(f"{p} ({tok(self.str_tokens_a, p)} → {tok(self.str_tokens_b, p)})" for p in self.differing)
        md = [
            f"A: `{self.prompt_a!r}`\n\nB: `{self.prompt_b!r}`\n\n",
            f"{len(self.str_tokens_a)} aligned tokens; they differ at position {diffs or 'none'}. "
            f"Attention from position {self.query_pos} {tok(self.str_tokens_a, self.query_pos)}.",
        ]
        if self.metric_a is not None and self.metric_b is not None:
            md.append(
                f" logit({self.answer!r}) − logit({self.rival!r}): {self.metric_a:+.3f} in A, "
                f"{self.metric_b:+.3f} in B."
            )
        md.append("\n\nHeads whose attention differs most (B − A at the key where it differs most):\n\n")
        rows = [
            {
                "head": h.name,
                "key": f"{h.key_pos} {tok(self.str_tokens_a, h.key_pos)}",
                "attention A": h.attention_a,
                "attention B": h.attention_b,
                "B − A": h.diff,
                "W_QK skew": h.skew,
            }
            for h in self.heads[:top]
        ]
        fmt = {"attention A": ".3f", "attention B": ".3f", "B − A": "+.3f", "W_QK skew": "+.3f"}
        md.append(markdown_table(rows, fmt))
        md.append(self._patching_markdown())
        for t in self.terms:
            md.append(
                f"\nL{t.layer}H{t.head} at ({t.query_pos}, {t.key_pos}): score {t.score_a:+.3f} in A, "
                f"{t.score_b:+.3f} in B; the terms that differ most ({t.n_terms} in all):\n\n"
            )
            md.append(
                markdown_table(
                    [
                        {
                            "query": _named(x.query, x.query_label),
                            "key": _named(x.key, x.key_label),
                            "A": x.value_a,
                            "B": x.value_b,
                            "B − A": x.diff,
                        }
                        for x in t.terms[:top_terms]
                    ],
                    {"A": "+.3f", "B": "+.3f", "B − A": "+.3f"},
                )
            )
        return "".join(md)

    def _patching_markdown(self) -> str:
        p = self.patching
        if p is None:
            return ""
        share = "" if p.share is None else f": {p.share:.0%} of the total difference"
        rows = [{"heads": f"L{ly}H{h}", "Δm": d} for (ly, h), d in zip(p.heads, p.alone)]
        rows.append({"heads": "together", "Δm": p.together})
        return (
            f"\nThese heads' attention patterns patched from B into A, every other head frozen: m moves by "
            f"{p.together:+.3f} of m(B) − m(A) = {p.total:+.3f}{share}.\n\n" + markdown_table(rows, {"Δm": "+.3f"})
        )


def compare(
    a: Traced,
    b: Traced,
    *,
    query_pos: int = -1,
    answer: str | int | None = None,
    rival: str | int | None = None,
    options: CompareOptions | None = None,
    **overrides: Any,
) -> Comparison:
    """Compare two traced prompts whose tokens align (see the module docstring).

    `query_pos`: the attending position (negative counts from the end). `answer`/`rival`: token
    strings or ids for m = logit(answer) - logit(rival) in both prompts (the rival defaults to prompt
    a's runner-up). `options` (`qktrace.options.CompareOptions`, or its fields as keywords: `top=3`):
    `top` heads whose QK terms are compared, `top_terms` terms kept per head."""
    from .explain import prompt_text

    o = with_overrides(options, CompareOptions, overrides)
    top, top_terms = o.top, o.top_terms
    q, differing = align_prompts(a, b, query_pos, answer, rival)  # 1
    att_a, att_b = attention_from(a, b, q)  # 2
    skew = head_skews(a)  # 4 (beside each head, so before ranking them)
    heads = rank_heads(att_a, att_b, skew)  # 3
    terms = match_terms(a, b, heads, q, top, top_terms)  # 3
    pair = measure_metric(a, b, answer, rival)  # 4
    patching = None
    if pair is not None and q == a.trace.n_pos - 1:  # 5
        patching = patch_heads(a, b, [(h.layer, h.head) for h in heads[:top]], pair)
    return Comparison(
        prompt_a=prompt_text(a),
        prompt_b=prompt_text(b),
        str_tokens_a=a.str_tokens,
        str_tokens_b=b.str_tokens,
        differing=differing,
        query_pos=q,
        attention_a=att_a,
        attention_b=att_b,
        skew=skew,
        heads=tuple(heads),
        terms=tuple(terms),
        answer=None if pair is None else pair.answer,
        rival=None if pair is None else pair.rival,
        metric_a=None if pair is None else pair.metric(a.trace.last_logits.float()),
        metric_b=None if pair is None else pair.metric(b.trace.last_logits.float()),
        patching=patching,
    )


def align_prompts(
    a: Traced,
    b: Traced,
    query_pos: int,
    answer: str | int | None,
    rival: str | int | None,
) -> tuple[int, tuple[int, ...]]:
    """Step 1: refuse prompts that do not align (or bad arguments); the query position and the positions
    whose tokens differ."""
    na, nb = a.trace.n_pos, b.trace.n_pos
    if na != nb:
        raise InputError(
            f"prompt A has {na} tokens and prompt B has {nb}: compare needs prompts whose tokens align "
            "(a minimal pair: change words for words of the same token count)"
        )
    if a.model is not b.model:
        raise InputError("the two prompts were traced by different models: trace both with the same Tracer")
    q = check_index(query_pos, na, "query position", allow_negative=True)
    if answer is None and rival is not None:
        raise InputError("a rival was given without an answer: give the answer too")
    if answer is not None:  # each a single token, the rival not the answer: before any work
        Contrast.tokens(a.model, answer, rival)
    differing = tuple(int(i) for i in (a.trace.tokens != b.trace.tokens).nonzero().flatten().tolist())
    log.info("compare: %d tokens, %d differ, query position %d", na, len(differing), q)
    return q, differing


def attention_from(a: Traced, b: Traced, q: int) -> tuple[Tensor, Tensor]:
    """Step 2: attention from q, every head, in both prompts: [layer, head, k_pos] (results live on the CPU)."""
    n_layers = a.model.n_layers
    att_a = torch.stack([a.trace.pattern(ly, q)[:, 0].float().cpu() for ly in range(n_layers)])
    att_b = torch.stack([b.trace.pattern(ly, q)[:, 0].float().cpu() for ly in range(n_layers)])
    log.info("compare: attention of %d layers x %d heads from position %d", n_layers, att_a.shape[1], q)
    return att_a, att_b


def head_skews(a: Traced) -> Tensor:
    """Step 4, first half: every head's W_QK eigenvalue sign skew, [layer, head]."""
    layers = a.model.anatomy.layers
    skew = torch.tensor(
        [[qk_spectrum(layer, h).skew for h in range(layer.n_heads)] for layer in layers],
        dtype=torch.float64,
        device="cpu",
    )
    log.info("compare: W_QK skew of %d heads, %d positive", skew.numel(), int((skew > 0).sum()))
    return skew


def rank_heads(att_a: Tensor, att_b: Tensor, skew: Tensor) -> list[HeadDiff]:
    """Step 3, first half: every head at the key where its attention changes most, ranked by |change|."""
    diff = att_b - att_a
    key = diff.abs().argmax(-1)  # [layer, head]
    heads = [
        HeadDiff(
            layer=ly,
            head=h,
            key_pos=int(key[ly, h]),
            attention_a=float(att_a[ly, h, key[ly, h]]),
            attention_b=float(att_b[ly, h, key[ly, h]]),
            diff=float(diff[ly, h, key[ly, h]]),
            skew=float(skew[ly, h]),
        )
        for ly in range(att_a.shape[0])
        for h in range(att_a.shape[1])
    ]
    heads.sort(key=lambda x: -abs(x.diff))
    log.info("compare: ranked %d heads; largest change %s", len(heads), heads[0].name if heads else None)
    return heads


def match_terms(a: Traced, b: Traced, heads: list[HeadDiff], q: int, top: int, top_terms: int) -> list[HeadTerms]:
    """Step 3, second half: the QK terms of the `top` heads with an SAE (with transcoders and no SAE at their
    layer: over the residual's writers, `qktrace.graph.transcoder_qk`), matched across the prompts."""
    traced = a.transcoders is not None
    with_sae = islice((h for h in heads if h.layer in a.saes or traced), top)  # only the `top` are computed
    terms = [head_terms(a, b, h.layer, h.head, q, h.key_pos, top_terms) for h in with_sae]
    log.info("compare: matched the QK terms of %d heads", len(terms))
    return terms


def measure_metric(a: Traced, b: Traced, answer: str | int | None, rival: str | int | None) -> Contrast | None:
    """Step 4, second half: with an answer, the contrast whose m is read in both prompts."""
    if answer is None:
        return None
    pair = Contrast.resolve(a.model, answer, rival, a.trace.last_logits.float())
    log.info("compare: m = logit(%r) - logit(%r) in both prompts", pair.answer, pair.rival)
    return pair


def head_terms(a: Traced, b: Traced, layer: int, head: int, query_pos: int, key_pos: int, top: int) -> HeadTerms:
    """The QK terms of head (layer, head) at (query_pos, key_pos) in both prompts, matched by component id."""
    qa, qb = a.qk(layer, head, query_pos, key_pos), b.qk(layer, head, query_pos, key_pos)
    values: dict[tuple[str, str], list[float]] = {}
    labels: dict[str, str] = {}
    for col, att in ((0, qa), (1, qb)):
        q_ids, k_ids = att.query.ids, att.key.ids
        block = att.terms.tolist()  # [q_component, k_component] (one key)
        for i, q_id in enumerate(q_ids):
            for j, k_id in enumerate(k_ids):
                values.setdefault((q_id, k_id), [0.0, 0.0])[col] += block[i][j]
        for c in (*q_ids, *k_ids):
            labels.setdefault(c, att.label(c))
    rows = sorted(values.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))
    kept = [TermDiff(qid, kid, labels[qid], labels[kid], va, vb, vb - va) for (qid, kid), (va, vb) in rows[:top]]
    rest = sum(vb - va for _, (va, vb) in rows[top:])
    return HeadTerms(
        layer=layer,
        head=head,
        query_pos=qa.query_pos,
        key_pos=key_pos,
        score_a=float(qa.sum_of_terms[0]),
        score_b=float(qb.sum_of_terms[0]),
        terms=tuple(kept),
        rest=float(rest),
        n_terms=len(rows),
    )


def _named(component: str, label: str) -> str:
    """A feature's label with its index in front (several features often share a label)."""
    node = Node.parse(component)
    return f"f{node.index} {label}" if node.kind is Kind.FEATURE else label
