"""Transcoder file layouts on disk, read into `RawTranscoder` / `RawCLT` in one orientation, shapes first.

Layouts (their conventions are data in `releases.json`, `transcoder_layouts`):
- circuit-tracer: a folder with `config.yaml` (`model_kind: transcoder_set | cross_layer_transcoder`,
  `feature_input_hook`, `feature_output_hook`, optional `transcoders:` list of files, local or hf://) and
  per-layer `layer_L.safetensors` (PLT), or `W_enc_L.safetensors` + `W_dec_L.safetensors` (CLT).
- Gemma Scope transcoders: `layer_N/width_W/average_l0_X/params.npz` (JumpReLU).
- Llama Scope LXTC: `hyperparams.json` (hook_point_in != hook_point_out) + `checkpoints/final.safetensors`.
- SAELens `transcoder`, `skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`: `cfg.json` +
  `sae_weights.safetensors`.

Every reader checks each tensor's shape against the model (d_model, n_layers) and the config from the file
headers (safetensors headers, npy headers inside the npz) before reading a weight, and refuses with one line
naming the file, the tensor, both shapes and the fix. Weights come out as W_enc [d_model, d_sae],
W_dec [d_sae, d_model], W_skip [d_model, d_model] applied as x @ W_skip, with constant scales folded in.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import Fix, SAELoadError, SAEMismatchError
from .conventions import read_sae_lens_cfg, typed
from .formats import CFG_FILE, WEIGHTS_FILE, read_json, read_npz, read_safetensors, regular_file
from .labels import LABELS_FILE, read_labels_json
from .releases import hub_file, registry

_LAYER_DIR = re.compile(r"^layer_(\d+)$")
_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.")
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
MAX_YAML_BYTES = 1 << 20  # a circuit-tracer config.yaml (a few hooks and file names)
_SCALE_RANGE = (2.0**-60, 2.0**60)  # a folded norm scale sqrt(d_model) / norm outside it under- or overflows


@dataclass(frozen=True)
class Expect:
    """What the files must match: the model's width and depth, and its name for messages."""

    d_model: int
    n_layers: int
    name: str


@dataclass(frozen=True, eq=False)
class RawTranscoder:
    """One per-layer transcoder as read: our orientation, scales folded, sites not yet resolved."""

    layer: int
    weights: dict[str, Tensor]  # W_enc, b_enc, W_dec, b_dec, optional threshold and W_skip
    architecture: str
    input_hook: str
    output_hook: str
    source: str
    k: int | None = None
    labels: dict[int, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # model_name, prepend_bos, context_size when known


@dataclass(frozen=True, eq=False)
class RawCLT:
    weights: dict[str, Tensor]  # W_enc [layer, d_model, d_sae], b_enc, b_dec, optional threshold
    W_dec: list[Tensor]  # W_dec[l] [d_sae, n_layers - l, d_model]
    architecture: str
    input_hook: str
    output_hook: str
    source: str


# ------------------------------------------------------------------------------------------- headers


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors header, without reading a weight (a FIFO or a device such as
    /dev/zero is refused by name before it is opened)."""
    regular_file(path, "safetensors", "re-download the transcoder or fix the path in its config")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types on truncated/corrupt files
        raise SAELoadError(f"{path} is not a readable safetensors file ({type(e).__name__}): re-download it") from None


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each array's shape from the npy headers inside an npz, without reading an array."""
    shapes: dict[str, tuple[int, ...]] = {}
    regular_file(path, "npz", "re-download the transcoder")
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shapes[member.removesuffix(".npy")] = tuple(read(f)[0])
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError on truncated or non-npz files
        raise SAELoadError(
            f"{path} is not a readable npz file ({type(e).__name__}): re-download or re-export it"
        ) from None
    return shapes


def check_shapes(
    shapes: dict[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...] | None], path: Path, what: str
) -> None:
    """Refuse a missing tensor or one whose shape differs from `want` (None: optional and absent is fine).

    `what` says where the expected shape came from (e.g. "d_model=32 of model 'x', d_sae=64 in cfg.json")."""
    for name, shape in want.items():
        if name not in shapes:
            if shape is None:
                continue
            have = ", ".join(sorted(shapes)) or "none"
            raise SAELoadError(f"{path} lacks tensor '{name}' (has {have}): re-download or re-export the transcoder")
        if shape is not None and shapes[name] != shape:
            raise SAEMismatchError(
                f"{path} has {name} of shape {list(shapes[name])}, expected {list(shape)} ({what}): "
                "use a transcoder trained on this model, or fix its config"
            )


