"""The plain transcoder graph's column sweep (sources forwards, `graph/replacement_sweep.py`) against the row
sweep (targets backwards, `Replacement.rows`): two routes through the frozen model that share no code past
the trace, on cross-layer transcoders with skips (a feature writes at every later layer) and on Gemma-2's
post-norms, at chunk sizes that cut position buckets and layers apart. (Per-layer transcoders are checked
against an autograd through HF itself in test_transcoder_graph.py.)"""

from __future__ import annotations

import pytest
import torch

from qktrace.graph import replacement as R
from qktrace.models import load_model
from qktrace.saes import CrossLayerTranscoder, TranscoderSet, load_transcoders
from qktrace.testing import make_tiny_model, random_prompt, write_transcoder_set


def clt_set(n: int, d: int, output_site: str, seed: int) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(
        "standard",
        W_enc=torch.randn(n, d, 40, generator=g, dtype=torch.float64) / d**0.5,
        b_enc=torch.randn(n, 40, generator=g, dtype=torch.float64) * 0.2 - 0.3,
        W_dec=tuple(torch.randn(40, n - i, d, generator=g, dtype=torch.float64) * 0.3 for i in range(n)),
        b_dec=torch.randn(n, d, generator=g, dtype=torch.float64) * 0.2,
        input_site="normalized",
        output_site=output_site,
        W_skip=torch.randn(n, d, d, generator=g, dtype=torch.float64) * 0.05,
    )
    return TranscoderSet(clt=clt)


def both_ways(model, ts, n_pos: int, batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(columns, rows, features, positions) of one random prompt's unpruned graph."""
    trace = model.run(random_prompt(n_pos, seed=4))
    enc = R.encode(ts, R.sites(model, trace, ts))
    _, _, vecs = R.salient_logits(model.anatomy, trace, max_n_logits=4, desired_logit_prob=0.99)
    rep = R.Replacement(model.anatomy, trace, ts, enc, R.token_vectors(model.anatomy, trace.tokens))
    with torch.no_grad():
        cols, rows = R.adjacency_rows(rep, vecs, batch_size), R.adjacency_by_rows(rep, vecs, 64)
    return cols, rows, enc.layer.numel(), trace.n_pos


@pytest.mark.parametrize(
    "family,output_site", [("gpt2", "mlp_out"), ("gemma2", "mlp_module_out"), ("llama", "mlp_out")]
)
def test_cross_layer_transcoder_columns_equal_rows(family, output_site, tmp_path):
    model = load_model(make_tiny_model(family, tmp_path / family, seed=3), dtype=torch.float64)
    ts = clt_set(model.n_layers, model.d_model, output_site, seed=1)
    for batch in (None, 7):
        cols, rows, n_feat, _ = both_ways(model, ts, 11, batch)
        assert n_feat > 20 and int((rows != 0).sum()) > 500
        torch.testing.assert_close(cols, rows, rtol=1e-9, atol=1e-12 * float(rows.abs().max()))
        # a feature read at layer 0 writes into a later layer's MLP output: edges from it reach layer 2's features
        later = (rows[:n_feat][:, :n_feat] != 0).any()
        assert bool(later)


def test_chunking_and_buckets_do_not_change_the_graph(tmp_path):
    """Per-layer transcoders with a skip on Llama: one chunk per bucket, or chunks of 3 sources, same numbers;
    sources at zeroed positions (the BOS errors) are columns of zeros."""
    model = load_model(make_tiny_model("llama", tmp_path / "m", seed=5), dtype=torch.float64)
    write_transcoder_set(tmp_path / "ts", model.d_model, model.n_layers, "mlp_in", "hook_mlp_out", True)
    ts = load_transcoders(tmp_path / "ts", model, dtype=torch.float64)
    whole, rows, n_feat, n_pos = both_ways(model, ts, 13, None)
    small, *_ = both_ways(model, ts, 13, 3)
    torch.testing.assert_close(whole, rows, rtol=1e-9, atol=1e-12 * float(rows.abs().max()))
    torch.testing.assert_close(small, whole, rtol=1e-12, atol=1e-14 * float(rows.abs().max()))
    bos_errors = [n_feat + layer * n_pos for layer in range(model.n_layers)]
    assert float(whole[:, bos_errors].abs().max()) == 0.0 and float(whole[:, n_feat:].abs().max()) > 0
