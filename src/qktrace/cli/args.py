"""The `qktrace` argument parser: every value is checked where it is parsed, before anything is loaded.

A bad value ends in one line on stderr and exit status 2 (`Parser.error`), never argparse's usage block.
Numbers and specs are bounded by `config.LIMITS`; device, dtype and memory budgets are read by
`config.parse_device`, `parse_dtype` and `parse_bytes`, as in the Python API.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from .. import config
from ..config import LIMITS
from ..errors import QKTraceError

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
            raise argparse.ArgumentTypeError(str(e)) from None

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


def fraction(text: str) -> float:
    """A number in (0, 1] (graph thresholds)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number in (0, 1]")
    return value


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
max_nodes = int_in(1, LIMITS.max_graph_nodes)
feature = int_in(0)


def _model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="a save_pretrained directory, a hub id, or 'demo' for the embedded model")
    sp.add_argument("--saes", help="SAE directory (SAELens layout or Gemma Scope params.npz files), or saelens:RELEASE")
    sp.add_argument("--sae-ids", help="comma-separated SAE ids within --saes (e.g. blocks.3.hook_resid_pre)")
    _labels_arg(sp)
    _device_args(sp)


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


def _scale_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--workers", type=int_in(1, 4096), default=1, help="model replicas (more than 1: a local Ray)")
    sp.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. ray://head:10001)")


def _graph_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--max-memory", type=memory, help="memory budget for full-mode graphs, e.g. 8GB or 512MB")


