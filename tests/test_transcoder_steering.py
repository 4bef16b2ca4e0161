"""Steering transcoder features: a feature's output (its decoder write into the MLP output of every layer it
writes), checked against HF's own forward with a hook that adds that write; and inside chosen heads' QK
circuits only, checked against the transcoder QK terms (`qktrace.graph.transcoder_qk`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qktrace.config import TOLERANCE
from qktrace.errors import InputError, OutOfRangeError
from qktrace.nodes import Kind
from qktrace.saes import CrossLayerTranscoder, TranscoderSet, load_transcoders
from qktrace.steering.interventions import SteerFeature, SteerQK, run_with
from qktrace.testing import random_prompt, write_transcoder_set

CASES = [
    ("gpt2", "mlp_in", "hook_mlp_out", False),
    ("llama", "mlp_in", "hook_mlp_out", False),
    ("qwen3", "resid_mid", "hook_mlp_out", True),
    ("gemma2", "normalized", "mlp.hook_out", True),  # writes before Gemma-2's post-MLP norm
    ("gemma2", "mlp_in", "hook_mlp_out", False),  # writes after it
]


def _site_input(hf, model, layer, ids, site):
    """The transcoder's input at layer `layer`, read off HF's own modules (not qktrace's sites)."""
    block = model.modules.blocks[layer]
    mlp, ln = model.modules.mlp[layer], model.modules.ln_mlp[layer]
    seen = {}
    handles = [
        mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0][0].detach())),
        ln.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0][0].detach())),
    ]
    try:
        with torch.no_grad():
            hf(ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    del block
    if site == "mlp_in":
        return seen["mlp_in"]
    x = seen["mid"].double()
    eps = getattr(ln, "eps", None) or getattr(ln, "variance_epsilon", None)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).float() if site == "normalized" else seen["mid"]


def _steered_hf(model, ids, adds):
    """HF's logits with `adds` {module: [pos, d_model]} added to those modules' outputs."""
    handles = [m.register_forward_hook(lambda mod, a, out, v=v: out + v[None].to(out)) for m, v in adds.items()]
    try:
        with torch.no_grad():
            return model.hf(ids[None], use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def _output_module(model, layer, output_hook):
    """Where the transcoder writes: the MLP module's output, or after Gemma-2's post-MLP norm."""
    post = model.modules.post_mlp
    if output_hook == "mlp.hook_out" or post is None:
        return model.modules.mlp[layer]
    return post[layer]


@pytest.mark.parametrize("family,input_site,output_hook,skip", CASES)
def test_steering_a_transcoder_feature_equals_hf_with_its_write_added(
    family, input_site, output_hook, skip, tiny_models, tmp_path
):
    model = tiny_models[family]
    folder = write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, input_site, output_hook, skip)
    ts = load_transcoders(folder, model)
    ids = model.tokenize(random_prompt(10, seed=3))
    clean = model.run(ids)
    for layer in range(model.n_layers):
        w = load_file(str(folder / f"layer_{layer}.safetensors"))
        x = _site_input(model.hf, model, layer, ids, input_site)
        acts = torch.relu(x.double() @ w["W_enc"].double().T + w["b_enc"].double())  # [pos, d_sae]
        pos, f = divmod(int(acts[1:].flatten().argmax()), acts.shape[1])
        pos += 1
        a = float(acts[pos, f])
        assert a > 0
        for s in (3.0, 0.0, -1.0):
            add = torch.zeros(len(ids), model.d_model, dtype=torch.float64)
            add[pos] = (s - 1) * a * w["W_dec"][f].double()
            want = _steered_hf(model, ids, {_output_module(model, layer, output_hook): add})
            iv = SteerFeature(layer, f, pos, scale=s, kind=Kind.TRANSCODER)
            got = run_with(model, {}, ids, [iv], clean=clean, transcoders=ts).logits
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) < TOLERANCE["float32"] * scale, (layer, s)
            assert float((got - clean_logits(model, ids)).abs().max()) > 100 * TOLERANCE["float32"] * scale


def clean_logits(model, ids):
    with torch.no_grad():
        return model.hf(ids[None], use_cache=False).logits[0].float()


