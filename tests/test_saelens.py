"""SAELens itself, both ways: SAEs qktrace writes load in SAELens with the same encodings, SAEs SAELens writes
load in qktrace with the same encodings, and a release of SAELens's own pretrained_saes.yaml resolves through
qktrace's registry reader. Each side encodes with its own code: SAELens's `SAE.encode`, qktrace's `SAE.encode`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qktrace.saes import ARCHITECTURES, find_release, save_sae_lens
from qktrace.saes.formats import read_sae_lens_dir
from qktrace.saes.load import build_sae
from qktrace.testing import random_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the dev extra: pip install -e '.[dev]'")

D_MODEL, D_SAE = 16, 40


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(7, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_saes_qktrace_writes_load_in_saelens(tmp_path: Path, architecture: str, b_dec_in: bool) -> None:
    ours = random_sae(
        architecture, D_MODEL, D_SAE, seed=3, hook_name="blocks.2.hook_resid_pre", apply_b_dec_to_input=b_dec_in
    )
    folder = save_sae_lens(ours, tmp_path / architecture)
    theirs = sae_lens.SAE.load_from_disk(folder, device="cpu")
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert theirs.cfg.d_in == D_MODEL and theirs.cfg.d_sae == D_SAE
    x = _inputs(0)
    with torch.no_grad():
        expected = theirs.encode(x)
        got = ours.encode(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got > 0).sum() > 0  # some feature is active: the comparison is not of two zero tensors
        torch.testing.assert_close(ours.decode(got), theirs.decode(expected), rtol=1e-5, atol=1e-5)


def _saelens_sae(architecture: str, b_dec_in: bool):  # type: ignore[no-untyped-def]
    """A SAELens SAE of `architecture` with random weights, built by SAELens's own classes."""
    common = dict(d_in=D_MODEL, d_sae=D_SAE, apply_b_dec_to_input=b_dec_in, dtype="float32", device="cpu")
    config = {
        "standard": lambda: sae_lens.StandardSAEConfig(**common),
        "jumprelu": lambda: sae_lens.JumpReLUSAEConfig(**common),
        "topk": lambda: sae_lens.TopKSAEConfig(k=5, **common),
    }[architecture]()
    config.metadata.hook_name = "blocks.1.hook_resid_pre"
    sae = sae_lens.SAE.from_dict(config.to_dict())
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name != "threshold" else 0.2))
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_saes_saelens_writes_load_in_qktrace(tmp_path: Path, architecture: str, b_dec_in: bool) -> None:
    theirs = _saelens_sae(architecture, b_dec_in)
    theirs.save_model(tmp_path / "sae")
    ours = build_sae(read_sae_lens_dir(tmp_path / "sae"), None, "cpu", torch.float32)
    assert ours.architecture == architecture and ours.checkpoint == 1
    x = _inputs(1)
    with torch.no_grad():
        expected = theirs.encode(x)
        got = ours.encode(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got > 0).sum() > 0
        torch.testing.assert_close(ours.decode(got), theirs.decode(expected), rtol=1e-5, atol=1e-5)


def test_a_saelens_release_resolves_through_its_own_registry() -> None:
    """An entry of the installed SAELens's pretrained_saes.yaml (read here with yaml, independently) is what
    qktrace resolves for that release: the same repository and the same SAE ids and paths."""
    import yaml

    path = Path(sae_lens.__file__).parent / "pretrained_saes.yaml"
    entries = yaml.safe_load(path.read_text())
    name = "gpt2-small-res-jb"
    entry = entries[name]
    release = find_release(name)
    assert release is not None and release.repo_id == entry["repo_id"]
    ids = {s["id"]: s["path"] for s in entry["saes"]}
    assert {k: release.saes[k]["path"] for k in ids} == ids
    assert release.origin == str(path)