def build_parser(commands: Mapping[str, Callable[[argparse.Namespace], int]]) -> Parser:
    """The parser; `commands` maps each sub-command's name to the function that runs it."""
    p = Parser(prog="qktrace", description="Why attention heads attend where they do, in SAE features.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (and tracebacks of bugs)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    sp = sub.add_parser("info", help="print the model's anatomy and the SAE set")
    _model_args(sp)
    sp.set_defaults(func=commands["info"])

    sp = sub.add_parser("qk", help="QK attribution of one head's score(s)")
    _model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--layer", type=int_in(0), required=True)
    sp.add_argument("--head", type=int_in(0), required=True)
    sp.add_argument("--query-pos", type=int, default=-1, help="negative counts from the end (default -1)")
    sp.add_argument("--key-pos", type=int, default=None, help="default: every key the query can see")
    sp.add_argument("--top", type=top, default=config.QK.top, help=f"terms listed, 1..{LIMITS.max_top}")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=commands["qk"])

    sp = sub.add_parser("graph", help="attribution graph with head loadings, saved as JSON")
    _model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", required=True, help="the JSON file (replaced atomically if it exists)")
    sp.add_argument("--node-threshold", type=fraction, default=config.GRAPH.node_threshold)
    sp.add_argument("--edge-threshold", type=fraction, default=config.GRAPH.edge_threshold)
    sp.add_argument("--max-nodes", type=max_nodes, default=config.GRAPH.max_nodes, help="features kept after pruning")
    sp.add_argument("--slug", type=slug, help="the graph's Neuronpedia name (default: the prompt's words and a hash)")
    sp.add_argument("--scan", type=scan, help="its Neuronpedia model id (default: from the model and SAEs)")
    _graph_args(sp)
    sp.set_defaults(func=commands["graph"])

    sp = sub.add_parser("steer", help="sweep a feature's scale inside chosen heads' QK circuit (or the residual)")
    _model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--layer", type=int_in(0), required=True, help="the layer whose input checkpoint holds the feature")
    sp.add_argument("--feature", type=feature, required=True)
    sp.add_argument("--positions", required=True, help="5, 3:7 or 2,4 (negative counts from the end)")
    sp.add_argument("--heads", help="comma-separated heads of --layer: steer only inside their QK circuit")
    sp.add_argument("--side", choices=("query", "key"), default="key")
    sp.add_argument("--mode", choices=("scale", "value"), default="scale", help="scale the activation or set it")
    sp.add_argument("--scales", default="-4:4:9", help=f"start:stop:count or a comma list (1..{LIMITS.max_scales})")
    sp.add_argument("--freeze-others", action="store_true", help="keep every other head's clean pattern")
    sp.add_argument("--watch", action="append", default=[], help="a token whose probability to report (repeat)")
    sp.add_argument("--watch-attn", action="append", default=[], help="LAYER,HEAD,Q,K attention weight to report")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--plot", help="write a PNG of the sweep")
    sp.set_defaults(func=commands["steer"])

    sp = sub.add_parser("explain", help="the QK mechanism behind an answer (attribution, then steering)")
    _model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--answer", required=True, help="the answer's token, e.g. ' Sally' (with its leading space)")
    sp.add_argument("--rival", help="the token it should beat (default: the clean runner-up)")
    sp.add_argument("--side", choices=("auto", "query", "key"), default="auto", help="where candidates are sought")
    sp.add_argument("--json", action="store_true", help="print the mechanism as one JSON object")
    sp.add_argument("--out", help="also write the mechanism's JSON here")
    sp.add_argument("--plot", help="write a PNG of every candidate's curve and the mechanism's")
    sp.set_defaults(func=commands["explain"])

    sp = sub.add_parser("compare", help="two prompts whose tokens align (a minimal pair), head by head")
    _model_args(sp)
    sp.add_argument("--prompt-a", required=True)
    sp.add_argument("--prompt-b", required=True)
    sp.add_argument("--query-pos", type=int, default=-1, help="the attending position (default -1, the last)")
    sp.add_argument("--answer", help="a token: logit(answer) - logit(rival) in both prompts")
    sp.add_argument("--rival", help="default: prompt A's runner-up")
    sp.add_argument("--top", type=int_in(0, 64), default=5, help="heads whose QK terms are compared")
    sp.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    sp.set_defaults(func=commands["compare"])

    sp = sub.add_parser("heads", help="rank heads: previous-token, induction, duplicate-token, W_QK sign skew")
    _model_args(sp)
    sp.add_argument("--sort", default="induction", choices=("induction", "prev_token", "duplicate", "qk_skew"))
    sp.add_argument("--top", type=top, default=20)
    sp.add_argument("--plot", default=None, help="write a heat-map PNG")
    sp.set_defaults(func=commands["heads"])

    sp = sub.add_parser("serve", help="the web UI: graphs, head loadings, QK attributions, steering")
    sp.add_argument("paths", nargs="*", help="graph JSON files and/or one directory of them")
    sp.add_argument("--model", help="a model to compute new graphs, QK attributions and sweeps ('demo' works)")
    sp.add_argument("--saes", help="its SAEs (default for 'demo': the embedded ones)")
    _labels_arg(sp)
    _device_args(sp)
    _graph_args(sp)
    sp.add_argument(
        "--max-tokens",
        type=int_in(1, 1 << 20),
        default=LIMITS.server_max_tokens,
        help=f"longest prompt the server traces, in tokens (default {LIMITS.server_max_tokens})",
    )
    sp.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sp.add_argument("--port", type=port, default=8000)
    sp.add_argument("--open", action="store_true", help="open a browser tab")
    sp.set_defaults(func=commands["serve"])

    sp = sub.add_parser("dashboards", help="feature dashboards and labels of every SAE over a corpus (Ray optional)")
    _model_args(sp)
    sp.add_argument("--corpus", required=True, help=".jsonl/.txt files, a folder of them, or a datasets save_to_disk")
    sp.add_argument("--out", required=True, help="output folder (a restarted job resumes from it)")
    _scale_args(sp)
    sp.add_argument("--seq-len", type=int_in(2, 1 << 16), default=128, help="tokens per chunk of a document")
    sp.add_argument("--max-docs", type=int_in(1), default=None, help="read only the first N documents")
    sp.add_argument("--text-field", default="text", help="the text field of JSONL records (default text)")
    sp.add_argument("--contexts", type=int_in(1, 1000), default=10, help="top activating contexts kept per feature")
    sp.add_argument("--circuit-tracer", action="store_true", help="also write circuit-tracer's per-feature files")
    sp.set_defaults(func=commands["dashboards"])

    sp = sub.add_parser("batch", help="trace a JSONL of prompts: graphs, QK rows of top heads, explain (Ray optional)")
    _model_args(sp)
    sp.add_argument("--prompts", required=True, help='JSONL: {"prompt": ..., optional "answer", "rival", "id"}')
    sp.add_argument("--out", required=True, help="output folder (a restarted job resumes from it)")
    _scale_args(sp)
    sp.add_argument("--node-threshold", type=fraction, default=config.GRAPH.node_threshold)
    sp.add_argument("--edge-threshold", type=fraction, default=config.GRAPH.edge_threshold)
    sp.add_argument("--max-nodes", type=max_nodes, default=config.GRAPH.max_nodes, help="features kept after pruning")
    sp.add_argument("--no-explain", action="store_true", help="skip explain() even where a prompt names an answer")
    sp.set_defaults(func=commands["batch"])

    sp = sub.add_parser("demo", help="run the case studies on the embedded demo model")
    sp.add_argument("--out", default="demo-output")
    sp.add_argument("--no-serve", action="store_true", help="do everything but serving the web UI")
    sp.add_argument("--port", type=port, default=8000)
    _device_args(sp)
    sp.set_defaults(func=commands["demo"])
    return p


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
