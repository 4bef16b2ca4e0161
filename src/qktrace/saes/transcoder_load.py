"""`load_transcoders` and `load_attention_saes`: local files of every layout into a `TranscoderSet` or an
`AttentionSAESet`, checked against the model before any weight is read.

A reader (`transcoder_formats`, or `formats` for attention SAEs) checks shapes from file headers against
the model, reads the weights in one orientation with constant scales folded in; this module resolves
which sites the release's hooks name (`releases.json`: `transcoder_sites`, `attention_sites`, which
depend on the model's norm and on whether it has post-MLP norms), and builds the coders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import parse_device, parse_dtype
from ..errors import Fix, SAELoadError, SAEMismatchError
from .attention import AttentionSAE, AttentionSAESet, attention_site
from .conventions import FileConfig, check_folded, read_sae_lens_cfg
from .formats import (
    CFG_FILE,
    LLAMA_SCOPE_CFG,
    NPZ_FILE,
    RawSAE,
    find_saes,
    layout_of,
    read_json,
    read_path,
    regular_file,
)
from .labels import dashboard_labels
from .load import ModelLike, build_sae, norm_kind, sae_paths
from .releases import registry
from .sae import SAE
from .transcoder import CrossLayerTranscoder, Transcoder, TranscoderSet
from .transcoder_formats import (
    Expect,
    RawCLT,
    RawTranscoder,
    hook_layer_of,
    layer_from_path,
    npz_shapes,
    read_circuit_tracer,
    read_gemma_transcoder,
    read_llama_scope_transcoder,
    read_sae_lens_transcoder,
)

logger = logging.getLogger(__name__)


def _post_mlp_norm(model: Any) -> bool:
    try:
        return model.anatomy.layers[0].post_mlp is not None
    except (AttributeError, IndexError):
        return False


def transcoder_sites(input_hook: str, output_hook: str, model: Any, where: str) -> tuple[str, str]:
    """(input site, output site) that a release's hooks name for this model (see `releases.json`)."""
    table = registry()["transcoder_sites"]
    keys = {"input": norm_kind(model), "output": "post_norm" if _post_mlp_norm(model) else "plain"}
    sites = []
    for which, hook in (("input", input_hook), ("output", output_hook)):
        suffix = hook.split(".", 2)[2] if hook_layer_of(hook) is not None else hook
        site = table[which].get(suffix)
        if isinstance(site, dict):
            if keys[which] not in site:
                raise SAEMismatchError(
                    f"{where}: what '{hook}' means depends on the model's norm, which '{getattr(model, 'name', '?')}' "
                    "does not say: pass a qktrace Model (load_model)"
                )
            site = site[keys[which]]
        if site is None:
            known = ", ".join(table[which])
            raise SAELoadError(f"{where} {which} hook '{hook}' is not an MLP {which} qktrace knows ({known})")
        sites.append(site)
    if hook_layer_of(input_hook) != hook_layer_of(output_hook):
        raise SAELoadError(
            f"{where} reads '{input_hook}' but writes '{output_hook}': a transcoder writes its own layer"
        )
    return sites[0], sites[1]


def _check_parallel(model: Any, input_site: str, where: str) -> None:
    try:
        parallel = model.anatomy.layers[0].parallel
    except (AttributeError, IndexError):
        return
    if parallel and input_site == "resid_mid":
        raise SAEMismatchError(
            f"{where} reads the residual after attention, but model '{model.name}' runs attention and MLP in "
            "parallel (no such residual): use transcoders that read the MLP input"
        )


def _coder(raw: RawTranscoder, device: torch.device, dtype: torch.dtype) -> SAE:
    """The encoder and decoder as an `SAE` (b_dec an output bias), checked as residual SAEs are."""
    meta = raw.meta
    cfg = FileConfig(
        architecture=raw.architecture,
        hook_name=raw.input_hook,
        apply_b_dec_to_input=False,
        k=raw.k,
        model_name=meta.get("model_name") or "",
        prepend_bos=meta.get("prepend_bos"),
        context_size=meta.get("context_size"),
    )
    weights = {n: w for n, w in raw.weights.items() if n != "W_skip"}
    return build_sae(RawSAE(weights, cfg, raw.source, raw.source, raw.labels), None, device, dtype, raw.layer)


