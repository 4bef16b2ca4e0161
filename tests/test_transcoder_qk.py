"""QK attributions on transcoder graphs: a head's score split over the residual's writers (transcoder features,
MLP errors, transcoder biases and skips, attention outputs, embeddings) sums to HF's own softmax input."""

from __future__ import annotations

import pytest
import torch

from qktrace.config import TOLERANCE
from qktrace.graph.transcoder_qk import residual_writers, transcoder_qk_attribution
from qktrace.nodes import Kind, Node
from qktrace.saes import load_transcoders
from qktrace.testing import hf_attention, random_prompt, write_transcoder_set

CASES = [
    ("gpt2", "mlp_in", "hook_mlp_out", False),
    ("llama", "mlp_in", "hook_mlp_out", False),
    ("qwen3", "resid_mid", "hook_mlp_out", True),
    ("gemma2", "normalized", "mlp.hook_out", True),  # writes before Gemma-2's post-MLP norm
    ("gemma2", "mlp_in", "hook_mlp_out", False),
]


@pytest.mark.parametrize("family,input_site,output_hook,skip", CASES)
def test_writer_terms_sum_to_hf_scores(family, input_site, output_hook, skip, tiny_models, tmp_path):
    model = tiny_models[family]
    write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, input_site, output_hook, skip)
    ts = load_transcoders(tmp_path / "ct", model)
    trace = model.run(random_prompt(10, seed=3))
    hf = hf_attention(model, trace.tokens)  # HF's softmax input, captured by its own spy
    writers = residual_writers(model, trace, ts)
    kinds: set[Kind] = set()
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            att = transcoder_qk_attribution(model, trace, writers, layer, head, -1)
            want = hf.scores[layer][head, -1, list(att.key_positions)]
            scale = float(att.terms.abs().max())
            assert float((att.capped_sum - want).abs().max()) < TOLERANCE["float32"] * scale, (layer, head)
            assert att.max_relative_error() < TOLERANCE["float32"]
            kinds |= {Node.parse(c).kind for c in att.key.ids}
    want_kinds = {Kind.TOKEN, Kind.ATTN_OUT, Kind.TRANSCODER, Kind.TC_BIAS, Kind.MLP_ERROR, Kind.HEAD_BIAS}
    assert want_kinds <= kinds, kinds
    assert (Kind.POS_EMBED in kinds) == (family == "gpt2")


def test_writers_name_the_graphs_nodes_and_read_like_sae_attributions(tiny_models, tmp_path):
    """Feature components are the graph's transcoder nodes (same activations); marginals, contrast and
    probability effects work as for SAE components; at layer 0 only embeddings and the head's constant write."""
    from qktrace.graph.replacement import transcoder_graph

    model = tiny_models["llama"]
    write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers)
    ts = load_transcoders(tmp_path / "ct", model)
    trace = model.run(random_prompt(9, seed=4))
    writers = residual_writers(model, trace, ts)
    graph_ids = {n.id for n in transcoder_graph(model, ts, trace).nodes}
    att = transcoder_qk_attribution(model, trace, writers, 1, 0, -1)
    feats = [c for c in att.query.ids + att.key.ids if Node.parse(c).kind is Kind.TRANSCODER]
    assert feats and set(feats) <= graph_ids
    errors = [c for c in att.key.ids if Node.parse(c).kind is Kind.MLP_ERROR]
    assert set(errors) <= graph_ids and errors
    assert float(att.query_marginals().sum()) == pytest.approx(float(att.sum_of_terms.sum()), rel=1e-4)
    df = att.contrast(att.key_positions[-1], att.key_positions[0])
    assert df.attrs["score_diff"] == pytest.approx(float(att.sum_of_terms[-1] - att.sum_of_terms[0]), rel=1e-5)
    assert torch.isfinite(att.prob_effects()).all()
    bottom = transcoder_qk_attribution(model, trace, writers, 0, 1, -1)
    assert {Node.parse(c).kind for c in bottom.key.ids} == {Kind.TOKEN, Kind.HEAD_BIAS}
    first = Node.parse(feats[0])  # a transcoder's label names its feature in QK tables, as in the graph
    assert att.label(feats[0]).startswith(f"t{first.layer}/f{first.index} @")
    ts[first.layer].labels[first.index] = "writes ⏎"
    named = transcoder_qk_attribution(model, trace, writers, 1, 0, -1)
    assert named.label(feats[0]).startswith(f"writes ⏎ (t{first.layer}/f{first.index}) @{first.pos} ")


