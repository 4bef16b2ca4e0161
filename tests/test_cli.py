"""The CLI: real output on tiny models, and one clear line (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from qktrace.cli import main
from qktrace.graph import FORMAT_VERSION
from qktrace.saes import save_sae_lens
from qktrace.testing import random_sae, random_saes


@pytest.fixture(scope="module")
def saes_dir(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    root = tmp_path_factory.mktemp("saes")
    saes = random_saes(model, "topk", d_sae=40, k=5, std=(1.0, 0.0, 0.3, 0.0), apply_b_dec_to_input=True)
    for c, sae in saes.items():
        save_sae_lens(sae, root / f"blocks.{c}.hook_resid_pre")
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_anatomy_and_saes(capsys, tiny_paths, saes_dir):
    code, out, _ = run(capsys, "info", str(tiny_paths["llama"]), "--saes", str(saes_dir))
    assert code == 0
    assert "kv_heads" in out and "blocks.2.hook_resid_pre" in out


def test_qk_json_sums_to_score(capsys, tiny_paths, saes_dir):
    argv = ["qk", str(tiny_paths["llama"]), "--saes", str(saes_dir), "--prompt", "Aunt Sally w1 w2 . Aunt"]
    code, out, _ = run(capsys, *argv, "--layer", "1", "--head", "3", "--json", "--top", "1000")
    assert code == 0
    obj = json.loads(out)
    for key in ("score", "sum_of_terms", "terms", "query_marginals", "key_marginals"):
        assert key in obj
    assert abs(obj["capped_sum"][-1] - obj["score"][-1]) < 1e-4 * max(1.0, abs(obj["score"][-1]))
    assert len(obj["terms"]) >= 10 and {"query", "key", "value"} <= set(obj["terms"][0])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "/nonexistent/model"], "does not exist"),
        (["info", "no-such-org/no-such-model-xyz"], "could not load model"),
        (["info", "@M", "--saes", "saelens:gpt2-small-res-jb"], "sae"),
        (["qk", "@M", "--saes", "@S", "--prompt", " ", "--layer", "0", "--head", "0"], "empty"),
        (["qk", "@M", "--saes", "@S", "--prompt", "w1 w2", "--layer", "7", "--head", "0"], "layer 7 is out of range"),
        (["qk", "@M", "--saes", "@S", "--prompt", "w1 w2", "--layer", "0", "--head", "9"], "head"),
        (["qk", "@M", "--saes", "@S", "--prompt", "w1", "--layer", "0", "--head", "0", "--query-pos", "5"], "position"),
        (["qk", "@M", "--prompt", "w1 w2", "--layer", "0", "--head", "0"], "no SAE at checkpoint 0"),
        (["info", "@M", "--saes", "@W"], "d_in"),
        (["info", "@M", "--saes", "/nonexistent/saes"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tiny_paths, saes_dir, tmp_path, args, needle):
    wide = random_sae("standard", 24, 8, std=(1.0, 0.0, 1.0, 0.0), apply_b_dec_to_input=True)
    save_sae_lens(wide, tmp_path / "blocks.0.hook_resid_pre")
    subst = {"@M": str(tiny_paths["llama"]), "@S": str(saes_dir), "@W": str(tmp_path)}
    code, out, err = run(capsys, *[subst.get(a, a) for a in args])
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_sae_file_is_one_line(capsys, tiny_paths, saes_dir, tmp_path):
    bad = tmp_path / "blocks.0.hook_resid_pre"
    bad.mkdir()
    (bad / "cfg.json").write_text((saes_dir / "blocks.0.hook_resid_pre" / "cfg.json").read_text())
    (bad / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    code, _, err = run(capsys, "info", str(tiny_paths["llama"]), "--saes", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1


# -- reliability: every mistake one line before any work, nothing on disk lost ---------------------------


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qktrace: error: "), err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads a model: its arguments should have been refused first."""
    from qktrace.tracer import Tracer

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Tracer, "load", refuse)


