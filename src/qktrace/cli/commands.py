"""The `qktrace` sub-commands. Each checks every argument and output path first, then loads the model.

All checks beyond parsing are the library's own (`qktrace.steering.requests`, `qktrace.files`, `check_index`),
shared with the server.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .. import config
from ..config import LIMITS
from ..errors import InputError
from ..files import check_distinct, check_output, check_output_dir
from ..nodes import position_text
from ..options import BatchOptions, DashboardOptions, ExplainSettings, GraphOptions, SweepOptions
from ..steering.requests import SteerRequest, build_steering, check_request, check_text


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _tracer(args: argparse.Namespace, model: str | None = None, saes: str | None = None):
    from ..tracer import Tracer

    if model is None:
        model, saes = args.model, getattr(args, "saes", None)
    ids = [s.strip() for s in args.sae_ids.split(",")] if getattr(args, "sae_ids", None) else None
    return Tracer.load(
        config.resolve_model(model),
        config.resolve_saes(model, saes, getattr(args, "transcoders", None)),
        sae_ids=ids,
        device=args.device,
        dtype=args.dtype,
        labels=getattr(args, "labels", None),
        transcoders=getattr(args, "transcoders", None),
        attention_saes=getattr(args, "attention_saes", None),
        full_path=getattr(args, "full_path", False),
    )


def _json_safe(x: Any) -> Any:
    """Non-finite floats become null, so that --json always prints valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _print_json(obj: Any) -> None:
    print(json.dumps(_json_safe(obj), allow_nan=False))


def cmd_info(args: argparse.Namespace) -> int:
    from rich.table import Table

    tracer = _tracer(args)
    con = _console()
    t = Table(title=f"model {tracer.model.name}", show_header=False)
    for k, v in tracer.model.anatomy.describe().items():
        t.add_row(k, str(v))
    con.print(t)
    if len(tracer.saes):
        s = Table(title="SAEs")
        cols = ["checkpoint", "hook_name", "d_sae", "architecture", "k"]
        for c in cols:
            s.add_column(c)
        for r in tracer.saes.describe():
            s.add_row(*(str(r.get(c, "")) for c in cols))
        con.print(s)
    else:
        con.print("no SAEs loaded (pass --saes DIR)")
    return 0


