"""Memory follows the question: a trace grows linearly with the prompt, patterns are cached within a byte
bound, full-mode graphs built under a small budget equal the ones built in memory, and a prompt past the
model's context is refused before any work."""

from __future__ import annotations

import pytest
import torch

from qktrace.errors import InputError
from qktrace.graph import build_graph
from qktrace.graph.build import attribute
from qktrace.models import load_model
from qktrace.models.trace import PatternCache
from qktrace.testing import make_tiny_model, random_prompt, random_saes


@pytest.fixture(scope="module")
def long_gpt2(tmp_path_factory):
    path = make_tiny_model("gpt2", tmp_path_factory.mktemp("long") / "gpt2", n_positions=512)
    return load_model(path)


def test_trace_bytes_grow_linearly(long_gpt2):
    small = long_gpt2.run(random_prompt(63, 1))  # 64 tokens with BOS
    large = long_gpt2.run(random_prompt(255, 1))  # 256 tokens
    assert small.n_pos == 64 and large.n_pos == 256
    ratio = large.nbytes / small.nbytes
    assert 3.5 < ratio < 4.5, ratio  # x4 tokens -> x4 bytes (a [head, pos, pos] tensor would make it x16)
    # patterns asked for one layer at a time are cached within the byte bound, never for the whole model
    large.cache.max_bytes = 5 * 4 * 256 * 256  # room for one layer and a bit (4 heads of 256 x 256 float32)
    for layer in range(large.n_layers):
        large.pattern(layer)
        assert large.cache.nbytes <= large.cache.max_bytes
    assert large.cache.nbytes == 4 * 4 * 256 * 256


def test_pattern_cache_evicts_least_recent():
    cache = PatternCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(("pattern", i), torch.zeros(100))
    assert cache.get(("pattern", 0)) is None and cache.get(("pattern", 4)) is not None
    assert cache.nbytes == 1200
    cache.put(("pattern", 9), torch.zeros(1000))  # larger than the bound: not kept at all
    assert cache.get(("pattern", 9)) is None


def test_prompt_past_the_context_is_refused(long_gpt2):
    with pytest.raises(InputError, match=r"600 tokens but model .* takes at most 512 positions"):
        long_gpt2.run(random_prompt(599, 0))
    with pytest.raises(InputError, match="at most 512"):
        long_gpt2.tokenize(list(range(3)) * 200)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_full_graph_equals_unchunked(long_gpt2, tiny_paths, family):
    model = long_gpt2 if family == "gpt2" else load_model(tiny_paths[family])
    saes = random_saes(model, "topk", d_sae=64, std=(1.0, 0.1, 0.25, 0.1), apply_b_dec_to_input=True)
    trace = model.run(random_prompt(60, 2))
    kw = dict(progress=False, node_threshold=0.9, edge_threshold=0.95, max_nodes=None, loadings_per_edge=3)
    whole = build_graph(model, saes, trace, **kw)
    budget = 1 << 20
    att = attribute(model, saes, trace, max_memory=budget)
    assert not any(att.store.held[1:-1])  # the layer blocks do not fit: they are recomputed in row chunks
    assert max(att.store.chunk_rows(b) for b in range(1, len(att.blocks) - 1)) < len(att.blocks[1].targets)
    chunked = build_graph(model, saes, trace, max_memory=budget, **kw)
    assert [n.id for n in chunked.nodes] == [n.id for n in whole.nodes]
    assert torch.equal(chunked.source, whole.source) and torch.equal(chunked.target, whole.target)
    assert torch.allclose(chunked.weight, whole.weight, rtol=1e-5, atol=1e-7)
    assert torch.equal(chunked.heads, whole.heads)
    assert torch.allclose(chunked.direct, whole.direct, rtol=1e-4, atol=1e-6)
    assert chunked.completeness == pytest.approx(whole.completeness, rel=1e-6)
    assert whole.n_edges > 100


def test_budget_below_a_megabyte_is_refused(tiny_models):
    model = tiny_models["llama"]
    saes = random_saes(model, "topk", d_sae=64, std=(1.0, 0.1, 0.25, 0.1), apply_b_dec_to_input=True)
    trace = model.run(random_prompt(6, 0))
    with pytest.raises(InputError, match="max_memory"):
        build_graph(model, saes, trace, max_memory=1000, progress=False)
