"""QK-only steering moves the steered head's score by exactly what the QK attribution predicts."""

from __future__ import annotations

import pytest
import torch

from qktrace import Tracer
from qktrace.nodes import CODE, Kind
from qktrace.steering.interventions import FreezeAttention, SteerQK, run_with
from qktrace.testing import hf_attention, random_prompt, random_saes


@pytest.mark.parametrize("fam", ["gpt2", "llama", "qwen3", "gpt_neox"])
@pytest.mark.parametrize("side", ["query", "key"])
def test_qk_steer_changes_score_by_attributed_terms(tiny_models, fam, side):
    model = tiny_models[fam]
    saes = random_saes(model, "topk", seed=3)
    traced = Tracer(model, saes).run(random_prompt(9, 11))
    layer, head, q = 1, 2, traced.trace.n_pos - 1
    att = traced.qk(layer, head, q)
    # steer the feature with the largest |marginal| on the chosen side
    comps = att.query if side == "query" else att.key
    feats = (comps.kind == CODE[Kind.FEATURE]).nonzero().flatten()
    marg = (att.terms.sum(1) if side == "query" else att.terms.sum(0))[feats]
    i = int(feats[marg.abs().argmax()])
    f, p = int(comps.feature[i]), int(comps.pos[i])
    scale = -1.5
    ivs = [SteerQK(layer, head, side, f, p, scale=scale), FreezeAttention()]
    res = run_with(model, saes, traced.trace.tokens, ivs, clean=traced.trace, record_attention=[layer])
    if side == "query":
        delta = torch.zeros_like(att.sum_of_terms).index_add_(0, att.key_index, att.terms[i])
        predicted = att.sum_of_terms + (scale - 1) * delta
    else:
        predicted = att.sum_of_terms.clone()
        predicted[att.key_index[i]] += (scale - 1) * float(att.terms[:, i].sum())
    got = res.scores[layer][head, q, list(att.key_positions)]
    assert (got - predicted).abs().max() < 1e-4 * predicted.abs().max()
    assert (got - att.score).abs().max() > 1e-3  # it really moved
    # every other head of the layer is bit-identical to the clean run
    others = [h for h in range(model.n_heads) if h != head]
    hf = hf_attention(model, traced.trace.tokens)  # HF's own clean scores
    assert torch.equal(res.scores[layer][others], hf.scores[layer][others])
