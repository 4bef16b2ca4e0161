"""The anatomy reproduces the HF model's own numbers, for every supported family."""

from __future__ import annotations

import pytest
import torch

from qktrace.errors import InputError, ModelLoadError, UnsupportedModelError
from qktrace.models import load_model
from qktrace.models.replay import attention_output, frozen_layer, logits_from, queries_keys, scores_from
from qktrace.testing import hf_attention, random_prompt


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_from_anatomy_equal_hf_scores(tiny_models, family, seed):
    model = tiny_models[family]
    trace = model.run(random_prompt(14, seed))
    ref = hf_attention(model, trace.tokens)
    for layer in range(model.n_layers):
        q, k = queries_keys(model.anatomy, trace, layer)
        assert rel_err(q, trace.q[layer]) < 1e-5
        assert rel_err(k, trace.k[layer]) < 1e-5
        mine = scores_from(model.anatomy.layers[layer], q, k)
        hf = ref.scores[layer]
        ok = torch.isfinite(hf)
        assert ok.sum() > 0
        assert rel_err(mine[ok], hf[ok]) < 1e-5
        # the trace's on-demand scores: the same mask, the same numbers
        assert torch.equal(torch.isfinite(trace.scores(layer)), ok)
        assert rel_err(trace.scores(layer)[ok], hf[ok]) < 1e-6
        # the scores are not trivially small: the test would catch a wrong scale
        assert hf[ok].abs().max() > 0.5


def test_patterns_equal_output_attentions(tiny_models, family):
    model = tiny_models[family]
    trace = model.run(random_prompt(10, 3))
    ref = hf_attention(model, trace.tokens)
    for layer in range(model.n_layers):
        assert torch.allclose(trace.pattern(layer), ref.patterns[layer], atol=1e-6)
        rows = torch.tensor([2, 9])
        assert torch.allclose(trace.pattern(layer, rows, heads=[1, 3]), ref.patterns[layer][[1, 3]][:, rows], atol=1e-6)
    assert torch.allclose(trace.last_logits, ref.logits[-1], atol=1e-5)


def test_layer_replay_reproduces_output_residual(tiny_models, family):
    model = tiny_models[family]
    trace = model.run(random_prompt(12, 5))
    ref = hf_attention(model, trace.tokens)
    for layer in range(model.n_layers):
        attn = attention_output(model.anatomy, trace, layer)
        assert rel_err(attn, ref.attn_out[layer]) < 1e-5
        out = frozen_layer(model.anatomy, trace, layer, trace.resid[layer])
        assert rel_err(out, trace.resid[layer + 1]) < 1e-5
    logits = logits_from(model.anatomy, trace.resid[-1], trace.scale_final)
    assert rel_err(logits, ref.logits) < 1e-5


def test_sliding_window_masks_far_keys(tiny_models):
    model = tiny_models["mistral"]  # sliding_window=5
    trace = model.run(random_prompt(12, 1))
    allowed = torch.isfinite(trace.scores(0)[0])
    assert bool(allowed[11, 11]) and not bool(allowed[11, 2])
    assert trace.keys(0, 11) == list(range(7, 12))  # the window HF applied: keys 7..11


def test_gemma_softcap_bounds_scores(tiny_models):
    trace = tiny_models["gemma2"].run(random_prompt(12, 2))
    for layer in range(trace.n_layers):
        scores = trace.scores(layer)
        finite = scores[torch.isfinite(scores)]
        assert finite.abs().max() <= 3.0 + 1e-6


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_unsupported_family_names_supported_ones(tmp_path):
    import transformers as T

    cfg = T.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama.*gemma2"):
        load_model(tmp_path)


def test_empty_prompt_and_bad_ids(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(InputError, match="empty"):
        model.run("   ")
    with pytest.raises(InputError, match="token ids"):
        model.run([10_000])


def test_two_threads_trace_and_intervene_at_once(tiny_models):
    """Two threads on ONE model: its hooks live on the model, so its own lock serialises its traces and
    interventions, and each gives exactly what it gives alone (two models: tests/test_seam.py)."""
    import threading

    from qktrace.steering.interventions import ScaleHead, run_with

    model = tiny_models["llama"]
    prompts = [random_prompt(11, 1), random_prompt(13, 2)]
    alone_trace = model.run(prompts[0])
    alone_steer = run_with(model, {}, prompts[1], [ScaleHead(1, 2, 0.0)], last_only=True).logits
    results: dict[str, list[torch.Tensor]] = {"trace": [], "steer": []}
    barrier = threading.Barrier(2)

    def tracing() -> None:
        barrier.wait()
        for _ in range(8):
            results["trace"].append(model.run(prompts[0]).q[1])

    def steering() -> None:
        barrier.wait()
        for _ in range(8):
            results["steer"].append(run_with(model, {}, prompts[1], [ScaleHead(1, 2, 0.0)], last_only=True).logits)

    threads = [threading.Thread(target=tracing), threading.Thread(target=steering)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results["trace"]) == len(results["steer"]) == 8
    assert all(torch.equal(q, alone_trace.q[1]) for q in results["trace"])
    assert all(torch.equal(x, alone_steer) for x in results["steer"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_norm_scales_follow_hf_precision_in_a_float64_model(tiny_paths, family):
    """HF's LayerNorm runs in float64 in a float64 model, its RMSNorms in float32: the frozen norm applied at the
    anatomy's scale reproduces HF's own module to that precision (float64: to 1e-12)."""
    model = load_model(tiny_paths[family], dtype=torch.float64)
    hf_norm = model.hf.model.layers[0].input_layernorm if family == "llama" else model.hf.transformer.h[0].ln_1
    x = torch.randn(5, model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mine = model.anatomy.layers[0].ln_attn(x)
    err = float((mine - hf_norm(x)).detach().abs().max())
    assert err < (1e-12 if family == "gpt2" else 1e-6)
