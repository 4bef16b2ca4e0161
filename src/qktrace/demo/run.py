"""`qktrace demo`: the paper's four case studies on the embedded demo model, end to end.

For each case study, by the tool's own evidence (nothing about the demo model is hard-coded beyond
the prompt, the expected answer and, where the task has one, its rival):
1. trace the prompt; the metric is logit(answer) - logit(rival), the rival defaulting to the runner-up;
2. build the attribution graph towards the answer; rank heads by cross-position influence (head
   loadings) and ablate each of the top ones, every other head frozen, to see which are necessary;
3. for the top heads, the features that most raise the score at the key each attends to (past the
   first token), on the study's side, alone and together, are removed inside the QK circuit of that
   layer's top heads, other heads frozen; every candidate's effect is reported;
4. the strongest is swept over scales and plotted; its head's QK row is written in full, with the
   top terms, the feature x feature terms and the contrast against the next best key;
5. write graph JSON, QK JSON, PNGs and a Markdown report to the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DEMO_MODEL, DEMO_SAES
from ..interventions import SCALE, FreezeAttention, Intervention, ScaleHead, SteerQK, sweep
from ..nodes import CODE, Kind
from ..plots import plot_sweep
from ..tracer import Traced, Tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseStudy:
    slug: str
    title: str
    prompt: str
    answer: str  # the expected next token, e.g. " Sally"
    rival: str | None  # a token the mechanism should lose to the answer
    side: str  # "key" or "query": where the steered feature lives
    scales: str = "-3:1:9"


CASES = (
    CaseStudy(
        "induction",
        "Induction: carrying a name to the second mention of its title",
        # the paper's prompt with a distractor: the title alone no longer tells which name to copy
        "I always loved visiting Aunt Sally. Then Uncle Peter came home. Whenever I was feeling sad, Aunt",
        " Sally",
        " Peter",
        "key",
    ),
    CaseStudy(
        "antonyms",
        "Antonyms: an 'opposite' query meets an adjective key",
        'Le contraire de "petit" est "',
        "grand",
        "petit",
        "query",
    ),
    CaseStudy(
        "multiple_choice",
        "Multiple choice: attending to the correct option",
        "Human: In what year did World War II end?\n(A) 1776\n(B) 1945\n(C) 1865\nAssistant: Answer: (",
        "B",
        "A",
        "key",
    ),
    CaseStudy(
        "correctness",
        "Correctness: concordance between the stated property and the object",
        "Answer with yes or no. The color of a banana is yellow?",
        " Yes",
        " No",
        "query",
    ),
)


@dataclass(frozen=True)
class HeadAblation:
    head: tuple[int, int]
    influence: float  # its share of the graph's cross-position influence
    effect: float  # change of the logit difference answer - rival when its output is zeroed, others frozen


@dataclass(frozen=True)
class Candidate:
    head: tuple[int, int]
    steer_heads: tuple[int, ...]
    key_pos: int
    features: tuple[int, ...]
    label: str
    term: float  # their summed QK terms at (query, key) on the study's side
    effect: float  # change of the logit difference when removed from the QK circuit (negative = as predicted)


@dataclass
class CaseResult:
    case: CaseStudy
    prediction: str
    answer: str
    rival: str
    p_answer: float
    graph_summary: dict[str, Any]
    ablations: list[HeadAblation]
    head: tuple[int, int]
    steer_heads: tuple[int, ...]
    key_pos: int
    qk: dict[str, Any]
    top_terms: list[dict[str, Any]]
    feature_terms: list[dict[str, Any]]  # the top terms that pair two SAE features
    contrast: list[dict[str, Any]]
    features: tuple[int, ...]
    feature_label: str
    sweep: list[dict[str, Any]]
    p_answer_ablated: float  # at scale 0
    p_answer_reversed: float  # at the most negative scale
    files: list[str]
    candidates: list[Candidate]
    share_top3: float


N_HEADS = 4  # top heads of the graph considered per case (plus the two whose ablation hurts most)
N_FEATURES = 2  # features per head tried, alone and together


def _side_values(att: Any, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per component of the study's side: summed terms at the attribution's (single) key, kind, feature."""
    if side == "key":
        return att.terms.sum(0), att.key.kind, att.key.feature
    return att.terms.sum(1), att.query.kind, att.query.feature


