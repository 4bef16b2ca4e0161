"""The `qktrace` argument parser: every value is checked where it is parsed, before anything is loaded.

A bad value ends in one line on stderr and exit status 2 (`Parser.error`), never argparse's usage block.
Numbers and specs are bounded by `config.LIMITS`; device, dtype and memory budgets are read by
`config.parse_device`, `parse_dtype` and `parse_bytes`, as in the Python API.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NoReturn, get_args, get_origin, get_type_hints

from .. import config
from ..config import LIMITS
from ..errors import InputError, QKTraceError
from ..options import (
    BatchOptions,
    CompareOptions,
    DashboardOptions,
    ExplainSettings,
    GraphOptions,
    ModelOptions,
    QKOptions,
    SweepOptions,
    doc,
)

_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(text: str) -> str:
    """`text` with every line break escaped, so that an error stays one line whatever the input held."""
    return "".join(repr(ch)[1:-1] if ch in _BREAKS else ch for ch in text)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the command's --help."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"qktrace: error: {one_line(message)} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _typed(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except QKTraceError as e:
            raise argparse.ArgumentTypeError(e.line("cli")) from None

    convert.__name__ = name
    return convert


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer {span}")
        return value

    return parse


def labels_path(text: str) -> str:
    """A Neuronpedia explanation export that exists: a .json / .jsonl / .gz file or a folder of them."""
    from pathlib import Path

    if not text.strip() or not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} does not exist: pass a Neuronpedia explanation export (.json, .jsonl, .gz) or a folder"
        )
    return text


def _name(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        from ..graph.formats import check_name

        return check_name(text, what)

    return _typed(what, parse)


slug, scan = _name("slug"), _name("scan")
device = _typed("device", config.parse_device)
dtype = _typed("dtype", config.parse_dtype)
memory = _typed("memory budget", config.parse_bytes)
port = int_in(1, 65535)
top = int_in(1, LIMITS.max_top)
feature = int_in(0)


def _number(kind: type) -> Callable[[str], Any]:
    """Text -> int or float (None for 'none'), or InputError naming what was expected."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text.strip())
        except ValueError:
            raise InputError(f"{text[:40]!r} is not {what}") from None

    return parse


