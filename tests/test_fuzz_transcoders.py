# mypy: disable-error-code="func-returns-value"
"""Hostile transcoder sets and attention-output SAEs: every layout (circuit-tracer PLT and CLT, Gemma Scope
params.npz, Llama Scope LXTC, SAELens transcoder and hook_z / hook_attn_out folders) made corrupt, truncated,
header-lying, absurd in its numbers, non-finite, a FIFO or a link to /dev/zero, for another model, or of two
formats at once. Each must be refused with one short line (a QKTraceError, which the CLI prints with exit 2
and the server answers with 4xx), within seconds and bounded memory: the cases run in one subprocess under
an address-space cap, each with an alarm. The table is the record of what was tried."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qktrace.testing import random_sae, write_transcoder_set

SRC = str(Path(__file__).resolve().parents[1] / "src")
D, N_LAYERS, D_SAE = 32, 2, 48  # the tiny llama's width and depth; the sets' width


# ------------------------------------------------------------------------------------------ file builders


def _ct(root: Path, **kw) -> Path:
    return write_transcoder_set(root / "ct", D, N_LAYERS, **kw)


def _yaml(root: Path, text: str) -> Path:
    folder = _ct(root)
    (folder / "config.yaml").write_text(text)
    return folder


_CT_HEAD = 'model_kind: "transcoder_set"\nfeature_input_hook: "mlp.hook_in"\nfeature_output_hook: "hook_mlp_out"\n'


def _replace(path: Path, how: str) -> None:
    """`path` replaced by a FIFO, a link to /dev/zero, or truncated to half."""
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def _st_header_lie(path: Path, name: str, shape: list[int]) -> None:
    """A safetensors file whose header states `shape` for `name`, holding a few bytes."""
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 64]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)


def _ct_layer(root: Path, edit: Callable[[dict], dict]) -> Path:
    folder = _ct(root)
    from safetensors.torch import load_file

    w = load_file(str(folder / "layer_0.safetensors"))
    save_file(edit(dict(w)), str(folder / "layer_0.safetensors"))
    return folder


def _gemma_npz(root: Path, layer: int | str = 0, d: int = D, arrays: dict | None = None) -> Path:
    npz = root / f"layer_{layer}" / "width_16k" / "average_l0_9" / "params.npz"
    npz.parent.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = {
        "W_enc": torch.randn(d, D_SAE, generator=g).numpy() * 0.1,
        "W_dec": torch.randn(D_SAE, d, generator=g).numpy() * 0.1,
        "b_enc": np.zeros(D_SAE, "f4"),
        "b_dec": np.zeros(d, "f4"),
        "threshold": np.full(D_SAE, 0.1, "f4"),
    }
    np.savez(npz, **(base | (arrays or {})))
    return npz


def _npz_bomb(root: Path, layer: int = 0) -> Path:
    """A params.npz whose members state a huge width and hold a few compressed bytes."""
    npz = root / f"layer_{layer}" / "w" / "params.npz"
    npz.parent.mkdir(parents=True)
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as z:
        for name, shape in (("W_enc", (D, 10**8)), ("W_dec", (10**8, D)), ("b_enc", (10**8,)), ("b_dec", (D,)),
                            ("threshold", (10**8,))):  # fmt: skip
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", buf.getvalue() + b"\0" * (4 * 10**6))
    return npz


def _lxtc(root: Path, **hp_edit) -> Path:
    folder = root / "lxtc"
    (folder / "checkpoints").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    w = {
        "encoder.weight": torch.randn(D_SAE, D, generator=g) * 0.1,
        "decoder.weight": torch.randn(D, D_SAE, generator=g) * 0.1,
        "encoder.bias": torch.zeros(D_SAE),
        "decoder.bias": torch.zeros(D),
    }
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    hp = {
        "d_model": D, "d_sae": D_SAE, "hook_point_in": "blocks.0.ln2.hook_normalized",
        "hook_point_out": "blocks.0.hook_mlp_out", "jump_relu_threshold": 0.1,
        "dataset_average_activation_norm": {"in": 5.0, "out": 5.0},
    }  # fmt: skip
    text = json.dumps(hp | hp_edit)
    for token, literal in (('"@NAN"', "NaN"), ('"@INF"', "1e999"), ('"@BIG"', "1" + "0" * 5000)):
        text = text.replace(token, literal)
    (folder / "hyperparams.json").write_text(text)
    return folder


def _sl_transcoder(root: Path, arch: str = "transcoder", **cfg_edit) -> Path:
    folder = root / "sl"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    w = {
        "W_enc": torch.randn(D, D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D, generator=g) * 0.1,
        "b_enc": torch.zeros(D_SAE),
        "b_dec": torch.zeros(D),
    }
    if "skip" in arch:
        w["W_skip"] = torch.randn(D, D, generator=g) * 0.1
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {
        "architecture": arch, "d_in": D, "d_sae": D_SAE, "d_out": D, "dtype": "float32",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.0.ln2.hook_normalized", "hook_name_out": "blocks.0.hook_mlp_out"},
    }  # fmt: skip
    meta = cfg_edit.pop("metadata", {})
    cfg = cfg | cfg_edit
    cfg["metadata"] = cfg["metadata"] | meta
    text = json.dumps(cfg)
    for token, literal in (('"@NAN"', "NaN"), ('"@INF"', "1e999"), ('"@BIG"', "1" + "0" * 5000)):
        text = text.replace(token, literal)
    (folder / "cfg.json").write_text(text)
    return folder


class _Shape:
    d_model = D
    n_layers = N_LAYERS


def _att(root: Path, site: str = "z", hook: str | None = None, width: int = D, **cfg_edit) -> Path:
    """One SAELens attention SAE folder at layer 0 (d_in 32 for both sites of the tiny llama: 4 heads x 8)."""
    hook = hook or ("blocks.0.attn.hook_z" if site == "z" else "blocks.0.hook_attn_out")
    sae = random_sae("standard", width, D_SAE, seed=3, checkpoint=0, hook_name=hook)
    from qktrace.saes import save_sae_lens

    folder = save_sae_lens(sae, root / "att" / "blocks.0.attn")
    if cfg_edit:
        cfg = json.loads((folder / "cfg.json").read_text())
        meta = cfg_edit.pop("metadata", {})
        cfg = cfg | cfg_edit
        cfg["metadata"] = cfg["metadata"] | meta
        text = json.dumps(cfg).replace('"@INF"', "1e999").replace('"@BIG"', "1" + "0" * 5000)
        (folder / "cfg.json").write_text(text)
    return root / "att"


def _att_gemma(root: Path, **kw) -> Path:
    return _gemma_npz(root / "att", **kw)


def _both(root: Path) -> Path:
    folder = _ct(root)
    shutil.copytree(_sl_transcoder(root), folder, dirs_exist_ok=True)
    return folder


def _layer_file(root: Path, name: str, how: str) -> Path:
    folder = _ct(root)
    _replace(folder / name, how)
    return folder


def _clt(root: Path, n: int = N_LAYERS, d_sae: int = 16, enc_edit: Callable | None = None) -> Path:
    folder = root / "clt"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(_CT_HEAD.replace("transcoder_set", "cross_layer_transcoder"))
    for i in range(n):
        enc = {f"W_enc_{i}": torch.randn(d_sae, D) * 0.1, f"b_enc_{i}": torch.zeros(d_sae)}
        enc[f"b_dec_{i}"] = torch.zeros(D)
        if enc_edit is not None:
            enc = enc_edit(enc, i)
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(d_sae, N_LAYERS - i, D) * 0.1}, str(folder / f"W_dec_{i}.safetensors"))
    return folder


def _nan_at(name: str, value: float = float("nan")) -> Callable[[dict], dict]:
    def edit(w: dict) -> dict:
        w[name] = w[name].clone()
        w[name].view(-1)[0] = value
        return w

    return edit


# name -> (loader, builder): "t" loads with load_transcoders ("h": in float16), "a" with load_attention_saes
CASES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    # circuit-tracer config.yaml
    "ct-yaml-fifo": ("t", lambda r: _layer_file(r, "config.yaml", "fifo")),
    "ct-yaml-devzero": ("t", lambda r: _layer_file(r, "config.yaml", "devzero")),
    "ct-yaml-binary": ("t", lambda r: _yaml(r, "\x00\x01\x02: [")),
    "ct-yaml-list": ("t", lambda r: _yaml(r, "- 1\n- 2\n")),
    "ct-yaml-huge": ("t", lambda r: _yaml(r, _CT_HEAD + "# " + "x" * (20 << 20) + "\n")),
    "ct-yaml-deep": ("t", lambda r: _yaml(r, _CT_HEAD + "extra: " + "[" * 10**5 + "]" * 10**5 + "\n")),
    "ct-yaml-laughs": (
        "t",
        lambda r: _yaml(
            r,
            _CT_HEAD
            + 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
            + "".join(
                f"{c}: &{c} [{',='.join(['*' + p] * 9)}]\n".replace("=", "") for p, c in zip("abcdefgh", "bcdefghi")
            )
            + "transcoders: *i\n",
        ),
    ),  # fmt: skip
    "ct-kind-int": ("t", lambda r: _yaml(r, _CT_HEAD.replace('"transcoder_set"', "7"))),
    "ct-kind-unknown": ("t", lambda r: _yaml(r, _CT_HEAD.replace("transcoder_set", "sae"))),
    "ct-input-hook-unknown": ("t", lambda r: _yaml(r, _CT_HEAD.replace("mlp.hook_in", "attn.hook_q"))),
    "ct-output-hook-int": ("t", lambda r: _yaml(r, _CT_HEAD.replace('"hook_mlp_out"', "3"))),
    "ct-activation-int": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: 5\n")),
    "ct-activation-unknown": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: swish\n")),
    "ct-topk-k-str": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: topk\nk: abc\n")),
    "ct-topk-k-huge": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: topk\nk: " + "9" * 5000 + "\n")),
    "ct-topk-k-negative": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: topk\nk: -3\n")),
    "ct-topk-k-nan": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: topk\nk: .nan\n")),
    "ct-topk-k-float": ("t", lambda r: _yaml(r, _CT_HEAD + "activation: topk\nk: 2.5\n")),
    "ct-list-empty": ("t", lambda r: _yaml(r, _CT_HEAD + "transcoders: []\n")),
    "ct-list-too-long": (
        "t",
        lambda r: _yaml(r, _CT_HEAD + "transcoders: [layer_0.safetensors, layer_1.safetensors, layer_1.safetensors]\n"),
    ),  # fmt: skip
    "ct-list-int-entry": ("t", lambda r: _yaml(r, _CT_HEAD + "transcoders: [3]\n")),
    "ct-list-devzero-entry": ("t", lambda r: _yaml(r, _CT_HEAD + "transcoders: [/dev/zero]\n")),
    "ct-list-folder-entry": ("t", lambda r: _yaml(r, _CT_HEAD + "transcoders: [.]\n")),
    "ct-list-surrogate-entry": ("t", lambda r: _yaml(r, _CT_HEAD + 'transcoders: ["\\ud800.safetensors"]\n')),
    "ct-list-nul-entry": ("t", lambda r: _yaml(r, _CT_HEAD + 'transcoders: ["a\\0b"]\n')),
    "ct-list-tab-entry": ("t", lambda r: _yaml(r, _CT_HEAD + 'transcoders: ["a\\tb"]\n')),
    "path-nul": ("t", lambda r: Path("a\0b")),
    "path-surrogate": ("t", lambda r: Path("\ud800")),
    "att-path-nul": ("a", lambda r: Path("a\0b")),
    "ct-list-dict": ("t", lambda r: _yaml(r, _CT_HEAD + "transcoders: {a: 1}\n")),
    # circuit-tracer layer files
    "ct-layer-fifo": ("t", lambda r: _layer_file(r, "layer_0.safetensors", "fifo")),
    "ct-layer-devzero": ("t", lambda r: _layer_file(r, "layer_0.safetensors", "devzero")),
    "ct-layer-truncated": ("t", lambda r: _layer_file(r, "layer_0.safetensors", "truncate")),
    "ct-layer-header-lie": (
        "t",
        lambda r: (_st_header_lie(_ct(r) / "layer_0.safetensors", "W_enc", [D_SAE, 10**12]), r / "ct")[1],
    ),  # fmt: skip
    "ct-layer-extra": (
        "t",
        lambda r: (shutil.copy(_ct(r) / "layer_1.safetensors", r / "ct" / "layer_2.safetensors"), r / "ct")[1],
    ),  # fmt: skip
    "ct-layer-none": (
        "t",
        lambda r: ((_ct(r) / "layer_0.safetensors").unlink(), (r / "ct" / "layer_1.safetensors").unlink(), r / "ct")[2],
    ),  # fmt: skip
    "ct-width-other-model": ("t", lambda r: write_transcoder_set(r / "ct", 64, N_LAYERS)),
    "ct-deeper-model": ("t", lambda r: write_transcoder_set(r / "ct", D, N_LAYERS + 3)),
    "ct-nan-W_enc": ("t", lambda r: _ct_layer(r, _nan_at("W_enc"))),
    "ct-inf-b_dec": ("t", lambda r: _ct_layer(r, _nan_at("b_dec", float("inf")))),
    "ct-inf-W_skip": ("t", lambda r: _ct_layer(r, lambda w: w | {"W_skip": torch.full((D, D), float("inf"))})),
    "ct-skip-wrong-shape": ("t", lambda r: _ct_layer(r, lambda w: w | {"W_skip": torch.zeros(D, D + 1)})),
    "ct-threshold-negative": ("t", lambda r: _ct_layer(r, lambda w: w | {"threshold": -torch.ones(D_SAE)})),
    "ct-b_enc-2d": ("t", lambda r: _ct_layer(r, lambda w: w | {"b_enc": torch.zeros(D_SAE, 2)})),
    "ct-b_enc-missing": ("t", lambda r: _ct_layer(r, lambda w: {k: v for k, v in w.items() if k != "b_enc"})),
    "ct-W_enc-int": ("t", lambda r: _ct_layer(r, lambda w: w | {"W_enc": torch.zeros(D_SAE, D, dtype=torch.int64)})),
    "ct-and-saelens": ("t", _both),
    # finite in the file, infinite in the dtype asked for (float16: past 65504)
    "ct-W_skip-past-float16": ("h", lambda r: _ct_layer(r, lambda w: w | {"W_skip": torch.full((D, D), 1e6)})),
    "ct-W_enc-past-float16": ("h", lambda r: _ct_layer(r, _nan_at("W_enc", 1e6))),
    "clt-W_dec-past-float16": (
        "h",
        lambda r: (
            save_file({"W_dec_1": torch.full((16, 1, D), 1e6)}, str(_clt(r) / "W_dec_1.safetensors")),
            r / "clt",
        )[1],
    ),
    # circuit-tracer CLT
    "clt-missing-dec": ("t", lambda r: ((_clt(r) / "W_dec_1.safetensors").unlink(), r / "clt")[1]),
    "clt-extra-layer": ("t", lambda r: _clt(r, n=N_LAYERS + 1)),
    "clt-nan": (
        "t",
        lambda r: _clt(r, enc_edit=lambda e, i: e | {f"b_enc_{i}": torch.full_like(e[f"b_enc_{i}"], float("nan"))}),
    ),  # fmt: skip
    "clt-widths-differ": (
        "t",
        lambda r: _clt(
            r,
            enc_edit=lambda e, i: (
                e
                if i == 0
                else {f"W_enc_{i}": torch.zeros(8, D), f"b_enc_{i}": torch.zeros(8), f"b_dec_{i}": torch.zeros(D)}
            ),
        ),
    ),
    "clt-enc-devzero": ("t", lambda r: (_replace(_clt(r) / "W_enc_0.safetensors", "devzero"), r / "clt")[1]),
    "clt-dec-fifo": ("t", lambda r: (_replace(_clt(r) / "W_dec_1.safetensors", "fifo"), r / "clt")[1]),
    # Gemma Scope transcoder params.npz
    "gemma-fifo": ("t", lambda r: (_replace(p := _gemma_npz(r), "fifo"), p)[1]),
    "gemma-devzero": ("t", lambda r: (_replace(p := _gemma_npz(r), "devzero"), p)[1]),
    "gemma-truncated": ("t", lambda r: (_replace(p := _gemma_npz(r), "truncate"), p)[1]),
    "gemma-bomb": ("t", _npz_bomb),
    "gemma-bomb-tree": ("t", lambda r: (_npz_bomb(r / "tree"), r / "tree")[1]),
    "gemma-other-width": ("t", lambda r: _gemma_npz(r, d=64)),
    "gemma-layer-out-of-range": ("t", lambda r: _gemma_npz(r, layer=7)),
    "gemma-layer-digits": ("t", lambda r: _gemma_npz(r / "x", layer="9" * 240)),
    "gemma-no-layer": ("t", lambda r: (p := _gemma_npz(r), shutil.move(p, r / "params.npz"), r / "params.npz")[2]),
    "gemma-nan": ("t", lambda r: _gemma_npz(r, arrays={"b_enc": np.full(D_SAE, np.nan, "f4")})),
    "gemma-threshold-negative": ("t", lambda r: _gemma_npz(r, arrays={"threshold": -np.ones(D_SAE, "f4")})),
    "gemma-object-array": ("t", lambda r: _gemma_npz(r, arrays={"b_dec": np.array([None] * D, dtype=object)})),
    "gemma-two-at-a-layer": ("t", lambda r: (_gemma_npz(r / "t"), _gemma_npz(r / "t" / "x"), r / "t")[2]),
    # Llama Scope LXTC
    "lxtc-norm-tiny": ("t", lambda r: _lxtc(r, dataset_average_activation_norm={"in": 1e-300, "out": 5.0})),
    "lxtc-norm-out-tiny": ("t", lambda r: _lxtc(r, dataset_average_activation_norm={"in": 5.0, "out": 1e-300})),
    "lxtc-threshold-overflow": (
        "t",
        lambda r: _lxtc(r, jump_relu_threshold=1e300, dataset_average_activation_norm={"in": 1e-10, "out": 5.0}),
    ),
    "lxtc-threshold-negative": ("t", lambda r: _lxtc(r, jump_relu_threshold=-1.0)),
    "lxtc-threshold-nan": ("t", lambda r: _lxtc(r, jump_relu_threshold="@NAN")),
    "lxtc-d_sae-big": ("t", lambda r: _lxtc(r, d_sae="@BIG")),
    "lxtc-d_sae-negative": ("t", lambda r: _lxtc(r, d_sae=-48)),
    "lxtc-d_sae-lie": ("t", lambda r: _lxtc(r, d_sae=10**12)),
    "lxtc-d_model-other": ("t", lambda r: _lxtc(r, d_model=64)),
    "lxtc-norm-inf": ("t", lambda r: _lxtc(r, dataset_average_activation_norm={"in": "@INF", "out": 5.0})),
    "lxtc-norm-list": ("t", lambda r: _lxtc(r, dataset_average_activation_norm=[1, 2])),
    "lxtc-hook-layer-digits": ("t", lambda r: _lxtc(r, hook_point_in="blocks." + "7" * 5000 + ".ln2.hook_normalized")),
    "lxtc-hook-layer-99": (
        "t",
        lambda r: _lxtc(r, hook_point_in="blocks.99.ln2.hook_normalized", hook_point_out="blocks.99.hook_mlp_out"),
    ),  # fmt: skip
    "lxtc-hook-unknown": ("t", lambda r: _lxtc(r, hook_point_in="blocks.0.attn.hook_q")),
    "lxtc-layers-differ": ("t", lambda r: _lxtc(r, hook_point_out="blocks.1.hook_mlp_out")),
    "lxtc-weights-devzero": (
        "t",
        lambda r: (_replace((p := _lxtc(r)) / "checkpoints" / "final.safetensors", "devzero"), p)[1],
    ),  # fmt: skip
    "lxtc-weights-fifo": (
        "t",
        lambda r: (_replace((p := _lxtc(r)) / "checkpoints" / "final.safetensors", "fifo"), p)[1],
    ),  # fmt: skip
    "lxtc-hp-fifo": ("t", lambda r: (_replace((p := _lxtc(r)) / "hyperparams.json", "fifo"), p)[1]),
    # SAELens transcoders
    "sl-d_sae-big": ("t", lambda r: _sl_transcoder(r, d_sae="@BIG")),
    "sl-d_sae-huge": ("t", lambda r: _sl_transcoder(r, d_sae=10**400)),
    "sl-d_sae-lie": ("t", lambda r: _sl_transcoder(r, d_sae=D_SAE * 3)),
    "sl-d_out-str": ("t", lambda r: _sl_transcoder(r, d_out="32")),
    "sl-d_out-other": ("t", lambda r: _sl_transcoder(r, d_out=64)),
    "sl-d_in-other": ("t", lambda r: _sl_transcoder(r, d_in=64)),
    "sl-hook-out-int": ("t", lambda r: _sl_transcoder(r, metadata={"hook_name_out": 5})),
    "sl-hook-out-unknown": ("t", lambda r: _sl_transcoder(r, metadata={"hook_name_out": "blocks.0.attn.hook_z"})),
    "sl-hook-layer-digits": (
        "t",
        lambda r: _sl_transcoder(r, metadata={"hook_name": "blocks." + "7" * 5000 + ".ln2.hook_normalized"}),
    ),
    "sl-hook-layer-99": (
        "t",
        lambda r: _sl_transcoder(
            r, metadata={"hook_name": "blocks.99.ln2.hook_normalized", "hook_name_out": "blocks.99.hook_mlp_out"}
        ),
    ),
    "sl-arch-sae": ("t", lambda r: _sl_transcoder(r, architecture="standard")),
    "sl-arch-int": ("t", lambda r: _sl_transcoder(r, architecture=4)),
    "sl-skip-missing": (
        "t",
        lambda r: (p := _sl_transcoder(r, "skip_transcoder"), _replace(p / "sae_weights.safetensors", "truncate"), p)[
            2
        ],
    ),  # fmt: skip
    "sl-jumprelu-no-threshold": ("t", lambda r: _sl_transcoder(r, "jumprelu_transcoder")),
    "sl-normalize": ("t", lambda r: _sl_transcoder(r, normalize_activations="expected_average_only_in")),
    "sl-weights-devzero": (
        "t",
        lambda r: (_replace((p := _sl_transcoder(r)) / "sae_weights.safetensors", "devzero"), p)[1],
    ),  # fmt: skip
    "sl-cfg-fifo": ("t", lambda r: (_replace((p := _sl_transcoder(r)) / "cfg.json", "fifo"), p)[1]),
    "sl-weights-header-lie": (
        "t",
        lambda r: (_st_header_lie((p := _sl_transcoder(r)) / "sae_weights.safetensors", "W_enc", [D, 10**12]), p)[1],
    ),  # fmt: skip
    # paths
    "path-empty-folder": ("t", lambda r: (r / "empty").mkdir() or r / "empty"),
    "path-devzero": ("t", lambda r: Path("/dev/zero")),
    "path-random-file": ("t", lambda r: ((r / "x.txt").write_text("hi"), r / "x.txt")[1]),
    # attention-output SAEs
    "att-site-unknown": ("a", lambda r: _att(r, hook="blocks.0.attn.hook_q")),
    "att-site-resid": ("a", lambda r: _att(r, hook="blocks.0.hook_resid_pre")),
    "att-layer-99": ("a", lambda r: _att(r, hook="blocks.99.attn.hook_z")),
    "att-layer-digits": ("a", lambda r: _att(r, hook="blocks." + "7" * 5000 + ".attn.hook_z")),
    "att-layer-negative": ("a", lambda r: _att(r, hook="blocks.-1.attn.hook_z")),
    "att-d_in-other": ("a", lambda r: _att(r, width=D + 8)),
    "att-attn-out-d_in-other": ("a", lambda r: _att(r, site="attn_out", width=D * 2)),
    "att-d_sae-huge": ("a", lambda r: _att(r, d_sae=10**400)),
    "att-d_sae-big": ("a", lambda r: _att(r, d_sae="@BIG")),
    "att-d_in-lie": ("a", lambda r: _att(r, d_in=10**12)),
    "att-norm-overflow": (
        "a",
        lambda r: _att(r, normalize_activations="expected_average_only_in", norm_scaling_factor=1e39),
    ),  # fmt: skip
    "att-norm-inf": (
        "a",
        lambda r: _att(r, normalize_activations="expected_average_only_in", norm_scaling_factor="@INF"),
    ),  # fmt: skip
    "att-two-at-layer": (
        "a",
        lambda r: (_att(r), shutil.copytree(r / "att" / "blocks.0.attn", r / "att" / "again"), r / "att")[2],
    ),  # fmt: skip
    "att-cfg-fifo": ("a", lambda r: (_replace(_att(r) / "blocks.0.attn" / "cfg.json", "fifo"), r / "att")[1]),
    "att-weights-devzero": (
        "a",
        lambda r: (_replace(_att(r) / "blocks.0.attn" / "sae_weights.safetensors", "devzero"), r / "att")[1],
    ),  # fmt: skip
    "att-gemma-fifo": ("a", lambda r: (_replace(p := _att_gemma(r), "fifo"), p)[1]),
    "att-gemma-devzero": ("a", lambda r: (_replace(p := _att_gemma(r), "devzero"), p)[1]),
    "att-gemma-bomb": ("a", lambda r: _npz_bomb(r / "att")),
    "att-gemma-other-width": ("a", lambda r: _att_gemma(r, d=64)),
    "att-gemma-no-layer": (
        "a",
        lambda r: (p := _att_gemma(r), shutil.move(p, r / "params.npz"), r / "params.npz")[2],
    ),  # fmt: skip
    "att-gemma-layer-out-of-range": ("a", lambda r: _att_gemma(r, layer=5)),
    "att-gemma-nan": ("a", lambda r: _att_gemma(r, arrays={"W_dec": np.full((D_SAE, D), np.inf, "f4")})),
    "att-transcoder-given": ("a", lambda r: _ct(r)),
    "att-empty-folder": ("a", lambda r: (r / "empty").mkdir() or r / "empty"),
    "att-and-npz": ("a", lambda r: (_att(r), _gemma_npz(r / "att" / "blocks.0.attn"), r / "att")[2]),
    "t-attention-given": ("t", lambda r: _att(r)),
    "ct-kind-alias": ("t", lambda r: _yaml(r, 'k: &k "transcoder_set"\nmodel_kind: *k\n' + _CT_HEAD.split("\n", 1)[1])),
}

# what the line must name, where an earlier version named something else (or nothing)
NAMES = {
    **{name: "FIFO" for name in CASES if "fifo" in name},
    **{name: "device" for name in CASES if "devzero" in name and name != "ct-list-devzero-entry"},
    "ct-yaml-laughs": "alias",
    "ct-yaml-huge": "bytes",
    "ct-topk-k-str": "k is 'abc'",
    "ct-layer-extra": "layer_2.safetensors",
    "ct-deeper-model": "layer_4.safetensors",
    "ct-and-saelens": "both config.yaml and cfg.json",
    "ct-W_enc-int": "int64",
    "ct-list-empty": "no transcoders",
    "lxtc-norm-tiny": "dataset_average_activation_norm.in",
    "lxtc-norm-out-tiny": "dataset_average_activation_norm.out",
    "lxtc-d_sae-big": "5,001 digits",
    "sl-d_sae-big": "5,001 digits",
    "att-d_sae-big": "5,001 digits",
    **{name: "5000 digits" for name in ("lxtc-hook-layer-digits", "sl-hook-layer-digits", "att-layer-digits")},
    "gemma-layer-digits": "240 digits",
    "att-gemma-no-layer": "cannot tell the layer",
}


def _script(model: str, cases: dict[str, tuple[str, str]]) -> str:
    return textwrap.dedent(
        f"""
        import json, resource, signal, sys, time
        sys.path.insert(0, {SRC!r})
        import torch, transformers, numpy, yaml, safetensors  # before the cap
        from qktrace.errors import QKTraceError
        from qktrace.models import load_model
        from qktrace.saes import load_attention_saes, load_transcoders
        model = load_model({model!r})
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

        class Hang(Exception):
            pass

        def alarm(*_):
            raise Hang()

        signal.signal(signal.SIGALRM, alarm)
        results = {{}}
        for name, (kind, path) in json.loads(sys.stdin.read()).items():
            start = time.perf_counter()
            signal.alarm(20)
            try:
                load = load_attention_saes if kind == "a" else load_transcoders
                load(path, model, dtype="float16" if kind == "h" else "float32")
                outcome = ("loaded", "")
            except QKTraceError as e:
                outcome = ("refused", str(e))
            except Hang:
                outcome = ("hang", "")
            except BaseException as e:
                outcome = ("crash", f"{{type(e).__name__}}: {{str(e)[:300]}}")
            finally:
                signal.alarm(0)
            results[name] = outcome + (time.perf_counter() - start,)
        print(json.dumps(results))
        """
    )


@pytest.fixture(scope="module")
def outcomes(tiny_paths, tmp_path_factory):
    """Every case built on disk, then loaded in one capped subprocess: name -> (outcome, message, seconds)."""
    cases = {}
    for name, (kind, build) in CASES.items():
        cases[name] = (kind, str(build(tmp_path_factory.mktemp(name.replace("-", "_")[:40]))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _script(str(tiny_paths["llama"]), cases)],
        input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_coder_files_are_refused_in_one_line(outcomes, name):
    outcome, message, seconds = outcomes[name]
    assert outcome == "refused", f"{name}: {outcome} {message[:400]}"
    assert "\n" not in message and len(message) < 1000, f"{name}: {message[:1100]!r}"
    assert seconds < 15, f"{name}: {seconds:.1f} s"
    assert NAMES.get(name, "") in message, f"{name}: {message[:400]!r} does not name {NAMES[name]!r}"


# ------------------------------------------------------------------------------ the CLI's transcoder flags

PROMPT = "Aunt Sally is the opposite of Uncle Bob . Aunt"


@pytest.fixture(scope="module")
def cli_world(tiny_paths, tmp_path_factory):
    """The tiny llama, a transcoder set and attention SAEs of it, a set of another width, an output folder."""
    from qktrace.models import load_model
    from qktrace.testing import random_attention_saes, write_attention_saes

    root = tmp_path_factory.mktemp("fuzz_tc_cli")
    model = load_model(tiny_paths["llama"])
    att = write_attention_saes(root / "att", random_attention_saes(model, ["z", "attn_out"]))
    (root / "out").mkdir()
    (root / "out" / "keep.json").write_text('{"old": 1}')
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    (root / "corpus.jsonl").write_text(json.dumps({"text": PROMPT}) + "\n")
    return {
        "M": str(tiny_paths["llama"]),
        "T": str(write_transcoder_set(root / "ct", D, N_LAYERS)),
        "T64": str(write_transcoder_set(root / "ct64", 64, N_LAYERS)),
        "A": str(att),
        "OUT": root / "out",
        "P": str(root / "prompts.jsonl"),
        "C": str(root / "corpus.jsonl"),
        "FIFO": (os.mkfifo(root / "fifo"), str(root / "fifo"))[1],
    }


_STEER = "steer @M --transcoders @T --prompt @PROMPT --positions -1 --scales 0,2 --feature 0"
_COMMON = "--device cpu"
CLI_CASES = {
    "steer-feature-layer-equals-heads": f"{_STEER} --layer 1 --heads 0 --feature-layer 1",
    "steer-feature-layer-above-heads": f"{_STEER} --layer 0 --heads 0 --feature-layer 1",
    "steer-feature-layer-huge": f"{_STEER} --layer 1 --heads 0 --feature-layer " + "9" * 40,
    "steer-feature-layer-negative": f"{_STEER} --layer 1 --heads 0 --feature-layer -1",
    "steer-feature-layer-no-heads": f"{_STEER} --layer 1 --feature-layer 0",
    "steer-feature-layer-no-transcoders": "steer @M --prompt @PROMPT --positions -1 --feature 0 --layer 1 --heads 0 "
    "--feature-layer 0",
    "steer-heads-without-feature-layer": f"{_STEER} --layer 1 --heads 0",
    "steer-layer-past-model": f"{_STEER} --layer 5",
    "steer-heads-layer-0": f"{_STEER} --layer 0 --heads 0 --feature-layer 0",
    "steer-heads-layer-past-model": f"{_STEER} --layer 5 --heads 0 --feature-layer 0",
    "steer-feature-past-width": _STEER.replace("--feature 0", "--feature 4800") + " --layer 0",
    "steer-feature-huge": _STEER.replace("--feature 0", "--feature " + "9" * 30) + " --layer 0",
    "steer-head-past-layer": f"{_STEER} --layer 1 --heads 9 --feature-layer 0",
    "steer-transcoders-other-width": f"{_STEER.replace('@T', '@T64')} --layer 0",
    "steer-transcoders-fifo": f"{_STEER.replace('@T', '@FIFO')} --layer 0",
    "steer-transcoders-empty": f"{_STEER.replace('@T', '')} --layer 0",
    "qk-transcoders-layer-past-model": "qk @M --transcoders @T --prompt @PROMPT --layer 7 --head 0",
    "qk-attention-other-model": "qk @M --transcoders @T --attention-saes @T --prompt @PROMPT --layer 1 --head 0",
    "qk-attention-fifo": "qk @M --transcoders @T --attention-saes @FIFO --prompt @PROMPT --layer 1 --head 0",
    "qk-key-after-query": "qk @M --transcoders @T --prompt @PROMPT --layer 1 --head 0 --query-pos 2 --key-pos 5",
    "graph-transcoders-other-width": "graph @M --transcoders @T64 --prompt @PROMPT --out @OUT/keep.json",
    "graph-attention-without-transcoders": "graph @M --attention-saes @A --prompt @PROMPT --out @OUT/keep.json",
    "graph-out-is-folder": "graph @M --transcoders @T --prompt @PROMPT --out @OUT",
    "compare-prompt-b-empty": "compare @M --transcoders @T --prompt-a @PROMPT --prompt-b ''",
    "compare-prompt-b-blank": "compare @M --transcoders @T --prompt-a @PROMPT --prompt-b '   '",
    "compare-prompt-b-huge": "compare @M --transcoders @T --prompt-a @PROMPT --prompt-b @HUGE",
    "explain-transcoders-other-width": "explain @M --transcoders @T64 --prompt @PROMPT --answer Bob",
    "explain-answer-huge": "explain @M --transcoders @T --prompt @PROMPT --answer @HUGE",
    "dashboards-transcoders-other-width": "dashboards @M --transcoders @T64 --corpus @C --out @OUT/d",
    "batch-transcoders-fifo": "batch @M --transcoders @FIFO --prompts @P --out @OUT/b",
    "serve-transcoders-other-width": "serve @OUT --model @M --transcoders @T64",
    "serve-attention-fifo": "serve @OUT --model @M --transcoders @T --attention-saes @FIFO",
}


def _argv(w, case: str) -> list[str]:
    import shlex

    subs = {"@PROMPT": PROMPT, "@HUGE": "Sally " * 20_000, "@OUT": str(w["OUT"]), "@FIFO": w["FIFO"]}
    subs |= {f"@{k}": w[k] for k in ("M", "T64", "T", "A", "P", "C")}
    argv = []
    for part in shlex.split(case):
        for key, value in subs.items():
            part = part.replace(key, value)
        argv.append(part)
    return [*argv, *_COMMON.split()]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_transcoder_flags_are_refused_in_one_line(cli_world, case):
    import contextlib
    import time

    from qktrace.cli import main

    before = {p.name: p.read_bytes() for p in cli_world["OUT"].iterdir() if p.is_file()}
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("uvicorn.run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the server started")))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(_argv(cli_world, CLI_CASES[case]))
    seconds = time.perf_counter() - start
    lines = err.getvalue().strip().splitlines()
    assert code == 2, f"{case}: exit {code}, stderr {err.getvalue()[:400]!r}"
    assert len(lines) == 1 and lines[0].startswith("qktrace: error: "), f"{case}: {err.getvalue()[:400]!r}"
    assert len(lines[0]) < 1000 and out.getvalue() == "", f"{case}: {lines[0][:300]}"
    assert seconds < 30, f"{case}: {seconds:.1f} s"
    assert {p.name: p.read_bytes() for p in cli_world["OUT"].iterdir() if p.is_file()} == before, case
    assert CLI_NAMES.get(case, "") in lines[0], f"{case}: {lines[0][:300]!r} does not name {CLI_NAMES[case]!r}"


# what the line must name, where an earlier version said "0..-1" or "no SAEs found"
CLI_NAMES = {"steer-heads-layer-0": "no feature layer is below layer 0", "qk-attention-other-model": "transcoder set"}


# ------------------------------------------------------------------------ the server's transcoder fields


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A server whose tracer holds transcoders only, another whose tracer holds SAEs only, and valid bodies."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qktrace.server import create_app
    from qktrace.testing import make_server_setup
    from qktrace.tracer import Tracer

    s = make_server_setup(tmp_path_factory.mktemp("fuzz_tc_api"))
    ct = write_transcoder_set(s.root / "ct", D, N_LAYERS)
    tracer = Tracer.load(s.root / "model", transcoders=ct)
    tc = TestClient(create_app(s.data, tracer), raise_server_exceptions=True)
    plain = TestClient(create_app(s.data, s.tracer), raise_server_exceptions=True)
    x = tracer.run(s.tokens).writers().enc
    f = int(x.index[(x.layer == 0) & (x.pos == len(s.tokens) - 1)][0])
    sweep = {"tokens": s.tokens, "heads": [[1, 0]], "feature": f, "positions": [-1], "scales": "0,1", "kind":
             "transcoder", "feature_layer": 0}  # fmt: skip
    compare = {"prompt_a": "w1 w2 w3 w4", "prompt_b": "w1 w2 w5 w4", "top": 2, "top_terms": 3}
    qk = {"tokens": s.tokens[:5], "layer": 1, "head": 0, "query_pos": 3, "key_pos": 2, "rival_pos": 1, "top": 3}
    row = tracer.run(s.tokens[:5]).qk(1, 0, 3)
    top = int(row.key_positions[int(row.pattern.argmax())])  # the key a request without key_pos contrasts
    assert tc.post("/api/qk", json=qk).status_code == 200
    assert tc.post("/api/sweep", json=sweep).status_code == 200
    assert tc.post("/api/compare", json=compare).status_code == 200
    return {"tc": tc, "plain": plain, "sweep": sweep, "compare": compare, "qk": qk, "top": top, "data": s.data}


_BIG = "w1 " * 100_000
API_CASES: dict[str, tuple[str, str, dict]] = {  # name -> (server, route, fields replaced in the valid body)
    "sweep-feature-layer-equals-heads": ("tc", "/api/sweep", {"feature_layer": 1}),
    "sweep-feature-layer-above": ("tc", "/api/sweep", {"feature_layer": 5}),
    "sweep-feature-layer-negative": ("tc", "/api/sweep", {"feature_layer": -1}),
    "sweep-feature-layer-huge": ("tc", "/api/sweep", {"feature_layer": 10**18}),
    "sweep-feature-layer-past-int64": ("tc", "/api/sweep", {"feature_layer": 10**40}),
    "sweep-feature-layer-str": ("tc", "/api/sweep", {"feature_layer": "0"}),
    "sweep-feature-layer-float": ("tc", "/api/sweep", {"feature_layer": 0.5}),
    "sweep-feature-layer-bool": ("tc", "/api/sweep", {"feature_layer": True}),
    "sweep-feature-layer-no-heads": ("tc", "/api/sweep", {"heads": []}),
    "sweep-feature-layer-with-feature-kind": ("tc", "/api/sweep", {"kind": "feature"}),
    "sweep-kind-unknown": ("tc", "/api/sweep", {"kind": "neuron"}),
    "sweep-kind-int": ("tc", "/api/sweep", {"kind": 3}),
    "sweep-heads-layer-0": ("tc", "/api/sweep", {"heads": [[0, 0]]}),
    "sweep-head-past-layer": ("tc", "/api/sweep", {"heads": [[1, 9]]}),
    "sweep-heads-layer-past-model": ("tc", "/api/sweep", {"heads": [[7, 0]]}),
    "sweep-feature-past-width": ("tc", "/api/sweep", {"feature": 4800}),
    "sweep-feature-negative": ("tc", "/api/sweep", {"feature": -1}),
    "sweep-no-feature-layer": ("tc", "/api/sweep", {"feature_layer": None}),
    "sweep-transcoder-without-transcoders": ("plain", "/api/sweep", {"heads": [[1, 0]], "checkpoint": None}),
    "sweep-feature-without-saes": (
        "tc",
        "/api/sweep",
        {"kind": "feature", "feature_layer": None, "checkpoint": 1},
    ),  # fmt: skip
    "qk-rival-is-key": ("tc", "/api/qk", {"rival_pos": 2}),
    "qk-rival-is-key-negative-form": ("tc", "/api/qk", {"rival_pos": -3}),
    "qk-rival-after-query": ("tc", "/api/qk", {"rival_pos": 4}),
    "qk-rival-past-prompt": ("tc", "/api/qk", {"rival_pos": 40}),
    "qk-rival-negative-past": ("tc", "/api/qk", {"rival_pos": -40}),
    "qk-rival-huge": ("tc", "/api/qk", {"rival_pos": 10**30}),
    "qk-rival-str": ("tc", "/api/qk", {"rival_pos": "1"}),
    "qk-rival-float": ("tc", "/api/qk", {"rival_pos": 1.0}),
    "qk-rival-on-saes": ("plain", "/api/qk", {"rival_pos": 2}),
    "qk-rival-without-key-is-top": ("tc", "/api/qk", {"key_pos": None, "rival_pos": "@TOP"}),
    "compare-prompt-b-empty": ("tc", "/api/compare", {"prompt_b": ""}),
    "compare-prompt-b-blank": ("tc", "/api/compare", {"prompt_b": "   "}),
    "compare-prompt-b-huge": ("tc", "/api/compare", {"prompt_b": _BIG}),
    "compare-prompt-b-null": ("tc", "/api/compare", {"prompt_b": None}),
    "compare-prompt-b-and-tokens": ("tc", "/api/compare", {"tokens_b": [1, 2, 3]}),
    "compare-tokens-b-empty": ("tc", "/api/compare", {"prompt_b": None, "tokens_b": []}),
    "compare-tokens-b-past-vocab": ("tc", "/api/compare", {"prompt_b": None, "tokens_b": [1, 10**9]}),
    "compare-prompt-b-int": ("tc", "/api/compare", {"prompt_b": 5}),
    "compare-prompt-b-surrogate": ("tc", "/api/compare", {"prompt_b": "w1 \ud800 w2"}),
    "compare-query-past-b": ("tc", "/api/compare", {"query_pos": 40}),
    "compare-answer-equals-rival": ("tc", "/api/compare", {"answer": "w1", "rival": "w1"}),
    "graph-prompt-empty": ("tc", "/api/graph", {"prompt": "", "name": "x"}),
    "graph-prompt-huge": ("tc", "/api/graph", {"prompt": _BIG, "name": "x"}),
    "graph-name-escapes": ("tc", "/api/graph", {"prompt": "w1 w2", "name": "../x"}),
    "graph-max-nodes-zero": ("tc", "/api/graph", {"prompt": "w1 w2", "name": "x", "max_nodes": 0}),
    "graph-threshold-nan": ("tc", "/api/graph", {"prompt": "w1 w2", "name": "x", "node_threshold": "@NAN"}),
    "graph-unknown-field": ("tc", "/api/graph", {"prompt": "w1 w2", "name": "x", "transcoders": "/etc"}),
}


# what the line must name, where an earlier version said only "the prompt"
API_NAMES = {"compare-prompt-b-empty": "prompt_b", "compare-prompt-b-blank": "prompt_b"}
API_NAMES["compare-tokens-b-empty"] = "tokens_b"


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_transcoder_fields_are_refused_in_one_line(api, case):
    import time

    server, route, fields = API_CASES[case]
    base = {"/api/sweep": api["sweep"], "/api/compare": api["compare"], "/api/qk": api["qk"], "/api/graph": {}}[route]
    body = json.dumps(base | fields).replace('"@NAN"', "NaN").replace('"@TOP"', str(api["top"]))
    before = sorted(p.name for p in api["data"].iterdir())
    start = time.perf_counter()
    r = api[server].post(route, content=body, headers={"content-type": "application/json"})
    seconds = time.perf_counter() - start
    assert 400 <= r.status_code < 500, f"{case}: {r.status_code} {r.text[:300]}"
    error = r.json()["error"]
    assert isinstance(error, str) and len(error.splitlines()) == 1 and len(error) < 1000, f"{case}: {error[:300]!r}"
    assert seconds < 30, f"{case}: {seconds:.1f} s"
    assert sorted(p.name for p in api["data"].iterdir()) == before, case
    assert API_NAMES.get(case, "") in error, f"{case}: {error[:300]!r} does not name {API_NAMES[case]!r}"


# ------------------------------------------------------------------- any value in any config key, in-process

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**40), 10**40),
    st.sampled_from([10**400, -1, 0, 1, 2, 31, 32, 48, 64, 2**53]),
    st.text(max_size=20),
    st.sampled_from(["blocks.0.ln2.hook_normalized", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z", "topk"]),
)
_junk = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_KEYS = {
    "lxtc": ["d_model", "d_sae", "hook_point_in", "hook_point_out", "jump_relu_threshold",
             "dataset_average_activation_norm"],
    "sl": ["architecture", "d_in", "d_sae", "d_out", "dtype", "apply_b_dec_to_input", "normalize_activations", "k",
           "metadata", "hook_name_out"],
    "ct": ["model_kind", "feature_input_hook", "feature_output_hook", "activation", "k", "transcoders"],
}  # fmt: skip


def _with_value(root: Path, layout: str, key: str, value: object) -> Path:
    if layout == "lxtc":
        folder = _lxtc(root)
        path = folder / "hyperparams.json"
    elif layout == "sl":
        folder = _sl_transcoder(root)
        path = folder / "cfg.json"
    else:
        folder = _ct(root)
        path = folder / "config.yaml"
        cfg = {
            "model_kind": "transcoder_set",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "hook_mlp_out",
        }
        path.write_text(json.dumps(cfg | {key: value}))  # JSON is YAML
        return folder
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    return folder


@settings(
    max_examples=int(os.environ.get("QKTRACE_FUZZ_EXAMPLES", "30")) * 2,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_config_value_loads_or_is_refused_in_one_line(tiny_models, tmp_path_factory, data):
    from qktrace.errors import QKTraceError
    from qktrace.saes import load_transcoders

    layout = data.draw(st.sampled_from(sorted(_KEYS)), label="layout")
    key = data.draw(st.sampled_from(_KEYS[layout]), label="key")
    value = data.draw(_junk, label="value")
    folder = _with_value(tmp_path_factory.mktemp("cfg"), layout, key, value)
    try:
        load_transcoders(folder, tiny_models["llama"])
    except QKTraceError as e:
        assert "\n" not in str(e) and 0 < len(str(e)) < 1000, (layout, key, str(e)[:300])


# ------------------------------------------------- saved transcoder / checkpointed graphs, edited by hand


def _edit_node_id(g: dict, old: str, new: str) -> None:
    for n in g["nodes"]:
        if n["node_id"] == old:
            n["node_id"] = n["jsNodeId"] = new
    for link in g["links"]:
        for end in ("source", "target"):
            if link[end] == old:
                link[end] = new


def _qk_head(g: dict, **fields: int) -> None:
    next(n for n in g["nodes"] if "qk_tracing_head" in n)["qk_tracing_head"].update(fields)


GRAPH_EDITS: dict[str, Callable[[dict, str], object]] = {  # (graph, a feature node's id) -> edited in place
    "layer-negative": lambda g, i: _edit_node_id(g, i, f"{i.split('/')[0]}/l-1/p1/f0"),
    "layer-huge": lambda g, i: _edit_node_id(g, i, f"{i.split('/')[0]}/l{'9' * 30}/p1/f0"),
    "position-past": lambda g, i: _edit_node_id(g, i, f"{i.split('/')[0]}/l0/p999/f0"),
    "feature-digits": lambda g, i: _edit_node_id(g, i, f"{i.split('/')[0]}/l0/p1/f{'9' * 5000}"),
    "id-short": lambda g, i: _edit_node_id(g, i, "transcoder/l0/p1"),
    "kind-unknown": lambda g, i: _edit_node_id(g, i, "attn_sae/l0/p1/f0"),
    "qk-head-layer-negative": lambda g, i: _qk_head(g, layer=-1),
    "qk-head-head-huge": lambda g, i: _qk_head(g, head=10**18),
    "qk-head-key-after-query": lambda g, i: _qk_head(g, query_pos=1, key_pos=3),
    "qk-head-key-negative": lambda g, i: _qk_head(g, key_pos=-1),
    "loadings-not-objects": lambda g, i: [link.update({"head_loadings": [[0, 99, 1.0]]}) for link in g["links"][:3]],
    "transcoder-list-string": lambda g, i: g["metadata"].update({"transcoder_list": "x" * 10}),
}


@pytest.fixture(scope="module")
def edited_graphs(api, tmp_path_factory):
    """A plain transcoder graph and a checkpointed one (transcoders + attention SAEs), each edited every way,
    in one data folder; the listing and each file's GET."""
    from fastapi.testclient import TestClient

    from qktrace.models import load_model
    from qktrace.server import create_app
    from qktrace.testing import random_attention_saes, write_attention_saes
    from qktrace.tracer import Tracer

    root = tmp_path_factory.mktemp("fuzz_tc_graphs")
    model_dir = api["data"].parent / "model"
    ct = write_transcoder_set(root / "ct", D, N_LAYERS)
    att = write_attention_saes(root / "att", random_attention_saes(load_model(model_dir), ["z", "attn_out"]))
    data = root / "data"
    data.mkdir()
    for kind, tracer in (("plain", Tracer.load(model_dir, transcoders=ct)),
                         ("checkpointed", Tracer.load(model_dir, transcoders=ct, attention_saes=att))):  # fmt: skip
        tracer.run("w1 w2 w3 w4").graph(progress=False).save(root / "g.json")
        graph = json.loads((root / "g.json").read_text())
        feature = next(n["node_id"] for n in graph["nodes"] if n["node_id"].split("/")[0] in ("transcoder", "attn"))
        for name, edit in GRAPH_EDITS.items():
            g = json.loads(json.dumps(graph))
            edit(g, feature)
            (data / f"{kind}-{name}.json").write_text(json.dumps(g))
    client = TestClient(create_app(data, None), raise_server_exceptions=False)
    listed = {g["name"] for g in client.get("/api/graphs").json()["graphs"]}
    return {name: (name in listed, client.get(f"/api/graphs/{name}")) for name in os.listdir(data)}


@pytest.mark.parametrize("name", [f"{k}-{e}.json" for k in ("plain", "checkpointed") for e in GRAPH_EDITS])
def test_edited_graphs_are_listed_exactly_when_they_load(edited_graphs, name):
    listed, r = edited_graphs[name]
    assert r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
    assert listed == (r.status_code == 200), f"{name}: listed {listed}, GET {r.status_code} {r.text[:300]}"
    if r.status_code != 200:
        assert len(r.json()["error"].splitlines()) == 1, name
