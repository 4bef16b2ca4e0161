"""Transcoders and attention-output SAEs: fake release files in each real layout, loaded offline, checked
against hand-written torch computations from the raw arrays and against HF's own modules (forward hooks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qktrace.errors import QKTraceError, SAELoadError, SAEMismatchError
from qktrace.saes import load_attention_saes, load_transcoders, site_input

FAMILIES = ("gpt2", "llama", "gemma2", "qwen3")
D_SAE = 40
# HF module names, written out here so the tests do not lean on qktrace's anatomy: (layers, pre-MLP norm, out proj)
HF = {
    "gpt2": (lambda hf: hf.transformer.h, "ln_2", "attn.c_proj"),
    "llama": (lambda hf: hf.model.layers, "post_attention_layernorm", "self_attn.o_proj"),
    "qwen3": (lambda hf: hf.model.layers, "post_attention_layernorm", "self_attn.o_proj"),
    "gemma2": (lambda hf: hf.model.layers, "pre_feedforward_layernorm", "self_attn.o_proj"),
}


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def capture(model, family: str, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pre-MLP norm's input and output, the MLP's output and the input of W_O, by forward hooks on HF."""
    layers, ln, proj = HF[family]
    block = layers(model.hf)[layer]
    got: dict[str, torch.Tensor] = {}
    hooks = [
        block.get_submodule(ln).register_forward_hook(lambda m, a, o: got.update(resid_mid=a[0][0], mlp_in=o[0])),
        block.get_submodule("mlp").register_forward_hook(lambda m, a, o: got.update(mlp_module_out=o[0])),
        block.get_submodule(proj).register_forward_pre_hook(lambda m, a: got.update(z=a[0][0])),
    ]
    try:
        with torch.no_grad():
            model.hf(ids[None])
    finally:
        for h in hooks:
            h.remove()
    return got


def ids_for(model) -> torch.Tensor:
    return model.tokenize("Aunt Sally is the opposite of Uncle Bob .")


def write_ct_set(folder: Path, d: int, n: int, input_hook: str, skip_layer: int | None = None) -> list[dict]:
    """A circuit-tracer transcoder set: config.yaml + layer_L.safetensors (W_enc [d_sae, d_model] as torch Linear)."""
    folder.mkdir(parents=True)
    out_hook = "hook_mlp_out"
    folder.joinpath("config.yaml").write_text(
        f'model_kind: "transcoder_set"\nfeature_input_hook: "{input_hook}"\nfeature_output_hook: "{out_hook}"\n'
    )
    raws = []
    for i in range(n):
        w = {
            "W_enc": rand(D_SAE, d, seed=10 * i + 1, scale=0.3),
            "W_dec": rand(D_SAE, d, seed=10 * i + 2, scale=0.3),
            "b_enc": rand(D_SAE, seed=10 * i + 3, scale=0.2),
            "b_dec": rand(d, seed=10 * i + 4, scale=0.2),
            "activation_function.threshold": rand(D_SAE, seed=10 * i + 5).abs() * 0.2,
        }
        if i == skip_layer:
            w["W_skip"] = rand(d, d, seed=10 * i + 6, scale=0.2)
        save_file(w, str(folder / f"layer_{i}.safetensors"))
        raws.append(w)
    return raws


