"""Bad SAE files are refused at load with one line naming the file and the key or tensor (issue 12)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qktrace.errors import QKTraceError, SAELoadError
from qktrace.saes import load_saes

D, D_SAE = 8, 16
MODEL = SimpleNamespace(d_model=D, n_layers=4, name="tiny")


def weights(seed: int = 0, threshold: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    if threshold:
        w["threshold"] = torch.rand(D_SAE, generator=g)
    return w


def cfg(**over) -> dict:
    base = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": D_SAE,
        "k": 4,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.1.hook_resid_pre"},
    }
    return base | over


def sae_dir(root: Path, config: dict, w: dict[str, torch.Tensor] | None = None, name: str = "s") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(w if w is not None else weights(threshold=config.get("architecture") == "jumprelu"),
              str(folder / "sae_weights.safetensors"))  # fmt: skip
    return folder


def refused(path: Path, *needles: str, error: type[QKTraceError] = SAELoadError) -> str:
    with pytest.raises(error) as e:
        load_saes(path, MODEL)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_a_good_file_loads(tmp_path: Path) -> None:
    assert load_saes(sae_dir(tmp_path, cfg()), MODEL).checkpoints == (1,)  # the fixtures below differ in one thing


# ---------------------------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("tensor", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_safetensors_weights(tmp_path: Path, tensor: str, bad: float) -> None:
    w = weights(threshold=True)
    w[tensor][0] = bad
    folder = sae_dir(tmp_path, cfg(architecture="jumprelu"), w)
    refused(folder, str(folder / "sae_weights.safetensors"), f"'{tensor}'", "NaN or infinite")


def test_non_finite_npz_and_llama_scope_weights(tmp_path: Path) -> None:
    w = {k: v.numpy().copy() for k, v in weights(threshold=True).items()}
    w["threshold"][3] = np.nan
    npz = tmp_path / "layer_1" / "width_16k" / "average_l0_5" / "params.npz"
    npz.parent.mkdir(parents=True)
    np.savez(npz, **w)
    refused(npz, str(npz), "'threshold'", "NaN or infinite")

    folder = llama_scope_dir(tmp_path)
    raw = llama_scope_weights()
    raw["encoder.weight"][2, 2] = math.inf
    save_file(raw, str(folder / "checkpoints" / "final.safetensors"))
    refused(folder, str(folder / "checkpoints" / "final.safetensors"), "'encoder.weight'")


# ---------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("apply_b_dec_to_input", "false", "true or false"),
        ("apply_b_dec_to_input", 0, "true or false"),
        ("d_sae", "16", "an integer"),
        ("d_sae", 16.0, "an integer"),
        ("d_in", None, None),  # null is allowed (unknown), not an error: handled below
        ("k", "4", "an integer"),
        ("k", 2.5, "an integer"),
        ("k", True, "an integer"),
        ("architecture", ["topk"], "a string"),
        ("normalize_activations", 3, "a string"),
        ("metadata", ["blocks.1.hook_resid_pre"], "an object"),
    ],
)
def test_wrong_typed_config_values(tmp_path: Path, key: str, value, expected: str | None) -> None:
    folder = sae_dir(tmp_path, cfg(**{key: value}))
    if expected is None:
        assert load_saes(folder, MODEL).checkpoints == (1,)
        return
    msg = refused(folder, str(folder / "cfg.json"), key, repr(value)[:20], expected)
    assert type(value).__name__ in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hook_name", 3, "a string"),
        ("prepend_bos", "yes", "true or false"),
        ("context_size", "128", "an integer"),
        ("model_name", 7, "a string"),
        ("model_from_pretrained_kwargs", {"center_writing_weights": "true"}, "true or false"),
        ("model_from_pretrained_kwargs", "center", "an object"),
    ],
)
def test_wrong_typed_metadata_values(tmp_path: Path, key: str, value, expected: str) -> None:
    folder = sae_dir(tmp_path, cfg(metadata={"sae_lens_version": "6.1.0", "hook_name": "blocks.1.hook_resid_pre",
                                             key: value}))  # fmt: skip
    refused(folder, str(folder / "cfg.json"), key, expected)


def test_pre_v6_config_types_are_checked_too(tmp_path: Path) -> None:
    flat = {"d_in": D, "d_sae": D_SAE, "hook_point": "blocks.1.hook_resid_pre", "apply_b_dec_to_input": "False"}
    folder = sae_dir(tmp_path, flat)
    refused(folder, "apply_b_dec_to_input", "'False'", "true or false")


# ---------------------------------------------------------------------------------------------- truncated


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    folder = sae_dir(tmp_path, cfg(), name="cut")
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) - 40])
    refused(folder, str(folder / "sae_weights.safetensors"), "tensor 'b_enc' is stated as F32 of shape", "cut short")

    deep = sae_dir(tmp_path, cfg(), name="deep")
    (deep / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(deep, str(deep / "cfg.json"))

    folder = llama_scope_dir(tmp_path / "ls1")
    (folder / "hyperparams.json").write_text('{"d_model": 8, "d_sae"')
    refused(folder, str(folder / "hyperparams.json"))
    folder = llama_scope_dir(tmp_path / "ls2")
    ckpt = folder / "checkpoints" / "final.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    refused(folder, str(ckpt))

    npz = tmp_path / "layer_0" / "params.npz"
    npz.parent.mkdir()
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in weights(threshold=True).items()})
    npz.write_bytes(buf.getvalue()[:-30])
    refused(npz, str(npz), "npz")


# ---------------------------------------------------------------------------------------------- absurd values


@pytest.mark.parametrize("k", [0, -3, D_SAE + 1])
def test_absurd_topk_k(tmp_path: Path, k: int) -> None:
    folder = sae_dir(tmp_path, cfg(k=k))
    refused(folder, str(folder / "cfg.json"), f"k is {k}", f"d_sae={D_SAE}")


def test_absurd_jumprelu_threshold_and_sizes(tmp_path: Path) -> None:
    w = weights(threshold=True)
    w["threshold"][5] = -0.5
    folder = sae_dir(tmp_path, cfg(architecture="jumprelu"), w, name="neg")
    refused(folder, str(folder / "cfg.json"), "negative jumprelu threshold", "log_threshold")
    folder = sae_dir(tmp_path, cfg(d_sae=D_SAE * 2), name="dsae")
    refused(folder, str(folder / "cfg.json"), f"d_sae is {2 * D_SAE}", f"[{D}, {D_SAE}]")
    folder = sae_dir(tmp_path, cfg(metadata={"hook_name": "blocks.1.hook_resid_pre", "context_size": 0}), name="ctx")
    refused(folder, "context_size is 0")
    folder = llama_scope_dir(tmp_path / "ls", threshold=-0.1)
    refused(folder, "jump_relu_threshold=-0.1")
    folder = llama_scope_dir(tmp_path / "ls0", norm_in=0.0)
    refused(folder, "dataset_average_activation_norm.in=0.0")


# ---------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm", "covariance_whitening"])
def test_per_token_normalisations_are_refused(tmp_path: Path, norm: str) -> None:
    folder = sae_dir(tmp_path, cfg(normalize_activations=norm))
    refused(folder, str(folder / "cfg.json"), f"normalize_activations='{norm}'", "cannot be folded", "'none'")


def test_unknown_or_unfoldable_normalisation(tmp_path: Path) -> None:
    folder = sae_dir(tmp_path, cfg(normalize_activations="sqrt_everything"), name="unknown")
    refused(folder, "'sqrt_everything'", "does not know")
    folder = sae_dir(tmp_path, cfg(normalize_activations="expected_average_only_in"), name="nofactor")
    refused(folder, str(folder / "cfg.json"), "no scaling factor is known", "saelens:RELEASE")
    flat = {"d_in": D, "d_sae": D_SAE, "hook_point": "blocks.1.hook_resid_pre", "normalize_activations": True}
    folder = sae_dir(tmp_path, flat, name="oldbool")  # pre-6 True means expected_average_only_in
    refused(folder, "expected_average_only_in", "no scaling factor")


def test_non_residual_hooks_and_transcoders(tmp_path: Path) -> None:
    folder = sae_dir(tmp_path, cfg(metadata={"hook_name": "blocks.1.hook_mlp_out"}), name="mlp")
    with pytest.raises(QKTraceError) as e:
        load_saes(folder, MODEL)
    assert "blocks.1.hook_mlp_out" in str(e.value) and "residual" in str(e.value)
    folder = sae_dir(tmp_path, cfg(metadata={"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 2}), name="z")
    refused(folder, "hook_head_index")
    folder = llama_scope_dir(tmp_path / "tc", hook_out="blocks.1.hook_mlp_out")
    refused(folder, "transcoder")
    npz = tmp_path / "gemma" / "embedding" / "width_4k" / "average_l0_6" / "params.npz"
    npz.parent.mkdir(parents=True)
    np.savez(npz, **{k: v.numpy() for k, v in weights(threshold=True).items()})
    with pytest.raises(QKTraceError) as e:
        load_saes(npz, MODEL)
    assert "hook_embed" in str(e.value) and "residual" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- Llama Scope helpers


def llama_scope_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(D_SAE, D, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "decoder.weight": torch.randn(D, D_SAE, generator=g),
        "decoder.bias": torch.randn(D, generator=g),
    }


def llama_scope_dir(root: Path, threshold: float = 0.1, norm_in: float = 2.0, hook_out: str | None = None) -> Path:
    folder = root / "Llama3_1-8B-Base-L1R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    hp = {
        "d_model": D,
        "d_sae": D_SAE,
        "hook_point_in": "blocks.1.hook_resid_post",
        "hook_point_out": hook_out or "blocks.1.hook_resid_post",
        "act_fn": "jumprelu",
        "jump_relu_threshold": threshold,
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_in},
    }
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    save_file(llama_scope_weights(), str(folder / "checkpoints" / "final.safetensors"))
    return folder


def test_local_llama_scope_folder_reads_its_own_norm(tmp_path: Path) -> None:
    folder = llama_scope_dir(tmp_path, threshold=0.1, norm_in=2.0)
    sae = load_saes(folder, MODEL)[2]  # resid_post of layer 1
    s = math.sqrt(D) / 2.0  # no release entry: the factor comes from hyperparams.json
    raw = llama_scope_weights()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5)).double()
    pre = (s * x) @ raw["encoder.weight"].double().T + raw["encoder.bias"].double()
    by_hand = pre.relu() * (pre > 0.1 * s)
    torch.testing.assert_close(sae.encode(x).double(), by_hand, atol=1e-5, rtol=1e-5)
    assert sae.conventions == (f"input scale {s:.6g}",) and int((by_hand > 0).sum()) > 0