def _feature_pairs(att: Any, key_pos: int, top: int) -> list[dict[str, Any]]:
    df = att.terms_frame(top=None, key_pos=key_pos)
    both = df["query"].str.startswith("feature/") & df["key"].str.startswith("feature/")
    return list(df[both].head(top).to_dict(orient="records"))


def _single_token(traced: Traced, text: str) -> bool:
    try:
        traced.model.token_id(text)
        return True
    except Exception:
        return False


def study(tracer: Tracer, case: CaseStudy, out: Path) -> CaseResult:
    traced = tracer.run(case.prompt)
    model, trace = traced.model, traced.trace
    probs = torch.softmax(trace.last_logits.double(), -1)
    answer_id = model.token_id(case.answer)
    prediction = model.str_tokens(trace.last_logits.argmax().reshape(1))[0]
    q = trace.n_pos - 1
    # the rival: the case's own, else the clean runner-up; the metric is the logit difference
    if case.rival and _single_token(traced, case.rival):
        rival_id = model.token_id(case.rival)
    else:
        rival_id = int(next(t for t in trace.last_logits.argsort(descending=True).tolist() if t != answer_id))
    watch = [answer_id, rival_id]
    answer, rival = model.str_tokens(torch.tensor(watch, device="cpu"))

    def diff(ivs: list[Intervention]) -> float:
        return float(sweep(model, tracer.saes, case.prompt, ivs, [0.0], watch_tokens=watch).iloc[0]["logit_diff"])

    clean = diff([])
    files: list[str] = []
    graph = traced.graph(targets=[case.answer], progress=False)
    gpath = out / f"{case.slug}.graph.json"
    graph.save(gpath)
    files.append(gpath.name)
    heads = graph.top_heads(8) or [{"layer": model.n_layers - 1, "head": 0, "influence": 0.0}]

    # Necessity: each top head's output ablated, every other head's pattern frozen.
    ablations = [
        HeadAblation(
            (int(h["layer"]), int(h["head"])),
            float(h["influence"]),
            diff([ScaleHead(int(h["layer"]), int(h["head"]), scale=0.0), FreezeAttention()]) - clean,
        )
        for h in heads
    ]
    # Candidate heads: the top ones by graph influence, then the ones whose ablation hurts the answer most.
    order = [a.head for a in ablations[:N_HEADS]]
    order += [a.head for a in sorted(ablations, key=lambda a: a.effect)[:2] if a.head not in order]

    # Candidates: for each such head, the features that most raise its score at the key it attends to
    # (past the first token) on the study's side, alone and together. Each is removed (scale 0) inside
    # the QK circuit of that layer's top heads, all other heads frozen; the one whose removal moves
    # the answer most against the rival is swept. Every candidate is reported.
    candidates: list[Candidate] = []
    for layer, head in order:
        same_layer = [a.head[1] for a in ablations if a.head[0] == layer]
        steer_heads = tuple(dict.fromkeys([head, *same_layer]))[:3]
        row = traced.pattern(layer, head, q).clone()
        row[0] = -1.0  # the first token is an attention sink, not a mechanism
        key_pos = int(row.argmax())
        values, kinds, feats = _side_values(traced.qk(layer, head, q, key_pos), case.side)
        feature = CODE[Kind.FEATURE]
        top = [i for i in values.argsort(descending=True).tolist() if int(kinds[i]) == feature and float(values[i]) > 0]
        top = top[:N_FEATURES]
        positions = key_pos if case.side == "key" else q
        for group in [[i] for i in top] + ([top] if len(top) > 1 else []):
            features = tuple(int(feats[i]) for i in group)
            ivs: list[Intervention] = [
                SteerQK(layer, steer_heads, case.side, f, positions, scale=0.0)  # type: ignore[arg-type]
                for f in features
            ]
            effect = diff([*ivs, FreezeAttention()]) - clean
            label = " + ".join(tracer.saes[layer].label(f) for f in features)
            term = float(values[group].sum())
            candidates.append(Candidate((layer, head), steer_heads, key_pos, features, label, term, effect))
    if not candidates:
        raise RuntimeError(f"{case.slug}: no active feature raises any top head's score")
    best = min(candidates, key=lambda c: c.effect)
    (layer, head), steer_heads, key_pos = best.head, best.steer_heads, best.key_pos

    att = traced.qk(layer, head, q)
    qk_json = att.to_json(top=25)
    qpath = out / f"{case.slug}.qk.json"
    qpath.write_text(json.dumps(qk_json))
    files.append(qpath.name)
    others = [p for p in traced.pattern(layer, head, q).argsort(descending=True).tolist() if p not in (key_pos, 0)]
    contrast = att.contrast(key_pos, others[0], top=10).to_dict(orient="records") if others else []

    positions = key_pos if case.side == "key" else q
    steer: list[Intervention] = [
        SteerQK(layer, steer_heads, case.side, f, positions, scale=SCALE)  # type: ignore[arg-type]
        for f in best.features
    ]
    df = sweep(
        model,
        tracer.saes,
        case.prompt,
        [*steer, FreezeAttention()],
        case.scales,
        watch_tokens=watch,
        watch_attention=[(layer, h, q, key_pos) for h in steer_heads],
    )
    png = out / f"{case.slug}.steer.png"
    what = f"{case.side}-side {'+'.join(map(str, best.features))} ({best.label})"
    plot_sweep(df, png, title=f"{case.slug}: {what} in L{layer} heads {list(steer_heads)}")
    files.append(png.name)
    at = {float(s): float(p) for s, p in zip(df["scale"], df[f"p:{answer}"])}
    return CaseResult(
        case=case,
        prediction=prediction,
        answer=answer,
        rival=rival,
        p_answer=float(probs[answer_id]),
        graph_summary=graph.summary(),
        ablations=ablations,
        head=(layer, head),
        steer_heads=steer_heads,
        key_pos=key_pos,
        qk=qk_json,
        top_terms=att.terms_frame(top=8, key_pos=key_pos).to_dict(orient="records"),
        feature_terms=_feature_pairs(att, key_pos, 6),
        contrast=contrast,
        features=best.features,
        feature_label=best.label,
        sweep=df.to_dict(orient="records"),
        p_answer_ablated=at[min(at, key=abs)],
        p_answer_reversed=at[min(at)],
        files=files,
        candidates=candidates,
        share_top3=sum(float(h["influence"]) for h in heads[:3]),
    )