def by_hand_plt(w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's PLT: pre = x W_enc^T + b_enc; acts = pre * (pre > threshold);
    out = acts W_dec + b_dec (+ x W_skip^T)."""
    pre = x @ w["W_enc"].T + w["b_enc"]
    acts = pre * (pre > w["activation_function.threshold"])
    out = acts @ w["W_dec"] + w["b_dec"]
    return acts, out + (x @ w["W_skip"].T if "W_skip" in w else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_circuit_tracer_plt_set_with_skip(family: str, tiny_models, tmp_path: Path) -> None:
    model = tiny_models[family]
    raws = write_ct_set(tmp_path / "ct", model.d_model, model.n_layers, "mlp.hook_in", skip_layer=1)
    ts = load_transcoders(tmp_path / "ct", model)
    assert ts.kind == "per_layer" and ts.layers == (0, 1) and ts.input_site == "mlp_in" and ts.has_skip
    ids = ids_for(model)
    for layer in ts.layers:
        got = capture(model, family, layer, ids)
        t = ts[layer]
        # the site computed from the residual after attention equals what HF's MLP really reads
        ln = model.anatomy.layers[layer].ln_mlp
        torch.testing.assert_close(site_input("mlp_in", ln, got["resid_mid"]), got["mlp_in"], atol=1e-5, rtol=1e-5)
        acts, out = by_hand_plt(raws[layer], got["mlp_in"])
        torch.testing.assert_close(t.encode(got["mlp_in"]), acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.decode(t.encode(got["mlp_in"]), got["mlp_in"]), out, atol=1e-5, rtol=1e-5)
        # exact split: features + b_dec + skip + error == the MLP's true output
        target = got["mlp_module_out"].double()
        fa = t.sparse(got["mlp_in"].double(), target)
        recon = torch.zeros_like(target).index_add_(0, fa.pos, fa.act.double()[:, None] * t.W_dec.double()[fa.feature])
        skip = got["mlp_in"].double() @ t.W_skip.double() if t.W_skip is not None else 0
        torch.testing.assert_close(recon + t.b_dec.double() + skip + fa.error, target, atol=1e-10, rtol=0)
    with pytest.raises(SAEMismatchError, match="skip transcoder: pass its input"):
        ts[1].decode(torch.zeros(3, D_SAE))


def test_clt_decode_into_is_the_sum_over_source_layers(tiny_models, tmp_path: Path) -> None:
    model = tiny_models["llama"]
    d, n = model.d_model, model.n_layers
    folder = tmp_path / "clt"
    folder.mkdir()
    folder.joinpath("config.yaml").write_text(
        'model_kind: "cross_layer_transcoder"\nfeature_input_hook: "hook_resid_mid"\n'
        'feature_output_hook: "hook_mlp_out"\n'
    )
    enc, dec = [], []
    for i in range(n):
        e = {f"W_enc_{i}": rand(D_SAE, d, seed=i, scale=0.3), f"b_enc_{i}": rand(D_SAE, seed=20 + i, scale=0.2),
             f"b_dec_{i}": rand(d, seed=40 + i), f"threshold_{i}": rand(D_SAE, seed=60 + i).abs() * 0.1}  # fmt: skip
        w = {f"W_dec_{i}": rand(D_SAE, n - i, d, seed=80 + i, scale=0.3)}
        save_file(e, str(folder / f"W_enc_{i}.safetensors"))
        save_file(w, str(folder / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(w[f"W_dec_{i}"])
    ts = load_transcoders(folder, model)
    assert ts.kind == "cross_layer" and ts.input_site == "resid_mid" and ts.writes(0) == (0, 1)
    x = [rand(5, d, seed=100 + i, scale=2.0) for i in range(n)]
    acts = []
    for i in range(n):
        pre = x[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]))
        torch.testing.assert_close(ts.encode(i, x[i]), acts[i], atol=1e-5, rtol=1e-5)
    for out_layer in range(n):
        want = enc[out_layer][f"b_dec_{out_layer}"] + sum(
            acts[i] @ dec[i][:, out_layer - i] for i in range(out_layer + 1)
        )
        torch.testing.assert_close(ts.decode_into(out_layer, acts), want, atol=1e-5, rtol=1e-5)
    (folder / "W_dec_1.safetensors").unlink()
    save_file({"W_dec_1": rand(D_SAE, 2, d, seed=1)}, str(folder / "W_dec_1.safetensors"))
    with pytest.raises(SAEMismatchError, match=r"W_dec_1 of shape \[40, 2, 32\], expected \[40, 1, 32\]"):
        load_transcoders(folder, model)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_gemma_scope_transcoder_npz_reads_the_normalised_residual(family: str, tiny_models, tmp_path: Path) -> None:
    model = tiny_models[family]
    d = model.d_model
    w = {"W_enc": rand(d, D_SAE, seed=1), "W_dec": rand(D_SAE, d, seed=2), "b_enc": rand(D_SAE, seed=3) * 0.1,
         "b_dec": rand(d, seed=4), "threshold": rand(D_SAE, seed=5).abs() * 0.5}  # fmt: skip
    path = tmp_path / "layer_1" / "width_16k" / "average_l0_7" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **{k: v.numpy() for k, v in w.items()})
    ts = load_transcoders(path, model)
    t = ts[1]
    got = capture(model, family, 1, ids_for(model))
    x = got["resid_mid"]
    if family == "gemma2":  # RMSNorm: ln2.hook_normalized is x / rms(x), before the gain
        assert (t.input_site, t.output_site) == ("normalized", "mlp_out")
        eps = model.hf.config.rms_norm_eps
        by_hand = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:  # LayerNorm: TransformerLens's hook_normalized is after gain and bias, the MLP's own input
        assert t.input_site == "mlp_in"
        by_hand = got["mlp_in"]
    inp = site_input(t.input_site, model.anatomy.layers[1].ln_mlp, x)
    torch.testing.assert_close(inp, by_hand, atol=1e-5, rtol=1e-5)
    pre = by_hand @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > w["threshold"])
    torch.testing.assert_close(t.encode(inp), acts, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(t.decode(acts), acts @ w["W_dec"] + w["b_dec"], atol=1e-4, rtol=1e-5)


def test_llama_scope_lxtc_folds_input_and_output_norms(tiny_models, tmp_path: Path) -> None:
    model = tiny_models["llama"]
    d = model.d_model
    folder = tmp_path / "Llama3_1-8B-Base-L1TC-8x"
    (folder / "checkpoints").mkdir(parents=True)
    hp = {"d_model": d, "d_sae": D_SAE, "hook_point_in": "blocks.1.ln2.hook_normalized",
          "hook_point_out": "blocks.1.hook_mlp_out", "act_fn": "jumprelu", "jump_relu_threshold": 0.3,
          "dataset_average_activation_norm": {"in": 3.0, "out": 7.0}}  # fmt: skip
    folder.joinpath("hyperparams.json").write_text(json.dumps(hp))
    w = {"encoder.weight": rand(D_SAE, d, seed=1), "encoder.bias": rand(D_SAE, seed=2) * 0.1,
         "decoder.weight": rand(d, D_SAE, seed=3), "decoder.bias": rand(d, seed=4)}  # fmt: skip
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    t = load_transcoders(folder, model)[1]
    assert t.input_site == "normalized"
    x = rand(6, d, seed=9)
    s_in, s_out = math.sqrt(d) / 3.0, math.sqrt(d) / 7.0
    pre = (x * s_in) @ w["encoder.weight"].T + w["encoder.bias"]  # the release reads s_in x ...
    acts = pre.relu() * (pre > 0.3 * s_in)
    y = (acts @ w["decoder.weight"].T + w["decoder.bias"]) / s_out  # ... and predicts s_out y
    torch.testing.assert_close(t.encode(x), acts, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(t.decode(t.encode(x)), y, atol=1e-4, rtol=1e-5)


def write_sae_lens(folder: Path, cfg: dict, w: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    folder.joinpath("cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def test_sae_lens_skip_transcoder_and_its_skip_term(tiny_models, tmp_path: Path) -> None:
    model = tiny_models["qwen3"]
    d = model.d_model
    w = {"W_enc": rand(d, D_SAE, seed=1), "b_enc": rand(D_SAE, seed=2), "W_dec": rand(D_SAE, d, seed=3),
         "b_dec": rand(d, seed=4), "W_skip": rand(d, d, seed=5)}  # fmt: skip
    cfg = {"architecture": "skip_transcoder", "d_in": d, "d_sae": D_SAE, "d_out": d,
           "hook_name_out": "blocks.0.hook_mlp_out",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_mid"}}  # fmt: skip
    ts = load_transcoders(write_sae_lens(tmp_path / "tc", cfg, w), model)
    t = ts[0]
    assert t.input_site == "resid_mid" and not t.coder.apply_b_dec_to_input
    x = rand(4, d, seed=7)
    acts = (x @ w["W_enc"] + w["b_enc"]).relu()  # SAELens transcoders never subtract b_dec from the input
    torch.testing.assert_close(t.skip(x), x @ w["W_skip"].T, atol=1e-5, rtol=1e-5)
    want = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    torch.testing.assert_close(t.decode(t.encode(x), x), want, atol=1e-5, rtol=1e-5)


def test_mismatches_are_one_line_errors(tiny_models, tmp_path: Path) -> None:
    llama, gpt2 = tiny_models["llama"], tiny_models["gpt2"]
    write_ct_set(tmp_path / "ct", 16, 2, "mlp.hook_in")  # d_model 16, the model has 32
    cases = [(lambda: load_transcoders(tmp_path / "ct", llama), r"W_enc of shape \[40, 16\], expected \[40, 32\]")]
    write_ct_set(tmp_path / "deep", 32, 3, "mlp.hook_in")
    (tmp_path / "deep" / "config.yaml").write_text(
        (tmp_path / "deep" / "config.yaml").read_text()
        + "transcoders:\n  - layer_0.safetensors\n  - layer_1.safetensors\n  - layer_2.safetensors\n"
    )
    cases.append((lambda: load_transcoders(tmp_path / "deep", llama), "lists 3 transcoders but model"))
    write_ct_set(tmp_path / "odd", 32, 2, "blocks.0.attn.hook_z")
    cases.append((lambda: load_transcoders(tmp_path / "odd", llama), "input hook 'blocks.0.attn.hook_z' is not"))
    cfg = {"architecture": "transcoder", "d_in": 32, "d_sae": D_SAE, "d_out": 32,
           "hook_name_out": "blocks.0.hook_mlp_out",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_mid"}}  # fmt: skip
    w = {"W_enc": rand(32, D_SAE + 1, seed=1), "b_enc": rand(D_SAE, seed=2), "W_dec": rand(D_SAE, 32, seed=3),
         "b_dec": rand(32, seed=4)}  # fmt: skip
    write_sae_lens(tmp_path / "bad_cfg", cfg, w)
    cases.append(
        (lambda: load_transcoders(tmp_path / "bad_cfg", llama), r"W_enc of shape \[32, 41\], expected \[32, 40\]")
    )
    cases.append((lambda: load_transcoders(tmp_path / "nowhere", llama), "does not exist"))
    neox = tiny_models["gpt_neox"]  # parallel attention and MLP: there is no residual after attention
    w["W_enc"] = rand(32, D_SAE, seed=1)
    write_sae_lens(tmp_path / "par", cfg, w)
    cases.append((lambda: load_transcoders(tmp_path / "par", neox), "in parallel"))
    for load, message in cases:
        with pytest.raises(QKTraceError, match=message) as err:
            load()
        assert "\n" not in str(err.value)
    assert gpt2.d_model == 32  # the same files fit gpt2's width


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_z_attention_sae_reads_the_concatenated_heads(family: str, tiny_models, tmp_path: Path) -> None:
    model = tiny_models[family]
    layer = model.anatomy.layers[1]
    d_in = layer.n_heads * layer.d_head
    w = {"W_enc": rand(d_in, D_SAE, seed=1, scale=0.5), "b_enc": rand(D_SAE, seed=2) * 0.1,
         "W_dec": rand(D_SAE, d_in, seed=3), "b_dec": rand(d_in, seed=4) * 0.1}  # fmt: skip
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "reshape_activations": "hook_z",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.1.attn.hook_z"}}  # fmt: skip
    saes = load_attention_saes(write_sae_lens(tmp_path / "z", cfg, w), model)
    sae = saes[1]
    assert (sae.site, sae.n_heads, sae.d_head) == ("z", layer.n_heads, layer.d_head)
    z = capture(model, family, 1, ids_for(model))["z"]  # the input of W_O: heads concatenated
    # the HF projection of that input is the attention output: z really is the heads side by side
    by_head = sae.heads(z)
    W_O = layer.W_O  # [head, d_head, d_model]
    proj = HF[family][2]
    attn_out = HF[family][0](model.hf)[1].get_submodule(proj)(z[None])[0]
    torch.testing.assert_close(torch.einsum("phd,hdm->pm", by_head, W_O) + layer.b_O, attn_out, atol=1e-4, rtol=1e-4)
    acts = ((z - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    torch.testing.assert_close(sae.encode(z), acts, atol=1e-4, rtol=1e-5)
    fa = sae.sparse(z.double())
    recon = torch.zeros_like(z.double()).index_add_(
        0, fa.pos, fa.act.double()[:, None] * sae.W_dec.double()[fa.feature]
    )
    torch.testing.assert_close(recon + sae.b_dec.double() + fa.error, z.double(), atol=1e-10, rtol=0)
    cfg["d_in"] = d_in + 1
    cfg["metadata"]["hook_name"] = "blocks.0.attn.hook_z"
    write_sae_lens(tmp_path / "wide", cfg, w)
    with pytest.raises(SAEMismatchError, match=rf"d_in={d_in + 1} but model .* n_heads \* d_head={d_in}"):
        load_attention_saes(tmp_path / "wide", model)


def test_gemma_scope_att_npz_and_non_attention_hooks(tiny_models, tmp_path: Path) -> None:
    model = tiny_models["gemma2"]
    layer = model.anatomy.layers[0]
    d_in = layer.n_heads * layer.d_head
    w = {"W_enc": rand(d_in, D_SAE, seed=1), "W_dec": rand(D_SAE, d_in, seed=2), "b_enc": rand(D_SAE, seed=3),
         "b_dec": rand(d_in, seed=4), "threshold": rand(D_SAE, seed=5).abs()}  # fmt: skip
    path = tmp_path / "layer_0" / "width_16k" / "average_l0_9" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **{k: v.numpy() for k, v in w.items()})
    sae = load_attention_saes(path, model)[0]
    assert sae.hook_name == "blocks.0.attn.hook_z" and sae.site == "z"
    x = rand(5, d_in, seed=8)
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope: b_dec not subtracted
    torch.testing.assert_close(sae.encode(x), pre.relu() * (pre > w["threshold"]), atol=1e-4, rtol=1e-5)
    cfg = {"architecture": "standard", "d_in": 32, "d_sae": D_SAE,
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_pre"}}  # fmt: skip
    ws = {"W_enc": rand(32, D_SAE, seed=1), "b_enc": rand(D_SAE, seed=2), "W_dec": rand(D_SAE, 32, seed=3),
          "b_dec": rand(32, seed=4)}  # fmt: skip
    write_sae_lens(tmp_path / "res", cfg, ws)
    with pytest.raises(SAEMismatchError, match="not an attention output"):
        load_attention_saes(tmp_path / "res", model)
    with pytest.raises(SAELoadError, match="not a transcoder"):
        load_transcoders(tmp_path / "res", model)