STEER = ["steer", "@M", "--saes", "@S", "--prompt", "Aunt Sally is the", "--layer", "1", "--positions", "2"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["graph", "@M", "--prompt", "w1", "--out", "@T"], "is a directory"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/missing/g.json"], "does not exist"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--max-nodes", "0"], "--max-nodes"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--max-nodes", "-3"], "--max-nodes"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--node-threshold", "nan"], "--node-threshold"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--max-memory", "lots"], "memory budget"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--max-memory", "0GB"], "out of range"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--top", "0"], "--top"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--top", "-1"], "--top"),
        (["qk", "@M", "--prompt", "w1 \udcff", "--layer", "0", "--head", "0"], "not valid UTF-8"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--device", "gpu"], "device 'gpu'"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--device", "cuda:99"], "cuda:99"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--dtype", "int8"], "dtype 'int8'"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0"], "required: --head"),
        (["heads", "@M", "--plot", "@T"], "is a directory"),
        (["heads", "@M", "--top", "0"], "--top"),
        ([*STEER, "--feature", "1", "--heads", "2,2"], "given twice"),
        ([*STEER, "--feature", "-1", "--heads", "2"], "--feature"),
        ([*STEER, "--feature", "1", "--heads", "2", "--scales", "0:1:10000"], "10000 scales"),
        ([*STEER, "--feature", "1", "--heads", "2", "--scales", "0:1:100000000000"], "a sweep takes 1..64"),
        ([*STEER, "--feature", "1", "--heads", "2", "--scales", ""], "0 scales"),
        ([*STEER, "--feature", "1", "--heads", "2", "--scales", "0,nan"], "not a finite number"),
        ([*STEER, "--feature", "1", "--heads", "2", "--scales", "-inf:1:3"], "not a finite number"),
        ([*STEER, "--feature", "1", "--heads", "2", "--watch-attn", "1,2"], "--watch-attn"),
        ([*STEER, "--feature", "1", "--heads", ",".join(["1"] * 300)], "300 heads"),
        ([*STEER, "--feature", "1", "--freeze-others"], "needs heads"),
        ([*STEER, "--feature", "1", "--heads", "2", "--plot", "@T"], "is a directory"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "@T/missing"], "does not exist"),
        (["serve", "--host", "no such host!", "--port", "8123"], "host"),
        (["demo", "--out", "@T/file.txt"], "not a folder"),
        (["demo", "--port", "-5"], "--port"),
        (["demo", "--dtype", "float64"], "dtype"),
        (
            ["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--slug", "my graph"],
            "slug 'my graph' may hold only",
        ),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--scan", "org/model"], "scan 'org/model'"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--slug", ""], "slug ''"),
        (
            ["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--labels", "@T/missing.json"],
            "does not exist",
        ),
        (["serve", "--labels", "@T/file.txt"], "add --model"),
        (["graph", "@M", "--prompt", "w1", "--out", "@T/g.json", "--transcoders", "@T/missing"], "does not exist"),
        (["qk", "@M", "--prompt", "w1", "--layer", "0", "--head", "0", "--transcoders", "@T/nope"], "does not exist"),
        (["serve", "--transcoders", "@T/nope"], "does not exist"),
        (["serve", "--transcoders", "@T/file.txt"], "add --model"),
    ],
)
def test_mistakes_are_refused_before_loading(capsys, tmp_path, no_loading, args, needle):
    (tmp_path / "file.txt").write_text("keep")
    subst = {"@M": "/no/model/needed", "@S": "/no/saes", "@T": str(tmp_path)}
    argv = [a.replace("@T", str(tmp_path)) if a.startswith("@T") else subst.get(a, a) for a in args]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert needle in one_line_error(err)
    assert (tmp_path / "file.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--feature", "40", "--heads", "2"], "checkpoint 1 feature 40 is out of range: valid values are 0..39"),
        (["--feature", "1", "--heads", "4"], "head 4 is out of range: valid values are 0..3"),
        (["--feature", "1", "--heads", "2", "--positions", "2,-3"], "position 2 is given twice"),
        (["--feature", "1", "--heads", "2", "--positions", "9"], "position 9 is out of range"),
        (["--feature", "1", "--heads", "2", "--watch", "Aunt Sally"], "single token"),
        (["--feature", "1", "--heads", "2", "--watch-attn", "1,9,0,0"], "watched head 9"),
    ],
)
def test_steer_checks_against_the_model(capsys, tiny_paths, saes_dir, extra, needle):
    argv = [tiny_paths["llama"] if a == "@M" else saes_dir if a == "@S" else a for a in STEER]
    code, _, err = run(capsys, *map(str, argv), *extra)
    assert code == 2 and needle in one_line_error(err)