def _md_table(rows: list[dict[str, Any]], cols: list[str], fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v).replace("|", "\\|"))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def _steered(r: CaseResult) -> str:
    feats = " + ".join(map(str, r.features))
    return f"{r.case.side}-side feature{'s' if len(r.features) > 1 else ''} {feats} ({r.feature_label})"


def report(results: list[CaseResult], tracer: Tracer, seconds: float) -> str:
    md = ["# qktrace demo report\n", f"Model: `{tracer.model.name}`; {len(tracer.saes)} SAEs; {seconds:.0f} s.\n"]
    for r in results:
        c = r.case
        toks = r.qk["key_positions"]
        md.append(f"\n## {c.title}\n")
        md.append(f"Prompt: `{c.prompt!r}` → prediction `{r.prediction!r}`, p({r.answer!r}) = {r.p_answer:.3f}\n")
        g = r.graph_summary
        md.append(
            f"\n**Graph** (`{c.slug}.graph.json`): {g['n_nodes']} nodes, {g['n_edges']} edges, completeness "
            f"{g['completeness']:.3f}, replacement {g['replacement']:.3f}. The top three heads carry "
            f"{r.share_top3:.0%} of the cross-position influence. Each top head's output ablated, every other "
            f"head's pattern frozen (effect on the logit difference {r.answer!r} − {r.rival!r}):\n\n"
        )
        md.append(
            _md_table(
                [
                    {"head": f"L{a.head[0]}H{a.head[1]}", "influence": a.influence, "ablated": a.effect}
                    for a in r.ablations
                ],
                ["head", "influence", "ablated"],
                {"influence": ".1%", "ablated": "+.3f"},
            )
        )
        L, H = r.head
        i = toks.index(r.key_pos)
        md.append(
            f"\n**QK attribution** of L{L}H{H} from the last position to key {r.key_pos} "
            f"(attention {r.qk['pattern'][i]:.3f}): score {r.qk['score'][i]:+.4f}, sum of terms "
            f"{r.qk['capped_sum'][i]:+.4f} (max relative error {r.qk['max_relative_error']:.1e}). Top terms:\n\n"
        )
        cols = ["query_label", "key_label", "value", "positional"]
        md.append(_md_table(r.top_terms, cols, {"value": "+.3f", "positional": "+.3f"}))
        if r.feature_terms:
            md.append("\nThe strongest terms between two SAE features (no bias or error components):\n\n")
            md.append(_md_table(r.feature_terms, cols, {"value": "+.3f", "positional": "+.3f"}))
        if r.contrast:
            md.append("\nWhy this key rather than the next best (contrast, top 5):\n\n")
            md.append(_md_table(r.contrast[:5], ["query_label", "key", "diff"], {"diff": "+.3f"}))
        md.append(
            f"\n**Candidates** ({c.side} side): for each top head, the active features that most raise its score "
            f"at the key it attends to, alone and together; each removed (scale 0) inside the QK circuit of its "
            f"layer's top heads, other heads frozen; effect on the logit difference {r.answer!r} − {r.rival!r}:\n\n"
        )
        md.append(
            _md_table(
                [
                    {
                        "head": f"L{x.head[0]}H{x.head[1]}",
                        "key": x.key_pos,
                        "features": f"{' + '.join(map(str, x.features))}: {x.label}",
                        "QK term": x.term,
                        "effect": x.effect,
                    }
                    for x in r.candidates
                ],
                ["head", "key", "features", "QK term", "effect"],
                {"QK term": "+.3f", "effect": "+.3f"},
            )
        )
        md.append(
            f"\n**Steering** {_steered(r)} only inside the QK circuit of L{L} heads {list(r.steer_heads)}, other "
            f"heads frozen: p({r.answer!r}) goes from {r.p_answer:.3f} (scale 1) to {r.p_answer_ablated:.3f} "
            f"(scale 0) and {r.p_answer_reversed:.3f} (most negative scale). Plot: `{c.slug}.steer.png`.\n"
        )
        if r.sweep:
            cols = ["scale", "top_1", "p_top_1", "logit_diff"] + [
                k for k in r.sweep[0] if k.startswith(("p:", "attn:"))
            ]
            md.append("\n" + _md_table(r.sweep, cols, {k: ".3f" for k in cols if k != "top_1"}))
    return "".join(md)