def build_transcoder(raw: RawTranscoder, model: Any, device: torch.device, dtype: torch.dtype) -> Transcoder:
    where = f"transcoder at {raw.source}"
    input_site, output_site = transcoder_sites(raw.input_hook, raw.output_hook, model, where)
    _check_parallel(model, input_site, where)
    skip = raw.weights.get("W_skip")
    if skip is not None:  # finite in the file, perhaps not in `dtype`
        skip = skip.detach().to(device=device, dtype=dtype)
        check_folded({"W_skip": skip}, [], dtype, raw.source)
    return Transcoder(
        layer=raw.layer,
        coder=_coder(raw, device, dtype),
        input_site=input_site,
        output_site=output_site,
        W_skip=skip,
        hook_name_out=raw.output_hook,
    )


def build_clt(raw: RawCLT, model: Any, device: torch.device, dtype: torch.dtype) -> CrossLayerTranscoder:
    where = f"cross-layer transcoder at {raw.source}"
    input_site, output_site = transcoder_sites(raw.input_hook, raw.output_hook, model, where)
    _check_parallel(model, input_site, where)
    t = {n: w.detach().to(device=device, dtype=dtype) for n, w in raw.weights.items()}
    W_dec = tuple(w.detach().to(device=device, dtype=dtype) for w in raw.W_dec)
    check_folded(t | {f"W_dec_{i}": w for i, w in enumerate(W_dec)}, [], dtype, raw.source)
    return CrossLayerTranscoder(
        architecture=raw.architecture,
        W_enc=t["W_enc"],
        b_enc=t["b_enc"],
        W_dec=W_dec,
        b_dec=t["b_dec"],
        input_site=input_site,
        output_site=output_site,
        threshold=t.get("threshold"),
        source=raw.source,
    )


def _layout(path: Path) -> str | None:
    """Which transcoder layout a folder or file is, by the config names it holds (a FIFO or a link to a device
    at such a name counts, so that its reader names it); two at once is ambiguous, and refused."""
    ct_config = registry()["transcoder_layouts"]["circuit_tracer"]["config"]
    if not path.is_dir():
        if path.suffix in (".yaml", ".yml"):
            return "circuit_tracer"
        return "gemma_2" if path.suffix == ".npz" else None
    names = {ct_config: "circuit_tracer", CFG_FILE: "sae_lens", LLAMA_SCOPE_CFG: "llama_scope"}
    held = [name for name in names if os.path.lexists(path / name)]
    if len(held) > 1:
        raise SAELoadError(
            f"{path} holds both {' and '.join(held)}: one folder is one transcoder layout; move one of them out"
        )
    return names[held[0]] if held else None


def read_transcoders(path: Path, expect: Expect) -> list[RawTranscoder] | RawCLT:
    """Every transcoder a local source holds: a circuit-tracer folder or config.yaml, a Gemma Scope params.npz,
    a Llama Scope LXTC folder, a SAELens transcoder folder, or a tree of the last three."""
    if not str(path).strip() or not path.exists():
        raise SAELoadError(f"transcoder path {str(path)!r} does not exist: pass a transcoder folder or file")
    kind = _layout(path)
    if not path.is_dir() and kind is None:
        regular_file(path, "transcoder", "pass a folder, a config.yaml or a Gemma Scope params.npz")
        raise SAELoadError(f"{path} is not a transcoder: pass a folder, a config.yaml or a Gemma Scope params.npz")
    if kind == "circuit_tracer":
        return read_circuit_tracer(path, expect)
    if kind == "gemma_2":
        return [read_gemma_transcoder(path, expect)]
    if kind == "sae_lens":
        return [read_sae_lens_transcoder(path, expect)]
    if kind == "llama_scope":
        return [read_llama_scope_transcoder(path, expect)]
    found = [p for p in find_saes(path) if p != path]
    if not found:
        ct_config = registry()["transcoder_layouts"]["circuit_tracer"]["config"]
        raise SAELoadError(
            f"no transcoders found under {path}: expected {ct_config}, {CFG_FILE}, {LLAMA_SCOPE_CFG} or {NPZ_FILE}"
        )
    raws: list[RawTranscoder] = []
    for p in found:
        one = read_transcoders(p, expect)
        assert isinstance(one, list)
        raws += one
    return raws


