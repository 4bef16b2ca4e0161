"""Cross-position links carry the QK terms of their top heads, equal to a direct QK attribution."""

from __future__ import annotations

import torch

from qktrace import Tracer, load_graph
from qktrace.testing import random_prompt, random_saes


def test_links_carry_qk_terms_of_their_heads(tiny_models, tmp_path):
    model = tiny_models["llama"]
    traced = Tracer(model, random_saes(model, "topk", seed=2)).run(random_prompt(8, 4))
    graph = traced.graph(progress=False, qk_links=50)
    assert graph.qk_terms, "some cross-position link should carry QK terms"
    e, per_head = next(iter(graph.qk_terms.items()))
    entry = per_head[0]
    att = traced.qk(entry["layer"], entry["head"], entry["query_pos"])
    k = att.key_positions.index(entry["key_pos"])
    assert abs(entry["score"] - float(att.sum_of_terms[k])) < 1e-6
    top = att.terms_frame(top=len(entry["terms"]), key_pos=entry["key_pos"])
    assert [t["value"] for t in entry["terms"]] == list(top["value"])
    src, tgt = graph.nodes[int(graph.source[e])].node, graph.nodes[int(graph.target[e])].node
    assert (src.pos, tgt.pos) == (entry["key_pos"], entry["query_pos"])
    assert {(h["layer"], h["head"]) for h in per_head} <= {(h.layer, h.head) for h in graph._loadings(e)}
    # the JSON carries them and reads back the same
    path = graph.save(tmp_path / "g.json")
    back = load_graph(path)
    assert back.qk_terms.keys() == graph.qk_terms.keys()
    assert torch.equal(back.source, graph.source)
