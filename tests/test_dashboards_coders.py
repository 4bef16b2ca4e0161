"""Dashboards of attention-output SAE features (`--attention-saes`), against encoding the corpus directly
through `Model.run` + `strategy2.attention_inputs`; their top outputs against HF's own weights; resuming
to the same bytes; and the server reading transcoder and attention dashboards by kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qktrace.errors import InputError
from qktrace.graph.formats.numbering import cantor
from qktrace.jobs.corpus import iter_documents
from qktrace.jobs.dashboards import build_dashboards
from qktrace.models import load_model
from qktrace.options import DashboardOptions
from qktrace.saes import load_attention_saes
from qktrace.testing import (
    make_tiny_model,
    random_attention_saes,
    tree,
    write_attention_saes,
    write_corpus,
    write_transcoder_set,
)

OPTS = DashboardOptions(seq_len=16, docs_per_shard=6, n_contexts=3, before=2, after=1)
SITES = ("z", "attn_out")


class Setup:
    def __init__(self, root: Path, family: str) -> None:
        self.model = make_tiny_model(family, root / "model", seed=3)
        m = load_model(self.model)
        self.transcoders = write_transcoder_set(root / "ct", m.d_model, m.n_layers)
        self.attention = write_attention_saes(root / "att", random_attention_saes(m, SITES[: m.n_layers]))
        self.corpus = write_corpus(root / "corpus.jsonl", n_docs=20)

    def build(self, out: Path, **how: Any) -> Any:
        return build_dashboards(
            self.model, None, self.corpus, out, options=OPTS, device="cpu", transcoders=self.transcoders,
            attention_saes=self.attention, circuit_tracer=True, **how,
        )  # fmt: skip


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp(f"att-{request.param}"), request.param)


@pytest.fixture(scope="module")
def reference(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    setup.build(out)
    return out


def _fired(setup: Setup) -> tuple[dict[tuple[int, int], list[float]], int]:
    """{(layer, feature): activations} of every firing over the corpus, chunk by chunk through `Model.run` and
    the checkpointed graph's own attention inputs (the one-prompt path), BOS not counted."""
    from qktrace.graph.strategy2 import attention_inputs

    model = load_model(setup.model)
    att = load_attention_saes(setup.attention, model)
    fired: dict[tuple[int, int], list[float]] = {}
    n_tokens = 0
    for text in iter_documents(setup.corpus):
        toks = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(toks), OPTS.seq_len - 1):
            ids = [model.tokenizer.bos_token_id] + toks[start : start + OPTS.seq_len - 1]
            xs = attention_inputs(model.anatomy, model.run(torch.tensor(ids)), att)
            n_tokens += len(ids) - 1
            for layer, x in enumerate(xs):
                acts = att[layer].encode(x.to(att[layer].W_enc))[1:]
                for p, f in zip(*torch.nonzero(acts > 0, as_tuple=True)):
                    fired.setdefault((layer, int(f)), []).append(float(acts[p, f]))
    return fired, n_tokens


def test_attention_dashboards_equal_encoding_the_corpus_directly(setup: Setup, reference: Path) -> None:
    fired, n_tokens = _fired(setup)
    index = json.loads((reference / "index.json").read_text())
    assert [e["hook_name"] for e in index["checkpoints"]] == ["blocks.0.attn", "blocks.1.attn"]
    for layer, site in enumerate(SITES):
        dash = json.loads((reference / f"blocks.{layer}.attn" / "dashboards.json").read_text())
        assert (dash["kind"], dash["layer"], dash["site"], dash["n_tokens"]) == ("attn", layer, site, n_tokens)
        want = {f for ly, f in fired if ly == layer}
        assert {int(f) for f in dash["features"]} == want and want
        for f, d in dash["features"].items():
            acts = sorted(fired[layer, int(f)], reverse=True)
            assert d["max_act"] == pytest.approx(round(acts[0], 3), abs=1.01e-3)
            assert [c["act"] for c in d["contexts"]] == pytest.approx([round(a, 3) for a in acts[:3]], abs=1.01e-3)
            assert d["freq"] == round(len(acts) / n_tokens, 5)
        labels = json.loads((reference / f"blocks.{layer}.attn" / "labels.json").read_text())
        assert {f: d["label"] for f, d in dash["features"].items()} == {f: labels[f] for f in dash["features"]}
        scan = reference / index["circuit_tracer_features"]
        for f in dash["features"]:  # numbered as graph JSON numbers attention features: after every MLP layer's
            ct = json.loads((scan / f"{cantor(len(SITES) + layer, int(f))}.json").read_text())
            assert ct["index"] == int(f) and ct["transcoder_id"].endswith(f"blocks.{layer}.attn")


