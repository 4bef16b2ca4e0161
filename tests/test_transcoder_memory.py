"""Transcoder graphs under `GraphOptions.max_memory`: the plain graph and the checkpointed graph (strategy 2)
count their nodes after encoding and refuse, in one line before the sweep, a build whose adjacency, pruning
blocks and sweep buffers do not fit the budget; the count is checked against what a build really holds."""

from __future__ import annotations

import time

import pytest
import torch

from qktrace.errors import InputError
from qktrace.graph.build import logit_targets
from qktrace.graph.replacement import TranscoderGraph, transcoder_graph
from qktrace.graph.replacement_graph import build_transcoder_graph, kinds_layers, layered_blocks, plain_plan
from qktrace.graph.strategy2 import CheckpointedGraph, checkpointed_graph
from qktrace.graph.strategy2_graph import build_checkpointed_graph, checkpointed_plan
from qktrace.options import GraphOptions
from qktrace.saes import load_transcoders
from qktrace.testing import random_attention_saes, write_attention_saes, write_transcoder_set
from qktrace.tracer import Tracer

D_SAE = 40
PROMPT = "Aunt Sally is the opposite of Uncle Bob . Aunt Sally is"
GRAPH_FACTOR = 1.6  # plan.graph / (adjacency + pruning's block copies) stays within [1, this]: the transients


def _plan(model, ts, trace, att=None):
    options = GraphOptions()
    ids, _ = logit_targets(model, trace, None, options)
    if att is None:
        return plain_plan(model, ts, trace, ids), ids
    top = max(0, min(options.loadings_per_edge, model.n_heads))
    return checkpointed_plan(model, ts, att, trace, ids, options, top), ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_plan_counts_the_adjacency_and_pruning_blocks_a_build_holds(family, checkpointed, tiny_models, tmp_path):
    model = tiny_models[family]
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE), model)
    att = random_attention_saes(model, ("z", "attn_out"), D_SAE) if checkpointed else None
    trace = model.run(PROMPT)
    plan, ids = _plan(model, ts, trace, att)
    g: TranscoderGraph | CheckpointedGraph
    if att is None:
        g = transcoder_graph(model, ts, trace, logit_ids=ids)
    else:
        g = checkpointed_graph(model, ts, att, trace, logit_ids=ids, by_head=False)
    assert plan.n_nodes == len(g.nodes) == g.adjacency.shape[0]
    blocks = layered_blocks(g.adjacency, *kinds_layers(g.nodes), model.n_layers)
    held = g.adjacency.nbytes + sum(b.weight.nbytes for b in blocks)
    assert held <= plan.graph <= GRAPH_FACTOR * held, (plan, held)
    assert plan.work > 0


@pytest.mark.parametrize("checkpointed", [False, True])
def test_budget_just_below_the_plan_refuses_in_one_line_and_at_the_plan_builds(checkpointed, tiny_models, tmp_path):
    model = tiny_models["llama"]
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE), model)
    att = random_attention_saes(model, ("z", "attn_out"), D_SAE) if checkpointed else None
    trace = model.run(PROMPT)
    plan, _ = _plan(model, ts, trace, att)
    assert plan.total > (1 << 20)  # parse_bytes' smallest budget
    build = (
        (lambda o: build_checkpointed_graph(model, ts, att, trace, o))
        if att is not None
        else (lambda o: build_transcoder_graph(model, ts, trace, o))
    )
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        build(GraphOptions(max_memory=plan.total - 1))
    message = str(err.value)
    assert "\n" not in message and f"of {plan.n_nodes} nodes" in message and "--max-memory" in message
    assert "budget" in message and "shorter prompt" in message
    assert time.perf_counter() - t0 < 30
    graph = build(GraphOptions(max_memory=plan.total))
    assert graph.n_edges > 0


