"""qktrace.saes: loading SAELens / Gemma Scope files, encoder semantics, exact feature decomposition."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qktrace.errors import OutOfRangeError, SAELoadError, SAEMismatchError
from qktrace.saes import SAE, SAESet, hook_checkpoint, load_saes, save_sae_lens
from qktrace.testing import random_sae

D_MODEL, D_SAE, N_LAYERS, K = 8, 32, 4, 5
MODEL = SimpleNamespace(d_model=D_MODEL, n_layers=N_LAYERS, name="tiny")


# make_sae(architecture, seed=..., hook_name=..., **fields): this module's random SAEs
make_sae = functools.partial(
    random_sae, d_model=D_MODEL, d_sae=D_SAE, hook_name="blocks.2.hook_resid_pre", std=(1.0, 0.5, 1.0, 0.3), k=K,
    apply_b_dec_to_input=True,
)  # fmt: skip


def reference_encode(sae: SAE, x: torch.Tensor) -> np.ndarray:
    """Float64 numpy transcription of the SAELens / Gemma Scope encoders."""
    W_enc, b_enc, b_dec = (t.double().numpy() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    xs = x.double().numpy()
    if sae.apply_b_dec_to_input:
        xs = xs - b_dec
    pre = xs @ W_enc + b_enc  # [pos, d_sae]
    if sae.architecture == "standard":
        return np.maximum(pre, 0.0)
    if sae.architecture == "jumprelu":
        assert sae.threshold is not None
        return np.where(pre > sae.threshold.double().numpy(), np.maximum(pre, 0.0), 0.0)
    out = np.zeros_like(pre)
    for p in range(pre.shape[0]):
        top = np.argsort(-pre[p])[: sae.k]
        out[p, top] = np.maximum(pre[p, top], 0.0)
    return out


def one_line(exc: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def assert_same_weights(a: SAE, b: SAE) -> None:
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.threshold is None) == (b.threshold is None)
    if a.threshold is not None:
        assert b.threshold is not None and torch.equal(a.threshold, b.threshold)


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_save_load_roundtrip_and_encode_matches_reference(tmp_path: Path, arch: str, apply_b_dec: bool) -> None:
    sae = make_sae(arch, apply_b_dec_to_input=apply_b_dec)
    folder = save_sae_lens(sae, tmp_path / "blocks.2.hook_resid_pre")
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == D_MODEL and cfg["d_sae"] == D_SAE
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_pre"

    saes = load_saes(folder, MODEL)
    assert saes.checkpoints == (2,)
    got = saes[2]
    assert_same_weights(sae, got)
    assert (got.architecture, got.k, got.apply_b_dec_to_input) == (arch, sae.k, apply_b_dec)
    assert (got.d_model, got.d_sae) == (D_MODEL, D_SAE)
    assert got.hook_name == "blocks.2.hook_resid_pre" and got.source == str(folder)

    x = torch.randn(7, D_MODEL, generator=torch.Generator().manual_seed(1)) * 2
    acts = got.encode(x)
    assert acts.shape == (7, D_SAE) and bool((acts >= 0).all())
    np.testing.assert_allclose(acts.double().numpy(), reference_encode(sae, x), atol=1e-5)
    assert int((acts > 0).sum()) > 0  # the reference comparison is not vacuous
    np.testing.assert_allclose(got.decode(acts).numpy(), (acts @ sae.W_dec + sae.b_dec).numpy(), atol=1e-6)


def test_encode_by_hand_numbers() -> None:
    # d_model=2, d_sae=3: pre = (x - b_dec) @ W_enc + b_enc, with W_enc picking x0, x1, x0 + x1
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    kw = dict(
        W_enc=W_enc,
        b_enc=torch.tensor([0.0, 0.0, -1.0]),
        W_dec=W_enc.T.clone(),
        b_dec=torch.tensor([1.0, 0.0]),
    )
    # x - b_dec = [[2, -2], [0.5, 0.25]] -> pre = [[2, -2, -1], [0.5, 0.25, -0.25]]
    x = torch.tensor([[3.0, -2.0], [1.5, 0.25]])
    std = SAE(0, "standard", **kw)
    assert std.encode(x).tolist() == [[2.0, 0.0, 0.0], [0.5, 0.25, 0.0]]
    jump = SAE(0, "jumprelu", threshold=torch.tensor([1.0, 0.1, 0.0]), **kw)
    assert jump.encode(x).tolist() == [[2.0, 0.0, 0.0], [0.0, 0.25, 0.0]]
    top1 = SAE(0, "topk", k=1, **kw)
    assert top1.encode(x).tolist() == [[2.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
    top2 = SAE(0, "topk", k=2, **kw)  # row 0: the 2nd largest pre is -1 -> relu'd to 0
    assert top2.encode(x).tolist() == [[2.0, 0.0, 0.0], [0.5, 0.25, 0.0]]
    no_bdec = SAE(0, "standard", apply_b_dec_to_input=False, **kw)  # pre = [[3, -2, 0], [1.5, 0.25, 0.75]]
    assert no_bdec.encode(x).tolist() == [[3.0, 0.0, 0.0], [1.5, 0.25, 0.75]]
    assert std.decode(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[5.0, 5.0]]  # [4, 5] + b_dec [1, 0]


def test_topk_keeps_exactly_k_when_all_pre_positive() -> None:
    sae = make_sae("topk")
    sae = dataclasses.replace(sae, b_enc=torch.full((D_SAE,), 100.0))  # every pre-activation > 0
    acts = sae.encode(torch.randn(9, D_MODEL, generator=torch.Generator().manual_seed(2)))
    assert (acts > 0).sum(-1).tolist() == [K] * 9
    # and never more than k when most pre-activations are negative
    neg = dataclasses.replace(sae, b_enc=torch.full((D_SAE,), -3.0))
    assert int((neg.encode(torch.randn(9, D_MODEL)) > 0).sum(-1).max()) <= K


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_sparse_decomposition_is_exact(arch: str) -> None:
    sae = make_sae(arch, seed=3)
    resid = torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(4)) * 3
    fa = sae.sparse(resid)
    dense = sae.encode(resid)
    assert fa.pos.dtype == torch.long and fa.feature.dtype == torch.long
    assert len(fa.act) == int((dense != 0).sum()) > 0
    order = (fa.pos * D_SAE + fa.feature).tolist()
    assert order == sorted(order)  # sorted by pos, then feature
    assert torch.equal(fa.act, dense[fa.pos, fa.feature]) and bool((fa.act > 0).all())
    torch.testing.assert_close(resid - fa.error, sae.decode(dense))
    for p in range(6):
        feats, acts = fa.at(p)
        rebuilt = (acts[:, None] * sae.W_dec[feats]).sum(0) + sae.b_dec + fa.error[p]
        torch.testing.assert_close(rebuilt, resid[p], atol=1e-5, rtol=0)
        assert torch.equal(feats, dense[p].nonzero().flatten())
    assert all(torch.equal(a, b) for a, b in zip(fa.at(-1), fa.at(5)))
    chunked = sae.sparse(resid, chunk=4)  # long prompts are encoded a few positions at a time
    assert torch.equal(chunked.pos, fa.pos) and torch.equal(chunked.feature, fa.feature)
    torch.testing.assert_close(chunked.act, fa.act)  # matmuls of other shapes round differently
    torch.testing.assert_close(chunked.error, fa.error)
    with pytest.raises(OutOfRangeError) as e:
        fa.at(6)
    one_line(e, "6")


def test_resid_width_mismatch_on_encode() -> None:
    with pytest.raises(SAEMismatchError) as e:
        make_sae("standard").encode(torch.zeros(3, D_MODEL + 1))
    one_line(e, f"{D_MODEL + 1}", f"d_in={D_MODEL}")


def test_to_and_label(tmp_path: Path) -> None:
    sae = make_sae("jumprelu", labels={3: "cats"})
    assert sae.label(3) == "cats" and sae.label(4) == "c2/f4"
    loaded = load_saes(save_sae_lens(sae, tmp_path / "s"), MODEL)[2]
    assert json.loads((tmp_path / "s" / "labels.json").read_text()) == {"3": "cats"}
    assert dict(loaded.labels) == {3: "cats"} and loaded.label(3) == "cats"
    d = sae.to(dtype=torch.float64)
    assert d.W_enc.dtype == d.threshold.dtype == torch.float64 and sae.W_enc.dtype == torch.float32  # type: ignore[union-attr]
    assert torch.equal(d.W_dec.float(), sae.W_dec) and d.labels is sae.labels
    assert load_saes(tmp_path / "s", MODEL, dtype=torch.float64)[2].b_dec.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- layouts


def test_directory_of_checkpoints_and_resid_post_mapping(tmp_path: Path) -> None:
    hooks = {"blocks.0.hook_resid_pre": 0, "blocks.1.hook_resid_post": 2, "blocks.3.hook_resid_post": 4}
    for i, hook in enumerate(hooks):
        save_sae_lens(make_sae(["standard", "jumprelu", "topk"][i], hook_name=hook, seed=i), tmp_path / hook)
    saes = load_saes(tmp_path, MODEL)
    assert isinstance(saes, SAESet) and saes.checkpoints == (0, 2, 4) and len(saes) == 3
    assert {c: saes[c].hook_name for c in saes} == {c: h for h, c in hooks.items()}
    assert [r["checkpoint"] for r in saes.describe()] == [0, 2, 4]
    assert saes.describe()[2] == {
        "checkpoint": 4,
        "hook_name": "blocks.3.hook_resid_post",
        "d_sae": D_SAE,
        "architecture": "topk",
        "k": K,
        "source": str(tmp_path / "blocks.3.hook_resid_post"),
        "prepend_bos": None,
        "context_size": None,
        "conventions": "",
    }
    assert 1 not in saes and saes.get(1) is None and 2 in saes
    with pytest.raises(OutOfRangeError) as e:
        saes[1]
    one_line(e, "checkpoint 1", "0, 2, 4")
    picked = load_saes(tmp_path, MODEL, sae_ids=["blocks.1.hook_resid_post"])
    assert picked.checkpoints == (2,)


def test_hook_checkpoint_mapping() -> None:
    assert hook_checkpoint("blocks.0.hook_resid_pre") == 0
    assert hook_checkpoint("blocks.7.hook_resid_post") == 8
    assert hook_checkpoint("blocks.8.hook_resid_pre") == 8
    for bad in ("blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "blocks.3.hook_resid_mid"):
        with pytest.raises(SAEMismatchError) as e:
            hook_checkpoint(bad)
        one_line(e, bad, "residual")


def _write_raw(folder: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def test_v5_cfg_topk_and_relu(tmp_path: Path) -> None:
    ref = make_sae("topk", seed=5)
    w = {n: getattr(ref, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    v5 = {
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "hook_name": "blocks.1.hook_resid_pre",
        "apply_b_dec_to_input": True,
    }
    topk_dir = _write_raw(
        tmp_path / "topk",
        {
            **v5,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 3},
            "normalize_activations": "none",
        },
        w,
    )
    got = load_saes(topk_dir, MODEL)[1]
    assert (got.architecture, got.k, got.checkpoint) == ("topk", 3, 1)
    assert_same_weights(ref, got)
    x = torch.randn(4, D_MODEL)
    assert (got.encode(x) > 0).sum(-1).max() <= 3
    relu_dir = _write_raw(tmp_path / "relu", {**v5, "activation_fn_str": "relu", "apply_b_dec_to_input": False}, w)
    std = load_saes(relu_dir, MODEL)[1]
    assert (std.architecture, std.k, std.apply_b_dec_to_input) == ("standard", None, False)
    torch.testing.assert_close(std.encode(x), (x @ ref.W_enc + ref.b_enc).relu())


def test_log_threshold_is_exponentiated(tmp_path: Path) -> None:
    ref = make_sae("jumprelu", seed=6)
    assert ref.threshold is not None
    w = {n: getattr(ref, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")} | {"log_threshold": ref.threshold.log()}
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "metadata": {"hook_name": "blocks.0.hook_resid_pre"},
    }
    got = load_saes(_write_raw(tmp_path / "j", cfg, w), MODEL)[0]
    assert got.threshold is not None
    torch.testing.assert_close(got.threshold, ref.threshold, atol=1e-6, rtol=1e-6)


def _write_npz(path: Path, sae: SAE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert sae.threshold is not None
    arrays = {n: getattr(sae, n).numpy() for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    np.savez(path, **arrays)
    return path


def test_gemma_scope_npz(tmp_path: Path) -> None:
    ref = make_sae("jumprelu", seed=7, apply_b_dec_to_input=False)
    npz = _write_npz(tmp_path / "gs" / "layer_2" / "width_16k" / "average_l0_50" / "params.npz", ref)
    for source in (npz, tmp_path / "gs"):
        saes = load_saes(source, MODEL)
        assert saes.checkpoints == (3,)  # resid_post of layer 2
        got = saes[3]
        assert (got.architecture, got.apply_b_dec_to_input, got.hook_name) == (
            "jumprelu",
            False,
            "blocks.2.hook_resid_post",
        )
        assert_same_weights(ref, got)
        x = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(8)) * 2
        # Gemma Scope's reference: mask = pre > threshold; acts = mask * relu(pre), without subtracting b_dec
        pre = x @ ref.W_enc + ref.b_enc
        torch.testing.assert_close(got.encode(x), (pre > ref.threshold) * pre.relu())


def test_npz_without_layer_folder(tmp_path: Path) -> None:
    npz = _write_npz(tmp_path / "flat" / "params.npz", make_sae("jumprelu"))
    with pytest.raises(SAELoadError) as e:
        load_saes(npz, MODEL)
    one_line(e, str(npz), "layer_N")


# ---------------------------------------------------------------------------------------------- errors


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(SAELoadError) as e:
        load_saes(tmp_path / "nope", MODEL)
    one_line(e, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError) as e:
        load_saes(tmp_path / "empty", MODEL)
    one_line(e, str(tmp_path / "empty"), "no SAEs found")


def test_corrupt_files(tmp_path: Path) -> None:
    good = save_sae_lens(make_sae("standard"), tmp_path / "bad_cfg")
    (good / "cfg.json").write_text('{"d_in": 8, "d_sae"')
    with pytest.raises(SAELoadError) as e:
        load_saes(good, MODEL)
    one_line(e, str(good / "cfg.json"))

    folder = save_sae_lens(make_sae("standard"), tmp_path / "bad_weights")
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAELoadError) as e:
        load_saes(folder, MODEL)
    one_line(e, str(folder / "sae_weights.safetensors"))

    npz = _write_npz(tmp_path / "layer_1" / "params.npz", make_sae("jumprelu"))
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAELoadError) as e:
        load_saes(npz, MODEL)
    one_line(e, str(npz))

    labels = save_sae_lens(make_sae("standard"), tmp_path / "bad_labels")
    (labels / "labels.json").write_text("[1, 2]")
    with pytest.raises(SAELoadError) as e:
        load_saes(labels, MODEL)
    one_line(e, str(labels / "labels.json"))


def test_missing_weight_and_unsupported_cfg(tmp_path: Path) -> None:
    ref = make_sae("jumprelu")
    w = {n: getattr(ref, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}  # no threshold
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "metadata": {"hook_name": "blocks.0.hook_resid_pre"},
    }
    with pytest.raises(SAELoadError) as e:
        load_saes(_write_raw(tmp_path / "nothr", cfg, w), MODEL)
    one_line(e, "threshold", str(tmp_path / "nothr"))
    norm = _write_raw(tmp_path / "norm", {**cfg, "architecture": "standard", "normalize_activations": "layer_norm"}, w)
    with pytest.raises(SAELoadError) as e:
        load_saes(norm, MODEL)
    one_line(e, "layer_norm", "cannot be folded", str(norm / "cfg.json"))
    gated = _write_raw(tmp_path / "gated", {**cfg, "architecture": "gated"}, w)
    with pytest.raises(SAELoadError) as e:
        load_saes(gated, MODEL)
    one_line(e, "gated")


def test_d_in_mismatch(tmp_path: Path) -> None:
    folder = save_sae_lens(make_sae("standard"), tmp_path / "s")
    with pytest.raises(SAEMismatchError) as e:
        load_saes(folder, SimpleNamespace(d_model=16, n_layers=N_LAYERS, name="gpt2"))
    one_line(e, str(folder), f"d_in={D_MODEL}", "d_model=16", "'gpt2'")


def test_non_residual_and_out_of_range_hooks(tmp_path: Path) -> None:
    ref = make_sae("standard")
    w = {n: getattr(ref, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg = {"architecture": "standard", "d_in": D_MODEL, "d_sae": D_SAE}
    mlp = _write_raw(tmp_path / "mlp", {**cfg, "metadata": {"hook_name": "blocks.1.hook_mlp_out"}}, w)
    with pytest.raises(SAEMismatchError) as e:
        load_saes(mlp, MODEL)
    one_line(e, "blocks.1.hook_mlp_out", "residual", str(mlp))
    # blocks.4.hook_resid_pre is the final residual of a 4-layer model (checkpoint 4): fine
    assert load_saes(
        save_sae_lens(make_sae("standard", hook_name="blocks.4.hook_resid_pre"), tmp_path / "ok"), MODEL
    ).checkpoints == (4,)
    far = save_sae_lens(make_sae("standard", hook_name="blocks.4.hook_resid_post"), tmp_path / "far")
    with pytest.raises(SAEMismatchError) as e:
        load_saes(far, MODEL)
    one_line(e, "blocks.4.hook_resid_post", "checkpoint 5", str(far))


def test_two_saes_at_one_checkpoint(tmp_path: Path) -> None:
    save_sae_lens(make_sae("standard", hook_name="blocks.1.hook_resid_post"), tmp_path / "a")
    save_sae_lens(make_sae("standard", hook_name="blocks.2.hook_resid_pre"), tmp_path / "b")
    with pytest.raises(SAELoadError) as e:
        load_saes(tmp_path, MODEL)
    one_line(e, "checkpoint 2", str(tmp_path / "a"), str(tmp_path / "b"))


def test_unknown_release_needs_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # makes `import sae_lens` raise ImportError
    with pytest.raises(SAELoadError) as e:
        load_saes("saelens:no-such-release", MODEL, sae_ids=["blocks.8.hook_resid_pre"])
    one_line(e, "pip install 'qktrace[saelens]'", "no-such-release", "gpt2-small-res-jb")
    with pytest.raises(SAELoadError) as e:
        load_saes("saelens:gpt2-small-res-jb", MODEL)
    one_line(e, "sae_ids", "blocks.0.hook_resid_pre")


def test_saelens_release_conversion_with_a_fake_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline stand-in for sae_lens: v6 returns the SAE, v5 a (sae, cfg, sparsity) tuple."""
    ref = make_sae("topk", hook_name="blocks.1.hook_resid_post", seed=9)
    v6_cfg = {"architecture": "topk", "d_in": D_MODEL, "d_sae": D_SAE, "k": K, "apply_b_dec_to_input": True}
    v6_cfg |= {"normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    fake = SimpleNamespace(cfg=SimpleNamespace(to_dict=lambda: v6_cfg), W_enc=ref.W_enc, b_enc=ref.b_enc)
    fake.W_dec, fake.b_dec = torch.nn.Parameter(ref.W_dec), ref.b_dec
    calls = []

    def from_pretrained(release, sae_id, device="cpu"):
        calls.append((release, sae_id, device))
        return fake if sae_id == "v6" else (fake, {}, None)

    monkeypatch.setitem(sys.modules, "sae_lens", SimpleNamespace(SAE=SimpleNamespace(from_pretrained=from_pretrained)))
    got = load_saes("saelens:my-release", MODEL, sae_ids=["v6"])[2]
    assert calls == [("my-release", "v6", "cpu")]
    assert (got.architecture, got.k, got.hook_name, got.source) == (
        "topk",
        K,
        ref.hook_name,
        "saelens:my-release/v6",
    )
    assert_same_weights(ref, got)
    assert not got.W_dec.requires_grad
    with pytest.raises(SAELoadError) as e:  # v5 tuple form, but both ids land on checkpoint 2
        load_saes("saelens:my-release", MODEL, sae_ids=["v6", "v5"])
    one_line(e, "checkpoint 2", "saelens:my-release/v5")