def run_demo(
    out: str | Path = "demo-output",
    serve: bool = True,
    port: int = 8000,
    tracer: Tracer | None = None,
    cases: tuple[CaseStudy, ...] = CASES,
) -> int:
    from rich.console import Console

    con = Console()
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tracer is None:
        tracer = Tracer.load(DEMO_MODEL, DEMO_SAES)
    results = []
    for case in cases:
        con.print(f"[bold]{case.slug}[/bold]: {case.prompt!r}")
        r = study(tracer, case, out)
        results.append(r)
        con.print(
            f"  predicts {r.prediction!r} (p({case.answer!r}) = {r.p_answer:.3f}); top head L{r.head[0]}H{r.head[1]} "
            f"attends to key {r.key_pos}; {_steered(r)} in L{r.head[0]} heads {list(r.steer_heads)} at scale 0: "
            f"p = {r.p_answer_ablated:.3f}, reversed: {r.p_answer_reversed:.3f} ({len(r.candidates)} candidates tried)"
        )
    seconds = time.perf_counter() - start
    (out / "report.md").write_text(report(results, tracer, seconds))
    con.print(f"wrote {out}/report.md and {sum(len(r.files) for r in results)} files in {seconds:.0f} s")
    if serve:
        try:
            from ..server import serve as serve_ui
        except ImportError:
            con.print("the web UI is not available (install qktrace[server]); stopping here")
            return 0
        con.print(f"serving the web UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
        serve_ui([str(out)], saes=str(DEMO_SAES), port=port, tracer=tracer)
    return 0
