"""Named releases loaded offline through huggingface_hub's own cache, each in its real file layout.

A fake Hugging Face cache (`models--ORG--NAME/{blobs,snapshots/<sha>,refs/main}`, snapshot files linked
to blobs as the hub writes them) holds random weights for gpt2-small-res-jb, gemma-scope-2b-pt-res-canonical,
llama_scope_lxr_8x and pythia-70m-deduped-res-sm; `load_saes("saelens:RELEASE")` then runs the real
loading path with HF_HUB_OFFLINE. Encodings are compared with each release's encoder written out by hand
(float64 numpy), and QK terms of tiny models of the same families with the model's own scores.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from qktrace import Tracer
from qktrace.errors import SAELoadError
from qktrace.saes import find_release, load_saes
from qktrace.testing import random_prompt

SHA = "3f2a1b" + "0" * 34
D_SAE = 64


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # any attempt to reach the network fails
    return cache


def put(cache: Path, repo_id: str, filename: str, data: bytes) -> None:
    """One file of a model repo as huggingface_hub caches it: a blob, a snapshot symlink, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / SHA / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def rand_sae(d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, D_SAE, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.2,
        "W_dec": torch.randn(D_SAE, d, generator=g) * 0.3,
        "b_dec": torch.randn(d, generator=g) * 0.5 + 0.4,  # mean far from 0: centring matters
    }


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def assert_qk_exact(tracer: Tracer, layers: list[int]) -> None:
    traced = tracer.run(random_prompt(10, 3))
    for layer in layers:
        for head in range(tracer.model.n_heads):
            att = traced.qk(layer, head, -1)
            assert att.max_relative_error() < 1e-4, (layer, head, att.max_relative_error())