def test_steer_refuses_inactive_feature_and_runs_an_active_one(capsys, tiny_paths, saes_dir, tmp_path):
    from qktrace.tracer import Tracer

    traced = Tracer.load(tiny_paths["llama"], saes_dir).run("Aunt Sally is the")
    acts = traced.acts(1)
    on = acts.feature[acts.pos == 2].tolist()
    off = next(f for f in range(40) if f not in on)
    argv = [str(tiny_paths["llama"]) if a == "@M" else str(saes_dir) if a == "@S" else a for a in STEER]
    code, _, err = run(capsys, *argv, "--feature", str(off), "--heads", "2")
    assert code == 2 and f"feature {off} is not active at positions [2]" in one_line_error(err)
    plot = tmp_path / "sweep.png"
    plot.write_bytes(b"old plot")
    code, out, err = run(
        capsys, *argv, "--feature", str(on[0]), "--heads", "2", "--scales", "0,1", "--json", "--plot", str(plot)
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [r["scale"] for r in rows] == [0.0, 1.0] and "attn:L1.H2:4->2" in rows[0]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run(capsys, *argv, "--feature", str(off), "--mode", "value", "--scales", "0,2", "--json")
    assert code == 0 and len(json.loads(out)) == 2  # setting a value injects an inactive feature


def test_graph_replaces_out_atomically(capsys, tiny_paths, saes_dir, tmp_path):
    out = tmp_path / "g.json"
    out.write_text("old graph")
    argv = ["graph", str(tiny_paths["llama"]), "--saes", str(saes_dir), "--prompt", "Aunt Sally is", "--out", str(out)]
    code, stdout, err = run(capsys, *argv, "--device", "cpu", "--dtype", "float32", "--max-memory", "1GB")
    assert code == 0, err
    assert json.loads(out.read_text())["metadata"]["qktrace"]["format_version"] == FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]


def test_device_and_dtype_reach_the_loader(capsys, monkeypatch, tmp_path):
    from qktrace.tracer import Tracer

    seen = {}

    def fake_load(model, saes=None, **kw):
        seen.update(kw, model=model)
        raise __import__("qktrace").errors.ModelLoadError("stop here")

    monkeypatch.setattr(Tracer, "load", fake_load)
    for cmd in (
        ["info", "m"],
        ["heads", "m"],
        ["qk", "m", "--prompt", "w", "--layer", "0", "--head", "0"],
        ["graph", "m", "--prompt", "w", "--out", str(tmp_path / "g.json")],
        ["steer", "m", "--prompt", "w", "--layer", "0", "--feature", "0", "--positions", "0"],
        ["demo"],
    ):
        seen.clear()
        code, _, err = run(capsys, *cmd, "--device", "cpu", "--dtype", "bf16")
        assert code == 2 and "stop here" in err, cmd
        assert seen["device"] == torch.device("cpu") and seen["dtype"] == torch.bfloat16, cmd


def test_a_bug_is_one_line_exit_1(capsys, monkeypatch):
    from qktrace.cli import commands

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setitem(commands.COMMANDS, "info", boom)
    code, _, err = run(capsys, "info", "m")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error (RuntimeError: something)" in lines[0] and "-v" in lines[0]
    code, _, err = run(capsys, "-v", "info", "m")
    assert code == 1 and "Traceback" in err  # asked for


