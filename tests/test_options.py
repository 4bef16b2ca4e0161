"""Settings are declared once (`qktrace.options`): the CLI, the server and the page agree on every default,
and a bad value is one InputError line naming the setting, the value and the fix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from qktrace.cli import commands
from qktrace.cli.args import build_parser
from qktrace.config import parse_bytes
from qktrace.errors import InputError
from qktrace.options import (
    BatchOptions,
    CompareOptions,
    DashboardOptions,
    ExplainSettings,
    GraphOptions,
    ModelOptions,
    QKOptions,
    SweepOptions,
    doc,
    with_overrides,
)
from qktrace.server import schemas as S

STATIC = Path(commands.__file__).resolve().parent.parent / "web" / "static"
MODEL = ["m", "--saes", "s"]


def parse(*argv: str) -> Any:
    return build_parser(commands.COMMANDS).parse_args(list(argv))


# -- one default per setting ------------------------------------------------------------------------------


def test_the_default_sweep_is_the_documented_one():
    # clean (1), ablation (0), sign flip (-1), x2 and x3: five passes (SweepOptions.scales' documentation)
    assert SweepOptions().values == (-1.0, 0.0, 1.0, 2.0, 3.0)
    assert "five passes" in doc(SweepOptions, "scales")


def test_cli_defaults_are_the_options_defaults():
    graph = parse("graph", *MODEL, "--prompt", "p", "--out", "g.json")
    assert commands._graph_options(graph, graph.max_memory) == GraphOptions()
    steer = parse("steer", *MODEL, "--prompt", "p", "--layer", "1", "--feature", "3", "--positions", "2")
    assert commands.steer_request(steer).options == SweepOptions()
    assert parse("qk", *MODEL, "--prompt", "p", "--layer", "0", "--head", "0").top == QKOptions().top
    batch = parse("batch", *MODEL, "--prompts", "p.jsonl", "--out", "o")
    assert BatchOptions(graph=commands._graph_options(batch), explain=not batch.no_explain) == BatchOptions()
    dash = parse("dashboards", *MODEL, "--corpus", "c", "--out", "o")
    ours = {k: getattr(dash, k) for k in ("seq_len", "max_docs", "text_field", "n_contexts")}
    assert DashboardOptions(**ours) == DashboardOptions()
    assert parse("serve").max_memory == GraphOptions().max_memory
    pair = parse("compare", *MODEL, "--prompt-a", "a", "--prompt-b", "b")
    assert CompareOptions(top=pair.top, top_terms=pair.top_terms) == CompareOptions()
    assert ModelOptions(full_path=graph.full_path) == ModelOptions() == ModelOptions(full_path=batch.full_path)
    assert parse("graph", *MODEL, "--prompt", "p", "--out", "g.json", "--full-path").full_path
    ex = parse("explain", *MODEL, "--prompt", "p", "--answer", "a")
    assert (ex.null_draws, ex.null_seed) == (ExplainSettings().null_draws, ExplainSettings().null_seed)


def test_cli_help_is_the_fields_documentation():
    sub = build_parser(commands.COMMANDS)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    flat = lambda text: " ".join(text.split())  # noqa: E731
    for command, cls, names in (
        ("graph", GraphOptions, ("node_threshold", "edge_threshold", "max_nodes", "max_memory")),
        ("steer", SweepOptions, ("scales", "side", "mode", "freeze_others")),
        ("dashboards", DashboardOptions, ("seq_len", "max_docs", "n_contexts")),
    ):
        text = flat(sub[command].format_help())
        for name in names:
            assert flat(doc(cls, name)) in text, (command, name)


def test_server_defaults_are_the_options_defaults():
    def defaults(model: type, names: tuple[str, ...]) -> dict[str, Any]:
        return {n: model.model_fields[n].get_default(call_default_factory=True) for n in names}  # type: ignore[attr-defined]

    graph = ("node_threshold", "edge_threshold", "max_nodes", "qk_terms")
    assert defaults(S.GraphRequest, graph) == {n: getattr(GraphOptions(), n) for n in graph}
    sweep = ("scales", "side", "mode", "freeze_others", "top_k")
    assert defaults(S.SweepRequest, sweep) == {n: getattr(SweepOptions(), n) for n in sweep}
    assert defaults(S.QKRequest, ("top",)) == {"top": QKOptions().top}
    from qktrace.server.explain import CompareRequest

    assert defaults(CompareRequest, ("top", "top_terms")) == dataclasses.asdict(CompareOptions())
    from qktrace.server.explain import ExplainRequest

    null = ("null_draws", "null_seed")
    assert defaults(ExplainRequest, null) == {n: getattr(ExplainSettings(), n) for n in null}
    from qktrace.server.compute import steer_request

    req = S.SweepRequest(prompt="p", heads=[(1, 0)], feature=3, positions=2)
    assert steer_request(req).request.options == SweepOptions()


def test_the_page_takes_its_defaults_from_the_server(tmp_path):
    from fastapi.testclient import TestClient

    from qktrace.server.app import create_app

    info = TestClient(create_app(tmp_path)).get("/api/info").json()
    assert info["defaults"]["sweep"] == dataclasses.asdict(SweepOptions())
    assert info["defaults"]["graph"] == dataclasses.asdict(GraphOptions())
    assert info["defaults"]["qk"] == dataclasses.asdict(QKOptions())
    # the page keeps no default of its own: the form is filled from /api/info's
    html = (STATIC / "index.html").read_text()
    field = re.search(r"<input[^>]*id=\"steer-scales\"[^>]*>", html)
    assert field is not None and "value=" not in field.group(0)
    assert "sweepPanel.setDefaults(info.defaults.sweep)" in (STATIC / "app.js").read_text()
    panel = (STATIC / "sweep-panel.js").read_text()
    assert '$("steer-scales").value = ' in panel and not re.search(r"-?\d+:-?\d+:\d+", panel)


# -- bad values: one line, naming the setting, the value and the fix ---------------------------------------

BAD = [
    (GraphOptions, {"node_threshold": 0.0}, "node_threshold=0.0", "(0, 1]"),
    (GraphOptions, {"edge_threshold": float("nan")}, "edge_threshold=nan", "(0, 1]"),
    (GraphOptions, {"node_threshold": True}, "node_threshold=True", "(0, 1]"),
    (GraphOptions, {"max_nodes": 0}, "max_nodes=0", "1..100000"),
    (GraphOptions, {"readout": "both"}, "readout='both'", "decoder, encoder"),
    (GraphOptions, {"mode": "fast"}, "mode='fast'", "full, target"),
    (GraphOptions, {"loadings_per_edge": -1}, "loadings_per_edge=-1", "0..1024"),
    (GraphOptions, {"max_memory": 1000}, "max_memory '1000'", "1MiB"),
    (GraphOptions, {"max_memory": "lots"}, "max_memory 'lots'", "such as 8GB"),
    (GraphOptions, {"qk_terms": "yes"}, "qk_terms='yes'", "True or False"),
    (SweepOptions, {"scales": "a:b"}, "scale spec 'a:b'", "start:stop:count"),
    (SweepOptions, {"scales": "0:1:100"}, "100 scales", "1..64"),
    (SweepOptions, {"side": "both"}, "side='both'", "query, key"),
    (SweepOptions, {"top_k": 0}, "top_k=0", "1..20"),
    (QKOptions, {"top": 0}, "top=0", "1..1000"),
    (ExplainSettings, {"sites": 0}, "sites=0", ">= 1"),
    (ExplainSettings, {"scales": (1.0, 2.0)}, "scales=(1.0, 2.0)", "below 1"),
    (ExplainSettings, {"null_draws": -1}, "null_draws=-1", "0..1000"),
    (DashboardOptions, {"seq_len": 1}, "seq_len=1", "2..65536"),
    (DashboardOptions, {"max_docs": 0}, "max_docs=0", ">= 1"),
    (BatchOptions, {"qk_rows": -1}, "qk_rows=-1", "0..1000"),
    (BatchOptions, {"graph": {"max_nodes": 5}}, "BatchOptions.graph", "GraphOptions(...)"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "named", "fix"), BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, *_ in BAD]
)
def test_bad_values_are_one_line(cls, kwargs, named, fix):
    with pytest.raises(InputError) as e:
        cls(**kwargs)
    message = str(e.value)
    assert "\n" not in message and named in message and fix in message, message


def test_overrides_are_checked_and_unknown_names_refused():
    options = with_overrides(GraphOptions(max_nodes=50), GraphOptions, {"node_threshold": 0.5})
    assert (options.max_nodes, options.node_threshold, options.edge_threshold) == (50, 0.5, 0.98)
    with pytest.raises(InputError, match="node_threshold=3"):
        with_overrides(None, GraphOptions, {"node_threshold": 3})
    with pytest.raises(InputError, match="GraphOptions has no setting 'top_heads': use one of .*loadings_per_edge"):
        with_overrides(None, GraphOptions, {"top_heads": 3})


def test_byte_budgets_have_one_rule():
    assert parse_bytes("1MiB") == 1 << 20 == GraphOptions(max_memory="1MiB").max_memory  # type: ignore[arg-type]
    assert GraphOptions(max_memory=8 << 30).max_memory == 8 << 30
    for small in ("1MB", "1000000", (1 << 20) - 1):  # 1MB is 10^6 bytes, under the 1MiB a build needs
        with pytest.raises(InputError, match="out of range: give 1MiB to 1PiB"):
            parse_bytes(small)
        with pytest.raises(InputError, match="max_memory .* out of range"):
            GraphOptions(max_memory=small)  # type: ignore[arg-type]


def test_cli_refuses_bad_settings_at_parse_time(capsys):
    for argv, needle in (
        (["graph", *MODEL, "--prompt", "p", "--out", "g.json", "--max-memory", "1MB"], "give 1MiB to 1PiB"),
        (["graph", *MODEL, "--prompt", "p", "--out", "g.json", "--edge-threshold", "2"], "edge_threshold=2.0"),
        (["steer", *MODEL, "--prompt", "p", "--layer", "1", "--feature", "3", "--positions", "2", "--scales=a:b"],
         "scale spec"),
        (["dashboards", *MODEL, "--corpus", "c", "--out", "o", "--contexts", "0"], "n_contexts=0"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_three_top_heads_have_three_names():
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in (GraphOptions, BatchOptions)}
    assert "loadings_per_edge" in fields[GraphOptions] and "top_heads" not in fields[GraphOptions]
    assert "qk_rows" in fields[BatchOptions] and "top_heads" not in fields[BatchOptions]
