"""Input conventions of SAE releases, read from their configs with type checks and folded into the weights.

1. A file layout (SAELens cfg.json, Gemma Scope params.npz, Llama Scope hyperparams.json) is read into a
   `FileConfig`: every value type-checked, so `"apply_b_dec_to_input": "false"` is an error, not True.
2. `fold` rewrites the weights so that `SAE.encode(raw residual)` equals what the release's own code
   computes on the input it was trained on, and `decode` returns to residual units:

   - Centring (TransformerLens `center_writing_weights`, e.g. gpt2-small-res-jb): the SAE read
     P x with P = I - 11^T/d (the residual minus its mean over d_model). Since
     (P x - b_dec) W_enc + b_enc = (x - b_dec) (P W_enc) + b_enc - mean(b_dec) 1^T W_enc,
     W_enc <- P W_enc and b_enc <- b_enc - mean(b_dec) 1^T W_enc (the second only when b_dec is
     subtracted from the input). b_dec and W_dec stay: the reconstruction approximates the centred
     residual, and `FeatureActs.error = resid - recon` carries the mean component, so features + b_dec +
     error still sum to the raw residual exactly. In a LayerNorm model every read of the residual
     (attention and MLP norms, the final norm) removes that mean component, so QK terms and graph
     edges are exact and the error node's mean part contributes nothing. TransformerLens only centres
     LayerNorm models, so an RMSNorm model keeps the SAE as it is.
   - A constant activation scale s (`normalize_activations: expected_average_only_in`, Llama Scope's
     dataset-average norm): the SAE read s x; W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s,
     as SAELens's own `fold_activation_norm_scaling_factor` does. Per-token normalisations
     (`constant_norm_rescale`, `layer_norm`) are not linear maps and are refused.
   - TopK `rescale_acts_by_decoder_norm`: pre-activations times n_i = |W_dec[i]| before the TopK, acts
     divided by n_i before decoding: W_enc[:, i] <- n_i W_enc[:, i], b_enc <- n b_enc, W_dec[i] <- W_dec[i] / n_i.
   - A per-feature `finetuning_scaling_factor` f (older SAELens): recon = (f a) W_dec + b_dec, so W_dec <- f W_dec.

   Activations, thresholds and TopK choices are unchanged by every fold; only float rounding differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import SAELoadError, quoted
from .releases import registry

_MISSING = object()
_EXPECTED = {
    bool: "true or false",
    int: "an integer below 2**53",
    float: "a number",
    str: "a string",
    dict: "an object",
}


def typed(value: Any, key: str, kind: type, where: str, *, optional: bool = False) -> Any:
    """`value` if it has JSON type `kind` (None allowed when `optional`), else a one-line SAELoadError."""
    if value is None and optional:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53,
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[kind]
    if not ok:
        raise SAELoadError(
            f"{where}: {key} is {quoted(value)} ({type(value).__name__}), expected {_EXPECTED[kind]}"
            f"{' or null' if optional else ''}: fix {key} in that file"
        )
    return float(value) if kind is float else value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range, 10**400
        return False


@dataclass(frozen=True)
class FileConfig:
    """What a file layout says about one SAE, type-checked, before its conventions are folded in."""

    architecture: str
    hook_name: str
    apply_b_dec_to_input: bool
    k: int | None = None
    d_in: int | None = None
    d_sae: int | None = None
    normalize_activations: str = "none"
    scale: float | None = None  # the constant input scale s, when normalize_activations is constant
    centre: bool = False  # trained on TransformerLens's centred residual
    rescale_acts_by_decoder_norm: bool = False
    finetuning_scaling_factor: bool = False
    model_name: str = ""
    prepend_bos: bool | None = None
    context_size: int | None = None
    neuronpedia_id: str = ""


def _major(version: str) -> int | None:
    head = version.strip().lstrip("v").split(".")[0]
    return int(head) if head.isdigit() else None


def read_sae_lens_cfg(cfg: Mapping[str, Any], where: str, overrides: Mapping[str, Any] | None = None) -> FileConfig:
    """A SAELens cfg.json (v6 with `metadata`, or the flat pre-6 layout) plus release overrides -> FileConfig.

    Release overrides win, then the v6 `metadata` block, then top-level keys (where pre-6 configs keep them).
    """
    overrides = overrides or {}
    meta = cfg.get("metadata", cfg.get("meta"))
    meta = typed(meta, "metadata", dict, where, optional=True) or {}

    def raw(key: str, default: Any = None) -> Any:
        for scope in (overrides, meta, cfg):
            if key in scope:
                return scope[key]
        return default

    def get(key: str, kind: type, default: Any = None, *, optional: bool = True) -> Any:
        value = raw(key, _MISSING)
        return default if value is _MISSING else typed(value, key, kind, where, optional=optional)

    version = get("sae_lens_version", str)
    pre_v6 = version is None or (_major(version) or 0) < 6
    defaults = registry()["layouts"]["sae_lens"]["defaults_before_v6"] if pre_v6 else {}
    hook = get("hook_name", str) or get("hook_point", str)
    if not hook:
        raise SAELoadError(f'{where} has no hook_name: add "metadata": {{"hook_name": "blocks.L.hook_resid_pre"}}')
    if get("hook_head_index", int) is not None or get("hook_point_head_index", int) is not None:
        raise SAELoadError(f"{where} reads a single attention head (hook_head_index): use a residual-stream SAE")
    act_fn = get("activation_fn", str) or get("activation_fn_str", str) or "relu"
    arch = get("architecture", str) or ("topk" if act_fn == "topk" else defaults.get("architecture", "standard"))
    if arch == "standard" and act_fn == "topk":
        arch = "topk"
    if arch == "standard" and act_fn != "relu":
        raise SAELoadError(f"{where} has activation_fn '{act_fn}': only relu, topk and jumprelu SAEs are supported")
    k = None
    if arch == "topk":
        kwargs = get("activation_fn_kwargs", dict) or {}
        k = get("k", int)
        k = typed(kwargs.get("k"), "activation_fn_kwargs.k", int, where) if k is None and "k" in kwargs else k
        if k is None:
            raise SAELoadError(f'{where} is a topk SAE without k: add "k" to the config')
    norm = raw("normalize_activations")
    if isinstance(norm, bool):  # pre-6 configs: True meant the constant, dataset-average scaling
        norm = "expected_average_only_in" if norm else "none"
    norm = typed(norm, "normalize_activations", str, where, optional=True) or "none"
    kwargs_model = get("model_from_pretrained_kwargs", dict) or {}
    flag = registry()["centring"]["flag"][1]
    centre = bool(typed(kwargs_model.get(flag, False), f"model_from_pretrained_kwargs.{flag}", bool, where))
    return FileConfig(
        architecture=arch,
        hook_name=hook,
        apply_b_dec_to_input=get(
            "apply_b_dec_to_input", bool, defaults.get("apply_b_dec_to_input", True), optional=False
        ),
        k=k,
        d_in=get("d_in", int),
        d_sae=get("d_sae", int),
        normalize_activations=norm,
        scale=get("norm_scaling_factor", float),
        centre=centre,
        rescale_acts_by_decoder_norm=bool(get("rescale_acts_by_decoder_norm", bool)),  # null: off
        finetuning_scaling_factor=bool(get("finetuning_scaling_factor", bool)),
        model_name=get("model_name", str) or "",
        prepend_bos=get("prepend_bos", bool, defaults.get("prepend_bos")),
        context_size=get("context_size", int),
        neuronpedia_id=get("neuronpedia_id", str) or "",
    )


def check_tensors(w: Mapping[str, Tensor], where: str) -> None:
    """Refuse NaN or infinite entries, naming the file and the tensor as the file names it."""
    for name, t in w.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SAELoadError(
                f"{where} has {bad} NaN or infinite values in tensor '{name}': re-download or re-export the SAE"
            )


def check_folded(w: Mapping[str, Tensor], notes: list[str], dtype: torch.dtype, where: str) -> None:
    """The weights as they will be used (conventions folded, in `dtype`) are finite: a scaling factor of
    1e39, or a threshold times a norm past float range, loads finite raw weights but gives NaN QK terms."""
    for name, t in w.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            folded = f" after folding {', '.join(notes)}" if notes else ""
            raise SAELoadError(
                f"{where}: {name} is NaN or infinite{folded} in {str(dtype).removeprefix('torch.')}: check its "
                "scaling factor, norm and threshold values (or load it in float32)"
            )


def check_config(cfg: FileConfig, w: Mapping[str, Tensor], where: str) -> None:
    """Config values that contradict the weights, or that no SAE could have, as one line each."""
    if cfg.architecture not in ("standard", "jumprelu", "topk"):
        raise SAELoadError(f"{where} has architecture '{cfg.architecture}': supported are standard, jumprelu, topk")
    d_in, d_sae = w["W_enc"].shape if w["W_enc"].dim() == 2 else (-1, -1)
    for key, want, got in (("d_in", cfg.d_in, d_in), ("d_sae", cfg.d_sae, d_sae)):
        if want is not None and want != got:
            raise SAELoadError(
                f"{where}: {key} is {want} but W_enc is [{d_in}, {d_sae}]: the config and the weights disagree; "
                "re-download or fix the config"
            )
    if cfg.k is not None and not 0 < cfg.k <= d_sae:
        raise SAELoadError(f"{where}: k is {cfg.k}, but a topk SAE keeps 1..d_sae={d_sae} features: fix k")
    if cfg.context_size is not None and cfg.context_size <= 0:
        raise SAELoadError(f"{where}: context_size is {cfg.context_size}: it must be a positive token count")
    threshold = w.get("threshold")
    if cfg.architecture == "jumprelu" and threshold is not None and bool((threshold < 0).any()):
        raise SAELoadError(
            f"{where} has a negative jumprelu threshold (min {float(threshold.min()):.4g}): thresholds are >= 0; "
            "if the tensor holds log thresholds, store it as log_threshold"
        )
    kind = registry()["normalize_activations"].get(cfg.normalize_activations)
    if kind is None or kind not in ("identity", "constant"):
        known = kind is not None
        raise SAELoadError(
            f"{where} has normalize_activations='{cfg.normalize_activations}', "
            + (
                "a per-token or data-dependent normalisation that cannot be folded into the weights: "
                if known
                else "which qktrace does not know: "
            )
            + "use an SAE trained without it, or fold it into the weights and set it to 'none'"
        )
    if kind == "constant":
        if cfg.scale is None:
            raise SAELoadError(
                f"{where} has normalize_activations='{cfg.normalize_activations}' but no scaling factor is known: "
                "load it by release name (saelens:RELEASE) so its norm_scaling_factor is read, or fold the "
                "factor into the weights and set normalize_activations to 'none'"
            )
        if not cfg.scale > 0:
            raise SAELoadError(f"{where}: the activation scaling factor is {cfg.scale}: it must be positive")


def fold(w: Mapping[str, Tensor], cfg: FileConfig, centre: bool, where: str) -> tuple[dict[str, Tensor], list[str]]:
    """The weights rewritten to read the raw residual (see the module docstring), and what was folded."""
    out = dict(w)
    dtype = torch.promote_types(w["W_enc"].dtype, torch.float32)
    W_enc, b_enc, W_dec, b_dec = (w[n].to(dtype) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    notes: list[str] = []
    if "scaling_factor" in w:
        f = w["scaling_factor"].to(dtype)
        if not bool((f == 1).all()):
            if not cfg.finetuning_scaling_factor:
                raise SAELoadError(
                    f"{where} has a scaling_factor tensor but finetuning_scaling_factor is not true: "
                    "fix the config or drop the tensor"
                )
            W_dec = W_dec * f[:, None]
            notes.append("finetuning scaling factor")
    if centre:
        if cfg.apply_b_dec_to_input:
            b_enc = b_enc - b_dec.mean() * W_enc.sum(0)
        W_enc = W_enc - W_enc.mean(0, keepdim=True)
        notes.append("centred residual")
    if cfg.normalize_activations != "none" and cfg.scale is not None and cfg.scale != 1.0:
        s = cfg.scale
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
        notes.append(f"input scale {s:.6g}")
    if cfg.rescale_acts_by_decoder_norm:
        n = W_dec.norm(dim=-1)  # [d_sae]
        if bool((n == 0).any()):
            raise SAELoadError(f"{where} rescales by decoder norms but some W_dec rows are zero: fix the weights")
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        notes.append("decoder-norm rescaling")
    if notes:
        out.update(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    out.pop("scaling_factor", None)
    return out, notes
