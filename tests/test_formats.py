"""Graph JSON as other tools read it: Neuronpedia's upload rules, circuit-tracer's node keys, QK tracing in
Neuronpedia's fields (checked against `Traced.qk` and an independent choice of head), slug and scan, and
other tools' graph files (tests/fixtures: one as circuit-tracer 0.5 writes it, one as Neuronpedia serves
a graph of its CRM backend) read by `load_graph`.

The schema below is written from Neuronpedia's documented upload schema (apps/webapp/app/api/graph/
graph-schema.json) and the checks of its save route: required fields and their types, the shape of
qk_tracing_results, and the [a-zA-Z0-9_.-] rule for slug and scan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

import qktrace
from qktrace.errors import GraphFileError, InputError
from qktrace.graph import Graph, load_graph
from qktrace.graph.formats import FEATURE_NUMBER, neuronpedia_scan
from qktrace.nodes import Kind, Node

jsonschema = pytest.importorskip("jsonschema")

FIXTURES = Path(__file__).parent / "fixtures"
CT_FILE, NP_FILE = FIXTURES / "circuit_tracer_0.5_graph.json", FIXTURES / "neuronpedia_graph.json"
SAFE = re.compile(r"^[a-zA-Z0-9_.-]+$")  # Neuronpedia's save route refuses anything else in slug and scan

NUMBER, INT, STR = {"type": "number"}, {"type": "integer"}, {"type": "string"}
PAIR = {"type": "array", "prefixItems": [STR, NUMBER], "minItems": 2, "maxItems": 2}
TRIPLE = {"type": "array", "prefixItems": [STR, STR, NUMBER], "minItems": 3, "maxItems": 3}
NODE_FIELDS = {
    "node_id": STR,
    "feature": {"type": ["integer", "null"]},
    "layer": {"type": ["string", "integer"]},
    "ctx_idx": INT,
    "feature_type": STR,
    "jsNodeId": STR,
    "clerp": STR,
    "influence": {"type": ["number", "null"]},
    "activation": {"type": ["number", "null"]},
}
NEURONPEDIA_UPLOAD = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
            "properties": {
                "slug": {"type": "string", "pattern": SAFE.pattern},
                "scan": {"type": "string", "pattern": SAFE.pattern},
                "prompt_tokens": {"type": "array", "items": STR},
                "prompt": STR,
                "node_threshold": NUMBER,
                "feature_details": {
                    "type": "object",
                    "properties": {"neuronpedia_source_set": STR, "feature_json_base_url": STR},
                },
                "info": {"type": "object"},
                "generation_settings": {"type": "object"},
                "pruning_settings": {"type": "object"},
            },
        },
        "qParams": {"type": "object"},
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
                "properties": {
                    **NODE_FIELDS,
                    "qk_tracing_results": {
                        "type": "object",
                        "required": [
                            "pair_wise_contributors",
                            "top_q_marginal_contributors",
                            "top_k_marginal_contributors",
                        ],
                        "properties": {
                            "pair_wise_contributors": {"type": "array", "items": TRIPLE},
                            "top_q_marginal_contributors": {"type": "array", "items": PAIR},
                            "top_k_marginal_contributors": {"type": "array", "items": PAIR},
                        },
                    },
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {"source": STR, "target": STR, "weight": NUMBER},
            },
        },
        "qk_only_nodes": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["node_id", "feature_type", "layer", "ctx_idx", "jsNodeId", "clerp"],
                "properties": NODE_FIELDS,
            },
        },
    },
}


def check_neuronpedia(data: dict) -> None:
    """Neuronpedia's upload rules, plus what its QK view needs: every contributor id resolves."""
    jsonschema.Draft202012Validator(NEURONPEDIA_UPLOAD).validate(data)
    ids = {n["node_id"] for n in data["nodes"]}
    only = data.get("qk_only_nodes", {})
    assert not ids & set(only), "a QK-only node is also a node"
    assert all(key == entry["node_id"] for key, entry in only.items())
    for n in data["nodes"]:
        res = n.get("qk_tracing_results")
        if res is None:
            continue
        named = [c for q, k, _ in res["pair_wise_contributors"] for c in (q, k)]
        named += [c for c, _ in res["top_q_marginal_contributors"] + res["top_k_marginal_contributors"]]
        assert all(c in ids or c in only for c in named), n["node_id"]


# -- the demo model's case studies -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    from qktrace.demo.run import CASES

    tracer = qktrace.Tracer.load("demo")
    out = []
    for case in CASES:
        traced = tracer.run(case.prompt)
        out.append((case.slug, traced, traced.graph(progress=False, qk_links=40)))
    return tracer, out


