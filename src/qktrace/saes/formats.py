"""SAE file layouts on disk: read each into a `RawSAE` (SAELens tensor names, a type-checked `FileConfig`),
and write qktrace's SAEs as SAELens v6 folders.

Layouts (their conventions are data in `releases.json`):
- SAELens: a folder with `cfg.json` (v6 with `metadata`, or the flat pre-6 layout) and
  `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold or log_threshold).
- Gemma Scope: `layer_N/width_W/average_l0_X/params.npz` (W_enc, W_dec, b_enc, b_dec, threshold), no config:
  jumprelu, b_dec not subtracted from the input, reading `blocks.N.hook_resid_post`.
- Llama Scope: a folder with `hyperparams.json` and `checkpoints/final.safetensors` (torch Linear layout:
  encoder.weight [d_sae, d_model], decoder.weight [d_model, d_sae], encoder.bias, decoder.bias), a scalar
  jumprelu threshold and a dataset-average input norm.
Every reader refuses a truncated file, a wrong-typed config value and NaN or infinite weights with one line
naming the file (and the key or tensor).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..errors import SAELoadError, SAEMismatchError, quoted
from ..files import atomic_write
from .conventions import FileConfig, check_tensors, read_sae_lens_cfg, typed
from .labels import LABELS_FILE, read_labels_json
from .releases import registry

if TYPE_CHECKING:
    from .sae import SAE

CFG_FILE, WEIGHTS_FILE, NPZ_FILE = "cfg.json", "sae_weights.safetensors", "params.npz"
LLAMA_SCOPE_CFG = "hyperparams.json"
SAE_LENS_FORMAT = "6.0.0"  # the cfg.json format version we write (SAELens reads >= 6.0 configs as v6)
_LAYER_DIR = re.compile(r"^layer_(\d+)$")
_NEEDED = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True, eq=False)
class RawSAE:
    """One SAE as its files hold it: SAELens tensor names and a config, conventions not yet folded in."""

    weights: dict[str, Tensor]
    config: FileConfig
    source: str  # the folder or file users named, for messages and SAE.source
    config_file: str  # the file config messages name
    labels: dict[int, str]


MAX_CONFIG_BYTES = 16 << 20  # a config file (cfg.json, hyperparams.json)
_NPZ_RATIO = 8  # an npz member may inflate to at most this many times its stored size (weights barely compress)


def regular_file(path: Path, what: str, missing: str, limit: int | None = None) -> int:
    """The size of `path` if it is a regular file (links followed) of at most `limit` bytes; SAELoadError
    otherwise, naming what it is: a device such as /dev/zero or a FIFO is refused before it is opened."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SAELoadError(f"{path} is missing: {missing}") from None
    except OSError as e:
        raise SAELoadError(f"cannot read {path} ({e.strerror or type(e).__name__}): check its permissions") from None
    except ValueError:  # a NUL byte or a lone surrogate in the name
        raise SAELoadError(f"{str(path)[:200]!r} is not a file name (NUL or unencodable characters): fix it") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "device or socket"
        raise SAELoadError(f"{path} is a {kind}, not a regular {what} file: put the real file there")
    if limit is not None and st.st_size > limit:
        raise SAELoadError(
            f"{path} is {st.st_size:,} bytes, more than a {what} holds ({limit:,}): is it the right file?"
        )
    return st.st_size


def _json_int(text: str, path: Path) -> int:
    """An integer literal of a config; one of thousands of digits (past what `int` reads) named as such."""
    if len(text) > 300:
        raise SAELoadError(f"{path} holds an integer of {len(text):,} digits: no SAE setting has one; fix that value")
    return int(text)


def read_json(path: Path, what: str = "JSON object") -> dict[str, Any]:
    regular_file(path, what, "re-download the SAE", MAX_CONFIG_BYTES)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_CONFIG_BYTES + 1).decode("utf-8"), parse_int=lambda t: _json_int(t, path))
    except (ValueError, OSError, RecursionError, UnicodeDecodeError) as e:
        raise SAELoadError(f"{path} is not a valid {what} ({type(e).__name__}): re-download or re-export it") from None
    if not isinstance(data, dict):
        raise SAELoadError(f"{path} is not a valid {what} (a {type(data).__name__}): re-download or re-export it")
    return data


MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound on a header
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
               "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # fmt: skip


def _unreadable(path: Path, why: str) -> SAELoadError:
    return SAELoadError(f"{path} is not a readable safetensors file ({why[:160]}): re-download or re-save it")


def _header(path: Path, size: int) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (8 bytes of length, then JSON), its length bounded by the file, and the
    bytes of data after it."""
    if size < 8:
        raise _unreadable(path, f"{size} bytes, shorter than a header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _unreadable(path, f"its header states {n:,} bytes of header in a file of {size:,}")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"), parse_int=lambda t: _json_int(t, path))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise _unreadable(path, f"its header is not JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, f"its header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - n


def _check_entry(path: Path, name: str, entry: Any, data_bytes: int) -> list[int]:
    """One tensor's header entry, its stated shape and dtype checked against the bytes the file gives it: a
    header that lies about a shape is named (tensor, stated shape, bytes held) before anything is read."""
    shown = quoted(name, 80)
    ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)
    offsets = entry.get("data_offsets") if ok else None
    if not ok or not isinstance(offsets, list) or len(offsets) != 2:
        raise _unreadable(path, f"tensor {shown} has no dtype, shape and data_offsets in the header")
    shape, dtype = entry["shape"], entry["dtype"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in [*shape, *offsets]):
        raise _unreadable(path, f"tensor {shown} states shape {quoted(shape)} and offsets {quoted(offsets)}")
    bits = _DTYPE_BITS.get(dtype, 8 if dtype.startswith("F8_") else None)
    if bits is None:
        raise _unreadable(path, f"tensor {shown} has dtype {quoted(dtype)}, which safetensors does not know")
    need, (begin, end) = (math.prod(shape) * bits + 7) // 8, offsets
    stated = f"{path}: tensor {shown} is stated as {dtype} of shape {quoted(shape)} ({need:,} bytes"
    if end > data_bytes:
        raise SAELoadError(
            f"{stated}, at {begin:,}..{end:,}) but the file holds {data_bytes:,} bytes of data: it was cut short or "
            "its header is wrong; re-download or re-save it"
        )
    if end - begin != need:
        raise SAELoadError(
            f"{stated}) but the file holds {end - begin:,} bytes for it: its header is wrong; re-download or re-save it"
        )
    return list(shape)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The tensor shapes a safetensors file's header states, read without loading any tensor; every shape's
    bytes checked against what the file holds for it (one line naming the tensor otherwise)."""
    size = regular_file(path, "safetensors", f"put {path.name} beside the SAE's config")
    header, data_bytes = _header(path, size)
    shapes = {
        name: _check_entry(path, name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"
    }
    try:
        with safe_open(str(path), framework="pt") as f:  # what is left: overlapping or uncovered offsets
            f.keys()
    except Exception as e:  # safetensors raises several types on truncated/corrupt files
        raise _unreadable(
            path, f"{type(e).__name__}: {str(e).removeprefix('Error while deserializing header: ')}"
        ) from None
    return shapes


def read_safetensors(
    path: Path, expect: Mapping[str, Sequence[int | None]] | None = None, said: str = "the config"
) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; `expect` (name -> shape, None for any size: what `said` says, e.g.
    "cfg.json: d_in is 8, d_sae is 32") is checked against the header before anything is loaded."""
    shapes = safetensors_shapes(path)
    for name, want in (expect or {}).items():
        got = shapes.get(name)
        if got is not None and (len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got))):
            raise SAELoadError(
                f"{said} but {path} has {name} of shape {got}: the config and the weights disagree; "
                "re-download or fix the config"
            )
    try:
        w = load_file(str(path))
    except Exception as e:  # safetensors raises several types on truncated/corrupt files
        raise _unreadable(path, type(e).__name__) from None
    check_tensors(w, str(path))
    return w


def _npz_shape(z: Any, name: str, path: Path) -> tuple[int, ...]:
    """The shape an npz member's header states, read without inflating it; refused if its stated size is
    past what its stored bytes can hold (`_NPZ_RATIO`)."""
    info = z.zip.getinfo(f"{name}.npy")
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(f)
    size = math.prod(shape) * dtype.itemsize
    if size > max(_NPZ_RATIO * info.compress_size, 1 << 20):
        raise SAELoadError(
            f"{path}: array {name} states shape {list(shape)} ({size:,} bytes) but holds {info.compress_size:,} "
            "stored bytes: the file is not a real SAE; re-download it"
        )
    return tuple(shape)


def read_npz(
    path: Path, names: Sequence[str] | None = None, check: Callable[[dict[str, tuple[int, ...]]], None] | None = None
) -> dict[str, Tensor]:
    """The arrays of an npz file (`names` among them, default all) as tensors. Each header is read first:
    an array is refused before it is inflated when its stated size is past its stored bytes, and `check`
    sees every stated shape before any array is read. NaN or infinite values are refused too."""
    regular_file(path, "npz", "re-download the SAE")
    try:
        with np.load(path, allow_pickle=False) as z:
            wanted = z.files if names is None else [n for n in z.files if n in names]
            shapes = {name: _npz_shape(z, name, path) for name in wanted}
            if check is not None:
                check(shapes)
            raw = {name: torch.from_numpy(np.array(z[name])) for name in wanted}
    except SAELoadError:
        raise
    except Exception as e:  # zipfile, OSError, ValueError on truncated or non-npz files
        raise SAELoadError(
            f"{path} is not a readable npz file ({type(e).__name__}): re-download or re-export it"
        ) from None
    check_tensors(raw, str(path))
    return raw


def _gemma_shapes(path: Path, aliases: Mapping[str, Sequence[str]]) -> Callable[[dict[str, tuple[int, ...]]], None]:
    """A check of a Gemma Scope npz's stated shapes before any array is read: W_enc [d_in, d_sae] and the
    others matching it (there is no config to hold them against)."""

    def check(shapes: dict[str, tuple[int, ...]]) -> None:
        ours = {name: shapes[a] for name, names in aliases.items() for a in names if a in shapes}
        enc = ours.get("W_enc")
        if enc is None or len(enc) != 2:
            return  # _require names what is missing
        d_in, d_sae = enc
        want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
        bad = [f"{k} {list(ours[k])}" for k, v in want.items() if k in ours and ours[k] != v]
        if bad:
            raise SAELoadError(
                f"{path} states {', '.join(bad)} against W_enc {list(enc)}: the arrays disagree; re-download it"
            )

    return check


def _require(w: Mapping[str, Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in w]
    if missing:
        raise SAELoadError(
            f"{path} lacks tensor(s) {', '.join(missing)} (has {', '.join(sorted(w)) or 'none'}): "
            "re-download or re-export the SAE"
        )


def _release_extras(overrides: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """model_name / neuronpedia_id that release overrides add to a layout without a config of its own."""
    o = overrides or {}
    return {
        "model_name": typed(o.get("model_name"), "model_name", str, where, optional=True) or "",
        "neuronpedia_id": typed(o.get("neuronpedia_id"), "neuronpedia_id", str, where, optional=True) or "",
    }


# ---------------------------------------------------------------------------------------------- readers


def read_sae_lens_dir(directory: Path, overrides: Mapping[str, Any] | None = None) -> RawSAE:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    cfg = read_sae_lens_cfg(read_json(cfg_path, "SAELens cfg.json"), str(cfg_path), overrides)
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,)}
    w = read_safetensors(weights_path, shapes, f"{cfg_path}: d_in is {d_in}, d_sae is {d_sae}")
    if "threshold" not in w and "log_threshold" in w:
        w["threshold"] = w.pop("log_threshold").exp()
    _require(w, _NEEDED + (("threshold",) if cfg.architecture == "jumprelu" else ()), weights_path)
    return RawSAE(w, cfg, str(directory), str(cfg_path), read_labels_json(directory / LABELS_FILE))


def read_gemma_npz(path: Path, overrides: Mapping[str, Any] | None = None, repo_kind: str = "res") -> RawSAE:
    layout = registry()["layouts"]["gemma_2"]
    # absolute(), not resolve(): the HF cache symlinks params.npz to a blob outside the layer_N folder
    layers = [int(m.group(1)) for part in path.absolute().parts if (m := _LAYER_DIR.match(part))]
    if not layers and "embedding" in path.absolute().parts:
        raise SAEMismatchError(
            f"SAE at {path} reads the embedding (hook_embed): only residual-stream SAEs are supported "
            "(blocks.L.hook_resid_pre or blocks.L.hook_resid_post): use a layer_N SAE"
        )
    if not layers:
        raise SAELoadError(
            f"cannot tell the layer of {path}: put it under a layer_N folder as in Gemma Scope "
            "(e.g. layer_12/width_16k/average_l0_82/params.npz)"
        )
    aliases = layout["tensors"]
    raw = read_npz(path, [a for names in aliases.values() for a in names], _gemma_shapes(path, aliases))
    w: dict[str, Tensor] = {}
    for name, aliases in layout["tensors"].items():
        found = [a for a in aliases if a in raw]
        if found:
            w[name] = raw[found[0]]
    _require(w, _NEEDED + ("threshold",), path)
    hook = layout["hook_by_repo_kind"][repo_kind].format(layer=layers[-1])
    cfg = FileConfig(hook_name=hook, **layout["config"], **_release_extras(overrides, str(path)))
    return RawSAE(w, cfg, str(path), str(path), read_labels_json(path.parent / LABELS_FILE))


def read_llama_scope_dir(directory: Path, overrides: Mapping[str, Any] | None = None) -> RawSAE:
    layout = registry()["layouts"]["llama_scope"]
    hp_path, weights_path = directory / layout["config_file"], directory / layout["weights"]
    hp = read_json(hp_path, "Llama Scope hyperparams.json")
    where = str(hp_path)

    def need(key: str, kind: type) -> Any:
        if key not in hp:
            raise SAELoadError(f"{where} lacks {key}: re-download the SAE")
        return typed(hp[key], key, kind, where)

    d_model, d_sae, hook = need("d_model", int), need("d_sae", int), need("hook_point_in", str)
    hook_out = typed(hp.get("hook_point_out", hook), "hook_point_out", str, where)
    if hook_out != hook:
        raise SAELoadError(
            f"{where} maps {hook} to {hook_out} (a transcoder): qktrace loads SAEs that reconstruct their input"
        )
    act_fn = typed(hp.get("act_fn", "jumprelu"), "act_fn", str, where)
    if act_fn != "jumprelu":
        raise SAELoadError(f"{where} has act_fn '{act_fn}': qktrace reads Llama Scope jumprelu SAEs only")
    threshold = need("jump_relu_threshold", float)
    norms = need("dataset_average_activation_norm", dict)
    norm_in = typed(norms.get("in"), "dataset_average_activation_norm.in", float, where)
    if not norm_in > 0 or threshold < 0:
        raise SAELoadError(
            f"{where}: dataset_average_activation_norm.in={norm_in} and jump_relu_threshold={threshold}: "
            "the norm must be positive and the threshold >= 0; re-download the SAE"
        )
    # SAELens's conversion: the scalar threshold lives in the normalised space, scaled by sqrt(d)/norm_in;
    # the release's norm_scaling_factor (else the same sqrt(d)/norm_in) is then folded into the weights
    factor = math.sqrt(d_model) / norm_in
    scale = (overrides or {}).get("norm_scaling_factor", factor)
    scale = typed(scale, "norm_scaling_factor", float, f"release entry for {directory}")
    names = layout["tensors_transposed"] | layout["tensors"]
    shapes = {"W_enc": (d_sae, d_model), "W_dec": (d_model, d_sae), "b_enc": (d_sae,), "b_dec": (d_model,)}
    said = f"{hp_path}: d_model is {d_model}, d_sae is {d_sae}"
    raw = read_safetensors(weights_path, {names[ours]: shape for ours, shape in shapes.items()}, said)
    _require(raw, tuple(names.values()), weights_path)
    for ours, theirs in names.items():
        if tuple(raw[theirs].shape) != shapes[ours]:
            raise SAELoadError(
                f"{weights_path} has {theirs} of shape {list(raw[theirs].shape)}, expected {list(shapes[ours])} "
                f"(d_model={d_model}, d_sae={d_sae} in {hp_path.name}): re-download the SAE"
            )
    w = {ours: raw[theirs].T if ours in layout["tensors_transposed"] else raw[theirs] for ours, theirs in names.items()}
    w["threshold"] = torch.full((d_sae,), threshold * factor, dtype=w["W_enc"].dtype, device=w["W_enc"].device)
    cfg = FileConfig(hook_name=hook, d_in=d_model, d_sae=d_sae, scale=scale, **layout["config"])
    extras = _release_extras(overrides, str(directory))
    cfg = replace(cfg, neuronpedia_id=extras["neuronpedia_id"], model_name=extras["model_name"] or cfg.model_name)
    return RawSAE(w, cfg, str(directory), where, read_labels_json(directory / LABELS_FILE))


def layout_of(path: Path) -> str | None:
    """Which layout a folder or file is: sae_lens, gemma_2, llama_scope, or None."""
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_2"
        if path.name in (CFG_FILE, WEIGHTS_FILE):
            return "sae_lens"
        return "llama_scope" if path.name == LLAMA_SCOPE_CFG else None
    if (path / CFG_FILE).is_file():
        return "sae_lens"
    return "llama_scope" if (path / LLAMA_SCOPE_CFG).is_file() else None


def read_path(path: Path, overrides: Mapping[str, Any] | None = None, repo_kind: str = "res") -> RawSAE:
    """One SAE from a folder or file of any known layout."""
    kind = layout_of(path)
    folder = path.parent if path.is_file() else path
    if kind == "sae_lens":
        return read_sae_lens_dir(folder, overrides)
    if kind == "llama_scope":
        return read_llama_scope_dir(folder, overrides)
    if kind == "gemma_2":
        return read_gemma_npz(path, overrides, repo_kind)
    raise SAELoadError(
        f"{path} is not an SAE: pass a SAELens folder (cfg.json), a Gemma Scope params.npz "
        "or a Llama Scope folder (hyperparams.json)"
    )


def find_saes(root: Path) -> list[Path]:
    """Every SAE folder or npz file under `root`, sorted."""
    # a weights file that is not a regular one is still found, then refused by name (not "no SAEs found")
    found = {p.parent for p in root.rglob(CFG_FILE) if os.path.lexists(p.parent / WEIGHTS_FILE)}
    found |= {p.parent for p in root.rglob(LLAMA_SCOPE_CFG)}
    return sorted(found) + sorted(root.rglob(NPZ_FILE))


# ---------------------------------------------------------------------------------------------- writing


def sae_lens_config(sae: SAE) -> dict[str, Any]:
    """The SAELens v6 cfg.json of `sae` (its weights read the raw residual: conventions are folded)."""
    meta: dict[str, Any] = {"sae_lens_version": SAE_LENS_FORMAT, "hook_name": sae.hook_name, "hook_head_index": None}
    known = {
        "model_name": sae.model_name or None,
        "prepend_bos": sae.prepend_bos,
        "context_size": sae.context_size,
        "neuronpedia_id": sae.neuronpedia_id or None,
    }
    meta |= {k: v for k, v in known.items() if v is not None}
    if sae.conventions:
        meta["qktrace_folded_conventions"] = list(sae.conventions)
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if sae.k is not None:
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    return cfg | {"metadata": meta}


def save_sae_lens(sae: SAE, directory: str | os.PathLike[str]) -> Path:
    """Write `sae` as a SAELens v6 folder (cfg.json, sae_weights.safetensors, labels.json); return it.

    SAELens (>= 6) loads it with hook name, architecture, k / threshold and metadata intact. Each file is
    written to a temp file beside it and renamed, so an interrupted save never leaves a half-written file.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = _NEEDED + (("threshold",) if sae.threshold is not None else ())
    tensors = {n: getattr(sae, n).detach().cpu().contiguous() for n in names}
    atomic_write(out / WEIGHTS_FILE, safetensors_bytes(tensors))
    atomic_write(out / CFG_FILE, (json.dumps(sae_lens_config(sae), indent=2) + "\n").encode())
    if sae.labels:
        labels = {str(i): text for i, text in sorted(sae.labels.items())}
        atomic_write(out / LABELS_FILE, (json.dumps(labels, indent=2) + "\n").encode())
    return out
