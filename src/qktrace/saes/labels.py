"""Feature labels: qktrace's own `labels.json`, and explanations exported from Neuronpedia.

Neuronpedia exports explanations as a JSON array (the `/api/explanation/export?modelId=..&saeId=..` answer)
or as JSONL batches (`explanations/batch-N.jsonl.gz` of its public datasets), one record per explanation:
`{"modelId": "gpt2-small", "layer": "8-res-jb", "index": "1234", "description": " ...", "typeName": ...,
"explanationModelName": ...}`. `layer` is the Neuronpedia source id of one SAE. A record is matched to a
loaded SAE by that SAE's Neuronpedia id (`SAE.neuronpedia_id`, e.g. "gpt2-small/8-res-jb", set by release
entries and SAELens configs), else by the leading layer number against the L of `blocks.L.hook_resid_*`
when exactly one loaded SAE has it, else through an explicit `layers={"8-res-jb": checkpoint}` map.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SAELoadError, quoted

if TYPE_CHECKING:
    from .sae import SAESet

LABELS_FILE = "labels.json"
DASHBOARDS_DIR = "dashboards"  # a coder set's dashboards, as `qktrace dashboards --out SET/dashboards` writes them
_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_LAYER_NUMBER = re.compile(r"^([0-9]{1,9})-")
_INDEX = re.compile(r"[0-9]{1,15}")  # a feature number: ASCII digits only ("²" is a digit to str.isdigit)
MAX_EXPORT_BYTES = 1 << 30  # one export file, as read and (gzip) once inflated


def read_labels_json(path: Path) -> dict[int, str]:
    """qktrace's `labels.json` ({"feature index": "label"}), or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(i): str(text) for i, text in data.items()}
    except (ValueError, AttributeError, OSError, RecursionError, UnicodeDecodeError) as e:
        raise SAELoadError(
            f"{path} is not a JSON object of feature index -> label ({type(e).__name__}): fix or delete it"
        ) from None


def dashboards_folder(source: str | os.PathLike[str] | None, folder: str) -> Path | None:
    """Where the dashboards job wrote `folder` (`blocks.L.transcoder`, `blocks.L.attn`) for a coder loaded from
    `source`: in the source folder, or one or two folders above a source file or folder (where its folders were
    copied), or in a `dashboards` folder there (the job's `out`); None when nowhere."""
    if not source:
        return None
    p = Path(source)
    for root in ([p] if p.is_dir() else []) + [p.parent, p.parent.parent]:
        for where in (root / folder, root / DASHBOARDS_DIR / folder):
            if (where / LABELS_FILE).is_file() or (where / "dashboards.json").is_file():
                return where
    return None


def dashboard_labels(source: str | os.PathLike[str] | None, folder: str) -> dict[int, str]:
    """The labels the dashboards job wrote in `folder` for a coder loaded from `source` ({} when none)."""
    where = dashboards_folder(source, folder)
    return {} if where is None else read_labels_json(where / LABELS_FILE)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
        if not files:
            raise SAELoadError(f"no Neuronpedia export files (*.json, *.jsonl, *.gz) under {path}")
        return files
    if not path.is_file():
        raise SAELoadError(f"Neuronpedia export {path} does not exist: pass an exported .json or .jsonl(.gz) file")
    return [path]


