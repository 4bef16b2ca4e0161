"""`load_saes`: local folders and files of every layout, or named releases, into an `SAESet`.

Data flows one way: a reader (`formats`) turns files into a `RawSAE`; `build_sae` checks its config against
its weights and folds the release's input conventions into them (`conventions`); `load_saes` keys the SAEs
by checkpoint and checks them against the model.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import parse_device, parse_dtype
from ..errors import SAELoadError, SAEMismatchError
from .conventions import check_config, check_folded, check_tensors, fold, read_sae_lens_cfg
from .formats import CFG_FILE, NPZ_FILE, WEIGHTS_FILE, RawSAE, find_saes, layout_of, read_path
from .labels import neuronpedia_labels
from .releases import Release, find_release, hub_file, known_releases, registry
from .sae import SAE, SAESet, hook_checkpoint

logger = logging.getLogger(__name__)


class ModelLike(Protocol):
    @property
    def d_model(self) -> int: ...
    @property
    def n_layers(self) -> int: ...

    name: str


def norm_kind(model: Any) -> str | None:
    """'layernorm' | 'rmsnorm' of a qktrace Model (None for anything that does not say)."""
    try:
        kind = model.anatomy.describe()["norm"]
    except (AttributeError, KeyError, TypeError):
        return None
    return kind if isinstance(kind, str) else None


def build_sae(
    raw: RawSAE, norm: str | None, device: str | torch.device, dtype: torch.dtype, checkpoint: int | None = None
) -> SAE:
    """A `RawSAE` checked, with its conventions folded in, on `device` in `dtype`.

    `checkpoint`: for coders off the residual stream (attention SAEs, transcoders), the layer they sit at;
    None reads the residual checkpoint off the hook name (and refuses any other hook)."""
    cfg = raw.config
    check_config(cfg, raw.weights, raw.config_file)
    if checkpoint is None:
        checkpoint = hook_checkpoint(cfg.hook_name, f"SAE at {raw.source}")
    centre = cfg.centre and (norm is None or norm in registry()["centring"]["norms"])
    if cfg.centre and not centre:
        logger.info(
            "%s: not centring (TransformerLens centres only LayerNorm models; this one is %s)", raw.source, norm
        )
    w, notes = fold(raw.weights, cfg, centre, raw.config_file)
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if cfg.architecture == "jumprelu" else ())
    t = {n: w[n].detach().to(device=device, dtype=dtype) for n in names}
    check_folded(t, notes, dtype, raw.config_file)
    return SAE(
        checkpoint=checkpoint,
        architecture=cfg.architecture,
        W_enc=t["W_enc"],
        b_enc=t["b_enc"],
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        threshold=t.get("threshold"),
        k=cfg.k,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        hook_name=cfg.hook_name,
        source=raw.source,
        labels=raw.labels,
        model_name=cfg.model_name,
        prepend_bos=cfg.prepend_bos,
        context_size=cfg.context_size,
        neuronpedia_id=cfg.neuronpedia_id,
        conventions=tuple(notes),
    )


def sae_paths(path: Path) -> list[Path]:
    """The SAE folders or files a local source holds, found without reading any weights (front ends check a
    source with it before starting work); SAELoadError, one line, when there are none."""
    if not str(path).strip() or not path.exists():
        raise SAELoadError(
            f"SAE path {str(path)!r} does not exist: pass a SAELens SAE directory, a params.npz or 'saelens:RELEASE'"
        )
    if path.is_file() or layout_of(path) is not None:
        if layout_of(path) is None:
            raise SAELoadError(
                f"{path} is not an SAE: pass a SAELens folder (cfg.json), a Gemma Scope params.npz "
                "or a Llama Scope folder (hyperparams.json)"
            )
        return [path]
    found = find_saes(path)
    if not found:
        raise SAELoadError(
            f"no SAEs found under {path}: expected folders with {CFG_FILE} + {WEIGHTS_FILE}, Llama Scope "
            f"hyperparams.json, or {NPZ_FILE}"
        )
    return found


def _local(path: Path) -> list[RawSAE]:
    return [read_path(p) for p in sae_paths(path)]


def _from_release(release: Release, sae_id: str) -> RawSAE:
    """Fetch one SAE of a release through the Hugging Face cache and read it with its layout's reader."""
    what = f"saelens:{release.name}/{sae_id}"
    folder = release.entry(sae_id)["path"].strip("/")
    layout = registry()["layouts"].get(release.layout)
    if layout is None:
        raise SAELoadError(f"{what} uses the '{release.layout}' file layout, which qktrace does not read")
    files = [layout[key] for key in ("config", "config_file", "weights") if isinstance(layout.get(key), str)]
    paths = [hub_file(release.repo_id, f"{folder}/{name}" if folder else name, what) for name in files]
    repo_kind = next((k for k in ("res", "mlp", "att") if k in release.repo_id.split("/")[-1].split("-")), "res")
    if release.layout == "gemma_2":
        raw = read_path(paths[-1], release.overrides(sae_id), repo_kind)
    else:  # the folder holding the config (hf_hub_download keeps the repo's folder structure)
        raw = read_path(paths[0].parent, release.overrides(sae_id))
    config = raw.config if raw.config.model_name else replace(raw.config, model_name=release.model)
    return RawSAE(raw.weights, config, what, raw.config_file, raw.labels)