def test_tracer_with_transcoders_builds_the_transcoder_graph_and_its_qk(tiny_paths, tmp_path):
    from qktrace import Tracer
    from qktrace.errors import InputError
    from qktrace.testing import random_saes

    tracer = Tracer.load(tiny_paths["gpt2"], transcoders=write_transcoder_set(tmp_path / "ct", 32, 2))
    traced = tracer.run(random_prompt(8, seed=5))
    assert traced.graph_kind == "transcoder"
    before = traced.nbytes
    graph = traced.graph(progress=False)
    kinds = {n.node.kind for n in graph.nodes}
    assert Kind.MLP_ERROR in kinds and Kind.FEATURE not in kinds and graph.settings["graph"] == "transcoder"
    att = traced.qk(1, 0, -1)
    assert any(Node.parse(c).kind is Kind.ATTN_OUT for c in att.key.ids)
    assert att.max_relative_error() < TOLERANCE["float32"]
    assert traced.nbytes > before  # the residual's writers count in what the server's cache holds
    both = Tracer(tracer.model, random_saes(tracer.model, "topk"), transcoders=tracer.transcoders)
    with pytest.raises(InputError, match="ambiguous"):
        both.run("w1 w2").graph(progress=False)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_cross_layer_transcoder_writers_sum_to_hf_scores(family, tmp_path):
    """A CLT's feature read at layer 0 writes layers 0, 1 and 2: at layer 2's input it is one component, the
    sum of both writes; the terms still sum to HF's scores, and the transcoder graph prunes and saves."""
    from qktrace.graph import build_transcoder_graph, load_graph
    from qktrace.models import load_model
    from qktrace.saes import CrossLayerTranscoder, TranscoderSet
    from qktrace.testing import make_tiny_model

    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    layers = {"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3, "layer_types": kinds}
    model = load_model(make_tiny_model(family, tmp_path / "m", seed=7, **layers))
    n, d, d_sae = 3, model.d_model, 24
    g = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoder(
        "standard",
        W_enc=torch.randn(n, d, d_sae, generator=g) / d**0.5,
        b_enc=torch.randn(n, d_sae, generator=g) * 0.2 - 0.3,
        W_dec=tuple(torch.randn(d_sae, n - i, d, generator=g) * 0.3 for i in range(n)),
        b_dec=torch.randn(n, d, generator=g) * 0.2,
        input_site="mlp_in",
        W_skip=torch.randn(n, d, d, generator=g) * 0.05,
    )
    ts = TranscoderSet(clt=clt)
    trace = model.run(random_prompt(9, seed=6))
    hf = hf_attention(model, trace.tokens)
    writers = residual_writers(model, trace, ts)
    for head in range(model.n_heads):
        att = transcoder_qk_attribution(model, trace, writers, 2, head, -1)
        want = hf.scores[2][head, -1, list(att.key_positions)]
        assert float((att.capped_sum - want).abs().max()) < TOLERANCE["float32"] * float(att.terms.abs().max())
    assert any(c.startswith("transcoder/l0/") for c in att.key.ids)
    graph = build_transcoder_graph(model, ts, trace)
    assert load_graph(graph.save(tmp_path / "clt.json")).n_edges == graph.n_edges > 0


def test_qk_tracing_goes_through_the_only_head_that_moves_anything(tmp_path):
    """With every attention head's W_O zeroed but one, each traced node of a transcoder graph is traced through
    that head (the direct-effect choice can fail: any other head would be wrong)."""
    import transformers

    from qktrace import Tracer
    from qktrace.testing import make_tiny_model

    path = make_tiny_model("llama", tmp_path / "m", seed=11)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            keep = torch.zeros_like(block.self_attn.o_proj.weight)
            if layer == 0:
                keep[:, 2 * d_head : 3 * d_head] = 1
            block.self_attn.o_proj.weight.mul_(keep)
    hf.save_pretrained(path)
    tracer = Tracer.load(path, transcoders=write_transcoder_set(tmp_path / "ct", 32, 2))
    graph = tracer.run(random_prompt(10, seed=8)).graph(progress=False, node_threshold=0.99, edge_threshold=0.99)
    assert graph.qk_tracing
    assert {(tr.layer, tr.head) for tr in graph.qk_tracing.values()} == {(0, 2)}