def _read_bounded(path: Path, limit: int | None = None) -> bytes:
    """The bytes of an export file, gunzipped if it is `.gz`, refused once past `limit`: a small gzip
    that inflates to gigabytes stops at the limit, never read whole."""
    limit = MAX_EXPORT_BYTES if limit is None else limit
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
        data = stream.read(limit + 1)
    if len(data) > limit:
        what = "inflates to" if path.suffix == ".gz" else "is"
        raise SAELoadError(
            f"{path} {what} more than {limit >> 20} MiB: split the export into smaller files (a folder of them reads)"
        )
    return data


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of one export file."""
    try:
        text = _read_bounded(path).decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError, ValueError) as e:
        raise SAELoadError(f"{path} is not a readable export file ({type(e).__name__}): re-download it") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            yield from ((f"{path} record {i}", r) for i, r in enumerate(json.loads(text)))
        elif stripped.startswith("{") and not path.name.removesuffix(".gz").endswith(".jsonl"):
            data = json.loads(text)
            items = data.get("explanations") if isinstance(data, dict) else None
            yield from ((f"{path} record {i}", r) for i, r in enumerate(items if isinstance(items, list) else [data]))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield f"{path} line {n}", _line(line, f"{path} line {n}")
    except (ValueError, RecursionError) as e:
        raise SAELoadError(f"{path} is not valid JSON / JSONL ({type(e).__name__}): re-download the export") from None


def _line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as e:
        raise SAELoadError(f"{where} is not valid JSON / JSONL ({type(e).__name__}): re-download the export") from None


def _index(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _INDEX.fullmatch(str(value).strip()):
        raise SAELoadError(f"{where}: index is {quoted(value)}, expected a feature number: fix or drop the record")
    return int(str(value).strip())


def _match_layer(layer: str, model_id: str, saes: SAESet, layers: Mapping[str, int]) -> int | None:
    from .sae import hook_layer

    if layer in layers:
        return layers[layer]
    full = f"{model_id}/{layer}" if model_id else ""
    for c in saes.checkpoints:
        np_id = saes[c].neuronpedia_id
        if np_id and (np_id == full or (not model_id and np_id.split("/", 1)[-1] == layer)):
            return c
    m = _LAYER_NUMBER.match(layer)
    if m is None:
        return None
    same = [c for c in saes.checkpoints if not saes[c].neuronpedia_id and hook_layer(saes[c].hook_name) == int(m[1])]
    return same[0] if len(same) == 1 else None


def neuronpedia_labels(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    saes: SAESet,
    *,
    layers: Mapping[str, int] | None = None,
) -> dict[int, dict[int, str]]:
    """checkpoint -> {feature: description} from Neuronpedia explanation exports (see the module docstring).

    The first explanation of a feature wins; empty descriptions are skipped. Raises SAELoadError, one line,
    for records whose layer matches no loaded SAE (naming those layers), bad indices, or unreadable files.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    layers = dict(layers or {})
    for name, target in layers.items():
        if target not in saes:
            raise SAELoadError(
                f"layers maps '{name}' to checkpoint {target}, which has no SAE (have {saes.checkpoints})"
            )
    out: dict[int, dict[int, str]] = {}
    unknown: dict[str, int] = {}
    cache: dict[tuple[str, str], int | None] = {}
    for path in (f for p in items for f in _files(Path(p).expanduser())):
        for where, rec in _records(path):
            if not isinstance(rec, dict):
                raise SAELoadError(f"{where} is a {type(rec).__name__}, expected an explanation object")
            layer, model_id = rec.get("layer", rec.get("saeId")), rec.get("modelId") or ""
            if not isinstance(layer, str):
                raise SAELoadError(
                    f"{where}: layer is {quoted(layer)}, expected a Neuronpedia source id like '8-res-jb'"
                )
            if not isinstance(model_id, str):
                raise SAELoadError(
                    f"{where}: modelId is {quoted(model_id)}, expected a Neuronpedia model id like 'gpt2-small'"
                )
            key = (model_id, layer)
            if key not in cache:
                cache[key] = _match_layer(layer, model_id, saes, layers)
            c = cache[key]
            if c is None:
                name = f"{model_id}/{layer}" if model_id else layer
                unknown[name] = unknown.get(name, 0) + 1
                continue
            index = _index(rec.get("index"), where)
            if index >= saes[c].d_sae:
                raise SAELoadError(
                    f"{where}: feature {index} is out of range for the SAE at checkpoint {c} "
                    f"(d_sae={saes[c].d_sae}): is the export for another SAE?"
                )
            text = rec.get("description")
            if isinstance(text, str) and text.strip():
                out.setdefault(c, {}).setdefault(index, " ".join(text.split()))
    if unknown:
        names = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        have = ", ".join(f"{c}: {saes[c].neuronpedia_id or saes[c].hook_name}" for c in saes.checkpoints) or "none"
        raise SAELoadError(
            f"Neuronpedia explanations for {names} match no loaded SAE (loaded {have}): load those SAEs, or pass "
            "layers={'<source id>': checkpoint}"
        )
    return out


def read_neuronpedia_labels(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    saes: SAESet,
    *,
    layers: Mapping[str, int] | None = None,
) -> SAESet:
    """A copy of `saes` whose SAEs carry the Neuronpedia explanations in `paths` as feature labels."""
    return saes.with_labels(neuronpedia_labels(paths, saes, layers=layers))
