"""The `qktrace` command line. Every bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from . import config
from .errors import QKTraceError


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _tracer(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .tracer import Tracer

    return Tracer.load(config.resolve_model(args.model), config.resolve_saes(args.model, args.saes))


def cmd_info(args: argparse.Namespace) -> int:
    from rich.table import Table

    tracer = _tracer(args)
    con = _console()
    anat = tracer.model.anatomy.describe()
    t = Table(title=f"model {tracer.model.name}", show_header=False)
    for k, v in anat.items():
        t.add_row(k, str(v))
    con.print(t)
    if len(tracer.saes):
        s = Table(title="SAEs")
        rows = tracer.saes.describe()
        cols = ["checkpoint", "hook_name", "d_sae", "architecture", "k"]
        for c in cols:
            s.add_column(c)
        for r in rows:
            s.add_row(*(str(r.get(c, "")) for c in cols))
        con.print(s)
    else:
        con.print("no SAEs loaded (pass --saes DIR)")
    return 0


def cmd_qk(args: argparse.Namespace) -> int:
    from rich.table import Table

    tracer = _tracer(args)
    traced = tracer.run(args.prompt)
    att = traced.qk(args.layer, args.head, args.query_pos, args.key_pos)
    if args.json:
        print(json.dumps(att.to_json(top=args.top)))
        return 0
    con = _console()
    toks = traced.str_tokens
    con.print(
        f"layer {att.layer} head {att.head}, query {att.query_pos} {toks[att.query_pos]!r}, "
        f"{len(att.key_positions)} key position(s)"
    )
    for i, k in enumerate(att.key_positions):
        if len(att.key_positions) > 8 and float(att.pattern[i]) < 0.05 and k != att.key_positions[-1]:
            continue
        con.print(
            f"  key {k:>3} {toks[k]!r:<14} p={float(att.pattern[i]):.3f}  score {float(att.score[i]):+.5f}  "
            f"sum of terms {float(att.capped_sum[i]):+.5f}  diff {float(att.difference[i]):+.1e}"
        )
    table = Table(title=f"top {args.top} terms")
    for c in ("query component", "key component", "key pos", "value", "positional", "Δp(top key)"):
        table.add_column(c, justify="right" if c[0] in "vkpΔ" else "left")
    for _, r in att.terms_frame(top=args.top).iterrows():
        table.add_row(
            r.query_label,
            r.key_label,
            str(r.key_pos),
            f"{r.value:+.4f}",
            f"{r.positional:+.4f}",
            f"{r.prob_effect:+.4f}",
        )
    con.print(table)
    for title, series in (("query marginals", att.query_marginals()), ("key marginals", att.key_marginals())):
        m = Table(title=title)
        m.add_column("component")
        m.add_column("value", justify="right")
        for comp, v in series.head(min(args.top, 10)).items():
            m.add_row(att.label(str(comp)), f"{v:+.4f}")
        con.print(m)
    con.print(f"score check: max relative error {att.max_relative_error():.1e}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    tracer = _tracer(args)
    traced = tracer.run(args.prompt)
    kw = dict(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, max_nodes=args.max_nodes)
    graph = traced.graph(**kw)
    graph.save(args.out)
    con = _console()
    con.print(graph.summary_text() if hasattr(graph, "summary_text") else json.dumps(graph.summary(), indent=1))
    con.print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(out=args.out, serve=not args.no_serve, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qktrace", description="Why attention heads attend where they do, in SAE features."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="a save_pretrained directory, a hub id, or 'demo' for the embedded model")
        sp.add_argument("--saes", help="SAE directory (SAELens layout or Gemma Scope params.npz files)")

    sp = sub.add_parser("info", help="print the model's anatomy and the SAE set")
    model_args(sp)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("qk", help="QK attribution of one head's score(s)")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--layer", type=int, required=True)
    sp.add_argument("--head", type=int, required=True)
    sp.add_argument("--query-pos", type=int, default=-1, help="negative counts from the end (default -1)")
    sp.add_argument("--key-pos", type=int, default=None, help="default: every key the query can see")
    sp.add_argument("--top", type=int, default=config.QK.top)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_qk)

    sp = sub.add_parser("graph", help="attribution graph with head loadings, saved as JSON")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--node-threshold", type=float, default=config.GRAPH.node_threshold)
    sp.add_argument("--edge-threshold", type=float, default=config.GRAPH.edge_threshold)
    sp.add_argument("--max-nodes", type=int, default=None)
    sp.set_defaults(func=cmd_graph)

    sp = sub.add_parser("demo", help="run the case studies on the embedded demo model")
    sp.add_argument("--out", default="demo-output")
    sp.add_argument("--no-serve", action="store_true", help="do everything but serving the web UI")
    sp.add_argument("--port", type=int, default=8000)
    sp.set_defaults(func=cmd_demo)
    return p


def _quiet_transformers() -> None:
    """HF's own progress bars and warnings would bury our one-line errors; our progress is rich's."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    try:
        return int(args.func(args) or 0)
    except QKTraceError as e:
        print(f"qktrace: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qktrace: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