def test_top_outputs_are_the_decoder_row_through_w_o_and_the_unembedding(setup: Setup, reference: Path) -> None:
    model = load_model(setup.model)
    if model.family != "llama":
        pytest.skip("the direct computation below reads llama's modules")
    hf, att = model.hf, load_attention_saes(setup.attention, model)
    vocab = [model.tokenizer.decode([i]) for i in range(hf.config.vocab_size)]
    for layer, site in enumerate(SITES):
        W = att[layer].W_dec.detach()
        if site == "z":  # HF's o_proj weight [d_model, head * d_head], heads side by side
            W = W @ hf.model.layers[layer].self_attn.o_proj.weight.detach().T
        with torch.no_grad():
            logits = (W * hf.model.norm.weight) @ hf.lm_head.weight.T  # RMSNorm at unit scale is its gain
        dash = json.loads((reference / f"blocks.{layer}.attn" / "dashboards.json").read_text())
        for f, d in dash["features"].items():
            assert d["top_out"] == [vocab[int(t)] for t in logits[int(f)].topk(OPTS.n_out).indices]
            assert d["bottom_out"] == [vocab[int(t)] for t in (-logits[int(f)]).topk(OPTS.n_out).indices]


class _Stop(Exception):
    pass


def test_interrupted_attention_job_resumes_to_the_same_files(setup: Setup, reference: Path, tmp_path: Path) -> None:
    def stop_after_one(p: Any) -> None:
        if p.done >= 1:
            raise _Stop

    with pytest.raises(_Stop):
        setup.build(tmp_path, progress=stop_after_one)
    assert len(list((tmp_path / "shards").glob("*.npz"))) == 1 and not (tmp_path / "index.json").exists()
    result = setup.build(tmp_path)
    assert result.resumed == 1 and result.shards == 4
    assert tree(tmp_path) == tree(reference)


def test_attention_saes_without_transcoders_and_missing_layers_are_one_line(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="without transcoders"):
        build_dashboards(setup.model, None, setup.corpus, tmp_path / "a", device="cpu", attention_saes=setup.attention)
    opts = DashboardOptions(seq_len=16, checkpoints=(5,))
    with pytest.raises(InputError, match=r"no attention SAE reads layers \[5\]"):
        build_dashboards(
            setup.model, None, setup.corpus, tmp_path / "b", options=opts, device="cpu",
            transcoders=setup.transcoders, attention_saes=setup.attention,
        )  # fmt: skip