def _model_what(expect: Expect, d_sae: int, where: str = "") -> str:
    return f"d_model={expect.d_model} of model '{expect.name}', d_sae={d_sae}{where}"


def layer_number(digits: str, what: str) -> int:
    """The layer `digits` names; a number past any model's depth (thousands of digits, which `int` refuses)
    is one line naming `what`."""
    if len(digits) > 9:
        raise SAEMismatchError(
            f"{what[:120]}{'...' if len(what) > 120 else ''} names layer {digits[:12]}... ({len(digits)} digits): "
            "no model has it; use coders trained on this model"
        )
    return int(digits)


def hook_layer_of(hook: str) -> int | None:
    m = _LAYER_HOOK.match(hook)
    return None if m is None else layer_number(m.group(1), f"hook '{hook}'")


def layer_from_path(path: Path) -> int | None:
    layers = [layer_number(m.group(1), str(path)) for part in path.absolute().parts if (m := _LAYER_DIR.match(part))]
    return layers[-1] if layers else None


def floating(w: Mapping[str, Tensor], path: Path) -> None:
    """Refuse weights stored as integers or booleans (no transcoder has them): one line naming the tensor."""
    for name, t in w.items():
        if name != "k" and not t.is_floating_point():
            raise SAELoadError(
                f"{path} stores {name} as {str(t.dtype).removeprefix('torch.')}: transcoder weights are floating "
                "point; re-export the transcoder"
            )