def test_cli_graph_with_transcoders_refuses_past_max_memory_with_exit_2(capsys, tiny_paths, tmp_path):
    from qktrace.cli import main

    ct = write_transcoder_set(tmp_path / "ct", 32, 2, d_sae=D_SAE)
    tracer = Tracer.load(tiny_paths["gpt2"], transcoders=ct)
    assert tracer.model.d_model == 32 and tracer.model.n_layers == 2
    traced = tracer.run(PROMPT)
    plan, _ = _plan(tracer.model, tracer.transcoders, traced.trace)
    out = tmp_path / "g.json"
    base = ["graph", str(tiny_paths["gpt2"]), "--transcoders", str(ct), "--device", "cpu", "--prompt", PROMPT]
    assert main([*base, "--out", str(out), "--max-memory", str(plan.total - 1)]) == 2
    err = capsys.readouterr().err  # transformers' weight-loading bar aside, one line
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and f"{plan.n_nodes} nodes" in lines[0] and "--max-memory" in lines[0], err
    assert not out.exists()
    assert main([*base, "--out", str(out), "--max-memory", str(plan.total)]) == 0, capsys.readouterr().err
    assert out.exists()


def test_server_graph_job_past_max_memory_fails_with_the_one_line(tiny_paths, tiny_models, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from qktrace.server import create_app

    model = tiny_models["llama"]
    ct = write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE)
    att = write_attention_saes(tmp_path / "att", random_attention_saes(model, ("attn_out", "z"), D_SAE))
    tracer = Tracer.load(tiny_paths["llama"], transcoders=ct, attention_saes=att)
    traced = tracer.run(PROMPT)
    assert tracer.attention_saes is not None
    plan, _ = _plan(tracer.model, tracer.transcoders, traced.trace, tracer.attention_saes)
    for budget, want in ((plan.total - 1, "error"), (plan.total, "done")):
        data = tmp_path / f"graphs{budget}"
        data.mkdir()
        client = TestClient(create_app(data, tracer, max_memory=budget))
        r = client.post("/api/graph", json={"prompt": PROMPT, "name": "s2"})
        assert r.status_code == 202, r.text
        job, deadline = r.json(), time.monotonic() + 120
        while job["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            job = client.get(f"/api/jobs/{job['id']}").json()
        assert job["status"] == want, job
        if want == "error":
            assert "\n" not in job["error"] and f"{plan.n_nodes} nodes" in job["error"], job
            assert "--max-memory" in job["error"]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_pruning_gathers_row_chunks_of_the_adjacency_and_keeps_the_same_graph(checkpointed, tiny_models, tmp_path):
    """With pruning's chunk budget cut to 1 KB, no block is held: every pass gathers row chunks of the
    adjacency again (no copy of it), and the pruned graph is the one pruning held blocks gives."""
    import qktrace.graph.replacement_graph as rg
    from qktrace.graph import blocks

    model = tiny_models["gpt2"]
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE), model)
    att = random_attention_saes(model, ("z", "attn_out"), D_SAE) if checkpointed else None
    trace = model.run(PROMPT)
    o = GraphOptions(node_threshold=0.9, edge_threshold=0.95, max_nodes=None, qk_terms=False)

    def build():
        if att is None:
            return build_transcoder_graph(model, ts, trace, o)
        return build_checkpointed_graph(model, ts, att, trace, o)

    held = build()
    stores: list[blocks.BlockStore] = []
    real = blocks.BlockStore

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            stores.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rg, "PRUNE_CHUNK_BYTES", 1024)
        mp.setattr(rg, "BlockStore", Spy)
        chunked = build()
    assert stores and not any(stores[0].held) and stores[0].recomputed > 0
    assert [n.id for n in chunked.nodes] == [n.id for n in held.nodes]
    assert torch.equal(chunked.source, held.source) and torch.equal(chunked.target, held.target)
    assert torch.allclose(chunked.weight, held.weight, rtol=1e-6, atol=0)
    assert chunked.replacement == pytest.approx(held.replacement, rel=1e-6)
    assert chunked.completeness == pytest.approx(held.completeness, rel=1e-6)