def test_demo_graphs_pass_neuronpedia_upload_rules(demo):
    _, graphs = demo
    slugs = set()
    for name, _, graph in graphs:
        data = json.loads(json.dumps(graph.to_json(), allow_nan=False))
        check_neuronpedia(data)
        meta = data["metadata"]
        assert meta["scan"] == "qktrace-demo", name  # the demo model is no Neuronpedia model
        slugs.add(meta["slug"])
        assert sum("qk_tracing_results" in n for n in data["nodes"]) > 0, name
        assert data.get("qk_only_nodes"), name
    assert len(slugs) == len(graphs)  # four prompts, four slugs: no upload overwrites another


def test_no_two_nodes_share_layer_feature_ctx(demo):
    """circuit-tracer's frontend (and Neuronpedia's) shows a node under (layer, feature, ctx_idx)."""
    _, graphs = demo
    for name, _, graph in graphs:
        data = graph.to_json()
        entries = data["nodes"] + list(data.get("qk_only_nodes", {}).values())
        keys = Counter((str(n["layer"]), n["feature"], n["ctx_idx"]) for n in entries)
        assert keys.most_common(1)[0][1] == 1, (name, keys.most_common(3))
        kinds = Counter(Node.parse(n["node_id"]).kind for n in entries)
        assert kinds[Kind.ERROR] and kinds[Kind.SAE_BIAS] and kinds[Kind.MLP_BIAS], (name, kinds)  # same layer
        for n in entries:
            node = Node.parse(n["node_id"])
            if node.kind is Kind.FEATURE:  # Neuronpedia's decoding of the Cantor number, written out
                w = (math.isqrt(8 * n["feature"] + 1) - 1) // 2
                index = n["feature"] - w * (w + 1) // 2
                assert (w - index, index) == (node.checkpoint, node.index) == (int(n["layer"]), node.index)
            elif node.kind is Kind.TOKEN:
                assert (n["layer"], n["feature"]) == ("E", node.pos)
            elif node.kind is Kind.LOGIT:
                assert (n["layer"], n["feature"]) == (str(graph.n_layers + 1), node.index)
            else:
                assert (n["layer"], n["feature"]) == (str(node.checkpoint), FEATURE_NUMBER[node.kind])


def test_biases_have_their_own_type_and_only_errors_count_as_error(demo):
    _, graphs = demo
    for _, _, graph in graphs:
        for n in graph.to_json()["nodes"]:
            kind = Node.parse(n["node_id"]).kind
            assert ("error" in n["feature_type"]) == (kind is Kind.ERROR)
            bias = kind in (Kind.SAE_BIAS, Kind.ATTN_BIAS, Kind.MLP_BIAS)
            assert (n["feature_type"] == "bias") == bias


def carrier_by_hand(graph: Graph, t: int) -> tuple[int, int, int]:
    """The head with the largest sum of |direct + via_mlp| over the cross-position edges into node t, read
    through `heads_for`, and the source position it carries most from."""
    per_head: Counter = Counter()
    per_key: Counter = Counter()
    target = graph.nodes[t]
    for e in range(graph.n_edges):
        source = graph.nodes[int(graph.source[e])]
        if int(graph.target[e]) != t or source.node.pos == target.node.pos:
            continue
        for hl in graph.heads_for(source.id, target.id):
            per_head[hl.layer, hl.head] += abs(hl.direct + hl.via_mlp)
            per_key[hl.layer, hl.head, source.node.pos] += abs(hl.direct + hl.via_mlp)
    (layer, head), _ = per_head.most_common(1)[0]
    key = max((k for (ly, h, k) in per_key if (ly, h) == (layer, head)), key=lambda k: per_key[layer, head, k])
    return layer, head, key


