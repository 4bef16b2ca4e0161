"""The release registry: which files a named SAE release holds, and the conventions it was trained with.

Everything here is data, read from `releases.json` beside this module: the file layouts (`layouts`), what
each `normalize_activations` value means, the centring flag, and release entries in the schema of
SAELens's `pretrained_saes.yaml`. When the sae-lens package is installed its own yaml is read (without
importing sae_lens) and takes precedence; our file covers gpt2-small-res-jb, gemma-scope-2b-pt-res-canonical,
llama_scope_lxr_8x and pythia-70m-deduped-res-sm without it. Files are fetched with huggingface_hub, so a
populated Hugging Face cache works offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import SAELoadError

logger = logging.getLogger(__name__)

REGISTRY_FILE = Path(__file__).with_name("releases.json")


@cache
def registry() -> dict[str, Any]:
    """The parsed `releases.json` (layouts, normalisations, centring flag, releases)."""
    return json.loads(REGISTRY_FILE.read_text())


@dataclass(frozen=True)
class Release:
    """One release entry: a Hugging Face repo, its file layout, and per-SAE paths and extras."""

    name: str
    repo_id: str
    model: str
    layout: str  # a key of registry()["layouts"]: sae_lens, gemma_2, llama_scope
    config_overrides: dict[str, Any] = field(default_factory=dict)
    saes: dict[str, dict[str, Any]] = field(default_factory=dict)  # sae id -> {path, neuronpedia, ...}
    origin: str = ""  # which registry file the entry came from

    def entry(self, sae_id: str) -> dict[str, Any]:
        if sae_id not in self.saes:
            ids = list(self.saes)
            shown = ", ".join(ids[:6]) + (f", ... ({len(ids)} in all)" if len(ids) > 6 else "")
            raise SAELoadError(f"release '{self.name}' has no SAE '{sae_id}': its ids are {shown}")
        return self.saes[sae_id]

    def overrides(self, sae_id: str) -> dict[str, Any]:
        """Config values the release sets for one SAE (what SAELens passes as cfg_overrides)."""
        entry = self.entry(sae_id)
        extra = {"neuronpedia_id": entry.get("neuronpedia"), "norm_scaling_factor": entry.get("norm_scaling_factor")}
        return {**{k: v for k, v in extra.items() if v is not None}, **self.config_overrides}


def _parse_entry(name: str, value: Any, origin: str) -> Release | None:
    if not isinstance(value, dict) or not isinstance(value.get("repo_id"), str):
        return None
    saes: dict[str, dict[str, Any]] = {}
    for s in value.get("saes") or []:
        if isinstance(s, dict) and "id" in s and "path" in s:
            saes[str(s["id"])] = {**s, "path": str(s["path"])}
    overrides = value.get("config_overrides")
    return Release(
        name=name,
        repo_id=value["repo_id"],
        model=str(value.get("model") or ""),
        layout=str(value.get("conversion_func") or "sae_lens"),
        config_overrides=dict(overrides) if isinstance(overrides, dict) else {},
        saes=saes,
        origin=origin,
    )


def sae_lens_yaml() -> Path | None:
    """sae-lens's own pretrained_saes.yaml when the package is installed (found without importing it)."""
    try:
        spec = importlib.util.find_spec("sae_lens")
    except (ImportError, ValueError):  # ValueError: a stand-in module without __spec__
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "pretrained_saes.yaml"
        if path.is_file():
            return path
    return None


@cache
def _yaml_releases(path: Path) -> dict[str, Any]:
    import yaml

    try:
        with path.open() as f:
            data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as e:
        logger.warning("could not read %s (%s); using qktrace's own release registry", path, type(e).__name__)
        return {}
    return data if isinstance(data, dict) else {}


def find_release(name: str) -> Release | None:
    """The entry for `name` from sae-lens's yaml (when installed), else from qktrace's registry, else None."""
    yaml_path = sae_lens_yaml()
    if yaml_path is not None and (entry := _parse_entry(name, _yaml_releases(yaml_path).get(name), str(yaml_path))):
        return entry
    return _parse_entry(name, registry()["releases"].get(name), str(REGISTRY_FILE))


def known_releases() -> list[str]:
    return sorted(registry()["releases"])


def hub_file(repo_id: str, filename: str, what: str) -> Path:
    """A file of a Hugging Face repo through huggingface_hub's cache (works offline once cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except LocalEntryNotFoundError:
        raise SAELoadError(
            f"{what}: {repo_id}/{filename} is not in the Hugging Face cache and the hub cannot be reached "
            "(offline?): download it once with network access, or pass the local SAE folder"
        ) from None
    except RepositoryNotFoundError:
        raise SAELoadError(
            f"{what}: Hugging Face repo '{repo_id}' does not exist or is private: check the name"
        ) from None
    except EntryNotFoundError:
        raise SAELoadError(f"{what}: repo '{repo_id}' has no file '{filename}': check the SAE id") from None
    except Exception as e:  # network and HTTP errors of every kind
        msg = " ".join(str(e).split())[:160]
        raise SAELoadError(f"{what}: could not fetch {repo_id}/{filename} ({type(e).__name__}: {msg})") from None
