"""SAEs qktrace writes are SAELens v6 folders: metadata intact, identical encodings after a round trip."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from qktrace.config import DEMO_SAES
from qktrace.saes import load_saes, save_sae_lens
from qktrace.testing import random_sae

D, D_SAE = 8, 32
MODEL = SimpleNamespace(d_model=D, n_layers=4, name="tiny")


# make_sae(architecture, seed=..., **fields): this module's random SAEs, at checkpoint 2
make_sae = functools.partial(
    random_sae, d_model=D, d_sae=D_SAE, hook_name="blocks.1.hook_resid_post", std=(1.0, 0.5, 1.0, 0.3), k=5,
    apply_b_dec_to_input=True,
)  # fmt: skip


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_written_config_is_sae_lens_v6_and_reads_back(tmp_path: Path, arch: str) -> None:
    meta = dict(model_name="tiny-gpt2", prepend_bos=False, context_size=64, neuronpedia_id="tiny/1-x")
    sae = make_sae(arch, apply_b_dec_to_input=arch != "jumprelu", labels={3: "cats"}, **meta)
    folder = save_sae_lens(sae, tmp_path / "s")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "labels.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    # SAELens >= 6 reads a config as v6 (hook_name kept in metadata) iff this holds
    assert Version(cfg["metadata"]["sae_lens_version"]) >= Version("6.0.0-rc.0")
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["hook_head_index"] is None
    assert {k: cfg["metadata"][k] for k in meta} == meta
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (arch, D, D_SAE, "none")
    assert cfg["apply_b_dec_to_input"] is sae.apply_b_dec_to_input
    assert cfg.get("k") == sae.k and ("k" in cfg) == (arch == "topk")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if sae.threshold is not None:
        assert torch.equal(tensors["threshold"], sae.threshold)

    back = load_saes(folder, MODEL)[2]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert (back.architecture, back.k, back.hook_name, back.apply_b_dec_to_input) == (
        sae.architecture,
        sae.k,
        sae.hook_name,
        sae.apply_b_dec_to_input,
    )
    assert {k: getattr(back, k) for k in meta} == meta and dict(back.labels) == {3: "cats"}
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(1)) * 2
    assert torch.equal(back.encode(x), sae.encode(x)) and int((sae.encode(x) > 0).sum()) > 0


def test_folded_conventions_survive_a_round_trip(tmp_path: Path) -> None:
    """A centred SAE written back out reads the raw residual: the same encodings, without folding twice."""
    ref = make_sae("standard", seed=4)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "metadata": {"sae_lens_version": "6.2.0", "hook_name": "blocks.1.hook_resid_post",
                        "model_from_pretrained_kwargs": {"center_writing_weights": True}}}  # fmt: skip
    src = tmp_path / "centred"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: getattr(ref, n).contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(src / "sae_weights.safetensors"))  # fmt: skip
    folded = load_saes(src, MODEL)[2]
    assert folded.conventions == ("centred residual",)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(2)) * 2 + 1.5
    by_hand = ((x - x.mean(-1, keepdim=True) - ref.b_dec) @ ref.W_enc + ref.b_enc).relu()
    torch.testing.assert_close(folded.encode(x), by_hand, atol=1e-5, rtol=1e-5)
    out = save_sae_lens(folded, tmp_path / "out")
    written = json.loads((out / "cfg.json").read_text())["metadata"]
    assert "model_from_pretrained_kwargs" not in written
    assert written["qktrace_folded_conventions"] == ["centred residual"]
    again = load_saes(out, MODEL)[2]
    assert again.conventions == () and torch.equal(again.encode(x), folded.encode(x))


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save_sae_lens(make_sae("topk", seed=1), tmp_path / "s")
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def fail(src, dst):  # killed between writing the temp file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        save_sae_lens(make_sae("topk", seed=2), tmp_path / "s")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # old files intact, no temp left over


def test_sae_lens_itself_reads_what_we_write(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    for arch in ("standard", "jumprelu", "topk"):
        sae = make_sae(arch, seed=3, apply_b_dec_to_input=arch == "topk")
        theirs = sae_lens.SAE.load_from_disk(str(save_sae_lens(sae, tmp_path / arch)))
        assert theirs.cfg.metadata.hook_name == sae.hook_name and theirs.cfg.architecture() == arch
        x = torch.randn(7, D, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-6, rtol=1e-6)


def test_demo_configs_are_v6_with_metadata() -> None:
    demo = SimpleNamespace(d_model=192, n_layers=4, name="demo")
    saes = load_saes(DEMO_SAES, demo)
    assert saes.checkpoints == (0, 1, 2, 3, 4)
    for sae in saes.values():
        cfg = json.loads((Path(sae.source) / "cfg.json").read_text())
        meta = cfg["metadata"]
        assert Version(meta["sae_lens_version"]) >= Version("6.0.0-rc.0")
        assert meta["hook_name"] == Path(sae.source).name == sae.hook_name
        assert (meta["model_name"], meta["prepend_bos"], meta["context_size"]) == ("qktrace-demo", True, 128)
        assert (cfg["architecture"], cfg["k"]) == ("topk", 24)
        assert (sae.prepend_bos, sae.context_size, sae.model_name) == (True, 128, "qktrace-demo")
    assert saes.prepend_bos is True and saes.context_size == 128
    # the config carries what save_sae_lens writes for the same SAE, so a re-export is a no-op
    sae = saes[0]
    from qktrace.saes import sae_lens_config

    assert sae_lens_config(dataclasses.replace(sae)) == json.loads((Path(sae.source) / "cfg.json").read_text())
