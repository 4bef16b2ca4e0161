"""Attribution graphs: every edge is the gradient it claims to be, parts sum to wholes, interventions agree.

Exactness tests run in float64 on the tiny models of every family, with random TopK SAEs; the reference
for each edge is autograd through `frozen_layer` (itself checked against HF's own residual stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from qktrace.errors import GraphFileError, InputError, SAEMismatchError
from qktrace.graph import FORMAT_VERSION, Graph, build_graph, load_graph
from qktrace.graph.build import Attribution, attribute
from qktrace.graph.edges import attention_bias, edge_parts
from qktrace.models import Model, Trace, load_model
from qktrace.models.replay import frozen_layer, logits_from
from qktrace.nodes import Kind, Node
from qktrace.saes import SAESet
from qktrace.testing import random_prompt, random_saes

D_SAE, K = 64, 6
# random topk SAEs with large encoders (many features active) and the SAE default of subtracting b_dec
SAE_INIT = dict(d_sae=D_SAE, k=K, std=(1.0, 0.1, 0.25, 0.1), apply_b_dec_to_input=True)
NO_SAE_AT_0 = ("gpt2", "llama", "qwen2", "gemma2")  # layer 0 reads the token embeddings directly


@dataclass
class Setup:
    model: Model
    trace: Trace
    saes: SAESet
    att: Attribution


@pytest.fixture(scope="module")
def models64(tiny_paths):
    return {f: load_model(p, dtype=torch.float64) for f, p in tiny_paths.items()}


@pytest.fixture(scope="module")
def setup(models64):
    cache: dict[str, Setup] = {}

    def get(family: str) -> Setup:
        if family not in cache:
            model = models64[family]
            trace = model.run(random_prompt(8, seed=3))
            saes = random_saes(
                model, "topk", checkpoints=range(1 if family in NO_SAE_AT_0 else 0, model.n_layers + 1), **SAE_INIT
            )
            cache[family] = Setup(model, trace, saes, attribute(model, saes, trace))
        return cache[family]

    return get


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def node_vector(s: Setup, node: Node) -> torch.Tensor:
    """What a source node writes, rebuilt from its id (independently of the graph code)."""
    c, p = node.checkpoint, node.pos
    if node.kind is Kind.TOKEN:
        return s.trace.resid[0][p]
    sae = s.saes[c]
    dense = sae.encode(s.trace.resid[c])
    if node.kind is Kind.FEATURE:
        return dense[p, node.index] * sae.W_dec[node.index]
    if node.kind is Kind.ERROR:
        return s.trace.resid[c][p] - sae.decode(dense)[p]
    assert node.kind is Kind.SAE_BIAS
    return sae.b_dec


def readout(s: Setup, node: Node, encoder: bool = False) -> torch.Tensor:
    """How a target node reads the residual at its checkpoint and position."""
    if node.kind is Kind.LOGIT:
        x = s.trace.resid[-1].clone().requires_grad_(True)
        logit = logits_from(s.model.anatomy, x, s.trace.scale_final)[node.pos, node.index]
        (grad,) = torch.autograd.grad(logit, x)
        return grad[node.pos]
    sae = s.saes[node.checkpoint]
    act = sae.encode(s.trace.resid[node.checkpoint])[node.pos, node.index]
    return act * (sae.W_enc[:, node.index] if encoder else sae.W_dec[node.index])


def reference_row(s: Setup, target: Node, sources: list[Node], encoder: bool = False) -> torch.Tensor:
    """Autograd edges into `target` from each source: d (r_t . f(x)[p_t]) / d x[p_s] . u_s."""
    r = readout(s, target, encoder)
    identity = target.kind is Kind.LOGIT or (target.checkpoint == 0 and sources[0].kind is Kind.TOKEN)
    if identity:  # logits read checkpoint n_layers, checkpoint-0 features read the tokens: same position only
        grad = torch.zeros_like(s.trace.resid[0])
        grad[target.pos] = r
    else:
        layer = target.checkpoint - 1
        x = s.trace.resid[layer].clone().requires_grad_(True)
        y = frozen_layer(s.model.anatomy, s.trace, layer, x)
        (grad,) = torch.autograd.grad((y[target.pos] * r).sum(), x)
    return torch.stack([grad[n.pos] @ node_vector(s, n) for n in sources])


def regular_columns(att: Attribution, b: int) -> list[int]:
    bias = (Kind.ATTN_BIAS, Kind.MLP_BIAS)
    return [j for j, i in enumerate(att.blocks[b].sources.tolist()) if att.node(i).kind not in bias]


# ------------------------------------------------------------------------------------------ exactness


def test_frozen_layer_reproduces_hf(setup, family):
    s = setup(family)
    for layer in range(s.model.n_layers):
        assert rel(frozen_layer(s.model.anatomy, s.trace, layer, s.trace.resid[layer]), s.trace.resid[layer + 1]) < 1e-6


def test_edges_equal_autograd_gradients(setup, family):
    s, g = setup(family), torch.Generator().manual_seed(0)
    kinds_seen = set()
    for b, block in enumerate(s.att.blocks):
        cols = regular_columns(s.att, b)
        sources = [s.att.node(int(block.sources[j])) for j in cols]
        kinds_seen |= {n.kind for n in sources} | {s.att.node(int(block.targets[0])).kind}
        for row in torch.randperm(len(block.targets), generator=g)[:4].tolist():
            target = s.att.node(int(block.targets[row]))
            ref = reference_row(s, target, sources)
            got = block.weight[row, cols]
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-9, (b, target.id)
    wanted = {Kind.FEATURE, Kind.ERROR, Kind.SAE_BIAS, Kind.TOKEN, Kind.LOGIT}
    assert wanted <= kinds_seen


def test_encoder_readout_edges_equal_autograd(models64):
    model = models64["llama"]
    saes = random_saes(model, "topk", checkpoints=range(1, 3), **SAE_INIT)
    s = Setup(model, model.run(random_prompt(7, 4)), saes, None)  # type: ignore[arg-type]
    s.att = attribute(model, s.saes, s.trace, readout="encoder")
    b = 1  # checkpoint 2 <- checkpoint 1
    cols = regular_columns(s.att, b)
    block = s.att.blocks[b]
    sources = [s.att.node(int(block.sources[j])) for j in cols]
    for row in range(min(5, len(block.targets))):
        ref = reference_row(s, s.att.node(int(block.targets[row])), sources, encoder=True)
        assert rel(block.weight[row, cols], ref) < 1e-4


def test_incoming_edges_and_bias_nodes_sum_to_readout(setup, family):
    s = setup(family)
    for block in s.att.blocks:
        for row in range(len(block.targets)):
            target = s.att.node(int(block.targets[row]))
            c = target.checkpoint
            expected = readout(s, target) @ s.trace.resid[c][target.pos]
            assert abs(float(block.weight[row].sum() - expected)) <= 1e-6 * float(block.weight[row].abs().sum())


def test_head_parts_residual_and_mlp_sum_to_edge(setup, family):
    s = setup(family)
    an = s.model.anatomy
    for b, info in s.att.inputs.items():
        parts = edge_parts(an, s.trace, info.layer, info.targets, info.sources)
        weight = s.att.blocks[b].weight[:, : len(info.sources)]
        assert rel(parts.total, weight) < 1e-10
        cross = info.targets.pos[:, None] != info.sources.pos[None, :]
        assert float(parts.residual[cross].abs().max()) == 0 and float(parts.mlp[cross].abs().max()) == 0
        if an.layers[info.layer].parallel:
            assert float(parts.via_mlp.abs().max()) == 0
        else:
            assert float(parts.via_mlp.abs().max()) > 0


def test_graph_head_loadings_sum_to_cross_position_edges(setup, family):
    s = setup(family)
    graph = build_graph(
        s.model, s.saes, s.trace, loadings_per_edge=99, node_threshold=1.0, edge_threshold=1.0, progress=False
    )
    pos = torch.tensor([n.node.pos for n in graph.nodes])
    cross = (pos[graph.source] != pos[graph.target]) & (graph.head_layer >= 0)
    assert bool(cross.any())
    heads_sum = (graph.direct + graph.via_mlp)[cross].sum(1)
    assert rel(heads_sum, graph.weight[cross]) < 1e-4
    assert graph.heads.shape[1] == s.model.n_heads
    e = int(cross.nonzero()[0])
    src, tgt = graph.nodes[int(graph.source[e])].id, graph.nodes[int(graph.target[e])].id
    loads = graph.heads_for(src, tgt)
    assert abs(sum(h.total for h in loads) - float(graph.weight[e])) <= 1e-4 * abs(float(graph.weight[e])) + 1e-6
    assert [abs(h.total) for h in loads] == sorted((abs(h.total) for h in loads), reverse=True)


def attention_only(path, family: str) -> Model:
    model = load_model(path, dtype=torch.float64)
    with torch.no_grad():
        for layer in model.anatomy.layers:
            out = layer.mlp.c_proj if family == "gpt2" else layer.mlp.down_proj
            out.weight.zero_()
            if getattr(out, "bias", None) is not None:
                out.bias.zero_()
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_only_edges_are_exact_and_interventions_linear(tiny_paths, family):
    model = attention_only(tiny_paths[family], family)
    trace = model.run(random_prompt(9, 5))
    saes = random_saes(model, "topk", checkpoints=range(0, model.n_layers + 1), seed=2, **SAE_INIT)
    s = Setup(model, trace, saes, attribute(model, saes, trace))
    an = model.anatomy
    for layer in range(model.n_layers):
        zero = frozen_layer(an, trace, layer, torch.zeros_like(trace.resid[layer]))
        assert rel(attention_bias(an, trace, layer), zero) < 1e-10
    for b, info in s.att.inputs.items():
        block = s.att.blocks[b]
        n_src = len(info.sources)
        mlp_bias_cols = block.weight[:, n_src + trace.n_pos :]
        assert float(mlp_bias_cols.abs().max()) < 1e-9 * float(block.weight.abs().max())
        expected = (info.targets.vec * trace.resid[info.layer + 1][info.targets.pos]).sum(-1)
        assert rel(block.weight.sum(1), expected) < 1e-6  # HF normalises in float32
        # the layer is linear at frozen patterns: adding a whole source vector moves each readout by the edge
        base = frozen_layer(an, trace, info.layer, trace.resid[info.layer])
        for j in range(0, n_src, max(1, n_src // 6)):
            x = trace.resid[info.layer].clone()
            x[info.sources.pos[j]] += info.sources.vec[j]
            moved = frozen_layer(an, trace, info.layer, x) - base
            delta = (info.targets.vec * moved[info.targets.pos]).sum(-1)
            assert rel(delta, block.weight[:, j]) < 1e-9 or float(block.weight[:, j].abs().max()) < 1e-12


def test_interventions_agree_to_first_order(setup, family):
    s = setup(family)
    an = s.model.anatomy
    for b, info in s.att.inputs.items():
        weight = s.att.blocks[b].weight[:, : len(info.sources)]
        x0 = s.trace.resid[info.layer]
        for j in range(0, len(info.sources), max(1, len(info.sources) // 5)):
            u, p = info.sources.vec[j], int(info.sources.pos[j])
            eps = 1e-3 * float(x0[p].norm() / u.norm().clamp_min(1e-12))
            moved = []
            for sign in (1, -1):
                x = x0.clone()
                x[p] += sign * eps * u
                with torch.no_grad():
                    moved.append(frozen_layer(an, s.trace, info.layer, x))
            delta = (info.targets.vec * (moved[0] - moved[1])[info.targets.pos]).sum(-1) / (2 * eps)
            scale = max(float(weight[:, j].abs().max()), 1e-3 * float(weight.abs().max()))
            assert float((delta - weight[:, j]).abs().max()) <= 1e-3 * scale


def test_target_mode_edges_equal_full_mode_edges(setup, family):
    s = setup(family)
    target = attribute(s.model, s.saes, s.trace, mode="target", max_nodes_per_checkpoint=5)
    where = {}
    for block in s.att.blocks:
        col = {int(n): j for j, n in enumerate(block.sources.tolist())}
        for row, t in enumerate(block.targets.tolist()):
            where[t] = (block.weight[row], col)
    compared = 0
    for block in target.blocks:
        for row, t in enumerate(block.targets.tolist()):
            full_row, col = where[t]
            full = torch.stack([full_row[col[int(n)]] for n in block.sources])
            assert rel(block.weight[row], full) < 1e-9
            compared += len(block.sources)
    assert compared > 20


# ---------------------------------------------------------------------------------- graph, JSON, API

CT_NODE = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
           "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}  # fmt: skip
CT_META = {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version"}


@pytest.fixture(scope="module")
def graph32(tiny_models):
    model = tiny_models["llama"]
    trace = model.run(random_prompt(10, 7))
    saes = random_saes(model, "topk", checkpoints=range(0, model.n_layers + 1), seed=5, **SAE_INIT)
    return model, trace, saes, build_graph(model, saes, trace, progress=True)


def test_save_load_round_trip_with_circuit_tracer_fields(graph32, tmp_path):
    model, trace, _, graph = graph32
    path = graph.save(tmp_path / "g.json")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}  # no QK tracing without a tracer
    assert set(data["metadata"]) >= CT_META and data["metadata"]["qktrace"]["format_version"] == FORMAT_VERSION == 2
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    assert all(set(n) >= CT_NODE for n in data["nodes"])
    by_id = {n["node_id"]: n for n in data["nodes"]}
    for link in data["links"]:
        assert {"source", "target", "weight", "head_loadings"} <= set(link)
        cross = by_id[link["source"]]["ctx_idx"] != by_id[link["target"]]["ctx_idx"]
        assert ("qk_top_terms" in link) == cross and link.get("qk_top_terms") is None
        for h in link["head_loadings"]:
            assert set(h) == {"layer", "head", "direct", "via_mlp"}
    back = load_graph(path)
    assert [n.id for n in back.nodes] == [n.id for n in graph.nodes]
    assert [n.label for n in back.nodes] == [n.label for n in graph.nodes]
    for name in ("source", "target", "weight", "influence", "head_layer", "heads", "direct", "via_mlp"):
        assert torch.equal(getattr(back, name), getattr(graph, name)), name
    assert back.summary() == graph.summary()
    assert back.completeness == graph.completeness and back.tokens == graph.tokens
    assert back.to_json() == data  # the file, exactly, once read and written again


def test_version_1_files_are_read(graph32, tmp_path):
    """A file as qktrace wrote it before format 2 (biases typed as errors, feature -1, a fixed slug, the
    load path as scan) reads to the same graph; saving it again writes format 2 with its own slug and scan."""
    graph = graph32[3]
    old = graph.to_json()
    meta = old["metadata"]
    meta.update(slug="qktrace-graph", scan="/some/path/model")
    meta["qktrace"]["format_version"] = 1
    for key in ("info", "generation_settings", "pruning_settings"):
        meta.pop(key)
    for n in old["nodes"]:
        if Node.parse(n["node_id"]).kind not in (Kind.TOKEN, Kind.FEATURE, Kind.LOGIT):
            n.update(feature=-1, feature_type="mlp reconstruction error")
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    back = load_graph(path)
    assert [n.node for n in back.nodes] == [n.node for n in graph.nodes]
    assert torch.equal(back.weight, graph.weight) and torch.equal(back.heads, graph.heads)
    again = back.to_json()
    assert again["metadata"]["qktrace"]["format_version"] == 2 and again == graph.to_json()
    assert again["metadata"]["slug"] != "qktrace-graph" and "/" not in again["metadata"]["scan"]


def test_pruning_keeps_logits_tokens_and_scores(graph32):
    model, trace, _, graph = graph32
    ids = {n.id for n in graph.nodes}
    probs = torch.softmax(trace.last_logits.float(), -1)
    logits = [n for n in graph.nodes if n.node.kind is Kind.LOGIT]
    assert logits and all(n.id in ids for n in logits)
    assert sum(n.token_prob for n in logits) >= 0.95 or len(logits) == 10
    assert logits[0].is_target_logit and abs(logits[0].token_prob - float(probs.max())) < 1e-6
    assert sum(n.node.kind is Kind.TOKEN for n in graph.nodes) == trace.n_pos
    assert 0 < graph.replacement <= 1 and 0 < graph.completeness <= 1
    summary = graph.summary()
    assert summary["n_nodes"] == len(graph.nodes) and summary["n_edges"] == graph.n_edges > 0
    assert all(0 <= h["head"] < model.n_heads for h in summary["top_cross_position_heads"])
    full = build_graph(model, graph32[2], trace, node_threshold=1.0, edge_threshold=1.0, progress=False)
    assert full.n_edges > graph.n_edges and len(full.nodes) > len(graph.nodes)
    capped = build_graph(model, graph32[2], trace, max_nodes=3, progress=False)
    assert sum(n.node.kind is Kind.FEATURE for n in capped.nodes) <= 3


def test_named_targets_and_target_mode_graph(graph32):
    model, trace, saes, _ = graph32
    graph = build_graph(model, saes, trace, targets=["Sally", 5], mode="target", progress=False)
    last, L = trace.n_pos - 1, model.n_layers
    ids = {n.id for n in graph.nodes}
    assert Node(Kind.LOGIT, L, last, model.token_id("Sally")).id in ids
    assert Node(Kind.LOGIT, L, last, 5).id in ids
    assert graph.settings["mode"] == "target"


def test_graph_without_head_loadings_round_trips(graph32, tmp_path):
    model, trace, saes, _ = graph32
    graph = build_graph(model, saes, trace, loadings_per_edge=0, progress=False)
    assert graph.heads.shape == (graph.n_edges, 0) and graph.summary()["top_cross_position_heads"] == []
    back = load_graph(graph.save(tmp_path / "bare.json"))
    assert torch.equal(back.weight, graph.weight) and back.heads.shape == graph.heads.shape
    assert torch.equal(back.head_layer, graph.head_layer)


def test_errors_are_one_line_and_name_the_fix(graph32, tmp_path):
    model, trace, saes, graph = graph32
    with pytest.raises(SAEMismatchError, match=r"no SAE at checkpoint 1 \(loaded: .*load an SAE"):
        build_graph(model, SAESet({c: saes[c] for c in (0, 2)}), trace, progress=False)
    with pytest.raises(InputError, match="readout"):
        build_graph(model, saes, trace, readout="both", progress=False)
    with pytest.raises(InputError, match="node_threshold"):
        build_graph(model, saes, trace, node_threshold=2.0, progress=False)
    with pytest.raises(InputError, match="no edge"):
        graph.heads_for("token/c0/p0/t0", "logit/c9/p0/t1")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraphFileError):
        load_graph(bad)
    data = graph.to_json()
    data["metadata"]["qktrace"]["format_version"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(GraphFileError, match="format_version 99"):
        load_graph(bad)
    assert isinstance(Graph.from_json(graph.to_json()), Graph)
