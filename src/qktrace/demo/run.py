"""`qktrace demo`: the paper's case studies on the embedded demo model, end to end, as a thin client of
`qktrace.explain` and `qktrace.compare` (nothing about the demo model is hard-coded beyond the prompts,
their expected answers and rivals).

1. Each case study (induction, antonyms, multiple choice, correctness): trace the prompt, build the
   attribution graph towards the answer (saved for the web UI) and `explain` it: the heads that carry
   the answer, the sites searched, every candidate tried, the confirmed mechanism with its curve (JSON,
   PNG), and the QK attribution of the mechanism's first head at its key.
2. The correctness study compares minimal pairs with `Traced.compare`: "The color of a banana is yellow?"
   against "... red?", and "18+5=23?" against "18+6=23?". Heads whose attention to the object (the
   banana; the second operand) is higher when the statement is true behave like the paper's concordance
   heads, lower like its discordance heads; beside each its W_QK eigenvalue sign skew, which the paper
   finds positive for concordance and negative for discordance heads. Attention is read from the last
   position (where this model answers) and from the stated value (where the paper reads it).
3. One case (`BOTH_WAYS`, induction) is traced again on the demo's transcoders and attention-output SAEs
   (`both_ways`): the plain transcoder graph and the strategy-2 graph beside the residual-SAE graph, each
   with the heads and features that carry the answer, its scores and its key head's QK terms.
4. Everything goes to the output folder: graph JSON (both prompts of each pair too, for the compare
   view), mechanism JSON and PNG, QK JSON, comparison JSON, and report.md. Each graph is written once:
   a pair's prompt that a case study already graphed (the same slug) points at that case's file, since
   Neuronpedia refuses a second upload under one slug.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analyses.compare import Comparison
from ..analyses.explain import Mechanism, explain
from ..config import DEMO_NAME, DEMO_SAES
from ..files import atomic_write
from ..graph import Graph
from ..graph.formats import default_slug
from ..tables import markdown_table
from ..tracer import Tracer
from .both_ways import BothWays, section, trace_both_ways

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseStudy:
    slug: str
    title: str
    prompt: str
    answer: str  # the expected next token, e.g. " Sally"
    rival: str | None  # the token the mechanism should lose to (None: the clean runner-up)


CASES = (
    CaseStudy(
        "induction",
        "Induction: carrying a name to the second mention of its title",
        # the paper's prompt with a distractor: the title alone no longer tells which name to copy
        "I always loved visiting Aunt Sally. Then Uncle Peter came home. Whenever I was feeling sad, Aunt",
        " Sally",
        " Peter",
    ),
    CaseStudy(
        "antonyms",
        "Antonyms: an 'opposite' query meets an adjective key",
        'Le contraire de "petit" est "',
        "grand",
        "petit",
    ),
    CaseStudy(
        "multiple_choice",
        "Multiple choice: attending to the correct option",
        "Human: In what year did World War II end?\n(A) 1776\n(B) 1945\n(C) 1865\nAssistant: Answer: (",
        "B",
        "A",
    ),
    CaseStudy(
        "correctness",
        "Correctness: why the model says a true statement is true",
        "Answer with yes or no. The color of a banana is yellow?",
        " Yes",
        " No",
    ),
)


@dataclass(frozen=True)
class MinimalPair:
    slug: str
    title: str
    true: str  # the statement that is true (the model should answer Yes)
    false: str  # the same tokens but one (No)
    key: str  # the object whose attention concordance/discordance heads move
    value: str  # the stated value, in the true prompt (the paper's query position)


PAIRS = (
    MinimalPair(
        "color",
        "yellow vs red",
        "Answer with yes or no. The color of a banana is yellow?",
        "Answer with yes or no. The color of a banana is red?",
        " banana",
        " yellow",
    ),
    MinimalPair(
        "sum", "18+5=23 vs 18+6=23", "Answer with yes or no. 18+5=23?", "Answer with yes or no. 18+6=23?", "5", "23"
    ),
)
BOTH_WAYS = "induction"  # the case study also traced on the demo's transcoders and attention SAEs
SHIFT = 0.1  # |attention(true) - attention(false)| at the object that makes a head concordance- or discordance-like


@dataclass
class CaseResult:
    case: CaseStudy
    mechanism: Mechanism
    qk: dict[str, Any] | None  # QK attribution of the mechanism's first head at its key (to_json)
    graph_summary: dict[str, Any]
    files: list[str]
    graph: Graph | None = field(default=None, repr=False)


@dataclass
class PairResult:
    pair: MinimalPair
    key_pos: int
    comparisons: dict[str, Comparison]  # "last" and "value": the query position read
    heads: list[dict[str, Any]]  # concordance- and discordance-like heads, per query position
    files: list[str] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)  # "true" / "false": the graph file of that prompt

    @property
    def answers(self) -> tuple[float, float]:
        c = self.comparisons["last"]
        assert c.metric_a is not None and c.metric_b is not None
        return c.metric_a, c.metric_b


def save_once(graph: Graph, path: Path, written: dict[str, str]) -> str:
    """The name of the file holding `graph`: `path`, written now, unless a file of this run already holds
    a graph of the same slug (same prompt, model, settings and logits: the same graph)."""
    slug = graph.slug or default_slug(graph)
    if slug not in written:
        written[slug] = graph.save(path).name
    return written[slug]


def study(tracer: Tracer, case: CaseStudy, out: Path, written: dict[str, str] | None = None) -> CaseResult:
    """One case study: graph towards the answer, `explain`, QK attribution of the mechanism's head.
    `written`: slug -> file of the graphs this run has saved (updated)."""
    traced = tracer.run(case.prompt)
    graph = traced.graph(targets=[case.answer], progress=False)
    files = [save_once(graph, out / f"{case.slug}.graph.json", {} if written is None else written)]
    m = explain(tracer, case.prompt, case.answer, case.rival, graph=graph)
    files.append(m.save_json(out / f"{case.slug}.mechanism.json").name)
    files.append(m.plot(out / f"{case.slug}.mechanism.png").name)
    qk = None
    best = m.best
    if best is not None:
        part = best.parts[0]
        att = traced.qk(part.layer, part.heads[0], len(m.str_tokens) - 1)
        qk = att.to_json(top=25)
        qk["top_terms"] = att.terms_frame(top=8, key_pos=part.key_pos).to_dict(orient="records")
        files.append(atomic_write(out / f"{case.slug}.qk.json", json.dumps(qk)).name)
    return CaseResult(case, m, qk, graph.summary(), files, graph)


def correctness(tracer: Tracer, pair: MinimalPair, out: Path, written: dict[str, str] | None = None) -> PairResult:
    """Compare the pair head by head; the heads whose attention to the object splits true from false.
    `written`: slug -> file of the graphs this run has saved (updated; a graph saved before is not saved
    again)."""
    a, b = tracer.run(pair.true), tracer.run(pair.false)
    written = {} if written is None else written
    files, graphs = [], {}
    for name, traced in (("true", a), ("false", b)):
        before = set(written.values())
        graphs[name] = save_once(traced.graph(progress=False), out / f"{pair.slug}.{name}.graph.json", written)
        if graphs[name] not in before:
            files.append(graphs[name])
    toks = a.str_tokens
    key = toks.index(pair.key)
    queries = {"last": len(toks) - 1, "value": toks.index(pair.value)}
    comparisons = {q: a.compare(b, query_pos=p, answer=" Yes", rival=" No") for q, p in queries.items()}
    heads = []
    for q, c in comparisons.items():
        for row in c.at_key(key).to_dict(orient="records"):
            role = "concordance" if row["diff"] <= -SHIFT else "discordance" if row["diff"] >= SHIFT else None
            if role is None:
                continue
            agrees = row["skew"] > 0 if role == "concordance" else row["skew"] < 0
            heads.append({"query": q, "role": role, **row, "attention_true": row["attention_a"],
                          "attention_false": row["attention_b"], "skew_agrees": agrees})  # fmt: skip
        files.append(atomic_write(out / f"{pair.slug}.{q}.compare.json", json.dumps(c.to_json(top=12))).name)
    return PairResult(pair, key, comparisons, heads, files, graphs)


def report(
    results: list[CaseResult], pairs: list[PairResult], tracer: Tracer, seconds: float, both: BothWays | None = None
) -> str:
    md = ["# qktrace demo report\n", f"Model: `{tracer.model.name}`; {len(tracer.saes)} SAEs; {seconds:.0f} s.\n"]
    for r in results:
        c, m = r.case, r.mechanism
        g = r.graph_summary
        md.append(f"\n## {c.title}\n\n")
        md.append(
            f"**Graph** (`{c.slug}.graph.json`): {g['n_nodes']} nodes, {g['n_edges']} edges, completeness "
            f"{g['completeness']:.3f}, replacement {g['replacement']:.3f}. **Mechanism** (`qktrace.explain`; "
            f"`{c.slug}.mechanism.json`, plot `{c.slug}.mechanism.png`):\n\n"
        )
        md.append(m.markdown())
        if r.qk is not None and m.best is not None:
            part = m.best.parts[0]
            i = r.qk["key_positions"].index(part.key_pos)
            md.append(
                f"\n**QK attribution** of L{part.layer}H{part.heads[0]} from the last position to key {part.key_pos} "
                f"(attention {r.qk['pattern'][i]:.3f}): score {r.qk['score'][i]:+.4f}, sum of terms "
                f"{r.qk['capped_sum'][i]:+.4f} (max relative error {r.qk['max_relative_error']:.1e}). Top terms:\n\n"
            )
            cols = ["query_label", "key_label", "value", "positional"]
            rows = [{k: t[k] for k in cols} for t in r.qk["top_terms"]]
            md.append(markdown_table(rows, {"value": "+.3f", "positional": "+.3f"}))
        if both is not None and both.case == c:
            md.append(section(both, m.str_tokens))
    if pairs:
        md.append(correctness_section(pairs))
    return "".join(md)


def correctness_section(pairs: list[PairResult]) -> str:
    md = [
        "\n## Correctness: concordance and discordance heads (`Traced.compare`)\n\n",
        "Each pair differs in one token. A head is *concordance-like* when its attention to the object is at "
        f"least {SHIFT} higher when the statement is true, *discordance-like* when it is at least {SHIFT} higher "
        "when it is false. The paper finds W_QK eigenvalues skewed positive for concordance heads and negative "
        "for discordance heads.\n",
    ]
    for p in pairs:
        yes_true, yes_false = p.answers
        c = p.comparisons["last"]
        said = (
            f"{'Yes' if yes_true > 0 else 'No'} to the true one and {'Yes' if yes_false > 0 else 'No'} to the false one"
        )
        md.append(
            f"\n### {p.pair.title}\n\nlogit(' Yes') − logit(' No'): {yes_true:+.3f} when true, {yes_false:+.3f} "
            f"when false: the model says {said}. Object: position {p.key_pos} {c.str_tokens_a[p.key_pos]!r}. "
            f"Graphs: `{p.graphs['true']}` (true), `{p.graphs['false']}` (false).\n\n"
        )
        rows = [
            {
                "query": f"{h['query']} ({p.comparisons[h['query']].query_pos})",
                "head": h["name"],
                "role": h["role"],
                "attention if true": h["attention_true"],
                "attention if false": h["attention_false"],
                "W_QK skew": h["skew"],
                "skew as in the paper": "yes" if h["skew_agrees"] else "no",
            }
            for h in sorted(p.heads, key=lambda h: (h["query"], h["role"], -abs(h["diff"])))
        ]
        md.append(markdown_table(rows, {"attention if true": ".3f", "attention if false": ".3f", "W_QK skew": "+.3f"}))
        md.append("\n" + verdict(p) + "\n")
        md.append("\nThe heads whose attention from the last position differs most, and their QK terms:\n\n")
        md.append(c.markdown(top=6, top_terms=5))
    return "".join(md)


def verdict(p: PairResult) -> str:
    """What the model does, in words, against the paper's picture."""
    skews = p.comparisons["last"].skew
    negative = float((skews < 0).double().mean())
    parts, means = [], {}
    for role, sign in (("concordance", "positive"), ("discordance", "negative")):
        skew = {h["name"]: h["skew"] for h in p.heads if h["role"] == role}
        agree = [name for name, s in skew.items() if (s > 0) == (sign == "positive")]
        if not skew:
            parts.append(f"no head behaves like a {role} head")
            continue
        means[role] = sum(skew.values()) / len(skew)
        n = len(skew)
        parts.append(
            f"{n} head{'s' if n > 1 else ''} behave{'' if n > 1 else 's'} like {role} heads "
            f"({', '.join(sorted(skew))}), {len(agree)} of {'them' if n > 1 else 'it'} with the {sign} W_QK skew the "
            f"paper reports (mean skew {means[role]:+.3f})"
        )
    text = "On this model " + "; ".join(parts) + "."
    if len(means) == 2:
        order = "above" if means["concordance"] > means["discordance"] else "below"
        text += (
            f" The concordance-like heads' mean skew lies {order} the discordance-like heads' "
            f"({'as' if order == 'above' else 'unlike'} in the paper)"
        )
    text += f"; {negative:.0%} of all this model's heads have a negative skew."
    yes_true, yes_false = p.answers
    if (yes_true > 0) == (yes_false > 0):
        text += " The model gives both statements the same answer, so these heads do not decide it here."
    return text


