"""Residual-stream sparse autoencoders: load them, encode a prompt's residual, split it into features.

A *checkpoint* c in 0..n_layers is the residual stream at the input of layer c; checkpoint n_layers is the
final residual before the last norm. SAELens hooks `blocks.L.hook_resid_pre` map to checkpoint L and
`blocks.L.hook_resid_post` to L + 1. Sources: a SAELens directory tree (`cfg.json` +
`sae_weights.safetensors`, v5 or v6 config), Gemma Scope `params.npz` files under a `layer_N` folder, or
`"saelens:RELEASE"` with `sae_ids` (needs the `qktrace[saelens]` extra).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from qktrace.config import DEMO_NAME, DEMO_SAES
from qktrace.errors import OutOfRangeError, SAELoadError, SAEMismatchError, check_index

logger = logging.getLogger(__name__)

ARCHITECTURES = ("standard", "jumprelu", "topk")
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_LAYER_DIR = re.compile(r"^layer_(\d+)$")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
LABELS_FILE, NPZ_FILE = "labels.json", "params.npz"


class ModelLike(Protocol):
    @property
    def d_model(self) -> int: ...
    @property
    def n_layers(self) -> int: ...

    name: str


def hook_checkpoint(hook_name: str, where: str = "SAE") -> int:
    """`blocks.L.hook_resid_pre` -> L, `blocks.L.hook_resid_post` -> L + 1; anything else is a mismatch."""
    m = _RESID_HOOK.match(hook_name)
    if m is None:
        raise SAEMismatchError(
            f"{where} reads hook '{hook_name}': only residual-stream SAEs are supported "
            "(blocks.L.hook_resid_pre or blocks.L.hook_resid_post): use a residual-stream SAE"
        )
    return int(m.group(1)) + (m.group(2) == "post")


@dataclass(frozen=True, eq=False)
class FeatureActs:
    """Active features of one checkpoint over a prompt, COO layout sorted by (pos, feature)."""

    pos: Tensor  # [n] long
    feature: Tensor  # [n] long
    act: Tensor  # [n]
    recon: Tensor  # [pos, d_model], decode(dense acts), includes b_dec
    error: Tensor  # [pos, d_model], resid - recon

    def at(self, p: int) -> tuple[Tensor, Tensor]:
        """(features, acts) active at position p (negative counts from the end)."""
        p = check_index(p, self.recon.shape[0], "position", allow_negative=True)
        lo, hi = torch.searchsorted(self.pos, torch.tensor([p, p + 1], device=self.pos.device)).tolist()
        return self.feature[lo:hi], self.act[lo:hi]


@dataclass(frozen=True, eq=False)
class SAE:
    """One residual-stream SAE with SAELens / Gemma Scope encoder semantics."""

    checkpoint: int
    architecture: str  # "standard" | "jumprelu" | "topk"
    W_enc: Tensor  # [d_model, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_model]
    b_dec: Tensor  # [d_model]
    threshold: Tensor | None = None  # [d_sae], jumprelu only
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True
    hook_name: str = ""  # defaults to blocks.{checkpoint}.hook_resid_pre
    source: str = ""
    labels: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.hook_name:
            object.__setattr__(self, "hook_name", f"blocks.{self.checkpoint}.hook_resid_pre")
        where = f"SAE from {self.source or self.hook_name}"
        if self.architecture not in ARCHITECTURES:
            raise SAELoadError(
                f"{where} has architecture '{self.architecture}': supported are {', '.join(ARCHITECTURES)}"
            )
        d_model, d_sae = self.W_enc.shape if self.W_enc.dim() == 2 else (-1, -1)
        expected = {"W_enc": (d_model, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_model)}
        expected["b_dec"] = (d_model,)
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise SAELoadError(f"{where} is jumprelu but has no threshold: add a [d_sae] threshold tensor")
            expected["threshold"] = (d_sae,)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if d_model < 0 or got != shape:
                raise SAELoadError(
                    f"{where} has {name} of shape {list(got)}, expected {list(shape)} "
                    "(W_enc [d_model, d_sae]): re-export the SAE with consistent weights"
                )
        if self.architecture == "topk" and (self.k is None or not 0 < self.k <= d_sae):
            raise SAELoadError(f"{where} is topk with k={self.k}: k must be in 1..d_sae={d_sae}")

    @property
    def d_model(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def _input(self, resid: Tensor) -> Tensor:
        if resid.shape[-1] != self.d_model:
            raise SAEMismatchError(
                f"resid has width {resid.shape[-1]} but the SAE at checkpoint {self.checkpoint} has "
                f"d_in={self.d_model}: pass the residual of the model this SAE was trained on"
            )
        return resid.to(device=self.W_enc.device, dtype=self.W_enc.dtype)

    def encode(self, resid: Tensor) -> Tensor:
        """resid [..., pos, d_model] -> dense feature acts [..., pos, d_sae], all >= 0."""
        x = self._input(resid)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc  # [pos, d_sae]
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return pre.relu() * (pre > self.threshold)
        assert self.k is not None
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, acts: Tensor) -> Tensor:
        """acts [..., pos, d_sae] -> reconstruction [..., pos, d_model] (includes b_dec)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def sparse(self, resid: Tensor) -> FeatureActs:
        """resid [pos, d_model] -> the active features, with resid == sum_i a_i W_dec[f_i] + b_dec + error."""
        if resid.dim() != 2:
            raise SAEMismatchError(
                f"sparse() needs resid of shape [pos, d_model], got {list(resid.shape)}: pass one prompt"
            )
        x = self._input(resid)
        dense = self.encode(x)  # [pos, d_sae]
        recon = self.decode(dense)  # [pos, d_model]
        pos, feature = dense.nonzero(as_tuple=True)  # row-major, so sorted by (pos, feature)
        return FeatureActs(pos=pos, feature=feature, act=dense[pos, feature], recon=recon, error=x - recon)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """A copy with every tensor moved to `device` and/or cast to `dtype`."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if self.threshold is not None else ())
        return dataclasses.replace(self, **{n: getattr(self, n).to(device=device, dtype=dtype) for n in names})

    def label(self, feature: int) -> str:
        """Short human label of a feature: from labels.json when known, else `c{checkpoint}/f{feature}`."""
        return self.labels.get(feature, f"c{self.checkpoint}/f{feature}")


class SAESet(Mapping[int, SAE]):
    """checkpoint -> SAE; not every checkpoint needs one."""

    def __init__(self, saes: Mapping[int, SAE]) -> None:
        self._saes = dict(sorted(saes.items()))

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(self._saes)

    def __getitem__(self, checkpoint: int) -> SAE:
        if checkpoint not in self._saes:
            have = ", ".join(map(str, self._saes)) or "none"
            raise OutOfRangeError(
                f"no SAE at checkpoint {checkpoint}: loaded checkpoints are {have}; pick one of these "
                "or load an SAE for it"
            )
        return self._saes[checkpoint]

    def __contains__(self, checkpoint: object) -> bool:
        return checkpoint in self._saes

    def get(self, checkpoint: int, default: Any = None) -> Any:  # type: ignore[override]
        return self._saes.get(checkpoint, default)

    def __iter__(self) -> Iterator[int]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    def __repr__(self) -> str:
        return f"SAESet(checkpoints={self.checkpoints})"

    def describe(self) -> list[dict[str, Any]]:
        """One row per SAE for `qktrace info`."""
        keys = ("hook_name", "d_sae", "architecture", "k", "source")
        return [{"checkpoint": c} | {key: getattr(s, key) for key in keys} for c, s in self._saes.items()]


# ---------------------------------------------------------------------------------------------- loading


def _read_labels(directory: Path) -> dict[int, str]:
    path = directory / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        return {int(i): str(text) for i, text in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError, OSError) as e:
        raise SAELoadError(
            f"{path} is not a JSON object of feature index -> label ({type(e).__name__}): fix or delete it"
        ) from None


def _resolve_sae_lens_cfg(cfg: dict[str, Any], path: Path) -> tuple[str, str, int | None, bool]:
    """(architecture, hook_name, k, apply_b_dec_to_input) from a SAELens v5 or v6 cfg.json."""
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not isinstance(hook, str):
        raise SAELoadError(f'{path} has no hook_name: add "metadata": {{"hook_name": "blocks.L.hook_resid_pre"}}')
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SAELoadError(
            f"{path} has normalize_activations='{norm}', which is not supported: "
            "fold the normalization into the weights and set it to 'none'"
        )
    act_fn = cfg.get("activation_fn_str", "relu")
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture") or ("topk" if act_fn == "topk" else "standard")
    if arch == "standard" and act_fn not in ("relu", "topk"):
        raise SAELoadError(f"{path} has activation_fn_str='{act_fn}': only relu, topk and jumprelu are supported")
    if act_fn == "topk" and arch == "standard":
        arch = "topk"
    k = cfg.get("k", act_kwargs.get("k")) if arch == "topk" else None
    if arch == "topk" and k is None:
        raise SAELoadError(f'{path} is a topk SAE without k: add "k" to the config')
    if cfg.get("rescale_acts_by_decoder_norm") or cfg.get("finetuning_scaling_factor"):
        raise SAELoadError(f"{path} rescales activations after encoding, which is not supported: fold it in")
    return str(arch), hook, None if k is None else int(k), bool(cfg.get("apply_b_dec_to_input", True))


def _load_sae_lens_dir(directory: Path, device: str | torch.device, dtype: torch.dtype) -> SAE:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not an object")
    except (ValueError, OSError) as e:
        raise SAELoadError(f"{cfg_path} is not a valid SAELens cfg.json ({e}): re-download or re-export it") from None
    arch, hook, k, apply_b_dec = _resolve_sae_lens_cfg(cfg, cfg_path)
    if not weights_path.is_file():
        raise SAELoadError(f"{weights_path} is missing: put {WEIGHTS_FILE} beside {cfg_path.name}")
    try:
        w = load_file(str(weights_path))
    except Exception as e:  # safetensors raises several types on truncated/corrupt files
        raise SAELoadError(
            f"{weights_path} is not a readable safetensors file ({type(e).__name__}): re-download or re-save"
        ) from None
    if "threshold" not in w and "log_threshold" in w:
        w["threshold"] = w["log_threshold"].exp()
    return _assemble(w, arch, hook, k, apply_b_dec, str(directory), _read_labels(directory), device, dtype)


def _load_npz(path: Path, device: str | torch.device, dtype: torch.dtype) -> SAE:
    # absolute(), not resolve(): the HF cache symlinks params.npz to a blob outside the layer_N folder
    layers = [int(m.group(1)) for part in path.absolute().parts if (m := _LAYER_DIR.match(part))]
    if not layers:
        raise SAELoadError(
            f"cannot tell the layer of {path}: put it under a layer_N folder as in Gemma Scope "
            "(e.g. layer_12/width_16k/average_l0_82/params.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            w = {name: torch.from_numpy(np.array(z[name])) for name in z.files}
    except Exception as e:
        raise SAELoadError(
            f"{path} is not a readable npz file ({type(e).__name__}): re-download or re-export it"
        ) from None
    hook = f"blocks.{layers[-1]}.hook_resid_post"  # Gemma Scope residual SAEs read resid_post of layer N
    return _assemble(w, "jumprelu", hook, None, False, str(path), _read_labels(path.parent), device, dtype)


def _assemble(
    w: Mapping[str, Tensor],
    arch: str,
    hook: str,
    k: int | None,
    apply_b_dec: bool,
    source: str,
    labels: Mapping[int, str],
    device: str | torch.device,
    dtype: torch.dtype,
) -> SAE:
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [n for n in needed if n not in w]
    if missing:
        raise SAELoadError(f"SAE weights at {source} lack {', '.join(missing)}: re-export with all of {needed}")
    t = {n: w[n].detach().to(device=device, dtype=dtype) for n in needed}
    c = hook_checkpoint(hook, f"SAE at {source}")
    return SAE(c, arch, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"), k, apply_b_dec,
               hook, source, labels)  # fmt: skip


def _load_path(path: Path, device: str | torch.device, dtype: torch.dtype) -> list[SAE]:
    if not path.exists():
        raise SAELoadError(
            f"SAE path {path} does not exist: pass a SAELens SAE directory, a params.npz or 'saelens:RELEASE'"
        )
    if path.is_file():
        if path.suffix == ".npz":
            return [_load_npz(path, device, dtype)]
        if path.name in (CFG_FILE, WEIGHTS_FILE):
            return [_load_sae_lens_dir(path.parent, device, dtype)]
        raise SAELoadError(f"{path} is not an SAE file: pass a SAELens directory (cfg.json) or a params.npz")
    if (path / CFG_FILE).is_file():
        return [_load_sae_lens_dir(path, device, dtype)]
    cfgs = sorted(p.parent for p in path.rglob(CFG_FILE) if (p.parent / WEIGHTS_FILE).is_file())
    npzs = sorted(path.rglob(NPZ_FILE))
    if not cfgs and not npzs:
        raise SAELoadError(
            f"no SAEs found under {path}: expected folders with {CFG_FILE} + {WEIGHTS_FILE}, or {NPZ_FILE}"
        )
    return [_load_sae_lens_dir(d, device, dtype) for d in cfgs] + [_load_npz(p, device, dtype) for p in npzs]


def _load_from_sae_lens(
    release: str, sae_ids: Sequence[str], device: str | torch.device, dtype: torch.dtype
) -> list[SAE]:
    try:
        sae_lens = importlib.import_module("sae_lens")
    except ImportError:
        raise SAELoadError(
            f"loading 'saelens:{release}' needs the sae_lens package: pip install 'qktrace[saelens]'"
        ) from None
    out = []
    for sae_id in sae_ids:
        source = f"saelens:{release}/{sae_id}"
        try:
            loaded = sae_lens.SAE.from_pretrained(release, sae_id, device=str(device))
        except Exception as e:
            msg = " ".join(str(e).split())[:200]
            raise SAELoadError(f"sae_lens could not load {source} ({type(e).__name__}: {msg}): check the ids") from None
        sae = loaded[0] if isinstance(loaded, tuple) else loaded  # sae_lens < 6 returns (sae, cfg, sparsity)
        cfg_dict = dict(sae.cfg.to_dict())  # v6: architecture + metadata.hook_name; v5: both top level
        meta = cfg_dict.get("metadata") or cfg_dict.get("meta") or {}
        cfg_dict["metadata"] = meta if isinstance(meta, dict) else vars(meta)
        arch, hook, k, apply_b_dec = _resolve_sae_lens_cfg(cfg_dict, Path(source))
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        w = {n: getattr(sae, n) for n in names if isinstance(getattr(sae, n, None), Tensor)}
        if "threshold" not in w and hasattr(sae, "log_threshold"):
            w["threshold"] = sae.log_threshold.exp()
        out.append(_assemble(w, arch, hook, k, apply_b_dec, source, {}, device, dtype))
    return out


def load_saes(
    source: str | os.PathLike[str],
    model: ModelLike,
    *,
    sae_ids: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SAESet:
    """Load residual SAEs for `model` (anything with d_model, n_layers, name), keyed by checkpoint.

    `source` is a SAELens directory tree or single SAE folder, a Gemma Scope params.npz (or a tree of them),
    or "saelens:RELEASE" together with `sae_ids`. For a local directory, `sae_ids` picks sub-paths of it.
    """
    if isinstance(source, str) and source.startswith("saelens:"):
        release = source.removeprefix("saelens:")
        if not sae_ids:
            raise SAELoadError(f"'{source}' needs sae_ids, e.g. sae_ids=['blocks.8.hook_resid_pre']")
        saes = _load_from_sae_lens(release, sae_ids, device, dtype)
    else:
        root = DEMO_SAES if str(source) == DEMO_NAME else Path(source).expanduser()
        paths = [root / i for i in sae_ids] if sae_ids else [root]
        saes = [s for p in paths for s in _load_path(p, device, dtype)]
    by_checkpoint: dict[int, SAE] = {}
    for sae in saes:
        if sae.d_model != model.d_model:
            raise SAEMismatchError(
                f"SAE at {sae.source} has d_in={sae.d_model} but model '{model.name}' has "
                f"d_model={model.d_model}: use SAEs trained on this model"
            )
        if not 0 <= sae.checkpoint <= model.n_layers:
            raise SAEMismatchError(
                f"SAE at {sae.source} reads '{sae.hook_name}' (checkpoint {sae.checkpoint}) but model "
                f"'{model.name}' has {model.n_layers} layers (checkpoints 0..{model.n_layers}): "
                "use SAEs trained on this model"
            )
        if (other := by_checkpoint.get(sae.checkpoint)) is not None:
            raise SAELoadError(
                f"two SAEs at checkpoint {sae.checkpoint}: {other.source} ({other.hook_name}) and "
                f"{sae.source} ({sae.hook_name}): keep one SAE per checkpoint or pass sae_ids"
            )
        by_checkpoint[sae.checkpoint] = sae
        logger.info("loaded %s SAE at checkpoint %d from %s", sae.architecture, sae.checkpoint, sae.source)
    return SAESet(by_checkpoint)


def save_sae_lens(sae: SAE, directory: str | os.PathLike[str]) -> Path:
    """Write `sae` as SAELens v6 (cfg.json, sae_weights.safetensors, labels.json); return the folder."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "metadata": {"hook_name": sae.hook_name},
    } | ({"k": sae.k} if sae.k is not None else {})
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        weights["threshold"] = sae.threshold
    save_file({n: t.detach().cpu().contiguous() for n, t in weights.items()}, str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    if sae.labels:
        labels = {str(i): text for i, text in sorted(sae.labels.items())}
        (out / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    return out