def assert_decomposition_exact(sae, resid: torch.Tensor) -> None:
    fa = sae.sparse(resid)
    assert len(fa.act) > 0
    rebuilt = torch.zeros_like(resid).index_add_(0, fa.pos, fa.act[:, None] * sae.W_dec[fa.feature])
    torch.testing.assert_close(rebuilt + sae.b_dec + fa.error, resid, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- gpt2-small-res-jb


def jb_cfg(layer: int, d: int) -> dict:
    """The fields of the release's own cfg.json (pre-6 SAELens training config)."""
    hook = f"blocks.{layer}.hook_resid_pre"
    return {
        "model_name": "gpt2-small",
        "hook_point": hook,
        "hook_point_layer": layer,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": 128,
        "use_cached_activations": False,
        "cached_activations_path": f"activations/Skylion007_openwebtext/gpt2-small/{hook}",
        "d_in": d,
        "n_batches_in_buffer": 128,
        "total_training_tokens": 300000000,
        "store_batch_size": 32,
        "device": "mps",
        "seed": 42,
        "dtype": "torch.float32",
        "b_dec_init_method": "geometric_median",
        "expansion_factor": D_SAE // d,
        "from_pretrained_path": None,
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "lr_scheduler_name": None,
        "lr_warm_up_steps": 5000,
        "train_batch_size": 4096,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "dead_feature_window": 5000,
        "dead_feature_threshold": 1e-08,
        "d_sae": D_SAE,
    }


def put_jb(cache: Path, d: int, layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    repo, weights = "jbloom/GPT2-Small-SAEs-Reformatted", {}
    for layer in layers:
        folder = f"blocks.{layer}.hook_resid_pre"
        weights[layer] = w = rand_sae(d, seed=layer)
        put(cache, repo, f"{folder}/cfg.json", json.dumps(jb_cfg(layer, d)).encode())
        put(cache, repo, f"{folder}/sae_weights.safetensors", safetensors_bytes(w))
        put(cache, repo, f"{folder}/sparsity.safetensors", safetensors_bytes({"sparsity": -torch.rand(D_SAE)}))
    return weights


def test_gpt2_res_jb_is_centred_and_qk_stays_exact(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["gpt2"]
    weights = put_jb(hf_cache, model.d_model, [0, 1])
    ids = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    saes = load_saes("saelens:gpt2-small-res-jb", model, sae_ids=ids)
    assert saes.checkpoints == (0, 1)
    sae = saes[1]
    assert sae.conventions == ("centred residual",) and sae.apply_b_dec_to_input
    assert (sae.prepend_bos, sae.context_size, sae.model_name) == (True, 128, "gpt2-small")
    assert sae.neuronpedia_id == "gpt2-small/1-res-jb" and sae.source == "saelens:gpt2-small-res-jb/" + ids[1]
    assert saes.prepend_bos is True and saes.context_size == 128

    tracer = Tracer(model, saes)
    traced = tracer.run(random_prompt(10, 3))
    for c, w in weights.items():
        resid = traced.trace.resid[c]
        x = f64(resid)
        centred = x - x.mean(-1, keepdims=True)  # TransformerLens's residual with center_writing_weights
        by_hand = relu((centred - f64(w["b_dec"])) @ f64(w["W_enc"]) + f64(w["b_enc"]))
        got = f64(saes[c].encode(resid))
        np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-4 * np.abs(by_hand).max())
        assert (by_hand > 0).sum() > 0
        uncentred = relu((x - f64(w["b_dec"])) @ f64(w["W_enc"]) + f64(w["b_enc"]))
        assert np.abs(uncentred - by_hand).max() > 1e-2 * np.abs(by_hand).max()  # centring is not a no-op here
        # decoding stays in residual space: the reconstruction is the release's own decode
        np.testing.assert_allclose(f64(saes[c].decode(saes[c].encode(resid))), got @ f64(w["W_dec"]) + f64(w["b_dec"]),
                                   rtol=1e-5, atol=1e-4)  # fmt: skip
        assert_decomposition_exact(saes[c], resid)
    assert_qk_exact(tracer, [0, 1])


def test_centring_is_skipped_for_rmsnorm_models(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["llama"]  # TransformerLens never centres RMSNorm models, whatever the flag says
    weights = put_jb(hf_cache, model.d_model, [0])
    sae = load_saes("saelens:gpt2-small-res-jb", model, sae_ids=["blocks.0.hook_resid_pre"])[0]
    assert sae.conventions == ()
    assert torch.equal(sae.W_enc, weights[0]["W_enc"]) and torch.equal(sae.b_enc, weights[0]["b_enc"])


# ---------------------------------------------------------------------------------------------- Gemma Scope


def test_gemma_scope_canonical(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["gemma2"]
    repo, weights = "google/gemma-scope-2b-pt-res", {}
    release = find_release("gemma-scope-2b-pt-res-canonical")
    assert release is not None and release.layout == "gemma_2"
    for layer in (0, 1):
        path = release.entry(f"layer_{layer}/width_16k/canonical")["path"]  # layer_0/width_16k/average_l0_105
        w = rand_sae(model.d_model, seed=10 + layer)
        w["threshold"] = torch.rand(D_SAE, generator=torch.Generator().manual_seed(layer)) * 0.3
        weights[layer + 1] = w  # resid_post of layer N is checkpoint N + 1
        put(hf_cache, repo, f"{path}/params.npz", npz_bytes({k: v.numpy() for k, v in w.items()}))
    saes = load_saes("saelens:gemma-scope-2b-pt-res-canonical", model,
                     sae_ids=["layer_0/width_16k/canonical", "layer_1/width_16k/canonical"])  # fmt: skip
    assert saes.checkpoints == (1, 2)
    sae = saes[2]
    assert (sae.hook_name, sae.architecture) == ("blocks.1.hook_resid_post", "jumprelu")
    assert not sae.apply_b_dec_to_input
    assert (sae.prepend_bos, sae.context_size, sae.model_name) == (True, 1024, "gemma-2-2b")
    assert sae.neuronpedia_id == "gemma-2-2b/1-gemmascope-res-16k" and sae.conventions == ()
    tracer = Tracer(model, saes)
    traced = tracer.run(random_prompt(10, 3))
    for c, w in weights.items():
        resid = traced.trace.resid[c]
        pre = f64(resid) @ f64(w["W_enc"]) + f64(w["b_enc"])  # Gemma Scope: b_dec is not subtracted
        by_hand = (pre > f64(w["threshold"])) * relu(pre)
        np.testing.assert_allclose(f64(saes[c].encode(resid)), by_hand, rtol=1e-5, atol=1e-5)
        assert (by_hand > 0).sum() > 0
        assert_decomposition_exact(saes[c], resid)
    assert_qk_exact(tracer, [1])


# ---------------------------------------------------------------------------------------------- Llama Scope


def test_llama_scope_lxr_8x_scale_is_folded(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["llama"]
    d, repo = model.d_model, "fnlp/Llama3_1-8B-Base-LXR-8x"
    release = find_release("llama_scope_lxr_8x")
    assert release is not None
    refs = {}
    for layer in (0, 1):
        entry = release.entry(f"l{layer}r_8x")
        folder, s = entry["path"], entry["norm_scaling_factor"]  # Llama3_1-8B-Base-L0R-8x, 58.93...
        hp = {
            "d_model": d,
            "d_sae": D_SAE,
            "hook_point_in": f"blocks.{layer}.hook_resid_post",
            "hook_point_out": f"blocks.{layer}.hook_resid_post",
            "use_decoder_bias": True,
            "apply_decoder_bias_to_pre_encoder": False,
            "act_fn": "jumprelu",
            "jump_relu_threshold": 0.05,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": math.sqrt(d) / s, "out": math.sqrt(d) / s},
            "sparsity_include_decoder_norm": True,
            "top_k": 50,
        }
        g = torch.Generator().manual_seed(20 + layer)
        raw = {  # torch Linear layout, stored in bfloat16 as the release is
            "encoder.weight": (torch.randn(D_SAE, d, generator=g) * 0.05).bfloat16(),
            "encoder.bias": (torch.randn(D_SAE, generator=g) * 0.5).bfloat16(),
            "decoder.weight": (torch.randn(d, D_SAE, generator=g) * 0.05).bfloat16(),
            "decoder.bias": (torch.randn(d, generator=g) * 0.1).bfloat16(),
        }
        put(hf_cache, repo, f"{folder}/hyperparams.json", json.dumps(hp).encode())
        put(hf_cache, repo, f"{folder}/checkpoints/final.safetensors", safetensors_bytes(raw))
        refs[layer + 1] = (raw, hp, s)
    saes = load_saes("saelens:llama_scope_lxr_8x", model, sae_ids=["l0r_8x", "l1r_8x"])
    assert saes.checkpoints == (1, 2)
    assert saes[1].neuronpedia_id == "llama3.1-8b/0-llamascope-res-32k"
    assert saes[1].model_name == "meta-llama/Llama-3.1-8B" and saes[1].prepend_bos is True
    assert saes[1].conventions == (f"input scale {refs[1][2]:.6g}",)
    tracer = Tracer(model, saes)
    traced = tracer.run(random_prompt(10, 3))
    for c, (raw, hp, s) in refs.items():
        resid = traced.trace.resid[c]
        # SAELens's conversion: threshold scaled by sqrt(d)/norm_in, inputs scaled by the release's factor
        factor = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
        pre = (s * f64(resid)) @ f64(raw["encoder.weight"]).T + f64(raw["encoder.bias"])
        by_hand = relu(pre) * (pre > hp["jump_relu_threshold"] * factor)
        got = saes[c].encode(resid)
        np.testing.assert_allclose(f64(got), by_hand, rtol=1e-4, atol=1e-4 * np.abs(by_hand).max())
        assert (by_hand > 0).sum() > 0
        recon = (f64(got) @ f64(raw["decoder.weight"]).T + f64(raw["decoder.bias"])) / s  # back to residual units
        np.testing.assert_allclose(f64(saes[c].decode(got)), recon, rtol=1e-4, atol=1e-5)
        assert_decomposition_exact(saes[c], resid)
    assert_qk_exact(tracer, [1])


# ---------------------------------------------------------------------------------------------- Pythia


def test_pythia_70m_res_sm(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["gpt_neox"]
    d, repo, weights = model.d_model, "ctigges/pythia-70m-deduped__res-sm_processed", {}
    for folder, hook, c in (("e-res-sm", "blocks.0.hook_resid_pre", 0), ("0-res-sm", "blocks.0.hook_resid_post", 1)):
        cfg = {  # a SAELens 3.x-era config, as these converted dictionaries carry
            "model_name": "pythia-70m-deduped",
            "hook_name": hook,
            "hook_layer": 0,
            "hook_head_index": None,
            "d_in": d,
            "d_sae": D_SAE,
            "dtype": "float32",
            "device": "cpu",
            "activation_fn_str": "relu",
            "apply_b_dec_to_input": True,
            "finetuning_scaling_factor": False,
            "context_size": 128,
            "dataset_path": "monology/pile-uncopyrighted",
            "normalize_activations": "none",
        }
        weights[c] = w = rand_sae(d, seed=30 + c)
        put(hf_cache, repo, f"{folder}/cfg.json", json.dumps(cfg).encode())
        put(hf_cache, repo, f"{folder}/sae_weights.safetensors", safetensors_bytes(w))
    saes = load_saes("saelens:pythia-70m-deduped-res-sm", model,
                     sae_ids=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"])  # fmt: skip
    assert saes.checkpoints == (0, 1)
    assert saes[1].neuronpedia_id == "pythia-70m-deduped/0-res-sm" and saes[1].conventions == ()
    assert saes[1].prepend_bos is True  # pre-6 configs default to BOS, as SAELens reads them
    tracer = Tracer(model, saes)
    traced = tracer.run(random_prompt(10, 3))
    for c, w in weights.items():
        resid = traced.trace.resid[c]
        by_hand = relu((f64(resid) - f64(w["b_dec"])) @ f64(w["W_enc"]) + f64(w["b_enc"]))
        np.testing.assert_allclose(f64(saes[c].encode(resid)), by_hand, rtol=1e-5, atol=1e-5)
        assert_decomposition_exact(saes[c], resid)
    assert_qk_exact(tracer, [0, 1])


# ---------------------------------------------------------------------------------------------- registry


def test_release_entries_come_from_sae_lens_yaml_when_installed(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models
) -> None:
    """A stand-in sae_lens package (never imported) whose pretrained_saes.yaml defines a new release."""
    site = tmp_path / "site"
    (site / "sae_lens").mkdir(parents=True)
    (site / "sae_lens" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (site / "sae_lens" / "pretrained_saes.yaml").write_text(
        "my-tiny-release:\n"
        "  conversion_func: null\n"
        "  model: tiny-gpt2\n"
        "  repo_id: me/tiny-saes\n"
        "  config_overrides:\n"
        "    model_from_pretrained_kwargs:\n"
        "      center_writing_weights: true\n"
        "  saes:\n"
        "  - id: first\n"
        "    path: sub/blocks.1.hook_resid_pre\n"
        "    neuronpedia: tiny-gpt2/1-test\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "sae_lens", raising=False)  # the real one may be imported: find the stand-in
    release = find_release("my-tiny-release")
    assert release is not None and release.origin.endswith("pretrained_saes.yaml")
    assert find_release("gpt2-small-res-jb") is not None  # not in that yaml: qktrace's registry fills in
    model = tiny_models["gpt2"]
    w = rand_sae(model.d_model, seed=40)
    cfg = {"architecture": "standard", "d_in": model.d_model, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0",
           "hook_name": "blocks.1.hook_resid_pre"}}  # fmt: skip
    put(hf_cache, "me/tiny-saes", "sub/blocks.1.hook_resid_pre/cfg.json", json.dumps(cfg).encode())
    put(hf_cache, "me/tiny-saes", "sub/blocks.1.hook_resid_pre/sae_weights.safetensors", safetensors_bytes(w))
    sae = load_saes("saelens:my-tiny-release", model, sae_ids=["first"])[1]
    assert sae.conventions == ("centred residual",) and sae.neuronpedia_id == "tiny-gpt2/1-test"
    assert sae.prepend_bos is None  # a v6 config that does not say


def test_release_errors_are_one_line(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["gpt2"]
    with pytest.raises(SAELoadError) as e:
        load_saes("saelens:gpt2-small-res-jb", model, sae_ids=["blocks.99.hook_resid_pre"])
    msg = str(e.value)
    assert "\n" not in msg and "has no SAE 'blocks.99.hook_resid_pre'" in msg and "blocks.0.hook_resid_pre" in msg
    with pytest.raises(SAELoadError) as e:  # a known id, but nothing cached and the hub is offline
        load_saes("saelens:gpt2-small-res-jb", model, sae_ids=["blocks.0.hook_resid_pre"])
    msg = str(e.value)
    assert "\n" not in msg and "jbloom/GPT2-Small-SAEs-Reformatted/blocks.0.hook_resid_pre/cfg.json" in msg
    assert "not in the Hugging Face cache" in msg
    put_jb(hf_cache, model.d_model, [5])  # cached, but the tiny model has 2 layers
    with pytest.raises(Exception) as e:
        load_saes("saelens:gpt2-small-res-jb", model, sae_ids=["blocks.5.hook_resid_pre"])
    assert "checkpoint 5" in str(e.value) and "\n" not in str(e.value)


def test_hf_repo_id_as_release(hf_cache: Path, tiny_models) -> None:
    model = tiny_models["gpt2"]
    put_jb(hf_cache, model.d_model, [1])
    sae = load_saes("saelens:jbloom/GPT2-Small-SAEs-Reformatted", model, sae_ids=["blocks.1.hook_resid_pre"])[1]
    # the repo id alone carries no release conventions (as in SAELens): no centring
    assert sae.conventions == () and sae.hook_name == "blocks.1.hook_resid_pre"


def test_release_scale_and_centring_together(hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """expected_average_only_in with the release's norm_scaling_factor, on a centred release."""
    site = tmp_path / "site"
    (site / "sae_lens").mkdir(parents=True)
    (site / "sae_lens" / "__init__.py").write_text("")
    (site / "sae_lens" / "pretrained_saes.yaml").write_text(
        "scaled-release:\n  repo_id: me/scaled\n  model: tiny\n  conversion_func: null\n"
        "  config_overrides:\n    model_from_pretrained_kwargs:\n      center_writing_weights: true\n"
        "  saes:\n  - id: a\n    path: a\n    norm_scaling_factor: 3.5\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "sae_lens", raising=False)  # the real one may be imported: find the stand-in
    g = torch.Generator().manual_seed(4)
    d = 8
    w = {"W_enc": torch.randn(d, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
         "W_dec": torch.randn(D_SAE, d, generator=g), "b_dec": torch.randn(d, generator=g) + 0.5}  # fmt: skip
    model = SimpleNamespace(d_model=d, n_layers=4, name="tiny")  # says nothing of its norm: centring applies
    cfg = {"architecture": "standard", "d_in": d, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "expected_average_only_in",
           "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.2.hook_resid_pre"}}  # fmt: skip
    put(hf_cache, "me/scaled", "a/cfg.json", json.dumps(cfg).encode())
    put(hf_cache, "me/scaled", "a/sae_weights.safetensors", safetensors_bytes(w))
    sae = load_saes("saelens:scaled-release", model, sae_ids=["a"])[2]
    assert sae.conventions == ("centred residual", "input scale 3.5")
    s, scale = {k: v.double() for k, v in w.items()}, 3.5
    X = torch.randn(7, d, generator=torch.Generator().manual_seed(99)).double() * 2 + 0.7
    centred = X - X.mean(-1, keepdim=True)
    acts = ((scale * centred - s["b_dec"]) @ s["W_enc"] + s["b_enc"]).relu()  # SAELens: scale, then subtract b_dec
    recon = (acts @ s["W_dec"] + s["b_dec"]) / scale  # back to residual units
    torch.testing.assert_close(sae.encode(X).double(), acts, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(X)).double(), recon, atol=1e-4, rtol=1e-5)
    assert int((acts > 0).sum()) > 0