def _with_sae_lens(release: str, sae_id: str) -> RawSAE:
    """A release qktrace cannot read itself, through sae_lens (its conventions are then read from its config)."""
    what = f"saelens:{release}/{sae_id}"
    try:
        sae_lens = importlib.import_module("sae_lens")
    except ImportError:
        known = ", ".join(known_releases())
        raise SAELoadError(
            f"release '{release}' is not in qktrace's registry (which has {known}) and sae_lens is not installed: "
            "pip install 'qktrace[saelens]', or download the SAE folder and pass its path"
        ) from None
    try:
        loaded = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise SAELoadError(f"sae_lens could not load {what} ({type(e).__name__}: {msg}): check the ids") from None
    sae = loaded[0] if isinstance(loaded, tuple) else loaded  # sae_lens < 6 returns (sae, cfg, sparsity)
    cfg = dict(sae.cfg.to_dict())  # v6: architecture + metadata; v5: everything top level
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    cfg["metadata"] = meta if isinstance(meta, dict) else dict(vars(meta))
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    w = {n: getattr(sae, n).detach() for n in names if isinstance(getattr(sae, n, None), torch.Tensor)}
    if "threshold" not in w and isinstance(getattr(sae, "log_threshold", None), torch.Tensor):
        w["threshold"] = sae.log_threshold.detach().exp()
    check_tensors(w, what)
    return RawSAE(w, read_sae_lens_cfg(cfg, what), what, what, {})


def _release_saes(name: str, sae_ids: Sequence[str] | None) -> list[RawSAE]:
    release = find_release(name)
    if release is None and "/" in name:  # a Hugging Face repo id in SAELens layout, folders as ids
        release = Release(name, name, "", "sae_lens", saes={i: {"path": i} for i in sae_ids or ()})
    if not sae_ids:
        ids = list(release.saes)[:3] if release else ["blocks.8.hook_resid_pre"]
        raise SAELoadError(f"'saelens:{name}' needs sae_ids, e.g. sae_ids={ids}: pick the SAEs of the release")
    if release is not None and release.layout in registry()["layouts"]:
        return [_from_release(release, i) for i in sae_ids]
    return [_with_sae_lens(name, i) for i in sae_ids]


def load_saes(
    source: str | os.PathLike[str],
    model: ModelLike,
    *,
    sae_ids: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> SAESet:
    """Load residual SAEs for `model` (anything with d_model, n_layers, name), keyed by checkpoint.

    `source`: a SAELens folder or tree of them, a Gemma Scope params.npz (or a tree), a Llama Scope folder
    (hyperparams.json + checkpoints/final.safetensors), "demo", or "saelens:RELEASE" with `sae_ids` (read
    through the Hugging Face cache; sae_lens is needed only for releases qktrace's registry cannot read).
    For a local directory, `sae_ids` picks sub-paths of it. Each release's input conventions are folded
    into the weights, so every SAE reads the model's raw residual (see `qktrace.saes.conventions`).
    `labels`: Neuronpedia explanation exports (.json / .jsonl / .gz, or folders of them) to label features.
    `device` (cpu, cuda, cuda:N, auto) and `dtype` (float32, bfloat16, float16) as in `load_model`; the
    embedded demo's SAEs are `qktrace.config.DEMO_SAES` (`Tracer.load("demo")` resolves the name).
    """
    device, dtype = parse_device(device), parse_dtype(dtype)
    if isinstance(source, str) and source.startswith("saelens:"):
        raws = _release_saes(source.removeprefix("saelens:"), sae_ids)
    else:
        root = Path(source).expanduser()
        raws = [r for p in ([root / i for i in sae_ids] if sae_ids else [root]) for r in _local(p)]
    norm = norm_kind(model)
    by_checkpoint: dict[int, SAE] = {}
    for raw in raws:
        sae = build_sae(raw, norm, device, dtype)
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
        logger.info(
            "loaded %s SAE at checkpoint %d from %s%s",
            sae.architecture,
            sae.checkpoint,
            sae.source,
            f" (folded: {', '.join(sae.conventions)})" if sae.conventions else "",
        )
    saes = SAESet(by_checkpoint)
    return saes if labels is None else saes.with_labels(neuronpedia_labels(labels, saes))