def test_qk_tracing_results_are_the_heads_own_qk_terms(demo):
    """Every value in qk_tracing_results is a term (or a sum of terms) of `Traced.qk` at that head, query
    and key; the head is the one carrying most of the node's cross-position inputs; the pairs are the
    largest terms; and the stored score is the model's own."""
    _, graphs = demo
    checked = 0
    for _, traced, graph in graphs:
        data = graph.to_json()
        index = {n.id: i for i, n in enumerate(graph.nodes)}
        for n in data["nodes"]:
            if "qk_tracing_results" not in n:
                continue
            head, res = n["qk_tracing_head"], n["qk_tracing_results"]
            t = index[n["node_id"]]
            assert (head["layer"], head["head"], head["key_pos"]) == carrier_by_hand(graph, t)
            assert n["clerp"].endswith(f"[QK L{head['layer']}H{head['head']} @{head['key_pos']}]")
            assert head["query_pos"] == Node.parse(n["node_id"]).pos
            att = traced.qk(head["layer"], head["head"], head["query_pos"], head["key_pos"])
            q_ids, k_ids = att.query.ids, att.key.ids
            scale = float(att.terms.abs().max())
            for q, k, v in res["pair_wise_contributors"]:
                assert abs(v - float(att.terms[q_ids.index(q), k_ids.index(k)])) <= 1e-5 * scale
            largest = att.terms.abs().flatten().topk(len(res["pair_wise_contributors"])).values
            assert torch.allclose(
                torch.tensor([abs(v) for *_, v in res["pair_wise_contributors"]]), largest, atol=1e-5 * scale
            )
            qm, km = att.query_marginals(), att.key_marginals()
            for c, v in res["top_q_marginal_contributors"]:
                assert abs(v - qm[c]) <= 1e-5 * scale
            for c, v in res["top_k_marginal_contributors"]:
                assert abs(v - km[c]) <= 1e-5 * scale
            assert abs(head["score"] - float(att.score[0])) <= 1e-4 * max(1.0, abs(float(att.score[0])))
            assert abs(head["pattern"] - float(att.pattern[0])) <= 1e-5
            checked += 1
    assert checked >= 8


def test_qk_only_nodes_carry_labels_and_activations(demo):
    tracer, graphs = demo
    for _, traced, graph in graphs:
        for cid, entry in graph.to_json().get("qk_only_nodes", {}).items():
            node = Node.parse(cid)
            if node.kind is Kind.FEATURE:
                assert entry["clerp"] == tracer.saes[node.checkpoint].label(node.index)
                dense = tracer.saes[node.checkpoint].encode(traced.trace.resid[node.checkpoint])
                assert entry["activation"] == pytest.approx(float(dense[node.pos, node.index]), rel=1e-5)
            else:
                assert entry["activation"] is None
                assert entry["feature_type"] == ("mlp reconstruction error" if node.kind is Kind.ERROR else "bias")


def test_round_trip_keeps_qk_tracing_exactly(demo, tmp_path):
    _, graphs = demo
    _, _, graph = graphs[0]
    back = load_graph(graph.save(tmp_path / "g.json"))
    assert back.to_json() == graph.to_json()
    assert back.qk_tracing == graph.qk_tracing and back.qk_only == graph.qk_only
    assert [n.label for n in back.nodes] == [n.label for n in graph.nodes]  # the head is not in the label
    assert (back.slug, back.scan) == (graph.slug, graph.scan)


# -- slug, scan and feature details ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ids", "scan"),
    [
        ("gpt2", (), "gpt2-small"),
        ("openai-community/gpt2", (), "gpt2-small"),
        ("/models/Meta-Llama-3.1-8B/", (), "llama3.1-8b"),
        ("meta-llama/Llama-3.1-8B", (), "llama3.1-8b"),
        ("google/gemma-2-2b", (), "gemma-2-2b"),
        ("Qwen/Qwen3-4B", (), "qwen3-4b"),
        ("/tmp/my model (v2)", (), "my-model-v2"),
        ("/ckpt/finetune", ("gpt2-small/8-res-jb", "gpt2-small/9-res-jb"), "gpt2-small"),
        ("demo", (), "qktrace-demo"),
    ],
)
def test_scan(name, ids, scan):
    assert neuronpedia_scan(name, ids) == scan and SAFE.match(scan)


def test_slug_and_scan_are_overridable_and_checked(demo, tmp_path):
    tracer, graphs = demo
    _, traced, graph = graphs[0]
    named = traced.graph(progress=False, qk_terms=False, slug="aunt-sally.v1", scan="my_model")
    assert (named.to_json()["metadata"]["slug"], named.to_json()["metadata"]["scan"]) == ("aunt-sally.v1", "my_model")
    saved = json.loads(graph.save(tmp_path / "g.json", slug="other", scan="gpt2-small").read_text())
    assert (saved["metadata"]["slug"], saved["metadata"]["scan"]) == ("other", "gpt2-small")
    for bad in ("a b", "a/b", "", "é", "x" * 201):
        with pytest.raises(InputError, match="may hold only letters") as e:
            graph.save(tmp_path / "bad.json", slug=bad)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(InputError, match="scan"):
        traced.graph(progress=False, qk_terms=False, scan="org/model")


