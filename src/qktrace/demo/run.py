"""`qktrace demo`: the paper's four case studies on the embedded demo model, end to end.

For each case study, by the tool's own evidence (nothing about the demo model is hard-coded beyond
the prompt and the expected answer):
1. trace the prompt; record the prediction and the answer's probability;
2. build the attribution graph towards the answer's logit; the heads carrying the most
   cross-position influence come from its head loadings;
3. for the top head, find the key it attends to most (past the first token) and compute the QK
   attribution of its whole row: top terms, marginals, the contrast against the next best key;
4. pick the feature that drives that score on the study's side (key or query) and sweep its scale
   inside the QK circuit of the top heads of that layer, other heads frozen; plot it;
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
from ..interventions import SCALE, FreezeAttention, Intervention, SteerQK, sweep
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
        "I always loved visiting Aunt Sally. Whenever I was feeling sad, Aunt",
        " Sally",
        None,
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


@dataclass
class CaseResult:
    case: CaseStudy
    prediction: str
    p_answer: float
    graph_summary: dict[str, Any]
    head: tuple[int, int]
    steer_heads: tuple[int, ...]
    key_pos: int
    qk: dict[str, Any]
    top_terms: list[dict[str, Any]]
    contrast: list[dict[str, Any]]
    feature: int
    feature_label: str
    sweep: list[dict[str, Any]]
    p_answer_ablated: float
    files: list[str]


def _single_token(traced: Traced, text: str) -> bool:
    try:
        traced.model.token_id(text)
        return True
    except Exception:
        return False


def study(tracer: Tracer, case: CaseStudy, out: Path) -> CaseResult:
    traced = tracer.run(case.prompt)
    model, trace = traced.model, traced.trace
    probs = torch.softmax(trace.logits[-1].double(), -1)
    answer_id = model.token_id(case.answer)
    prediction = model.str_tokens(trace.logits[-1].argmax().reshape(1))[0]
    files: list[str] = []

    graph = traced.graph(targets=[case.answer], progress=False)
    gpath = out / f"{case.slug}.graph.json"
    graph.save(gpath)
    files.append(gpath.name)
    heads = graph.top_heads(8) or [{"layer": model.n_layers - 1, "head": 0, "influence": 0.0}]
    layer, head = int(heads[0]["layer"]), int(heads[0]["head"])
    steer_heads = tuple(int(h["head"]) for h in heads if int(h["layer"]) == layer)[:3]

    q = trace.n_pos - 1
    row = trace.patterns[layer, head, q].clone()
    row[0] = -1.0  # the first token is an attention sink, not a mechanism
    key_pos = int(row.argmax())
    att = traced.qk(layer, head, q)
    qk_json = att.to_json(top=25)
    qpath = out / f"{case.slug}.qk.json"
    qpath.write_text(json.dumps(qk_json))
    files.append(qpath.name)
    order = [p for p in row.argsort(descending=True).tolist() if p != key_pos and p != 0]
    contrast = att.contrast(key_pos, order[0], top=10).to_dict(orient="records") if order else []

    # the feature that drives this score on the study's side
    at_key = att.key.pos == key_pos
    if case.side == "key":
        values = att.terms[:, at_key].sum(0)
        kinds, feats = att.key.kind[at_key], att.key.feature[at_key]
        positions: Any = key_pos
    else:
        values = att.terms[:, at_key].sum(1)
        kinds, feats = att.query.kind, att.query.feature
        positions = q
    values = torch.where(kinds == 0, values, torch.full_like(values, float("-inf")))
    feature = int(feats[values.argmax()]) if bool(torch.isfinite(values).any()) else -1
    label = tracer.saes[layer].label(feature) if feature >= 0 else "none"

    rows: list[dict[str, Any]] = []
    p_ablated = float(probs[answer_id])
    if feature >= 0:
        ivs: list[Intervention] = [
            SteerQK(layer, steer_heads, case.side, feature, positions, scale=SCALE),  # type: ignore[arg-type]
            FreezeAttention(),
        ]
        watch = [case.answer] + ([case.rival] if case.rival and _single_token(traced, case.rival) else [])
        df = sweep(
            model,
            tracer.saes,
            case.prompt,
            ivs,
            case.scales,
            watch_tokens=watch,
            watch_attention=[(layer, h, q, key_pos) for h in steer_heads],
        )
        png = out / f"{case.slug}.steer.png"
        plot_sweep(df, png, title=f"{case.slug}: {case.side}-side feature {feature} ({label}) in L{layer} heads")
        files.append(png.name)
        rows = df.to_dict(orient="records")
        zero = df.iloc[(df["scale"] - 0.0).abs().argsort()[:1]]
        p_ablated = float(zero[f"p:{model.str_tokens(torch.tensor([answer_id]))[0]}"].iloc[0])
    return CaseResult(
        case=case,
        prediction=prediction,
        p_answer=float(probs[answer_id]),
        graph_summary=graph.summary(),
        head=(layer, head),
        steer_heads=steer_heads,
        key_pos=key_pos,
        qk=qk_json,
        top_terms=att.terms_frame(top=8, key_pos=key_pos).to_dict(orient="records"),
        contrast=contrast,
        feature=feature,
        feature_label=label,
        sweep=rows,
        p_answer_ablated=p_ablated,
        files=files,
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


def report(results: list[CaseResult], tracer: Tracer, seconds: float) -> str:
    md = ["# qktrace demo report\n", f"Model: `{tracer.model.name}`; {len(tracer.saes)} SAEs; {seconds:.0f} s.\n"]
    for r in results:
        c = r.case
        toks = r.qk["key_positions"]
        md.append(f"\n## {c.title}\n")
        md.append(f"Prompt: `{c.prompt!r}` → prediction `{r.prediction!r}`, p({c.answer!r}) = {r.p_answer:.3f}\n")
        g = r.graph_summary
        heads = ", ".join(f"L{h['layer']}H{h['head']} ({h['influence']:.0%})" for h in g["top_cross_position_heads"])
        md.append(
            f"\n**Graph** (`{c.slug}.graph.json`): {g['n_nodes']} nodes, {g['n_edges']} edges, completeness "
            f"{g['completeness']:.3f}, replacement {g['replacement']:.3f}. Heads carrying the most "
            f"cross-position influence: {heads or 'none'}.\n"
        )
        L, H = r.head
        i = toks.index(r.key_pos)
        md.append(
            f"\n**QK attribution** of L{L}H{H} from the last position to key {r.key_pos} "
            f"(attention {r.qk['pattern'][i]:.3f}): score {r.qk['score'][i]:+.4f}, sum of terms "
            f"{r.qk['capped_sum'][i]:+.4f} (max relative error {r.qk['max_relative_error']:.1e}). Top terms:\n\n"
        )
        md.append(
            _md_table(
                r.top_terms,
                ["query_label", "key_label", "value", "positional"],
                {"value": "+.3f", "positional": "+.3f"},
            )
        )
        if r.contrast:
            md.append("\nWhy this key rather than the next best (contrast, top 5):\n\n")
            md.append(_md_table(r.contrast[:5], ["query_label", "key", "diff"], {"diff": "+.3f"}))
        md.append(
            f"\n**Steering** {c.side}-side feature {r.feature} ({r.feature_label}) only inside the QK circuit of "
            f"L{L} heads {list(r.steer_heads)}, other heads frozen: p({c.answer!r}) goes from {r.p_answer:.3f} "
            f"(scale 1) to {r.p_answer_ablated:.3f} (scale 0). Plot: `{c.slug}.steer.png`.\n"
        )
        if r.sweep:
            cols = ["scale", "top_1", "p_top_1"] + [k for k in r.sweep[0] if k.startswith(("p:", "attn:"))]
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
            f"attends to key {r.key_pos}; steering {case.side}-side feature {r.feature} ({r.feature_label}) to 0 "
            f"in L{r.head[0]} heads {list(r.steer_heads)}: p = {r.p_answer_ablated:.3f}"
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