@pytest.fixture(scope="module")
def in_place(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The llama setup with its transcoders' dashboards written to a `dashboards` folder in the transcoder folder,
    and its attention SAEs' copied into theirs (where `Tracer.load` and `serve` look)."""
    import shutil

    root = tmp_path_factory.mktemp("in-place")
    s = Setup(root, "llama")
    out = s.transcoders / "dashboards"
    build_dashboards(s.model, None, s.corpus, out, options=OPTS, device="cpu", transcoders=s.transcoders)
    s.build(root / "att-dash")
    for layer in (0, 1):
        shutil.copytree(root / "att-dash" / f"blocks.{layer}.attn", s.attention / f"blocks.{layer}.attn")
    return s


def _labels(s: Setup, kind: str, layer: int | str) -> dict[str, str]:
    root = s.transcoders / "dashboards" if kind == "transcoder" else s.attention
    return json.loads((root / f"blocks.{layer}.{kind}" / "labels.json").read_text())


def test_loaded_transcoders_and_attention_saes_carry_the_dashboards_labels(in_place: Setup) -> None:
    from qktrace import Tracer

    tracer = Tracer.load(in_place.model, transcoders=in_place.transcoders, attention_saes=in_place.attention)
    ts, att = tracer.transcoders, tracer.attention_saes
    assert ts is not None and att is not None
    for layer in (0, 1):
        for kind, coder in (("transcoder", ts[layer]), ("attn", att[layer])):
            labels = _labels(in_place, kind, layer)
            assert {f: coder.label(int(f)) for f in labels} == labels
    traced = tracer.run("w3 w8 w2 of the w9 w4 Aunt Sally")
    graph = traced.graph(progress=False, node_threshold=0.95).to_json()
    named = [n for n in graph["nodes"] if n["node_id"].startswith(("transcoder/", "attn/"))]
    assert named
    for n in named:
        kind, layer, _, f = n["node_id"].split("/")
        label = _labels(in_place, kind, layer[1:])[f[1:]]
        assert n["clerp"].startswith(label), (n["clerp"], label)


def test_server_serves_transcoder_and_attention_dashboards_by_kind(in_place: Setup) -> None:
    from fastapi.testclient import TestClient

    from qktrace import Tracer
    from qktrace.server import create_app

    tracer = Tracer.load(in_place.model, transcoders=in_place.transcoders, attention_saes=in_place.attention)
    client = TestClient(create_app(in_place.corpus.parent, tracer))
    info = client.get("/api/info").json()
    assert info["features"] is True and info["coder_features"] == {"transcoder": [0, 1], "attn": [0, 1]}
    for kind, root in (("transcoder", in_place.transcoders / "dashboards"), ("attn", in_place.attention)):
        dash = json.loads((root / f"blocks.1.{kind}" / "dashboards.json").read_text())
        f, want = next(iter(dash["features"].items()))
        got = client.get(f"/api/features/{kind}/1/{f}").json()
        assert (got["kind"], got["checkpoint"], got["feature"], got["label"]) == (kind, 1, int(f), want["label"])
        assert got["dashboard"]["contexts"] == want["contexts"] and got["dashboard"]["top_out"] == want["top_out"]
        assert got["dashboard"]["hist"]["counts"] == want["hist"]["counts"]
        for dead in [i for i in range(dash["d_sae"]) if str(i) not in dash["features"]][:1]:
            assert client.get(f"/api/features/{kind}/1/{dead}").json()["dashboard"] is None
        r = client.get(f"/api/features/{kind}/7/0")
        assert r.status_code == 404 and "layer 7" in r.json()["error"] and "\n" not in r.json()["error"]
        assert client.get(f"/api/features/{kind}/1/{dash['d_sae']}").status_code == 400
    assert client.get("/api/features/mlp/1/0").status_code in (400, 404, 422)
    r = client.get("/api/features/1/0")  # the residual route: this tracer has no residual SAEs
    assert r.status_code == 404 and "checkpoint 1" in r.json()["error"]


def test_batch_with_attention_saes_equals_tracing_each_prompt_alone(tmp_path: Path) -> None:
    from qktrace import Tracer
    from qktrace.jobs.batch import BatchOptions, trace_batch

    s = Setup(tmp_path / "s", "llama")
    prompts = tmp_path / "prompts.jsonl"
    rows = ["Aunt Sally is the opposite of Uncle Bob . Aunt", "w3 w8 w2 of the w9 w4"]
    prompts.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    o = BatchOptions(explain=False)
    how: dict[str, Any] = {"transcoders": s.transcoders, "attention_saes": s.attention}
    trace_batch(s.model, None, prompts, tmp_path / "b", device="cpu", options=o, **how)
    tracer = Tracer.load(s.model, **how)
    for i, prompt in enumerate(rows):
        graph = tracer.run(prompt).graph(o.graph, progress=False)
        assert graph.settings.get("graph") == "checkpointed"
        got = (tmp_path / "b" / "prompts" / f"p{i:05d}" / "graph.json").read_bytes()
        assert got == graph.save(tmp_path / "g.json").read_bytes()
    assert json.loads((tmp_path / "b" / "job.json").read_text())["attention_saes"] == "att"


def test_cli_dashboards_takes_attention_saes(setup: Setup, reference: Path, tmp_path: Path, capsys: Any) -> None:
    from qktrace.cli import main

    if load_model(setup.model).family != "llama":
        pytest.skip("one family is enough for the command line")
    capsys.readouterr()
    base = ["dashboards", str(setup.model), "--corpus", str(setup.corpus), "--device", "cpu", "--seq-len", "16"]
    base += ["--contexts", "3"]
    att = ["--attention-saes", str(setup.attention)]
    assert main([*base, "--out", str(tmp_path / "a"), *att]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--transcoders" in err
    assert main([*base, "--out", str(tmp_path / "b"), "--transcoders", str(setup.transcoders), *att]) == 0
    for layer in (0, 1):
        got = json.loads((tmp_path / "b" / f"blocks.{layer}.attn" / "dashboards.json").read_text())
        assert got["kind"] == "attn" and got["features"]


def test_view_only_server_reads_coder_dashboards_under_saes_dir(in_place: Setup, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from qktrace.server import create_app

    (tmp_path / "graphs").mkdir()
    client = TestClient(create_app(tmp_path / "graphs", None, saes_dir=in_place.transcoders))
    info = client.get("/api/info").json()
    assert info["model"] is None and info["coder_features"] == {"transcoder": [0, 1], "attn": []}
    dash = json.loads((in_place.transcoders / "dashboards" / "blocks.0.transcoder" / "dashboards.json").read_text())
    f, want = next(iter(dash["features"].items()))
    got = client.get(f"/api/features/transcoder/0/{f}").json()
    assert got["label"] == want["label"] and got["dashboard"]["contexts"] == want["contexts"]
    assert client.get(f"/api/features/transcoder/0/{dash['d_sae']}").status_code == 400  # width from labels.json
    assert client.get("/api/features/attn/0/0").status_code == 404