def run_demo(
    out: str | Path = "demo-output",
    serve: bool = True,
    port: int = 8000,
    tracer: Tracer | None = None,
    cases: tuple[CaseStudy, ...] = CASES,
    pairs: tuple[MinimalPair, ...] = PAIRS,
    both_ways: str | None = BOTH_WAYS,
) -> int:
    from rich.console import Console

    con = Console()
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tracer is None:
        tracer = Tracer.load(DEMO_NAME)  # the embedded model and its SAEs
    results: list[CaseResult] = []
    written: dict[str, str] = {}  # slug -> graph file, so that each graph is written once
    for case in cases:
        con.print(f"[bold]{case.slug}[/bold]: {case.prompt!r}")
        r = study(tracer, case, out, written)
        results.append(r)
        m, best = r.mechanism, r.mechanism.best
        what = "no candidate" if best is None else f"{best.kind} ({best.side}) {best.label!r} in {best.name}"
        con.print(
            f"  predicts {m.prediction!r} (p({case.answer!r}) = {m.p_answer:.3f}); mechanism: {what}; "
            f"{m.verdict()} ({len(m.candidates)} candidates, {m.n_passes} passes "
            f"+ {sum(n.n_passes for n in m.nulls)} for controls, {m.seconds:.1f} s)"
        )
    both = None
    chosen = [r for r in results if r.case.slug == both_ways and r.graph is not None]
    if chosen:
        r = chosen[0]
        con.print(f"[bold]{r.case.slug}[/bold] on the demo's transcoders and attention SAEs")
        assert r.graph is not None
        t0 = time.perf_counter()
        both = trace_both_ways(tracer, r.case, (r.graph, r.files[0]), out, lambda g, p: save_once(g, p, written))
        con.print(f"  three graphs compared in {time.perf_counter() - t0:.1f} s")
        for v in both.views:
            heads = ", ".join(f"L{h['layer']}H{h['head']}" for h in v.heads) or "no head loadings"
            con.print(f"  {v.name}: replacement {v.replacement:.3f}, completeness {v.completeness:.3f}; {heads}")
    compared = []
    for pair in pairs:
        con.print(f"[bold]correctness[/bold]: {pair.title}")
        p = correctness(tracer, pair, out, written)
        compared.append(p)
        con.print("  " + verdict(p))
        patched = p.comparisons["last"].patching
        if patched is not None:
            share = "" if patched.share is None else f" ({patched.share:.1%} of it)"
            con.print(f"  the top heads' patterns from false into true move m by {patched.together:+.3f} of "
                      f"{patched.total:+.3f}{share}")  # fmt: skip
    seconds = time.perf_counter() - start
    atomic_write(out / "report.md", report(results, compared, tracer, seconds, both))
    n_files = sum(len(r.files) for r in results) + sum(len(p.files) for p in compared) + len(both.files if both else [])
    con.print(f"wrote {out}/report.md and {n_files} files in {seconds:.0f} s")
    if serve:
        try:
            from ..server import serve as serve_ui
        except ImportError:
            con.print("the web UI is not available (install qktrace[server]); stopping here")
            return 0
        con.print(f"serving the web UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
        serve_ui([str(out)], saes=str(DEMO_SAES), port=port, tracer=tracer)
    return 0