def small_graph(sources: dict[int, str]) -> Graph:
    """Token -> feature (checkpoint 1) -> logit, with an error and an SAE bias: no node at checkpoint 0."""
    from qktrace.graph import GraphNode

    nodes = [
        Node(Kind.TOKEN, 0, 0, 7), Node(Kind.FEATURE, 1, 0, 5), Node(Kind.ERROR, 1, 0), Node(Kind.SAE_BIAS, 2, 0),
        Node(Kind.FEATURE, 2, 0, 3), Node(Kind.LOGIT, 2, 0, 9),
    ]  # fmt: skip
    n = len(nodes) - 1
    return Graph(
        nodes=tuple(GraphNode(node, 1.0, 0.1, 0.5, f"node {i}") for i, node in enumerate(nodes)),
        source=torch.arange(n), target=torch.arange(1, n + 1), weight=torch.ones(n), influence=torch.ones(n),
        head_layer=torch.full((n,), -1), heads=torch.zeros(n, 0, dtype=torch.long), direct=torch.zeros(n, 0),
        via_mlp=torch.zeros(n, 0), tokens=(7,), str_tokens=("x",), prompt="x", model_name="gemma-2-2b", n_layers=2,
        replacement=0.5, completeness=0.5, sources=sources,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "ids", "source_set", "offset"),
    [
        ("demo", {c: f"gpt2-small/{c}-res-jb" for c in range(5)}, "res-jb", 0),
        ("demo", {c: f"gemma-2-2b/{c - 1}-gemmascope-res-16k" for c in range(1, 5)}, None, 0),  # checkpoint 0 uncovered
        ("demo", {c: f"gpt2-small/{c}-res-jb" if c % 2 else f"gpt2-small/{c}-other" for c in range(5)}, None, 0),
        (
            "small",
            {1: "gemma-2-2b/0-gemmascope-res-16k", 2: "gemma-2-2b/1-gemmascope-res-16k"},
            "gemmascope-res-16k",
            -1,
        ),
    ],
)
def test_feature_details_name_the_neuronpedia_source_set(demo, case, ids, source_set, offset):
    """With SAEs from one Neuronpedia source set, Neuronpedia looks each feature up at
    `{layer}-{source set}`, its index decoded from the Cantor number: both must be the SAE's own (Gemma
    Scope's resid_post SAE of layer L reads checkpoint L + 1)."""
    graph = dataclasses.replace(demo[1][0][2], sources=ids, scan="") if case == "demo" else small_graph(ids)
    data = graph.to_json()
    check_neuronpedia(data)
    assert data["metadata"].get("feature_details") == ({"neuronpedia_source_set": source_set} if source_set else None)
    assert data["metadata"]["scan"] == next(iter(ids.values())).split("/")[0]
    for n in data["nodes"] + list(data.get("qk_only_nodes", {}).values()):
        node = Node.parse(n["node_id"])
        if node.kind is Kind.FEATURE:
            layer = int(ids[node.checkpoint].split("/")[1].split("-")[0]) if source_set else node.checkpoint
            w = (math.isqrt(8 * n["feature"] + 1) - 1) // 2
            assert (int(n["layer"]), n["feature"] - w * (w + 1) // 2) == (layer, node.index)
        elif node.kind not in (Kind.TOKEN, Kind.LOGIT):
            assert int(n["layer"]) == node.checkpoint + offset
    assert load_graph_json(data).sources == ids and load_graph_json(data).to_json() == data


def load_graph_json(data: dict) -> Graph:
    return Graph.from_json(json.loads(json.dumps(data)))


# -- other tools' files --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "origin"), [(CT_FILE, "circuit-tracer"), (NP_FILE, "neuronpedia")])
def test_other_tools_graphs_load(path, origin, tmp_path):
    raw = json.loads(path.read_text())
    graph = load_graph(path)
    assert graph.origin == origin and graph.to_json() == raw  # saving writes the file back as read
    assert [n.id for n in graph.nodes] == [n["node_id"] for n in raw["nodes"]]
    assert [n.label for n in graph.nodes] == [n.get("clerp", "") for n in raw["nodes"]]
    assert graph.n_edges == len(raw["links"]) and graph.heads.shape == (len(raw["links"]), 0)
    assert torch.equal(graph.weight, torch.tensor([link["weight"] for link in raw["links"]], dtype=torch.float32))
    for link in raw["links"]:
        assert graph.heads_for(link["source"], link["target"]) == []  # no head loadings
    kinds = {n["node_id"]: n["feature_type"] for n in raw["nodes"]}
    for n in graph.nodes:
        ftype = kinds[n.id]
        expected = (
            Kind.TOKEN if ftype == "embedding"
            else Kind.LOGIT if ftype == "logit"
            else Kind.ERROR if "error" in ftype
            else Kind.FEATURE
        )  # fmt: skip
        assert n.node.kind is expected, n.id
    assert "no head loadings" in graph.summary_text()
    again = load_graph(graph.save(tmp_path / "again.json"))
    assert again.to_json() == raw
    with pytest.raises(InputError, match="another tool"):
        graph.save(tmp_path / "renamed.json", slug="x")


def test_circuit_tracer_features_decode_to_their_transcoder_index():
    graph = load_graph(CT_FILE)
    feature = graph.node("3_1234_4")
    assert (feature.node.kind, feature.node.checkpoint, feature.node.pos, feature.node.index) == (
        Kind.FEATURE,
        3,
        4,
        1234,
    )
    assert graph.n_layers == 26  # gemma-2-2b: circuit-tracer puts the logits at n_layers + 1 = 27


def test_other_tools_graphs_refused_in_one_line(tmp_path):
    raw = json.loads(CT_FILE.read_text())
    cases = {
        "hello": {"hello": 1},
        "ctx": {**raw, "nodes": [{**raw["nodes"][0], "ctx_idx": 99}, *raw["nodes"][1:]]},
        "type": {**raw, "nodes": [{**raw["nodes"][0], "ctx_idx": "four"}, *raw["nodes"][1:]]},
        "dup": {**raw, "nodes": raw["nodes"] + raw["nodes"][:1]},
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(GraphFileError) as e:
            load_graph(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), name


def test_transcoder_graph_json_is_what_circuit_tracer_and_neuronpedia_read(tiny_models, tmp_path):
    """A plain transcoder graph's JSON passes Neuronpedia's upload rules with circuit-tracer's feature types and
    numbering (layer = the MLP's layer, Cantor(layer, index); MLP errors -1), and reads back."""
    from qktrace.graph.replacement_graph import build_transcoder_graph
    from qktrace.saes import load_transcoders
    from qktrace.testing import random_prompt, write_transcoder_set

    model = tiny_models["llama"]
    write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers)
    ts = load_transcoders(tmp_path / "ct", model)
    traced = qktrace.Tracer(model, transcoders=ts).run(random_prompt(8, seed=2))
    graph = traced.graph(node_threshold=0.95)
    data = json.loads(json.dumps(graph.to_json(), allow_nan=False))
    check_neuronpedia(data)  # every QK contributor resolves to a node or a QK-only node
    assert graph.settings["graph"] == "transcoder"
    plain = build_transcoder_graph(model, ts, traced.trace, node_threshold=0.95)
    assert [n.id for n in plain.nodes] == [n.id for n in graph.nodes]
    traced_nodes = [n for n in data["nodes"] if "qk_tracing_results" in n]
    assert traced_nodes, "targets of cross-position links should carry QK tracing through a chosen head"
    for n in traced_nodes:  # the tracing is the head's own QK row at (query, key): terms of its score
        head = n["qk_tracing_head"]
        att = traced.qk(head["layer"], head["head"], head["query_pos"])
        i = att.key_positions.index(head["key_pos"])
        assert head["score"] == pytest.approx(float(att.sum_of_terms[i]), rel=1e-5)
        frame = att.terms_frame(top=len(n["qk_tracing_results"]["pair_wise_contributors"]), key_pos=head["key_pos"])
        pairs = n["qk_tracing_results"]["pair_wise_contributors"]
        assert [v for _, _, v in pairs] == pytest.approx(frame["value"].tolist(), rel=1e-5)
    types = Counter(n["feature_type"] for n in data["nodes"])
    assert types["cross layer transcoder"] and types["mlp reconstruction error"] and types["embedding"], types
    assert set(types) == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    keys = Counter((str(n["layer"]), n["feature"], n["ctx_idx"]) for n in data["nodes"])
    assert keys.most_common(1)[0][1] == 1
    for n in data["nodes"]:
        node = Node.parse(n["node_id"])
        if node.kind is Kind.TRANSCODER:
            w = (math.isqrt(8 * n["feature"] + 1) - 1) // 2
            index = n["feature"] - w * (w + 1) // 2
            assert (w - index, index) == (node.layer, node.index) == (int(n["layer"]), node.index)
        elif node.kind is Kind.MLP_ERROR:
            assert (n["layer"], n["feature"]) == (str(node.layer), -1)
    assert all(link["head_loadings"] == [] for link in data["links"])
    back = load_graph(graph.save(tmp_path / "tc.json"))
    assert [n.node for n in back.nodes] == [n.node for n in graph.nodes]
    assert back.summary()["n_features"] == types["cross layer transcoder"]


# -- the scores Neuronpedia shows --------------------------------------------------------------------------
# A Python port of Neuronpedia's graph score worker, read at hijohnnylin/neuronpedia commit ebb8426fc550
# (2026-08-20), apps/webapp/app/[modelId]/graph/score.worker.ts (the guard came in b8efe8435ea5, "initial crm
# support"), written from its algorithm: a graph holding any "lorsa" or "lorsa error" node is not scored
# (-1, which the view prints as "N/A"); otherwise nodes sorted by (feature type in its list, layer, ctx_idx,
# feature), unlisted types last; adjacency[target, source]; rows normalised by their |weights|; influence
# w A + w A^2 + ... with the logits' token_prob as w on the LAST n_logits rows; replacement = token / (token +
# error) influence; completeness = the (influence + w)-weighted mean of each row's non-error share. Unpinned
# features merge into the error node at their (layer, ctx_idx) when nodes are pinned. Its graph view
# (subgraph.tsx) shows metadata.replacement_score and metadata.completeness_score instead when a file carries
# both; its subgraph score (pinned nodes) always comes from the worker.
# `lorsa=True` drops the guard and slices as the same commit's utils.ts does past its own guard: "lorsa" counted
# with the features, errors running up to the first embedding ("mlp reconstruction error" and "lorsa error",
# which its type list sorts together) -- the definition its type order implies once lorsa graphs are scored.

NP_TYPES = ["cross layer transcoder", "lorsa", "mlp reconstruction error", "lorsa error", "embedding", "logit"]
NP_NOT_SCORED = (-1.0, -1.0)  # what the worker answers for a graph with lorsa nodes; the view prints "N/A"


def np_sort_key(n: dict) -> tuple:
    kind = NP_TYPES.index(n["feature_type"]) if n["feature_type"] in NP_TYPES else len(NP_TYPES)
    layer = str(n["layer"])
    number = 0 if layer == "E" else int(m[0]) if (m := re.match(r"^\s*[+-]?\d+", layer)) else 999
    return (kind, number, n["ctx_idx"], n.get("feature") or 0)


def np_worker_scores(data: dict, pinned: tuple[str, ...] = (), lorsa: bool = False) -> tuple[float, float]:
    """(replacement, completeness) as Neuronpedia's score worker computes them from a file's nodes and links."""
    has_lorsa = any(n["feature_type"] in ("lorsa", "lorsa error") for n in data["nodes"])
    if has_lorsa and not lorsa:
        return NP_NOT_SCORED
    assert not (lorsa and pinned), "utils.ts scores pinned lorsa graphs another way; not ported"
    nodes = sorted(data["nodes"], key=np_sort_key)
    at = {n["node_id"]: i for i, n in enumerate(nodes)}
    a = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for e in data["links"]:
        if e["source"] in at and e["target"] in at:
            a[at[e["target"]], at[e["source"]]] = e["weight"]
    types = [n["feature_type"] for n in nodes]
    if pinned:
        errors = {(n["layer"], n["ctx_idx"]): i for i, n in enumerate(nodes) if types[i] == "mlp reconstruction error"}
        for i, n in enumerate(nodes):
            if types[i] != "cross layer transcoder" or n["node_id"] in pinned:
                continue
            j = errors.get((n["layer"], n["ctx_idx"]))
            if j is not None:
                a[:, j] += a[:, i]
            a[i, :] = 0
            a[:, i] = 0
    feature_types = ("cross layer transcoder", "lorsa") if lorsa else ("cross layer transcoder",)
    error_types = ("mlp reconstruction error", "lorsa error") if lorsa else ("mlp reconstruction error",)
    n_feat, n_err = sum(t in feature_types for t in types), sum(t in error_types for t in types)
    n_tok = types.count("embedding")
    logits = [n.get("token_prob", math.nan) for n in nodes if n["feature_type"] == "logit"]
    w = torch.zeros(len(nodes), dtype=torch.float64)
    w[len(nodes) - len(logits) :] = torch.tensor(logits, dtype=torch.float64)
    norm = a.abs() / a.abs().sum(1, keepdim=True).clamp_min(1e-10)
    current = w @ norm
    influence = current.clone()
    for _ in range(1000):
        if not current.any():
            break
        current = current @ norm
        influence += current
    else:
        raise AssertionError("influence did not converge")
    errs, toks = slice(n_feat, n_feat + n_err), slice(n_feat + n_err, n_feat + n_err + n_tok)
    with torch.no_grad():
        token, error = float(influence[toks].sum()), float(influence[errs].sum())
        replacement = token / (token + error) if token + error else math.nan
        out = influence + w
        total = float(out.sum())
        completeness = float(((1 - norm[:, errs].sum(1)) * out).sum()) / total if total else math.nan
    return (0.0 if math.isnan(replacement) else replacement, 0.0 if math.isnan(completeness) else completeness)


def np_shown_scores(data: dict) -> tuple[float, float] | None:
    """What Neuronpedia's graph view shows for a file: its metadata scores when present, else the worker's;
    None where it prints "N/A" (a negative worker score)."""
    meta = data["metadata"]
    if "replacement_score" in meta and "completeness_score" in meta:
        return meta["replacement_score"], meta["completeness_score"]
    scores = np_worker_scores(data)
    return None if min(scores) < 0 else scores


def test_neuronpedia_shows_our_scores(demo):
    """Neuronpedia's graph view shows the scores qktrace reports, for a pruned file too: we write them as
    metadata.replacement_score / completeness_score (the unpruned graph's, circuit-tracer's definition), which
    it shows instead of computing its own from the file's (pruned) links. Its subgraph panel still computes
    from the file's links around the pinned nodes (`np_worker_scores(data, pinned)`)."""
    _, graphs = demo
    for name, _, graph in graphs:
        data = json.loads(json.dumps(graph.to_json()))
        shown = np_shown_scores(data)
        assert shown == pytest.approx((graph.replacement, graph.completeness), abs=1e-6), name
        assert 0 < graph.replacement < 1 and 0 < graph.completeness < 1, name


@pytest.fixture(scope="module")
def unpruned(demo):
    """A small graph built here with every edge kept, as JSON, without the metadata scores."""
    tracer, _ = demo
    graph = tracer.run("Aunt Sally came home. Aunt").graph(
        progress=False, node_threshold=1.0, edge_threshold=1.0, max_nodes=None, qk_terms=False
    )
    data = json.loads(json.dumps(graph.to_json()))
    for key in ("replacement_score", "completeness_score"):
        del data["metadata"][key]
    return graph, data


def test_neuronpedia_worker_computes_our_scores_from_every_edge(unpruned):
    """Neuronpedia's algorithm on the file's every edge gives qktrace's scores (prune._scores): the two tools
    compute the same thing. Bias nodes are sorted among the features here (where a node type its worker lists
    puts them: sources with no inputs, counted neither as tokens nor as errors, as qktrace counts them)."""
    graph, data = unpruned
    data = json.loads(json.dumps(data))  # a copy: the fixture is shared
    assert len(data["links"]) > 1000
    for n in data["nodes"]:
        if n["feature_type"] == "bias":
            n["feature_type"] = "cross layer transcoder"
    got = np_worker_scores(data)
    assert got == pytest.approx((graph.replacement, graph.completeness), abs=1e-6)


def test_neuronpedia_worker_alone_misreads_bias_nodes(unpruned):
    """Why the scores are in the metadata: on our node types its worker sorts "bias" after the logits, puts
    the logit weights on bias nodes, and shows replacement 0 and completeness 1 (the issue's observation), for
    the graph and for any pinned subgraph."""
    graph, data = unpruned
    assert np_worker_scores(data) == (0.0, 1.0)
    pinned = tuple(n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")[:3]
    assert len(pinned) == 3 and np_worker_scores(data, pinned) == (0.0, 1.0)  # its subgraph score too
    assert (graph.replacement, graph.completeness) != pytest.approx((0.0, 1.0), abs=0.05)


def test_neuronpedia_worker_computes_our_transcoder_graph_scores(tiny_models, tmp_path):
    """A plain transcoder graph has no bias nodes, and its feature types are the ones Neuronpedia's worker lists:
    on its every edge, the worker computes qktrace's scores from the file alone (and shows the metadata's)."""
    from qktrace.saes import load_transcoders
    from qktrace.testing import random_prompt, write_transcoder_set

    model = tiny_models["llama"]
    write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers)
    traced = qktrace.Tracer(model, transcoders=load_transcoders(tmp_path / "ct", model)).run(random_prompt(8, seed=2))
    graph = traced.graph(node_threshold=1.0, edge_threshold=1.0, max_nodes=None, qk_terms=False)
    data = json.loads(json.dumps(graph.to_json()))
    assert np_shown_scores(data) == pytest.approx((graph.replacement, graph.completeness), abs=1e-6)
    for key in ("replacement_score", "completeness_score"):
        del data["metadata"][key]
    assert len(data["links"]) > 100 and 0 < graph.replacement < 1
    assert np_worker_scores(data) == pytest.approx((graph.replacement, graph.completeness), abs=1e-6)


@pytest.fixture(scope="module")
def checkpointed(tiny_models, tmp_path_factory):
    """A traced prompt on a tiny Gemma-2 with transcoders and attention-output SAEs (hook_z and attn_out)."""
    from qktrace.saes import load_transcoders
    from qktrace.testing import random_attention_saes, random_prompt, write_transcoder_set

    model, folder = tiny_models["gemma2"], tmp_path_factory.mktemp("checkpointed") / "ct"
    write_transcoder_set(folder, model.d_model, model.n_layers)
    ts, att = load_transcoders(folder, model), random_attention_saes(model, ("z", "attn_out"))
    return model, qktrace.Tracer(model, transcoders=ts, attention_saes=att).run(random_prompt(8, seed=2))


def test_checkpointed_graph_json_passes_neuronpedia_and_shows_our_scores(checkpointed):
    """A checkpointed graph (transcoders + attention SAEs): Neuronpedia's upload rules with its "lorsa" and
    "lorsa error" types, distinct (layer, feature, ctx_idx), attention features numbered Cantor(n_layers + layer,
    index), attention errors -9; its view shows qktrace's scores for the pruned file (the metadata's: its worker
    does not score graphs with lorsa nodes, and its subgraph score for pinned nodes reads "N/A")."""
    model, traced = checkpointed
    graph = traced.graph(node_threshold=0.95)
    data = json.loads(json.dumps(graph.to_json(), allow_nan=False))
    check_neuronpedia(data)
    types = Counter(n["feature_type"] for n in data["nodes"])
    assert set(types) <= set(NP_TYPES) and types["lorsa"] and types["cross layer transcoder"], types
    keys = Counter((str(n["layer"]), n["feature"], n["ctx_idx"]) for n in data["nodes"])
    assert keys.most_common(1)[0][1] == 1
    for n in data["nodes"]:
        node = Node.parse(n["node_id"])
        if node.kind is Kind.ATTN_FEATURE:
            w = (math.isqrt(8 * n["feature"] + 1) - 1) // 2
            index = n["feature"] - w * (w + 1) // 2
            assert (w - index, index, n["layer"]) == (model.n_layers + node.layer, node.index, str(node.layer))
        elif node.kind is Kind.ATTN_ERROR:
            assert (n["layer"], n["feature"], n["feature_type"]) == (str(node.layer), -9, "lorsa error")
    assert any(link["head_loadings"] for link in data["links"])
    assert np_shown_scores(data) == (graph.replacement, graph.completeness) and 0 < graph.replacement < 1
    pinned = tuple(n["node_id"] for n in data["nodes"] if n["feature_type"] == "lorsa")[:2]
    assert np_worker_scores(data, pinned) == NP_NOT_SCORED


def test_neuronpedia_worker_scores_checkpointed_graphs_by_our_definition(checkpointed):
    """On the unpruned checkpointed graph's every edge: without the metadata Neuronpedia shows "N/A" (its worker
    refuses lorsa nodes); with lorsa counted as its type order sorts them (attention features with the features,
    attention errors with the errors, as qktrace counts them) its algorithm gives qktrace's scores. Counting
    only MLP errors as errors, as its worker did before it refused lorsa, gives other numbers."""
    _, traced = checkpointed
    graph = traced.graph(progress=False, node_threshold=1.0, edge_threshold=1.0, max_nodes=None, qk_terms=False)
    data = json.loads(json.dumps(graph.to_json(), allow_nan=False))
    assert np_shown_scores(data) == (graph.replacement, graph.completeness)
    for key in ("replacement_score", "completeness_score"):
        del data["metadata"][key]
    types = Counter(n["feature_type"] for n in data["nodes"])
    assert set(types) == set(NP_TYPES) and len(data["links"]) > 300, types
    assert np_shown_scores(data) is None and np_worker_scores(data) == NP_NOT_SCORED
    ours = (graph.replacement, graph.completeness)
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95, ours
    assert np_worker_scores(data, lorsa=True) == pytest.approx(ours, abs=1e-5)
    mlp_errors_only = json.loads(json.dumps(data))  # attention features as features, attention errors dropped
    mlp_errors_only["nodes"] = [n for n in mlp_errors_only["nodes"] if n["feature_type"] != "lorsa error"]
    for n in mlp_errors_only["nodes"]:
        if n["feature_type"] == "lorsa":
            n["feature_type"] = "cross layer transcoder"
    assert np_worker_scores(mlp_errors_only) != pytest.approx(ours, abs=0.01)
