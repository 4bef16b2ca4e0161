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

    ids = args.sae_ids.split(",") if getattr(args, "sae_ids", None) else None
    return Tracer.load(config.resolve_model(args.model), config.resolve_saes(args.model, args.saes), sae_ids=ids)


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


def _positions(spec: str) -> int | slice | list[int]:
    """'5' -> 5, '3:7' -> slice(3, 7), '2,4' -> [2, 4]; negatives count from the end."""
    from .errors import InputError

    try:
        if ":" in spec:
            a, b = spec.split(":")
            return slice(int(a) if a else None, int(b) if b else None)
        if "," in spec:
            return [int(x) for x in spec.split(",")]
        return int(spec)
    except ValueError:
        raise InputError(f"positions '{spec}' not understood: use 5, 3:7 or 2,4") from None


def _watch_attn(spec: str) -> tuple[int, int, int, int]:
    from .errors import InputError

    try:
        layer, head, q, k = (int(x) for x in spec.split(","))
    except ValueError:
        raise InputError(f"--watch-attn '{spec}' not understood: use LAYER,HEAD,QUERY_POS,KEY_POS") from None
    return layer, head, q, k


def cmd_steer(args: argparse.Namespace) -> int:
    from . import interventions as iv
    from .errors import InputError, check_index

    tracer = _tracer(args)
    model = tracer.model
    n_pos = int(model.tokenize(args.prompt).shape[0])
    pos = _positions(args.positions)
    if args.heads:
        heads = tuple(int(h) for h in args.heads.split(","))
        layer = check_index(args.layer, model.n_layers, "layer")
        for h in heads:
            check_index(h, model.anatomy.layers[layer].n_heads, "head")
        steer: list[iv.Intervention] = [iv.SteerQK(layer, heads, args.side, args.feature, pos, scale=iv.SCALE)]
        if args.freeze_others:
            steer.append(iv.FreezeAttention())
        watch = [_watch_attn(w) for w in args.watch_attn] or [
            (layer, heads[0], n_pos - 1, p) for p in _pos_list(pos, n_pos)
        ]
    else:
        if args.freeze_others:
            raise InputError("--freeze-others needs --heads (QK-only steering); residual steering changes every head")
        steer = [iv.SteerFeature(args.layer, args.feature, pos, scale=iv.SCALE)]
        watch = [_watch_attn(w) for w in args.watch_attn]
    acts = tracer.saes[args.layer].encode(model.run(args.prompt).resid[args.layer])[:, args.feature]
    where = iv.resolve_positions(pos, n_pos)
    if not bool((acts[where] != 0).any()):
        active = (acts != 0).nonzero().flatten().tolist()
        raise InputError(
            f"feature {args.feature} is not active at positions {where} of checkpoint {args.layer}, so scaling it "
            f"changes nothing: it is active at {active or 'no position'}"
        )
    df = iv.sweep(model, tracer.saes, args.prompt, steer, args.scales, watch_tokens=args.watch, watch_attention=watch)
    if args.plot:
        from .plots import plot_sweep

        plot_sweep(
            df, args.plot, title=f"steer feature {args.feature} ({'QK ' + args.side if args.heads else 'residual'})"
        )
    if args.json:
        print(df.to_json(orient="records"))
    else:
        _console().print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        if args.plot:
            _console().print(f"wrote {args.plot}")
    return 0


def _pos_list(pos: int | slice | list[int], n: int) -> list[int]:
    from .interventions import resolve_positions

    return resolve_positions(pos, n)[:4]


def cmd_heads(args: argparse.Namespace) -> int:
    from .heads import heads_table
    from .plots import plot_heads

    tracer = _tracer(args)
    table = heads_table(tracer.model, sort_by=args.sort)
    con = _console()
    con.print(table.head(args.top).to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    if args.plot:
        plot_heads(table, args.plot)
        con.print(f"wrote {args.plot}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(args.paths, model=args.model, saes=args.saes, host=args.host, port=args.port, open_browser=args.open)
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
        sp.add_argument(
            "--saes", help="SAE directory (SAELens layout or Gemma Scope params.npz files), or saelens:RELEASE"
        )
        sp.add_argument("--sae-ids", help="comma-separated SAE ids within --saes (e.g. blocks.3.hook_resid_pre)")

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
    sp.add_argument("--max-nodes", type=int, default=config.GRAPH.max_nodes, help="features kept after pruning")
    sp.set_defaults(func=cmd_graph)

    sp = sub.add_parser("steer", help="sweep a feature's scale inside chosen heads' QK circuit (or the residual)")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--layer", type=int, required=True, help="the layer whose input checkpoint holds the feature")
    sp.add_argument("--feature", type=int, required=True)
    sp.add_argument("--positions", required=True, help="5, 3:7 or 2,4 (negative counts from the end)")
    sp.add_argument("--heads", help="comma-separated heads of --layer: steer only inside their QK circuit")
    sp.add_argument("--side", choices=("query", "key"), default="key")
    sp.add_argument("--scales", default="-4:4:9", help="start:stop:count or a comma list")
    sp.add_argument("--freeze-others", action="store_true", help="keep every other head's clean pattern")
    sp.add_argument("--watch", action="append", default=[], help="a token whose probability to report (repeat)")
    sp.add_argument("--watch-attn", action="append", default=[], help="LAYER,HEAD,Q,K attention weight to report")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--plot", help="write a PNG of the sweep")
    sp.set_defaults(func=cmd_steer)

    sp = sub.add_parser("heads", help="rank heads: previous-token, induction, duplicate-token, W_QK sign skew")
    model_args(sp)
    sp.add_argument("--sort", default="induction", choices=("induction", "prev_token", "duplicate", "qk_skew"))
    sp.add_argument("--top", type=int, default=20)
    sp.add_argument("--plot", default=None, help="write a heat-map PNG")
    sp.set_defaults(func=cmd_heads)

    sp = sub.add_parser("serve", help="the web UI: graphs, head loadings, QK attributions, steering")
    sp.add_argument("paths", nargs="*", help="graph JSON files and/or one directory of them")
    sp.add_argument("--model", help="a model to compute new graphs, QK attributions and sweeps ('demo' works)")
    sp.add_argument("--saes", help="its SAEs (default for 'demo': the embedded ones)")
    sp.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--open", action="store_true", help="open a browser tab")
    sp.set_defaults(func=cmd_serve)

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
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        pass


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """argparse takes '-4:4:9' after --scales for an option; glue such values to their flag."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("--scales", "--positions"):
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
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