def _weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file whose header was checked: finite and floating point."""
    w = read_safetensors(path)
    floating(w, path)
    return w


def _scale(norm: float, d_model: int, key: str, where: str) -> float:
    """sqrt(d_model) / norm, the factor a Llama Scope norm folds in, refused where it would under- or overflow."""
    s = math.sqrt(d_model) / norm
    if not _SCALE_RANGE[0] <= s <= _SCALE_RANGE[1]:
        raise SAELoadError(
            f"{where}: {key}={norm:g} gives a scale sqrt(d_model)/norm of {s:.3g}, which under- or overflows the "
            "weights: fix the norm (dataset norms are of order 1 to 10^4)"
        )
    return s


# ------------------------------------------------------------------------------------------- readers


def read_gemma_transcoder(
    path: Path, expect: Expect, layer: int | None = None, hooks: tuple[str, str] | None = None
) -> RawTranscoder:
    """A Gemma Scope transcoder params.npz (W_enc [d_model, d_sae], JumpReLU threshold)."""
    layout = registry()["transcoder_layouts"]["gemma_scope_transcoder"]
    layer = layer_from_path(path) if layer is None else layer
    if layer is None:
        raise SAELoadError(
            f"cannot tell the layer of {path}: put it under a layer_N folder as Gemma Scope does "
            "(layer_12/width_16k/average_l0_82/params.npz) or list it in a circuit-tracer config.yaml"
        )
    shapes = npz_shapes(path)
    names = {a: n for n, aliases in registry()["layouts"]["gemma_2"]["tensors"].items() for a in aliases}
    shapes = {names.get(k, k): v for k, v in shapes.items()}
    d_sae = shapes.get("b_enc", (0,))[0]
    D = expect.d_model
    want = {"W_enc": (D, d_sae), "W_dec": (d_sae, D), "b_enc": (d_sae,), "b_dec": (D,), "threshold": (d_sae,)}
    check_shapes(shapes, want, path, _model_what(expect, d_sae))
    w = {names.get(k, k): t for k, t in read_npz(path).items()}
    floating(w, path)
    hook_in, hook_out = hooks or (layout["input_hook"], layout["output_hook"])
    return RawTranscoder(layer, w, layout["architecture"], hook_in, hook_out, str(path),
                         labels=read_labels_json(path.parent / LABELS_FILE))  # fmt: skip


def read_circuit_tracer_layer(path: Path, layer: int, cfg: dict[str, Any], expect: Expect) -> RawTranscoder:
    """One `layer_L.safetensors` of a circuit-tracer transcoder set (torch Linear layout for W_enc, W_skip)."""
    layout = registry()["transcoder_layouts"]["circuit_tracer"]
    shapes = safetensors_shapes(path)
    threshold_name = next((n for n in layout["threshold"] if n in shapes), None)
    d_sae, D = shapes.get("b_enc", (0,))[0], expect.d_model
    want: dict[str, tuple[int, ...] | None] = {
        "W_enc": (d_sae, D),
        "W_dec": (d_sae, D),
        "b_enc": (d_sae,),
        "b_dec": (D,),
    }
    want |= {"W_skip": (D, D) if "W_skip" in shapes else None}
    want |= {threshold_name: (d_sae,)} if threshold_name else {}
    check_shapes(shapes, want, path, _model_what(expect, d_sae))
    raw = _weights(path)
    w = {"W_enc": raw["W_enc"].T, "W_dec": raw["W_dec"], "b_enc": raw["b_enc"], "b_dec": raw["b_dec"]}
    if "W_skip" in raw:
        w["W_skip"] = raw["W_skip"].T  # circuit-tracer applies x @ W_skip.T
    activation = cfg.get("activation") or ("jump_relu" if threshold_name else "relu")
    arch = layout["activations"].get(typed(activation, "activation", str, str(path)))
    if arch is None:
        raise SAELoadError(
            f"{path}: activation '{activation}' is unknown: use one of {', '.join(layout['activations'])}"
        )
    if arch == "jumprelu":
        if threshold_name is None:
            raise SAELoadError(f"{path} is jumprelu but has no threshold tensor: re-export the transcoder")
        w["threshold"] = raw[threshold_name]
    k = cfg.get("k", int(raw["k"]) if "k" in raw else None) if arch == "topk" else None
    k = typed(k, "k", int, str(path.parent / layout["config"]), optional=True)
    if arch == "topk" and k is None:
        raise SAELoadError(f"{path} is a topk transcoder without k: add k to config.yaml")
    hooks = (cfg["feature_input_hook"], cfg["feature_output_hook"])
    return RawTranscoder(layer, w, arch, *hooks, str(path), k=k, labels=read_labels_json(path.parent / LABELS_FILE))


def read_circuit_tracer_clt(folder: Path, cfg: dict[str, Any], expect: Expect) -> RawCLT:
    """A circuit-tracer CLT folder: W_enc_L / W_dec_L safetensors for every layer L."""
    layout = registry()["transcoder_layouts"]["circuit_tracer"]
    n = expect.n_layers
    enc = [folder / layout["clt_encoder_file"].format(layer=i) for i in range(n)]
    dec = [folder / layout["clt_decoder_file"].format(layer=i) for i in range(n)]
    extra = folder / layout["clt_encoder_file"].format(layer=n)
    if extra.exists():
        raise SAEMismatchError(f"{folder} has a CLT encoder for layer {n}, but model '{expect.name}' has {n} layers")
    enc_shapes = [safetensors_shapes(p) for p in enc]
    d_sae, D = enc_shapes[0].get("b_enc_0", (0,))[0], expect.d_model
    jump = "threshold_0" in enc_shapes[0]
    for i, (e, d) in enumerate(zip(enc, dec)):
        want = {f"W_enc_{i}": (d_sae, D), f"b_enc_{i}": (d_sae,), f"b_dec_{i}": (D,)}
        check_shapes(
            enc_shapes[i], want | ({f"threshold_{i}": (d_sae,)} if jump else {}), e, _model_what(expect, d_sae)
        )
        check_shapes(
            safetensors_shapes(d), {f"W_dec_{i}": (d_sae, n - i, D)}, d, _model_what(expect, d_sae, f", {n} layers")
        )
    raws = [_weights(p) for p in enc]
    w = {
        "W_enc": torch.stack([r[f"W_enc_{i}"].T for i, r in enumerate(raws)]),
        "b_enc": torch.stack([r[f"b_enc_{i}"] for i, r in enumerate(raws)]),
        "b_dec": torch.stack([r[f"b_dec_{i}"] for i, r in enumerate(raws)]),
    }
    if jump:
        w["threshold"] = torch.stack([r[f"threshold_{i}"].reshape(-1) for i, r in enumerate(raws)])
    W_dec = [_weights(p)[f"W_dec_{i}"] for i, p in enumerate(dec)]
    arch = "jumprelu" if jump else "standard"
    return RawCLT(w, W_dec, arch, cfg["feature_input_hook"], cfg["feature_output_hook"], str(folder))


def _ct_file(entry: Any, folder: Path, where: str) -> Path:
    """A `transcoders:` entry: hf://org/repo/path (through the Hugging Face cache) or a path beside config.yaml."""
    entry = typed(entry, "transcoders[]", str, where)
    if not entry.strip() or not entry.isprintable():  # empty, or NUL, control or lone surrogate characters
        raise SAELoadError(f"{where}: transcoders[] entry {entry[:80]!r} is not a file name: fix the transcoders list")
    if entry.startswith("hf://"):
        parts = entry.removeprefix("hf://").split("?")[0].split("/")
        if len(parts) < 3:
            raise SAELoadError(f"{where}: '{entry}' is not hf://ORG/REPO/PATH: fix the transcoders list")
        return hub_file("/".join(parts[:2]), "/".join(parts[2:]), where)
    return folder / entry