def _clt(model, n_layers, seed=0):
    n, d, d_sae = n_layers, model.d_model, 24
    g = torch.Generator().manual_seed(seed)
    return CrossLayerTranscoder(
        "standard",
        W_enc=torch.randn(n, d, d_sae, generator=g) / d**0.5,
        b_enc=torch.randn(n, d_sae, generator=g) * 0.2 - 0.3,
        W_dec=tuple(torch.randn(d_sae, n - i, d, generator=g) * 0.3 for i in range(n)),
        b_dec=torch.randn(n, d, generator=g) * 0.2,
        input_site="mlp_in",
    )


def test_a_cross_layer_feature_writes_every_later_layer(tiny_models):
    model = tiny_models["llama"]
    clt = _clt(model, model.n_layers)
    ts = TranscoderSet(clt=clt)
    ids = model.tokenize(random_prompt(9, seed=4))
    x = _site_input(model.hf, model, 0, ids, "mlp_in")
    acts = torch.relu(x @ clt.W_enc[0] + clt.b_enc[0])
    pos, f = divmod(int(acts[1:].flatten().argmax()), acts.shape[1])
    pos += 1
    adds = {}
    for j in range(model.n_layers):
        add = torch.zeros(len(ids), model.d_model)
        add[pos] = 1.5 * float(acts[pos, f]) * clt.W_dec[0][f, j]
        adds[model.modules.mlp[j]] = add
    want = _steered_hf(model, ids, adds)
    got = run_with(model, {}, ids, [SteerFeature(0, f, pos, scale=2.5, kind="transcoder")], transcoders=ts).logits
    assert float((got - want).abs().max()) < TOLERANCE["float32"] * float(want.abs().max())
    only_first = _steered_hf(model, ids, {model.modules.mlp[0]: adds[model.modules.mlp[0]]})
    assert float((got - only_first).abs().max()) > 1e-3  # the later layer's write matters


@pytest.mark.parametrize("family,input_site,output_hook,skip", CASES)
@pytest.mark.parametrize("side", ["query", "key"])
def test_qk_steering_moves_only_the_chosen_heads_scores_by_the_qk_terms(
    family, input_site, output_hook, skip, side, tiny_models, tmp_path, check_qk_steering
):
    model = tiny_models[family]
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, 2, input_site, output_hook, skip), model)
    ids = model.tokenize(random_prompt(10, seed=5))
    check_qk_steering(model, ids, ts, side, Kind.TRANSCODER)


def test_transcoder_steering_refuses_what_it_cannot_do(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, 2), model)
    ids = model.tokenize(random_prompt(6, seed=1))
    with pytest.raises(InputError, match="no transcoders are loaded"):
        run_with(model, {}, ids, [SteerFeature(0, 1, 2, scale=2.0, kind=Kind.TRANSCODER)])
    with pytest.raises(InputError, match="write no residual"):
        run_with(model, {}, ids, [SteerQK(0, 1, "query", 1, 2, scale=2.0, kind="transcoder", feature_layer=0)],
                 transcoders=ts)  # fmt: skip
    with pytest.raises(InputError, match="feature_layer"):
        SteerQK(1, 1, "query", 1, 2, scale=2.0, kind=Kind.TRANSCODER)
    with pytest.raises(InputError, match="cannot be steered"):
        SteerFeature(0, 1, 2, scale=2.0, kind="mlp_error")
    with pytest.raises(OutOfRangeError, match="feature"):
        run_with(model, {}, ids, [SteerFeature(0, 48, 2, scale=2.0, kind=Kind.TRANSCODER)], transcoders=ts)


def test_traced_intervene_steers_with_the_tracers_transcoders(tiny_paths, tmp_path):
    from qktrace import Tracer

    model_path = tiny_paths["gpt2"]
    ct = write_transcoder_set(tmp_path / "ct", 32, 2)
    traced = Tracer.load(model_path, transcoders=ct).run(random_prompt(8, seed=2))
    enc = traced.writers().enc
    i = int(enc.act.argmax())
    iv = SteerFeature(int(enc.layer[i]), int(enc.index[i]), int(enc.pos[i]), scale=0.0, kind=Kind.TRANSCODER)
    got = traced.intervene([iv]).logits
    want = run_with(traced.model, {}, traced.trace.tokens, [iv], transcoders=traced.transcoders).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got[-1], traced.trace.last_logits.float(), atol=1e-4)
