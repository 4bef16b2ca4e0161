"""Strategy 2 wired in: the pruned checkpointed graph, its head loadings, QK over every writer, the tracer, CLI
and server.

The unpruned `CheckpointedGraph` (adjacency and head loadings) is proven against an independent autograd
through HF in test_strategy2.py; here the pruned `Graph` must carry exactly those numbers, and QK terms
must sum to HF's own softmax input (`hf_attention`)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qktrace.config import TOLERANCE
from qktrace.errors import InputError
from qktrace.graph import build_checkpointed_graph, load_graph
from qktrace.graph.strategy2 import checkpointed_graph
from qktrace.models import load_model
from qktrace.nodes import Kind, Node
from qktrace.saes import AttentionSAE, load_transcoders
from qktrace.testing import (
    hf_attention,
    make_tiny_model,
    random_attention_saes,
    random_prompt,
    random_sae,
    write_attention_saes,
    write_transcoder_set,
)
from qktrace.tracer import Tracer

D_SAE = 40
PROMPT = "Aunt Sally is the opposite of Uncle Bob ."
# (family, transcoder input site, skip, attention SAE site per layer)
CASES = [
    ("gpt2", "mlp_in", False, ("z", "attn_out")),
    ("llama", "mlp_in", False, ("attn_out", "z")),
    ("qwen3", "resid_mid", True, ("z", "z")),
    ("gemma2", "mlp_in", True, ("z", "attn_out")),
]


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2g")
    return {f: load_model(make_tiny_model(f, root / f, seed=i), dtype=torch.float64) for i, (f, *_) in enumerate(CASES)}


def setup(model, tmp_path, input_site="mlp_in", skip=False, sites=("z", "attn_out")):
    write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, input_site, skip=skip, d_sae=D_SAE)
    ts = load_transcoders(tmp_path / "ct", model, dtype=model.anatomy.dtype)
    return ts, random_attention_saes(model, sites, D_SAE)


@pytest.mark.parametrize("family,input_site,skip,sites", CASES)
def test_pruned_edges_are_adjacency_entries_and_head_loadings_sum_to_them(
    family, input_site, skip, sites, models64, tmp_path
):
    model = models64[family]
    ts, att = setup(model, tmp_path, input_site, skip, sites)
    trace = model.run(PROMPT)
    n_heads = model.n_heads
    graph = build_checkpointed_graph(model, ts, att, trace, node_threshold=0.9, edge_threshold=0.95, max_nodes=None,
                                     loadings_per_edge=n_heads)  # fmt: skip
    logit_ids = torch.tensor([n.node.index for n in graph.nodes if n.node.kind is Kind.LOGIT])
    assert len(logit_ids)
    full = checkpointed_graph(model, ts, att, trace, logit_ids=logit_ids, by_head=True)
    index = {n.id: i for i, n in enumerate(full.nodes)}
    kept = [index[n.id] for n in graph.nodes]
    assert len(kept) < len(full.nodes)
    kinds = {n.node.kind for n in graph.nodes}
    assert {Kind.TRANSCODER, Kind.ATTN_FEATURE, Kind.MLP_ERROR, Kind.TOKEN, Kind.LOGIT} <= kinds, kinds
    hl = full.head_loadings
    assert hl is not None
    parts = {(int(t), int(s)): hl.parts[e] for e, (t, s) in enumerate(zip(hl.target, hl.source))}
    loaded = 0
    for e in range(graph.n_edges):
        s, t = kept[int(graph.source[e])], kept[int(graph.target[e])]
        want = float(full.adjacency[t, s])
        assert float(graph.weight[e]) == pytest.approx(want, rel=1e-6, abs=1e-12)  # stored as float32
        if full.nodes[t].kind is not Kind.ATTN_FEATURE:
            assert int(graph.head_layer[e]) == -1 and bool((graph.heads[e] == -1).all())
            continue
        loaded += 1
        assert int(graph.head_layer[e]) == full.nodes[t].layer
        heads = graph.heads[e].tolist()
        assert sorted(heads) == list(range(n_heads))  # every head, largest |part| first
        want_parts = parts[t, s]
        assert graph.direct[e].tolist() == pytest.approx(want_parts[heads].tolist(), rel=1e-6, abs=1e-9)
        assert float(graph.direct[e].double().sum()) == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert bool((graph.via_mlp[e] == 0).all())
        mags = graph.direct[e].abs()
        assert bool((mags[:-1] >= mags[1:]).all())
    assert loaded > 5
    # fewer loadings per edge: the largest ones, the same numbers
    two = build_checkpointed_graph(model, ts, att, trace, node_threshold=0.9, edge_threshold=0.95, max_nodes=None,
                                   loadings_per_edge=2)  # fmt: skip
    assert two.heads.shape[1] == 2 and torch.equal(two.heads, graph.heads[:, :2])
    assert graph.settings["graph"] == "checkpointed" and graph.settings["top_heads"] == n_heads


@pytest.mark.parametrize("family,input_site,skip,sites", CASES)
def test_qk_writer_terms_with_attention_saes_sum_to_hf_scores(family, input_site, skip, sites, tiny_models, tmp_path):
    model = tiny_models[family]
    ts, att = setup(model, tmp_path, input_site, skip, sites)
    traced = Tracer(model, transcoders=ts, attention_saes=att).run(random_prompt(10, seed=3))
    hf = hf_attention(model, traced.trace.tokens)
    graph_ids = {n.id for n in checkpointed_graph(model, ts, att, traced.trace, by_head=False).nodes}
    kinds: set[Kind] = set()
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            a = traced.qk(layer, head, -1)
            want = hf.scores[layer][head, -1, list(a.key_positions)]
            assert float((a.capped_sum - want).abs().max()) < TOLERANCE["float32"] * float(a.terms.abs().max())
            assert a.max_relative_error() < TOLERANCE["float32"]
            comps = {Node.parse(c) for c in a.query.ids + a.key.ids}
            kinds |= {c.kind for c in comps}
            nodes = {c.id for c in comps if c.kind in (Kind.TRANSCODER, Kind.ATTN_FEATURE, Kind.ATTN_ERROR)}
            assert nodes <= graph_ids  # the features and attention errors are the graph's own nodes
    assert {Kind.ATTN_FEATURE, Kind.ATTN_ERROR, Kind.ATTN_SAE_BIAS, Kind.TRANSCODER} <= kinds
    assert Kind.ATTN_OUT not in kinds  # every attention output is split over its SAE


def test_tracer_graph_json_carries_head_loadings_and_qk_tracing(tiny_models, tmp_path):
    model = tiny_models["llama"]
    ts, att = setup(model, tmp_path)
    traced = Tracer(model, transcoders=ts, attention_saes=att).run(random_prompt(9, seed=2))
    assert traced.graph_kind == "checkpointed"
    with pytest.raises(InputError, match="attention SAEs were given without transcoders"):
        Tracer(model, attention_saes=att)
    graph = traced.graph(progress=False, node_threshold=0.95)
    data = json.loads(json.dumps(graph.to_json(), allow_nan=False))
    types = {n["feature_type"] for n in data["nodes"]}
    assert {"lorsa", "cross layer transcoder", "embedding", "logit"} <= types, types
    np_types = {"cross layer transcoder", "lorsa", "mlp reconstruction error", "lorsa error", "embedding", "logit"}
    assert types <= np_types  # Neuronpedia's score worker lists every one of them
    keys = [(str(n["layer"]), n["feature"], n["ctx_idx"]) for n in data["nodes"]]
    assert len(set(keys)) == len(keys)
    by_id = {n["node_id"]: n for n in data["nodes"]}
    into_attn = [lk for lk in data["links"] if by_id[lk["target"]]["feature_type"] == "lorsa"]
    assert into_attn and all(lk["head_loadings"] for lk in into_attn)
    for lk in into_attn:
        total = sum(h["direct"] + h["via_mlp"] for h in lk["head_loadings"])
        assert len(lk["head_loadings"]) < model.n_heads or total == pytest.approx(lk["weight"], rel=1e-4, abs=1e-6)
        assert {h["layer"] for h in lk["head_loadings"]} == {Node.parse(lk["target"]).layer}
    traced_nodes = [n for n in data["nodes"] if "qk_tracing_results" in n]
    assert traced_nodes and all(Node.parse(n["node_id"]).kind is Kind.ATTN_FEATURE for n in traced_nodes)
    only = data.get("qk_only_nodes", {})
    for n in traced_nodes:
        head = n["qk_tracing_head"]
        a = traced.qk(head["layer"], head["head"], head["query_pos"])
        assert head["score"] == pytest.approx(float(a.sum_of_terms[a.key_positions.index(head["key_pos"])]), rel=1e-5)
        named = [c for q, k, _ in n["qk_tracing_results"]["pair_wise_contributors"] for c in (q, k)]
        assert all(c in by_id or c in only for c in named)
    back = load_graph(graph.save(tmp_path / "s2.json"))
    assert [x.id for x in back.nodes] == [x.id for x in graph.nodes]
    assert torch.equal(back.heads, graph.heads) and torch.equal(back.head_layer, graph.head_layer)
    assert back.summary()["n_features"] == sum(t in ("lorsa", "cross layer transcoder") for t in
                                               (n["feature_type"] for n in data["nodes"]))  # fmt: skip


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from qktrace.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_graph_and_qk_with_attention_saes_and_bad_inputs(capsys, tiny_paths, tiny_models, tmp_path):
    model = tiny_models["llama"]
    path = str(tiny_paths["llama"])
    ct = str(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE))
    att = str(write_attention_saes(tmp_path / "att", random_attention_saes(model, ("z", "attn_out"), D_SAE)))
    out = tmp_path / "g.json"
    argv = ["graph", path, "--transcoders", ct, "--attention-saes", att, "--prompt", PROMPT, "--out", str(out)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    graph = load_graph(out)
    assert graph.settings["graph"] == "checkpointed" and bool((graph.head_layer >= 0).any())
    assert any(n.node.kind is Kind.ATTN_FEATURE for n in graph.nodes)
    argv = ["qk", path, "--transcoders", ct, "--attention-saes", att, "--prompt", PROMPT, "--layer", "1", "--head", "0"]
    code, stdout, err = run_cli(capsys, *argv, "--json", "--top", "1000")
    assert code == 0, err
    obj = json.loads(stdout)
    assert abs(obj["capped_sum"][-1] - obj["score"][-1]) < 1e-4 * max(1.0, abs(obj["score"][-1]))
    assert any(t["key"].startswith("attn/l0/") for t in obj["terms"])
    labels = [(t["key"], t["key_label"]) for t in obj["terms"] if t["key"].startswith("attn/l0/")]
    assert all(label.startswith(f"a0/f{Node.parse(key).index} @") for key, label in labels)
    one = tmp_path / "one"
    write_attention_saes(one, {0: random_attention_saes(model, ("z",), D_SAE)[0]})
    hook = "blocks.1.hook_attn_out"  # an attention SAE 4 wider than this model's d_model
    coder = random_sae("standard", model.d_model + 4, D_SAE, checkpoint=1, hook_name=hook)
    wide = write_attention_saes(tmp_path / "wide", {1: AttentionSAE(1, "attn_out", coder)})
    bad = [
        (["--attention-saes", att], "attention SAEs were given without transcoders"),
        (["--transcoders", ct, "--attention-saes", str(one)], r"attention SAEs cover layers \(0,\) of 2"),
        (["--transcoders", ct, "--attention-saes", str(tmp_path / "nope")], "does not exist"),
        (["--transcoders", ct, "--attention-saes", str(wide)], rf"d_in={model.d_model + 4} but model .* d_model="),
    ]
    for extra, message in bad:
        code, _, err = run_cli(capsys, "graph", path, *extra, "--prompt", "w1 w2", "--out", str(tmp_path / "x.json"))
        assert code == 2 and re.search(message, err), (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.json").exists()
    code, _, err = run_cli(capsys, "serve", "--attention-saes", att)
    assert code == 2 and "--transcoders" in err


def test_server_builds_checkpointed_graphs(tiny_paths, tiny_models, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import time

    from fastapi.testclient import TestClient

    from qktrace.server import create_app

    model = tiny_models["llama"]
    ct = write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE)
    att = write_attention_saes(tmp_path / "att", random_attention_saes(model, ("attn_out", "z"), D_SAE))
    tracer = Tracer.load(tiny_paths["llama"], transcoders=ct, attention_saes=att)
    data = tmp_path / "graphs"
    data.mkdir()
    client = TestClient(create_app(data, tracer))
    r = client.post("/api/graph", json={"prompt": PROMPT, "name": "s2"})
    assert r.status_code == 202, r.text
    job, deadline = r.json(), time.monotonic() + 120
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    graph = client.get("/api/graphs/s2").json()["graph"]
    assert graph["metadata"]["qktrace"]["settings"]["graph"] == "checkpointed"
    kinds = {Node.parse(n["node_id"]).kind for n in graph["nodes"]}
    assert {Kind.ATTN_FEATURE, Kind.TRANSCODER, Kind.TOKEN, Kind.LOGIT} <= kinds
    assert any(lk["head_loadings"] for lk in graph["links"])


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_attention_writer_parts_are_the_graphs_errors_and_hfs_biases(family, models64, tmp_path):
    """Layer j's attention write splits into features + attn_sae_bias + attn_error: the bias is HF's own output
    projection of the SAE's b_dec (b_O included; through the post-attention norm at its frozen scale), and the
    error, away from the zeroed first position, is the checkpointed graph's attention error written out."""
    from qktrace.graph.transcoder_qk import _attention_parts, residual_writers
    from qktrace.testing import norm_gain

    model = models64[family]
    ts, att = setup(model, tmp_path, sites=("z", "z"))
    trace = model.run(PROMPT)
    w = residual_writers(model, trace, ts, attention_saes=att)
    assert w.att is not None
    P = torch.arange(trace.n_pos)
    blocks = model.hf.transformer.h if family == "gpt2" else model.hf.model.layers
    for j in range(model.n_layers):
        (pos, index, feats), [(_, _, const), (_, _, err)] = _attention_parts(model, trace, w, j, P, P, lambda v, p: v)
        block = blocks[j]
        proj = block.attn.c_proj if family == "gpt2" else block.self_attn.o_proj
        want_const = proj(att[j].b_dec.expand(trace.n_pos, -1)).detach()
        want_err = proj(w.att.errors[j]).detach() - proj(torch.zeros_like(w.att.errors[j])).detach()
        if family == "gemma2":
            gain = norm_gain(block.post_attention_layernorm).detach()
            want_const, want_err = (x * trace.scale_post_attn[j][:, None] * gain for x in (want_const, want_err))
        torch.testing.assert_close(const, want_const, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(err[1:], want_err[1:], rtol=1e-5, atol=1e-6)  # HF: float32 norm scales
        assert len(pos) > 0 and bool((pos > 0).all())  # no feature at the zeroed position