def _no_deeper_layers(folder: Path, expect: Expect) -> None:
    """Refuse a set with layer_L files past the model's depth: it was trained on a deeper model."""
    names = [m.group(1) for p in folder.iterdir() if (m := _LAYER_FILE.match(p.name))]
    layers = [layer_number(digits, f"{folder}/layer_{digits}.safetensors") for digits in names]
    if layers and max(layers) >= expect.n_layers:
        raise SAEMismatchError(
            f"{folder} has layer_{max(layers)}.safetensors but model '{expect.name}' has layers "
            f"0..{expect.n_layers - 1}: use transcoders trained on this model"
        )


def _yaml_config(cfg_path: Path) -> Any:
    """A circuit-tracer config.yaml, size-capped and without YAML aliases (`*name`: a few lines of them expand
    to gigabytes when anything walks the result)."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise SAELoadError(f"{cfg_path} uses a YAML alias (*name): write the value out in full")
            return super().compose_node(parent, index)

    regular_file(cfg_path, "circuit-tracer config.yaml", "re-download the transcoders", MAX_YAML_BYTES)
    try:
        with open(cfg_path, "rb") as f:
            return yaml.load(f.read(MAX_YAML_BYTES + 1).decode("utf-8"), Loader=NoAliases)  # noqa: S506 (safe)
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:  # ValueError: an int of 5,000 digits
        raise SAELoadError(f"{cfg_path} is not a readable YAML file ({type(e).__name__}): re-download it") from None


def read_circuit_tracer(path: Path, expect: Expect) -> list[RawTranscoder] | RawCLT:
    """A circuit-tracer transcoder folder (or its config.yaml): a PLT per layer, or one CLT."""
    layout = registry()["transcoder_layouts"]["circuit_tracer"]
    cfg_path = path if path.suffix in (".yaml", ".yml") else path / layout["config"]
    cfg = _yaml_config(cfg_path)
    where, folder = str(cfg_path), cfg_path.parent
    cfg = typed(cfg, "the config", dict, where)
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        typed(cfg.get(key), key, str, where)
    if cfg["model_kind"] not in layout["model_kinds"]:
        raise SAELoadError(
            f"{where}: model_kind '{cfg['model_kind']}' is unknown: use {' or '.join(layout['model_kinds'])}"
        )
    if cfg["model_kind"] == "cross_layer_transcoder":
        return read_circuit_tracer_clt(folder, cfg, expect)
    entries = cfg.get("transcoders")
    if entries is None:
        _no_deeper_layers(folder, expect)
        files = [folder / layout["layer_file"].format(layer=i) for i in range(expect.n_layers)]
        files = [f for f in files if os.path.lexists(f)] or files[:1]
    else:
        files = [_ct_file(e, folder, where) for e in (entries if isinstance(entries, list) else [entries])]
    if not files:
        raise SAELoadError(f"{where} lists no transcoders: list layer files under transcoders, or remove the key")
    if len(files) > expect.n_layers:
        raise SAEMismatchError(
            f"{where} lists {len(files)} transcoders but model '{expect.name}' has {expect.n_layers} layers"
        )
    hooks = (cfg["feature_input_hook"], cfg["feature_output_hook"])
    return [
        read_gemma_transcoder(f, expect, i, hooks)
        if f.suffix == ".npz"
        else read_circuit_tracer_layer(f, i, cfg, expect)
        for i, f in enumerate(files)
    ]


def read_llama_scope_transcoder(folder: Path, expect: Expect) -> RawTranscoder:
    """A Llama Scope LXTC folder; the dataset-average input and output norms are folded into the weights."""
    layout = registry()["transcoder_layouts"]["llama_scope_transcoder"]
    hp_path, weights_path = folder / layout["config_file"], folder / layout["weights"]
    hp, where = read_json(hp_path, "Llama Scope hyperparams.json"), str(hp_path)
    need = {k: typed(hp.get(k), k, kind, where) for k, kind in
            (("d_model", int), ("d_sae", int), ("hook_point_in", str), ("hook_point_out", str),
             ("jump_relu_threshold", float), ("dataset_average_activation_norm", dict))}  # fmt: skip
    norms = need["dataset_average_activation_norm"]
    n_in, n_out = (typed(norms.get(k), f"dataset_average_activation_norm.{k}", float, where) for k in ("in", "out"))
    layer = hook_layer_of(need["hook_point_in"])
    if need["hook_point_in"] == need["hook_point_out"] or layer is None or not (n_in > 0 and n_out > 0):
        raise SAELoadError(
            f"{where} maps {need['hook_point_in']} to {need['hook_point_out']} with norms in={n_in}, out={n_out}: "
            "a Llama Scope transcoder reads blocks.L.<input> and writes another hook, with positive norms"
        )
    D, d_sae = expect.d_model, need["d_sae"]
    if need["d_model"] != D:
        raise SAEMismatchError(
            f"{where} has d_model={need['d_model']} but model '{expect.name}' has d_model={D}: "
            "use transcoders of this model"
        )
    want = {"encoder.weight": (d_sae, D), "decoder.weight": (D, d_sae), "encoder.bias": (d_sae,), "decoder.bias": (D,)}
    check_shapes(
        safetensors_shapes(weights_path), want, weights_path, _model_what(expect, d_sae, " in hyperparams.json")
    )
    raw = _weights(weights_path)
    # the release reads s_in x and predicts s_out y
    s_in = _scale(n_in, D, "dataset_average_activation_norm.in", where)
    s_out = _scale(n_out, D, "dataset_average_activation_norm.out", where)
    w = {
        "W_enc": raw["encoder.weight"].T * s_in,
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["decoder.weight"].T / s_out,
        "b_dec": raw["decoder.bias"] / s_out,
    }
    # in float64 first: a threshold past float32's range becomes inf, which the folded-weights check names
    b_enc = w["b_enc"]
    threshold = torch.full((d_sae,), need["jump_relu_threshold"] * s_in, dtype=torch.float64, device=b_enc.device)
    w["threshold"] = threshold.to(b_enc.dtype)
    meta = {"model_name": registry()["layouts"]["llama_scope"]["config"]["model_name"]}
    return RawTranscoder(layer, w, layout["architecture"], need["hook_point_in"], need["hook_point_out"], str(folder),
                         labels=read_labels_json(folder / LABELS_FILE), meta=meta)  # fmt: skip


def read_sae_lens_transcoder(folder: Path, expect: Expect) -> RawTranscoder:
    """A SAELens transcoder / skip_transcoder / jumprelu_transcoder folder (cfg.json + sae_weights.safetensors)."""
    archs = registry()["transcoder_layouts"]["sae_lens_transcoder"]["architectures"]
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg, where = read_json(cfg_path, "SAELens cfg.json"), str(cfg_path)
    arch_name = typed(cfg.get("architecture"), "architecture", str, where)
    if arch_name not in archs:
        cli = "pass it as --saes (an attention-output SAE: --attention-saes)"
        raise SAELoadError(
            f"{where} has architecture '{arch_name}', not a transcoder ({', '.join(archs)})",
            Fix(api="load it with load_saes (an attention-output SAE: load_attention_saes)", cli=cli, http=cli),
        )
    fc = read_sae_lens_cfg(cfg, where, {"architecture": archs[arch_name], "apply_b_dec_to_input": False})
    meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    hook_out = typed(cfg.get("hook_name_out", meta.get("hook_name_out")), "hook_name_out", str, where)
    d_out = typed(cfg.get("d_out", fc.d_in), "d_out", int, where)
    layer = hook_layer_of(fc.hook_name)
    if layer is None or fc.normalize_activations != "none":
        raise SAELoadError(
            f"{where} reads '{fc.hook_name}' with normalize_activations='{fc.normalize_activations}': qktrace loads "
            "MLP transcoders on blocks.L hooks without activation normalisation"
        )
    D, d_sae = expect.d_model, fc.d_sae or 0
    for key, value in (("d_in", fc.d_in), ("d_out", d_out)):
        if value != D:
            raise SAEMismatchError(
                f"{where} has {key}={value} but model '{expect.name}' has d_model={D}: use transcoders of this model"
            )
    shapes = safetensors_shapes(weights_path)
    threshold = "log_threshold" if "log_threshold" in shapes else "threshold"
    want: dict[str, tuple[int, ...] | None] = {
        "W_enc": (D, d_sae),
        "W_dec": (d_sae, D),
        "b_enc": (d_sae,),
        "b_dec": (D,),
    }
    want |= {"W_skip": (D, D) if "skip" in arch_name else None}
    want |= {threshold: (d_sae,)} if fc.architecture == "jumprelu" else {}
    check_shapes(shapes, want, weights_path, _model_what(expect, d_sae, " in cfg.json"))
    raw = _weights(weights_path)
    w = {n: raw[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if fc.architecture == "jumprelu":
        w["threshold"] = raw[threshold].exp() if threshold == "log_threshold" else raw[threshold]
    if "W_skip" in raw:
        w["W_skip"] = raw["W_skip"].T  # SAELens applies x @ W_skip.T
    meta = {"model_name": fc.model_name, "prepend_bos": fc.prepend_bos, "context_size": fc.context_size}
    return RawTranscoder(layer, w, fc.architecture, fc.hook_name, hook_out, str(folder), k=fc.k,
                         labels=read_labels_json(folder / LABELS_FILE), meta=meta)  # fmt: skip