def checked(cls: type, name: str, parse: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """The argparse type of field `name` of the settings class `cls`: the text parsed as the field's type,
    then checked by the class itself (`cls(name=value)`), so that the CLI applies the API's one rule."""
    kind = {"float": float, "int": int}.get(_base_type(cls, name))
    read = parse or (_number(kind) if kind is not None else str)

    def convert(text: str) -> Any:
        value = read(text)
        cls(**{name: value})
        return value

    return _typed(name.replace("_", " "), convert)


def _base_type(cls: type, name: str) -> str:
    """'int', 'float', 'str', 'bool' or 'Literal' for the field's annotation (its first part before '|')."""
    annotation = str(next(f for f in dataclasses.fields(cls) if f.name == name).type)
    return annotation.split("|")[0].split("[")[0].strip()


def setting(sp: argparse.ArgumentParser, cls: type, name: str, flag: str | None = None, **kw: Any) -> None:
    """An option for field `name` of the settings class `cls` (`qktrace.options`): its default, help and
    check are the field's own."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    text = f.metadata["doc"].replace("%", "%%")
    flag = flag or "--" + name.replace("_", "-")
    if f.default is False:
        sp.add_argument(flag, dest=name, action="store_true", help=text)
        return
    hints = get_type_hints(cls)
    if get_origin(hints[name]) is Literal:
        kw.setdefault("choices", get_args(hints[name]))
    else:
        kw.setdefault("type", checked(cls, name))
    sp.add_argument(flag, dest=name, default=f.default, help=f"{text} (default {f.default})", **kw)


def transcoders_path(text: str) -> str:
    """A transcoder set that exists: a folder, a circuit-tracer config.yaml or a Gemma Scope params.npz."""
    from pathlib import Path

    if text != "demo" and (not text.strip() or not Path(text).expanduser().exists()):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} does not exist: pass a transcoder set (a circuit-tracer folder or config.yaml, a Gemma "
            "Scope params.npz or a tree of them, a Llama Scope or SAELens transcoder folder; 'demo': the demo's own)"
        )
    return text


def attention_saes_path(text: str) -> str:
    """Attention-output SAEs that exist: a folder (or tree) of SAELens hook_z / hook_attn_out SAEs or Gemma
    Scope "att" params.npz files."""
    from pathlib import Path

    if text != "demo" and (not text.strip() or not Path(text).expanduser().exists()):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} does not exist: pass attention-output SAEs (SAELens hook_z or hook_attn_out folders, "
            "Gemma Scope att params.npz files, or a tree of them, one per layer; 'demo': the demo's own)"
        )
    return text


def _transcoders_arg(sp: argparse.ArgumentParser, attention: bool = False) -> None:
    """--transcoders for every command that loads a model for graphs, QK, steering or jobs; --attention-saes
    (`attention=True`) where checkpointed tracers work (graph, qk, steer, explain, compare, serve, dashboards,
    batch)."""
    sp.add_argument(
        "--transcoders",
        type=transcoders_path,
        metavar="PATH",
        help="a transcoder set; without --saes, graphs are plain transcoder graphs (circuit-tracer's) and QK "
        "components are the residual's writers",
    )
    if not attention:
        return
    sp.add_argument(
        "--attention-saes",
        type=attention_saes_path,
        metavar="PATH",
        help="SAEs on every layer's attention output, with --transcoders: graphs are checkpointed graphs "
        "(strategy 2) whose edges into attention features carry head loadings; dashboards describe their features",
    )


def _model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="a save_pretrained directory, a hub id, or 'demo' for the embedded model")
    sp.add_argument("--saes", help="SAE directory (SAELens layout or Gemma Scope params.npz files), or saelens:RELEASE")
    sp.add_argument("--sae-ids", help="comma-separated SAE ids within --saes (e.g. blocks.3.hook_resid_pre)")
    _labels_arg(sp)
    _device_args(sp)
    setting(sp, ModelOptions, "full_path")


def _labels_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--labels",
        action="append",
        type=labels_path,
        metavar="PATH",
        help="Neuronpedia explanation export(s) labelling the SAEs' features (.json, .jsonl, .gz or a folder; repeat)",
    )


def _device_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", type=device, default="auto", help=f"{config.DEVICES_HELP} (default auto)")
    sp.add_argument("--dtype", type=dtype, default="float32", help=f"{', '.join(config.DTYPES)} (default float32)")


def _scale_args(sp: argparse.ArgumentParser, source: str, source_help: str) -> None:
    """A resumable job's input, output folder and workers."""
    sp.add_argument(source, required=True, help=source_help)
    sp.add_argument("--out", required=True, help="output folder (a restarted job resumes from it)")
    sp.add_argument("--workers", type=int_in(1, 4096), default=1, help="model replicas (more than 1: a local Ray)")
    sp.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. ray://head:10001)")


def _graph_args(sp: argparse.ArgumentParser, memory_budget: bool = True) -> None:
    for name in ("node_threshold", "edge_threshold", "max_nodes"):
        setting(sp, GraphOptions, name)
    if memory_budget:
        _memory_arg(sp)


def _memory_arg(sp: argparse.ArgumentParser) -> None:
    setting(sp, GraphOptions, "max_memory", type=memory)


Sub = Any  # argparse's sub-parsers action (private type)
Commands = Mapping[str, Callable[[argparse.Namespace], int]]


def build_parser(commands: Commands) -> Parser:
    """The parser; `commands` maps each sub-command's name to the function that runs it."""
    p = Parser(prog="qktrace", description="Why attention heads attend where they do, in SAE features.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (and tracebacks of bugs)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_info, _qk, _graph, _steer, _explain, _compare, _heads, _serve, _dashboards, _batch, _demo):
        add(sub, commands)
    return p


def _command(sub: Sub, commands: Commands, name: str, help: str, model: bool = True) -> argparse.ArgumentParser:
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help)
    sp.set_defaults(func=commands[name])
    if model:
        _model_args(sp)
    return sp


def _info(sub: Sub, commands: Commands) -> None:
    _command(sub, commands, "info", "print the model's anatomy and the SAE set")


def _qk(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "qk", "QK attribution of one head's score(s)")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--layer", type=int_in(0), required=True)
    sp.add_argument("--head", type=int_in(0), required=True)
    sp.add_argument("--query-pos", type=int, default=-1, help="negative counts from the end (default -1)")
    sp.add_argument("--key-pos", type=int, default=None, help="default: every key the query can see")
    _transcoders_arg(sp, attention=True)
    setting(sp, QKOptions, "top")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def _graph(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "graph", "attribution graph with head loadings, saved as JSON")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", required=True, help="the JSON file (replaced atomically if it exists)")
    sp.add_argument("--slug", type=slug, help="the graph's Neuronpedia name (default: the prompt's words and a hash)")
    sp.add_argument("--scan", type=scan, help="its Neuronpedia model id (default: from the model and SAEs)")
    _transcoders_arg(sp, attention=True)
    _graph_args(sp)


def _steer(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "steer", "sweep a feature's scale inside chosen heads' QK circuit (or the residual)")
    sp.add_argument("--prompt", required=True)
    sp.add_argument(
        "--layer",
        type=int_in(0),
        required=True,
        help="the layer whose input checkpoint holds the feature (with --transcoders: the heads' layer, or "
        "without --heads the layer whose transcoder reads it)",
    )
    sp.add_argument("--feature", type=feature, required=True)
    sp.add_argument("--positions", required=True, help="5, 3:7 or 2,4 (negative counts from the end)")
    sp.add_argument("--heads", help="comma-separated heads of --layer: steer only inside their QK circuit")
    _transcoders_arg(sp, attention=True)
    sp.add_argument(
        "--feature-layer",
        type=int_in(0),
        help="with --transcoders and --heads: the layer whose transcoder reads the feature (below --layer); "
        "without --heads, --layer is that layer and the feature's output is steered",
    )
    sp.add_argument(
        "--kind",
        choices=("feature", "transcoder", "attn"),
        help="what --feature indexes: a residual-SAE feature, a transcoder feature or an attention-SAE feature "
        "(default: transcoder with --transcoders and no --saes, else feature)",
    )
    for name in ("side", "mode", "scales", "freeze_others"):
        setting(sp, SweepOptions, name)
    sp.add_argument("--watch", action="append", default=[], help="a token whose probability to report (repeat)")
    sp.add_argument("--watch-attn", action="append", default=[], help="LAYER,HEAD,Q,K attention weight to report")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--plot", help="write a PNG of the sweep")


def _explain(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "explain", "the QK mechanism behind an answer (attribution, then steering)")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--answer", required=True, help="the answer's token, e.g. ' Sally' (with its leading space)")
    sp.add_argument("--rival", help="the token it should beat (default: the clean runner-up)")
    sp.add_argument("--side", choices=("auto", "query", "key"), default="auto", help="where candidates are sought")
    _transcoders_arg(sp, attention=True)
    setting(sp, ExplainSettings, "null_draws")
    setting(sp, ExplainSettings, "null_seed")
    sp.add_argument("--json", action="store_true", help="print the mechanism as one JSON object")
    sp.add_argument("--out", help="also write the mechanism's JSON here")
    sp.add_argument("--plot", help="write a PNG of every candidate's curve and the mechanism's")


def _compare(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "compare", "two prompts whose tokens align (a minimal pair), head by head")
    sp.add_argument("--prompt-a", required=True)
    sp.add_argument("--prompt-b", required=True)
    sp.add_argument("--query-pos", type=int, default=-1, help="the attending position (default -1, the last)")
    sp.add_argument("--answer", help="a token: logit(answer) - logit(rival) in both prompts")
    sp.add_argument("--rival", help="default: prompt A's runner-up")
    _transcoders_arg(sp, attention=True)
    setting(sp, CompareOptions, "top")
    setting(sp, CompareOptions, "top_terms")
    sp.add_argument("--json", action="store_true", help="print the comparison as one JSON object")


def _heads(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "heads", "rank heads: previous-token, induction, duplicate-token, W_QK sign skew")
    sp.add_argument("--sort", default="induction", choices=("induction", "prev_token", "duplicate", "qk_skew"))
    sp.add_argument("--top", type=top, default=20)
    sp.add_argument("--plot", default=None, help="write a heat-map PNG")


def _serve(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "serve", "the web UI: graphs, head loadings, QK attributions, steering", model=False)
    sp.add_argument("paths", nargs="*", help="graph JSON files and/or one directory of them")
    sp.add_argument("--model", help="a model to compute new graphs, QK attributions and sweeps ('demo' works)")
    sp.add_argument("--saes", help="its SAEs (default for 'demo': the embedded ones)")
    _transcoders_arg(sp, attention=True)
    _labels_arg(sp)
    _device_args(sp)
    _memory_arg(sp)
    sp.add_argument(
        "--max-tokens",
        type=int_in(1, 1 << 20),
        default=LIMITS.server_max_tokens,
        help=f"longest prompt the server traces, in tokens (default {LIMITS.server_max_tokens})",
    )
    sp.add_argument(
        "--queue",
        type=int_in(1, 1024),
        default=LIMITS.max_queued_jobs,
        help="requests and jobs that run the model, queued or running at once; one more is answered 429 "
        f"(default {LIMITS.max_queued_jobs})",
    )
    sp.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sp.add_argument("--port", type=port, default=8000)
    sp.add_argument("--open", action="store_true", help="open a browser tab")


def _dashboards(sub: Sub, commands: Commands) -> None:
    what = "feature dashboards and labels of every SAE over a corpus (Ray optional)"
    sp = _command(sub, commands, "dashboards", what)
    _scale_args(sp, "--corpus", ".jsonl/.txt files, a folder of them, or a datasets save_to_disk")
    for name in ("seq_len", "max_docs", "text_field"):
        setting(sp, DashboardOptions, name)
    setting(sp, DashboardOptions, "n_contexts", "--contexts")
    _transcoders_arg(sp, attention=True)
    sp.add_argument("--circuit-tracer", action="store_true", help="also write circuit-tracer's per-feature files")


def _batch(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "batch", "trace a JSONL of prompts: graphs, QK rows of top heads, explain (Ray)")
    _scale_args(sp, "--prompts", 'JSONL: {"prompt": ..., optional "answer", "rival", "id"}')
    _graph_args(sp, memory_budget=False)
    _transcoders_arg(sp, attention=True)
    sp.add_argument("--no-explain", action="store_true", help=f"do not {doc(BatchOptions, 'explain')}")


def _demo(sub: Sub, commands: Commands) -> None:
    sp = _command(sub, commands, "demo", "run the case studies on the embedded demo model", model=False)
    sp.add_argument("--out", default="demo-output")
    sp.add_argument("--no-serve", action="store_true", help="do everything but serving the web UI")
    sp.add_argument("--port", type=port, default=8000)
    _device_args(sp)


# options whose value may start with '-' (a negative scale or position, a prompt, a token)
_VALUED = ("--scales", "--positions", "--prompt", "--watch", "--watch-attn", "--heads", "--slug", "--scan", "--answer",
           "--rival", "--prompt-a", "--prompt-b")  # fmt: skip


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """argparse takes '-4:4:9' after --scales for an option; glue such values to their flag."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in _VALUED:
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out