def test_a_newline_in_a_value_stays_one_line(capsys, no_loading):
    code, _, err = run(capsys, "graph", "m", "--prompt", "w", "--out", "/no/such\ndir\u2028/g.json")
    assert code == 2 and "such\\ndir" in one_line_error(err)


def test_json_output_is_valid_json_without_nan(capsys, monkeypatch):
    from qktrace.cli import commands

    commands._print_json({"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [1.0, None]}


def test_python_m_qktrace_server_is_the_serve_command(capsys):
    from qktrace.server.__main__ import main as server_main

    assert server_main(["--port", "99999"]) == 2
    assert "--port" in one_line_error(capsys.readouterr().err)


# Load-time checks that live in models/ and saes/: the CLI turns their errors into one line.


def _broken_model(src, dst, how: str):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "nan":
        tensors = load_file(weights)
        name = next(k for k in tensors if k.endswith("q_proj.weight"))
        tensors[name][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "config-type":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["num_hidden_layers"] = "two"
        (dst / "config.json").write_text(json.dumps(cfg))
    elif how == "config-deep":
        (dst / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return dst


@pytest.mark.parametrize("how", ["truncated", "nan", "config-type", "config-deep"])
def test_broken_model_files_are_one_line(capsys, tiny_paths, tmp_path, how):
    model = _broken_model(tiny_paths["llama"], tmp_path / "m", how)
    code, _, err = run(capsys, "info", str(model))
    assert code == 2 and one_line_error(err)


def test_nan_sae_weights_are_refused_at_load(capsys, tiny_paths, saes_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(saes_dir / "blocks.1.hook_resid_pre", tmp_path / "blocks.1.hook_resid_pre")
    weights = tmp_path / "blocks.1.hook_resid_pre" / "sae_weights.safetensors"
    tensors = load_file(weights)
    tensors["W_dec"][0, 0] = float("inf")
    save_file(tensors, weights)
    code, _, err = run(capsys, "info", str(tiny_paths["llama"]), "--saes", str(tmp_path))
    assert code == 2 and "W_dec" in one_line_error(err)


def test_a_prompt_past_the_context_names_both_numbers(capsys, tiny_paths):
    long = " ".join(["w1"] * 200)  # the tiny GPT-2 has 128 positions
    code, _, err = run(capsys, "qk", str(tiny_paths["gpt2"]), "--prompt", long, "--layer", "0", "--head", "0")
    line = one_line_error(err)
    assert code == 2 and "201" in line and "128" in line


def test_dashboards_and_batch_commands_write_what_the_library_writes(capsys, tiny_paths, saes_dir, tmp_path):
    """The two scale-out commands are thin: their files equal the library's, run in one process."""
    from qktrace.jobs.batch import BatchOptions, trace_batch
    from qktrace.jobs.dashboards import DashboardOptions, build_dashboards

    model = str(tiny_paths["llama"])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "Aunt Sally is the w1 of w2 . the Aunt"}\n{"text": "Uncle Bob , w3 w4 w5"}\n')
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Aunt Sally is the Aunt", "id": "a"}\n{"prompt": "w1 w2 w3 w1", "id": "b"}\n')
    common = ["--saes", str(saes_dir), "--device", "cpu"]
    code, out, err = run(capsys, "dashboards", model, *common, "--corpus", str(corpus), "--out", str(tmp_path / "d1"),
                         "--seq-len", "16")  # fmt: skip
    assert code == 0, err
    build_dashboards(model, str(saes_dir), corpus, tmp_path / "d2", options=DashboardOptions(seq_len=16), device="cpu")
    for name in ("blocks.1.hook_resid_pre/dashboards.json", "blocks.1.hook_resid_pre/labels.json", "index.json"):
        assert (tmp_path / "d1" / name).read_bytes() == (tmp_path / "d2" / name).read_bytes(), name
    code, out, err = run(capsys, "batch", model, *common, "--prompts", str(prompts), "--out", str(tmp_path / "b1"))
    assert code == 0, err
    trace_batch(model, str(saes_dir), prompts, tmp_path / "b2", options=BatchOptions(), device="cpu")
    assert (tmp_path / "b1" / "summary.jsonl").read_bytes() == (tmp_path / "b2" / "summary.jsonl").read_bytes()
    assert (tmp_path / "b1/prompts/a/graph.json").read_bytes() == (tmp_path / "b2/prompts/a/graph.json").read_bytes()


def test_labels_slug_and_scan(capsys, tiny_paths, saes_dir, tmp_path):
    """--labels (a Neuronpedia export) changes the labels that QK tables and graph nodes show; --slug and
    --scan name the graph for Neuronpedia."""
    from qktrace.nodes import Kind, Node

    export = tmp_path / "explanations.jsonl"
    records = [
        {"modelId": "tiny", "layer": "1-res-test", "index": str(i), "description": f"np feature {i}"} for i in range(40)
    ]
    export.write_text("\n".join(json.dumps(r) for r in records))
    qk = ["qk", str(tiny_paths["llama"]), "--saes", str(saes_dir), "--prompt", "Aunt Sally w1 . Aunt", "--layer", "1"]
    qk += ["--head", "2", "--json", "--top", "50"]
    shown = {}
    for labels in ([], ["--labels", str(export)]):
        code, out, err = run(capsys, *qk, *labels)
        assert code == 0, err
        terms = json.loads(out)["terms"]
        shown[bool(labels)] = {
            (t[side], t[f"{side}_label"]) for t in terms for side in ("query", "key")
            if Node.parse(t[side]).kind is Kind.FEATURE
        }  # fmt: skip
    assert shown[True] and {c for c, _ in shown[True]} == {c for c, _ in shown[False]}
    for component, label in shown[True]:
        node = Node.parse(component)
        assert label.startswith(f"np feature {node.index} (c{node.checkpoint}/f{node.index}) @"), label
    for _, label in shown[False]:
        assert not label.startswith("np feature")
    out = tmp_path / "g.json"
    graph = ["graph", str(tiny_paths["llama"]), "--saes", str(saes_dir), "--prompt", "Aunt Sally w1 . Aunt"]
    code, _, err = run(
        capsys, *graph, "--out", str(out), "--labels", str(export), "--slug", "my.graph_1", "--scan", "tiny-llama"
    )
    assert code == 0, err
    data = json.loads(out.read_text())
    assert (data["metadata"]["slug"], data["metadata"]["scan"]) == ("my.graph_1", "tiny-llama")
    at1 = [(Node.parse(n["node_id"]), n["clerp"]) for n in data["nodes"]]
    at1 = [(node, clerp) for node, clerp in at1 if node.kind is Kind.FEATURE and node.checkpoint == 1]
    assert at1 and all(clerp.startswith(f"np feature {node.index}") for node, clerp in at1)


def test_transcoders_build_the_transcoder_graph_and_its_qk(capsys, tiny_paths, tmp_path):
    """--transcoders without --saes: graph writes circuit-tracer's node types, qk decomposes over writers."""
    from qktrace.testing import write_transcoder_set

    ts = str(write_transcoder_set(tmp_path / "ct", 32, 2))
    model, out = str(tiny_paths["llama"]), tmp_path / "tc.json"
    code, stdout, err = run(capsys, "graph", model, "--transcoders", ts, "--prompt", "Aunt Sally is", "--out", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["metadata"]["qktrace"]["settings"]["graph"] == "transcoder"
    assert {"mlp reconstruction error", "embedding", "logit"} <= {n["feature_type"] for n in data["nodes"]}
    argv = ["qk", model, "--transcoders", ts, "--prompt", "Aunt Sally w1 . Aunt", "--layer", "1", "--head", "0"]
    code, stdout, err = run(capsys, *argv, "--json", "--top", "1000")
    assert code == 0, err
    obj = json.loads(stdout)
    assert abs(obj["capped_sum"][-1] - obj["score"][-1]) < 1e-4 * max(1.0, abs(obj["score"][-1]))
    assert any(t["key"].startswith("attn_out/l0/") for t in obj["terms"])