def cmd_qk(args: argparse.Namespace) -> int:
    from rich.table import Table

    check_text(args.prompt)
    traced = _tracer(args).run(args.prompt)
    att = traced.qk(args.layer, args.head, args.query_pos, args.key_pos)
    if args.json:
        _print_json(att.to_json(top=args.top))
        return 0
    con = _console()
    toks = traced.str_tokens
    con.print(
        f"layer {att.layer} head {att.head}, query {position_text(att.query_pos, toks[att.query_pos])}, "
        f"{len(att.key_positions)} key position(s)"
    )
    for i, k in enumerate(att.key_positions):
        if len(att.key_positions) > 8 and float(att.pattern[i]) < 0.05 and k != att.key_positions[-1]:
            continue
        con.print(
            f"  key {position_text(k, toks[k]):<18} p={float(att.pattern[i]):.3f}  score {float(att.score[i]):+.5f}  "
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
    check_text(args.prompt)
    out = check_output(args.out, "graph")
    options = _graph_options(args, max_memory=args.max_memory)
    traced = _tracer(args).run(args.prompt)
    graph = traced.graph(options, slug=args.slug, scan=args.scan)
    graph.save(out)
    con = _console()
    con.print(graph.summary_text())
    con.print(f"wrote {out}")
    return 0


def _graph_options(args: argparse.Namespace, max_memory: int | None = None) -> GraphOptions:
    """The graph settings of `graph` and `batch` (already checked by the parser, through `GraphOptions`)."""
    return GraphOptions(
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        max_nodes=args.max_nodes,
        max_memory=max_memory,
    )


def _count(spec: str, sep: str, limit: int, what: str) -> None:
    n = spec.count(sep) + 1
    if n > limit:
        raise InputError(f"{n} {what} given: give at most {limit}")


def _ints(spec: str, what: str, usage: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise InputError(f"{what} '{spec[:60]}' not understood: use {usage}") from None


def parse_positions(spec: str) -> int | slice | list[int]:
    """'5' -> 5, '3:7' -> slice(3, 7), '2,4' -> [2, 4]; negatives count from the end."""
    usage = "5, 3:7 or 2,4"
    _count(spec, ",", LIMITS.max_positions, "positions")
    if ":" in spec:
        try:
            a, b = spec.split(":")
            return slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
        except ValueError:
            raise InputError(f"positions '{spec[:60]}' not understood: use {usage}") from None
    ints = _ints(spec, "positions", usage)
    return ints[0] if len(ints) == 1 and "," not in spec else ints


def parse_watch_attn(specs: list[str]) -> list[tuple[int, int, int, int]]:
    if len(specs) > LIMITS.max_watch_attention:
        raise InputError(f"{len(specs)} --watch-attn given: watch at most {LIMITS.max_watch_attention}")
    out = []
    for spec in specs:
        _count(spec, ",", 4, "numbers in --watch-attn")
        ints = _ints(spec, "--watch-attn", "LAYER,HEAD,QUERY_POS,KEY_POS")
        if len(ints) != 4:
            raise InputError(f"--watch-attn '{spec[:60]}' not understood: use LAYER,HEAD,QUERY_POS,KEY_POS")
        out.append((ints[0], ints[1], ints[2], ints[3]))
    return out


def steer_request(args: argparse.Namespace) -> SteerRequest:
    """The CLI's steering arguments as the request the server also builds."""
    heads: list[tuple[int, int]] = []
    if args.heads is not None:
        _count(args.heads, ",", LIMITS.max_heads, "heads")
        heads = [(args.layer, h) for h in _ints(args.heads, "--heads", "comma-separated head numbers, e.g. 2,5")]
    if len(args.watch) > LIMITS.max_watch_tokens:
        raise InputError(f"{len(args.watch)} --watch given: watch at most {LIMITS.max_watch_tokens} tokens")
    return SteerRequest(
        feature=args.feature,
        positions=parse_positions(args.positions),
        heads=heads,
        checkpoint=args.layer,
        watch_tokens=[check_text(w, "watched token") for w in args.watch],
        watch_attention=parse_watch_attn(args.watch_attn) if (args.watch_attn or not heads) else None,
        options=SweepOptions(side=args.side, mode=args.mode, scales=args.scales, freeze_others=args.freeze_others),
        kind=args.kind or ("transcoder" if args.transcoders is not None and args.saes is None else None),
        feature_layer=args.feature_layer,
    )


def cmd_steer(args: argparse.Namespace) -> int:
    check_text(args.prompt)
    checked = check_request(steer_request(args))
    plot = check_output(args.plot, "plot", "--plot") if args.plot is not None else None
    traced = _tracer(args).run(args.prompt)
    steering = build_steering(traced, checked)
    df = steering.run()
    if plot is not None:
        from ..analyses.plots import plot_sweep

        plot_sweep(df, plot, title=steering.title)
    if args.json:
        _print_json(df.to_dict(orient="records"))
    else:
        _console().print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        if plot is not None:
            _console().print(f"wrote {plot}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..analyses.explain import explain

    check_text(args.prompt)
    out = check_output(args.out, "output", "--out") if args.out is not None else None
    plot = check_output(args.plot, "plot", "--plot") if args.plot is not None else None
    check_distinct({"--out": out, "--plot": plot})
    settings = ExplainSettings(null_draws=args.null_draws, null_seed=args.null_seed)
    m = explain(_tracer(args), args.prompt, args.answer, args.rival, args.side, settings=settings)
    if out is not None:
        m.save_json(out)
    if plot is not None:
        m.plot(plot)
    if args.json:
        _print_json(m.to_json())
    else:
        print(m.markdown())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    check_text(args.prompt_a, "--prompt-a")
    check_text(args.prompt_b, "--prompt-b")
    tracer = _tracer(args)
    # both prompts held to the model's positions before either runs; each refusal names its flag
    ids_a = tracer.tokenize(args.prompt_a, what="prompt A (--prompt-a)")
    ids_b = tracer.tokenize(args.prompt_b, what="prompt B (--prompt-b)")
    a, b = tracer.run(ids_a), tracer.run(ids_b)
    c = a.compare(
        b, query_pos=args.query_pos, answer=args.answer, rival=args.rival, top=args.top, top_terms=args.top_terms
    )
    if args.json:
        _print_json(c.to_json())
    else:
        print(c.markdown(top=max(args.top, 8)))
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    from ..analyses.plots import plot_heads
    from ..steering.heads import heads_table

    plot = check_output(args.plot, "plot", "--plot") if args.plot is not None else None
    tracer = _tracer(args)
    table = heads_table(tracer.model, sort_by=args.sort)
    con = _console()
    con.print(table.head(args.top).to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    if plot is not None:
        plot_heads(table, plot)
        con.print(f"wrote {plot}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..server.launch import serve

    serve(
        args.paths,
        model=args.model,
        saes=args.saes,
        host=args.host,
        port=args.port,
        open_browser=args.open,
        device=args.device,
        dtype=args.dtype,
        max_memory=args.max_memory,
        max_tokens=args.max_tokens,
        queue=args.queue,
        labels=args.labels,
        transcoders=args.transcoders,
        attention_saes=args.attention_saes,
    )
    return 0


def _scale_source(args: argparse.Namespace) -> tuple[str, str | None, list[str] | None]:
    """(model, saes, sae ids) as each worker loads them ('demo' resolved), checked here first: a wrong path
    is one line before any worker starts."""
    from pathlib import Path

    from ..models.model import model_source
    from ..saes.load import sae_paths

    ids = [s.strip() for s in args.sae_ids.split(",")] if args.sae_ids else None
    model, saes = config.resolve_model(args.model), config.resolve_saes(args.model, args.saes)
    model_source(model, args.model)
    if saes is not None and not saes.startswith("saelens:"):
        root = Path(saes).expanduser()
        for sub in ids or [""]:
            sae_paths(root / sub if sub else root)
    return model, saes, ids


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_dashboards(args: argparse.Namespace) -> int:
    from ..jobs.corpus import corpus_files
    from ..jobs.dashboards import build_dashboards
    from ..jobs.pool import progress_bar

    out = check_output_dir(args.out)
    corpus_files(args.corpus)  # a missing or unreadable corpus is one line before any progress is drawn
    model, saes, ids = _scale_source(args)
    options = DashboardOptions(
        seq_len=args.seq_len, max_docs=args.max_docs, text_field=args.text_field, n_contexts=args.n_contexts
    )
    with progress_bar("dashboards", console=_stderr_console()) as bar:
        result = build_dashboards(
            model, saes, args.corpus, out, workers=args.workers, ray_address=args.ray_address, progress=bar,
            options=options, circuit_tracer=args.circuit_tracer, sae_ids=ids, device=str(args.device),
            dtype=str(args.dtype).removeprefix("torch."), full_path=args.full_path, transcoders=args.transcoders,
            attention_saes=args.attention_saes,
        )  # fmt: skip
    _console().print(
        f"{result.n_tokens} tokens in {result.shards} shards ({result.resumed} already done); "
        f"{sum(result.n_alive.values())} features active; wrote {result.out}"
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from ..jobs.batch import read_prompts, trace_batch
    from ..jobs.pool import progress_bar

    out = check_output_dir(args.out)
    read_prompts(args.prompts)  # a bad prompts file is one line before any progress is drawn
    model, saes, ids = _scale_source(args)
    options = BatchOptions(graph=_graph_options(args), explain=not args.no_explain)
    with progress_bar("batch", unit="prompts", console=_stderr_console()) as bar:
        result = trace_batch(
            model, saes, args.prompts, out, workers=args.workers, ray_address=args.ray_address, progress=bar,
            options=options, sae_ids=ids, device=str(args.device), dtype=str(args.dtype).removeprefix("torch."),
            full_path=args.full_path, transcoders=args.transcoders, attention_saes=args.attention_saes,
        )  # fmt: skip
    _console().print(f"{result.n_prompts} prompts ({result.resumed} already done); summary {result.summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.run import run_demo
    from ..server.launch import check_port

    out = check_output_dir(args.out)
    if not args.no_serve:
        check_port("127.0.0.1", args.port)
    tracer = _tracer(args, model=config.DEMO_NAME, saes=config.DEMO_NAME)
    return run_demo(out=out, serve=not args.no_serve, port=args.port, tracer=tracer)


COMMANDS = {
    "info": cmd_info,
    "qk": cmd_qk,
    "graph": cmd_graph,
    "steer": cmd_steer,
    "explain": cmd_explain,
    "compare": cmd_compare,
    "heads": cmd_heads,
    "serve": cmd_serve,
    "dashboards": cmd_dashboards,
    "batch": cmd_batch,
    "demo": cmd_demo,
}