def load_transcoders(
    source: str | os.PathLike[str],
    model: ModelLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> TranscoderSet:
    """Load the transcoders of `model` (a qktrace Model: its norm decides what some hooks mean) from `source`:
    a circuit-tracer folder (config.yaml + layer_L.safetensors, or a CLT's W_enc_L / W_dec_L files) or its
    config.yaml, a Gemma Scope transcoder params.npz (or a tree of them), a Llama Scope LXTC folder, or a
    SAELens transcoder / skip_transcoder / jumprelu_transcoder folder (or a tree of them). Every tensor's shape
    is checked against the model and the config from the file headers before any weight is read."""
    device, dtype = parse_device(device), parse_dtype(dtype)
    expect = Expect(model.d_model, model.n_layers, model.name)
    raws = read_transcoders(Path(source).expanduser(), expect)
    if isinstance(raws, RawCLT):
        clt = build_clt(raws, model, device, dtype)
        labels = {(ly, f): t for ly in range(clt.n_layers) for f, t in _dash_labels(clt.source, ly, "transcoder")}
        clt = dataclasses.replace(clt, labels={**labels, **clt.labels})
        logger.info(
            "loaded a %s cross-layer transcoder over %d layers from %s", clt.architecture, clt.n_layers, clt.source
        )
        return TranscoderSet(clt=clt)
    by_layer: dict[int, Transcoder] = {}
    for raw in raws:
        if not 0 <= raw.layer < model.n_layers:
            raise SAEMismatchError(
                f"transcoder at {raw.source} is for layer {raw.layer} but model '{model.name}' has layers "
                f"0..{model.n_layers - 1}: use transcoders trained on this model"
            )
        if raw.layer in by_layer:
            raise SAELoadError(
                f"two transcoders at layer {raw.layer}: {by_layer[raw.layer].source} and {raw.source}: "
                "keep one per layer"
            )
        raw = dataclasses.replace(raw, labels={**dict(_dash_labels(raw.source, raw.layer, "transcoder")), **raw.labels})
        by_layer[raw.layer] = build_transcoder(raw, model, device, dtype)
        logger.info("loaded a %s transcoder at layer %d from %s", raw.architecture, raw.layer, raw.source)
    return TranscoderSet(by_layer)


def _dash_labels(source: str, layer: int, kind: str) -> Iterable[tuple[int, str]]:
    """The dashboards job's labels of layer `layer`'s features (`blocks.L.transcoder` or `blocks.L.attn`, found
    from the coder's `source` by `labels.dashboards_folder`); files beside the weights win over them."""
    return dashboard_labels(source, f"blocks.{layer}.{kind}").items()


def _heads(model: Any, layer: int) -> tuple[int, int]:
    """(n_heads, d_head) of a layer: from a qktrace Model's anatomy, else the model's own attributes."""
    try:
        lay = model.anatomy.layers[layer]
        return int(lay.n_heads), int(lay.d_head)
    except (AttributeError, IndexError):
        return int(model.n_heads), int(model.d_head)


def _attention_config(path: Path) -> tuple[FileConfig | None, str]:
    """The config (SAELens) and the hook an attention SAE names, read without its weights."""
    if not path.is_dir():  # a FIFO or a device at an npz's name is refused by name before it is opened
        regular_file(path, "attention SAE", "pass a SAELens folder or a Gemma Scope att params.npz")
    kind = layout_of(path)
    folder = path.parent if path.is_file() else path
    if kind == "sae_lens" or os.path.lexists(folder / CFG_FILE):
        cfg = read_sae_lens_cfg(read_json(folder / CFG_FILE, "SAELens cfg.json"), str(folder / CFG_FILE))
        return cfg, cfg.hook_name
    if kind == "gemma_2":
        layer = layer_from_path(path)
        if layer is None:
            raise SAELoadError(
                f"cannot tell the layer of {path}: put it under a layer_N folder as Gemma Scope does "
                "(layer_12/width_16k/average_l0_82/params.npz)"
            )
        return None, registry()["layouts"]["gemma_2"]["hook_by_repo_kind"]["att"].format(layer=layer)
    raise SAELoadError(f"{path} is not an attention SAE: pass a SAELens hook_z folder or a Gemma Scope att params.npz")


def _check_attention(path: Path, model: ModelLike) -> tuple[int, str, int]:
    """(layer, site, d_in) of one attention SAE, checked against the model from its config or npz header."""
    cfg, hook = _attention_config(path)
    layer, site = attention_site(hook, f"SAE at {path}")
    if not 0 <= layer < model.n_layers:
        raise SAEMismatchError(
            f"SAE at {path} reads '{hook}' but model '{model.name}' has layers 0..{model.n_layers - 1}"
        )
    n_heads, d_head = _heads(model, layer)
    want = n_heads * d_head if site == "z" else model.d_model
    got = cfg.d_in if cfg is not None else npz_shapes(path).get("W_enc", (None,))[0]
    if got is not None and got != want:
        what = "n_heads * d_head" if site == "z" else "d_model"
        raise SAEMismatchError(
            f"SAE at {path} reads '{hook}' with d_in={got} but model '{model.name}' has {what}={want} at layer "
            f"{layer}: use attention SAEs trained on this model"
        )
    return layer, site, want


def load_attention_saes(
    source: str | os.PathLike[str],
    model: ModelLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    sae_ids: Sequence[str] | None = None,
) -> AttentionSAESet:
    """Load SAEs on attention outputs, keyed by layer: SAELens folders on `blocks.L.attn.hook_z` (d_in =
    n_heads * d_head) or `blocks.L.hook_attn_out` (d_in = d_model), or Gemma Scope "att" params.npz files
    (layer_N folders), or trees of them; `sae_ids` picks sub-paths. Each is checked against the model from its
    config or npz header before its weights are read; release conventions are folded in as for residual SAEs."""
    device, dtype = parse_device(device), parse_dtype(dtype)
    root = Path(source).expanduser()
    roots = [root / i for i in sae_ids] if sae_ids else [root]
    for r in roots:
        if r.exists() and not r.is_dir():
            regular_file(r, "attention SAE", "pass a SAELens folder or a Gemma Scope att params.npz")
    ct_config = registry()["transcoder_layouts"]["circuit_tracer"]["config"]
    for r in roots:
        if (r / ct_config).exists():
            raise SAELoadError(
                f"{r} holds a circuit-tracer {ct_config}, a transcoder set",
                Fix(api="pass it as transcoders", cli="pass it as --transcoders", http="pass it as --transcoders"),
            )
    paths = [p for r in roots for p in sae_paths(r)]
    by_layer: dict[int, AttentionSAE] = {}
    for path in paths:
        layer, site, _ = _check_attention(path, model)
        raw_sae = read_path(path, repo_kind="att")
        raw_sae = dataclasses.replace(
            raw_sae, labels={**dict(_dash_labels(raw_sae.source, layer, "attn")), **raw_sae.labels}
        )
        sae = build_sae(raw_sae, None, device, dtype, checkpoint=layer)
        if layer in by_layer:
            raise SAELoadError(
                f"two attention SAEs at layer {layer}: {by_layer[layer].source} and {sae.source}: keep one"
            )
        n_heads, d_head = _heads(model, layer) if site == "z" else (None, None)
        by_layer[layer] = AttentionSAE(layer, site, sae, n_heads, d_head)
        logger.info("loaded a %s attention SAE (%s) at layer %d from %s", sae.architecture, site, layer, sae.source)
    return AttentionSAESet(by_layer)
