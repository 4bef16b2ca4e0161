"""Steering attention-output SAE features (strategy 2's checkpoints): a feature's output (its decoder row added at
its SAE's site: to the heads' z before W_O, or to the attention output), checked against HF's own forward with a
hook on HF's own module that adds that row; and inside chosen heads' QK circuits only, checked against the
checkpointed graph's QK terms (`qktrace.graph.transcoder_qk` with attention SAEs)."""

from __future__ import annotations

import pytest
import torch

from qktrace.config import TOLERANCE
from qktrace.errors import InputError, OutOfRangeError
from qktrace.nodes import Kind
from qktrace.saes import load_transcoders
from qktrace.steering.interventions import SteerFeature, SteerQK, run_with
from qktrace.testing import random_attention_saes, random_prompt, write_transcoder_set

FAMILIES = ["gpt2", "llama", "gemma2", "qwen3"]


def _out_proj(model, layer):
    """HF's own output projection of layer `layer` (o_proj, GPT-2's c_proj): its input is z, heads side by side."""
    attn = model.modules.attn[layer]
    return attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj


def _attn_out_module(model, layer):
    """The HF module whose output is the attention output as it joins the residual."""
    post = model.modules.post_attn
    return model.modules.attn[layer] if post is None else post[layer]


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _hf(model, ids, layer, site, add=None):
    """(HF's logits [pos, vocab], the SAE site's value [pos, d_in]) with `add` [pos, d_in] added at the site."""
    seen = {}

    def pre(mod, args):
        x = args[0] if add is None else args[0] + add[None].to(args[0])
        seen["x"] = x[0].detach()
        return (x, *args[1:])

    def post(mod, args, out):
        x = _first(out) if add is None else _first(out) + add[None].to(_first(out))
        seen["x"] = x[0].detach()
        return x if isinstance(out, torch.Tensor) else (x, *out[1:])

    if site == "z":
        handle = _out_proj(model, layer).register_forward_pre_hook(pre)
    else:
        handle = _attn_out_module(model, layer).register_forward_hook(post)
    try:
        with torch.no_grad():
            logits = model.hf(ids[None], use_cache=False).logits[0].float()
    finally:
        handle.remove()
    return logits, seen["x"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ["z", "attn_out"])
def test_steering_an_attention_feature_equals_hf_with_its_write_added(family, site, tiny_models):
    model = tiny_models[family]
    saes = random_attention_saes(model, [site] * model.n_layers)
    ids = model.tokenize(random_prompt(10, seed=3))
    clean = model.run(ids)
    for layer in range(model.n_layers):
        clean_logits, x = _hf(model, ids, layer, site)
        sae = saes[layer]
        acts = sae.encode(x.to(sae.W_enc))  # [pos, d_sae]
        pos, f = divmod(int(acts[1:].flatten().argmax()), acts.shape[1])
        pos += 1
        a = float(acts[pos, f])
        assert a > 0
        for s in (3.0, 0.0, -1.0):
            add = torch.zeros(len(ids), sae.d_in, dtype=torch.float64)
            add[pos] = (s - 1) * a * sae.W_dec[f].double()
            want, _ = _hf(model, ids, layer, site, add)
            iv = SteerFeature(layer, f, pos, scale=s, kind=Kind.ATTN_FEATURE)
            got = run_with(model, {}, ids, [iv], clean=clean, attention_saes=saes).logits
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) < TOLERANCE["float32"] * scale, (layer, s)
            assert float((got - clean_logits).abs().max()) > 100 * TOLERANCE["float32"] * scale


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sites", [("z", "attn_out"), ("attn_out", "z")])
@pytest.mark.parametrize("side", ["query", "key"])
def test_qk_steering_of_an_attention_feature_moves_only_the_chosen_heads_by_its_qk_terms(
    family, sites, side, tiny_models, tmp_path, check_qk_steering
):
    model = tiny_models[family]
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, 2), model)
    saes = random_attention_saes(model, sites)
    ids = model.tokenize(random_prompt(10, seed=5))
    check_qk_steering(model, ids, ts, side, Kind.ATTN_FEATURE, attention_saes=saes)


def test_attention_steering_refuses_what_it_cannot_do(tiny_models):
    model = tiny_models["llama"]
    saes = random_attention_saes(model, ["z"] * model.n_layers)
    ids = model.tokenize(random_prompt(6, seed=1))
    with pytest.raises(InputError, match="no attention SAEs are loaded"):
        run_with(model, {}, ids, [SteerFeature(0, 1, 2, scale=2.0, kind=Kind.ATTN_FEATURE)])
    with pytest.raises(InputError, match="write no residual"):
        run_with(model, {}, ids, [SteerQK(1, 1, "query", 1, 2, scale=2.0, kind="attn", feature_layer=1)],
                 attention_saes=saes)  # fmt: skip
    with pytest.raises(InputError, match="feature_layer"):
        SteerQK(1, 1, "query", 1, 2, scale=2.0, kind=Kind.ATTN_FEATURE)
    with pytest.raises(OutOfRangeError, match="attention SAE at layer 0"):
        run_with(model, {}, ids, [SteerFeature(0, 400, 2, scale=2.0, kind=Kind.ATTN_FEATURE)], attention_saes=saes)


def test_traced_intervene_steers_with_the_tracers_attention_saes(tiny_models, tiny_paths, tmp_path):
    from qktrace import Tracer
    from qktrace.testing import write_attention_saes

    model = tiny_models["gpt2"]
    ct = write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers)
    att = write_attention_saes(tmp_path / "att", random_attention_saes(model, ["z", "attn_out"]))
    traced = Tracer.load(tiny_paths["gpt2"], transcoders=ct, attention_saes=att).run(random_prompt(8, seed=2))
    enc = traced.writers().att
    assert enc is not None
    i = int(enc.act.argmax())
    iv = SteerFeature(int(enc.layer[i]), int(enc.index[i]), int(enc.pos[i]), scale=5.0, kind=Kind.ATTN_FEATURE)
    got = traced.intervene([iv]).logits
    want = run_with(traced.model, {}, traced.trace.tokens, [iv], attention_saes=traced.attention_saes).logits
    assert torch.equal(got, want)
    assert float((got - run_with(traced.model, {}, traced.trace.tokens, []).logits).abs().max()) > 1e-3
