"""The fixtures themselves: one builder of random SAEs for every architecture, a reference independent of
qktrace's capture code, and test modules that share setups only through qktrace.testing and conftest.py."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from qktrace import testing
from qktrace.saes import ARCHITECTURES
from qktrace.testing import random_sae, random_saes

TESTS = Path(__file__).parent


def test_no_test_module_imports_another():
    local = {p.stem for p in TESTS.glob("*.py")} | {"tests"}
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["." + (node.module or "")]
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in local or n.startswith(".")]
    assert not found, "shared helpers belong in qktrace.testing or conftest.py: " + ", ".join(found)


def test_hf_reference_is_independent_of_qktrace():
    """hf_attention names nothing qktrace defines (no capture hooks, no anatomy): only torch and the HF model."""
    tree = ast.parse(inspect.getsource(testing))
    from_qktrace = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.level for a in n.names}
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "hf_attention")
    names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    assert from_qktrace and not names & from_qktrace, names & from_qktrace
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(fn))
    assert {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)} >= {"hf", "attn_modules", "softmax"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_sae_of_every_architecture(arch):
    sae = random_sae(arch, 8, 16, seed=1, hook_name="blocks.1.hook_resid_post")
    assert (sae.architecture, sae.checkpoint, sae.d_model, sae.d_sae) == (arch, 2, 8, 16)
    assert (sae.threshold is not None) == (arch == "jumprelu") and (sae.k == 6) == (arch == "topk")
    assert torch.equal(sae.W_enc, random_sae(arch, 8, 16, seed=1).W_enc)
    assert not torch.equal(sae.W_enc, random_sae(arch, 8, 16, seed=2).W_enc)
    acts = sae.encode(torch.randn(5, 8, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu"))
    assert acts.shape == (5, 16) and bool((acts >= 0).all()) and bool((acts > 0).any())


def test_random_sae_scales_tied_weights_and_overrides():
    big = random_sae("standard", 64, 512, std=(1.0, 0.5, 0.25, 2.0))
    for t, s in ((big.W_enc, 1.0), (big.b_enc, 0.5), (big.W_dec, 0.25), (big.b_dec, 2.0)):
        assert abs(float(t.std()) / s - 1) < 0.15
    tied = random_sae("topk", 8, 16, std=(1.0, 0.0, 0.3, 0.0), tied=True, b_enc=torch.ones(16))
    assert torch.allclose(tied.W_dec, 0.3 * tied.W_enc.T) and torch.equal(tied.b_enc, torch.ones(16))
    assert not tied.apply_b_dec_to_input and tied.b_dec.abs().max() == 0


def test_random_saes_follow_the_model(tiny_models):
    model = tiny_models["llama"]
    saes = random_saes(model, "jumprelu", d_sae=20, seed=3, dtype=torch.float64)
    assert saes.checkpoints == tuple(range(model.n_layers + 1))
    assert all(s.checkpoint == c and s.W_dec.dtype == torch.float64 for c, s in saes.items())
    assert not torch.equal(saes[0].W_enc, saes[1].W_enc)  # one generator, drawn one after another
    assert random_saes(model, "topk", checkpoints=[1, 2]).checkpoints == (1, 2)
