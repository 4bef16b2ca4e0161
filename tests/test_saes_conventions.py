"""Each foldable convention gives the release's own activations and reconstruction, written out by hand."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from qktrace.saes import load_saes

D, D_SAE = 8, 24
MODEL = SimpleNamespace(d_model=D, n_layers=4, name="tiny")  # says nothing of its norm: centring applies


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, D_SAE, generator=g).double(),
        "b_enc": torch.randn(D_SAE, generator=g).double() * 0.3,
        "W_dec": torch.randn(D_SAE, D, generator=g).double() * (torch.rand(D_SAE, 1, generator=g).double() + 0.2),
        "b_dec": torch.randn(D, generator=g).double() + 0.5,
    }


def write(folder: Path, cfg: dict, w: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.float().contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def as_stored(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float().double() for k, v in w.items()}  # what the float32 file holds, in float64


X = torch.randn(7, D, generator=torch.Generator().manual_seed(99)).double() * 2 + 0.7


def test_topk_rescale_acts_by_decoder_norm(tmp_path: Path) -> None:
    w = weights(1)
    cfg = {"architecture": "topk", "d_in": D, "d_sae": D_SAE, "k": 4, "apply_b_dec_to_input": True,
           "rescale_acts_by_decoder_norm": True,
           "metadata": {"sae_lens_version": "6.3.0", "hook_name": "blocks.0.hook_resid_pre"}}  # fmt: skip
    sae = load_saes(write(tmp_path / "s", cfg, w), MODEL)[0]
    s = as_stored(w)
    n = s["W_dec"].norm(dim=-1)
    pre = ((X - s["b_dec"]) @ s["W_enc"] + s["b_enc"]) * n  # SAELens TopK: pre-activations times |W_dec[i]|
    top = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    recon = (acts / n) @ s["W_dec"] + s["b_dec"]
    got = sae.encode(X)
    torch.testing.assert_close(got.double(), acts, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.decode(got).double(), recon, atol=1e-4, rtol=1e-5)
    assert sae.conventions == ("decoder-norm rescaling",)
    plain = (pre / n).topk(4, dim=-1)  # the same SAE without the convention
    assert not torch.allclose(acts, torch.zeros_like(pre).scatter(-1, plain.indices, plain.values.relu()))


def test_finetuning_scaling_factor(tmp_path: Path) -> None:
    w = weights(2)
    f = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)).double() + 0.5
    cfg = {"d_in": D, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_pre", "finetuning_scaling_factor": True}
    sae = load_saes(write(tmp_path / "s", cfg, w | {"scaling_factor": f}), MODEL)[0]
    s = as_stored(w)
    acts = ((X - s["b_dec"]) @ s["W_enc"] + s["b_enc"]).relu()  # encode ignores the factor
    recon = (acts * f.float().double()) @ s["W_dec"] + s["b_dec"]  # decode multiplies by it
    torch.testing.assert_close(sae.encode(X).double(), acts, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(X)).double(), recon, atol=1e-4, rtol=1e-5)
    ones = write(
        tmp_path / "ones", {**cfg, "finetuning_scaling_factor": False}, w | {"scaling_factor": torch.ones(D_SAE)}
    )
    assert load_saes(ones, MODEL)[0].conventions == ()  # an all-ones factor is dropped, as SAELens does
    with pytest.raises(Exception, match="finetuning_scaling_factor is not true"):
        load_saes(
            write(tmp_path / "bad", {**cfg, "finetuning_scaling_factor": False}, w | {"scaling_factor": f}), MODEL
        )
