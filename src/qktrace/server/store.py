"""Files the app serves: graph JSON confined to one data directory, and SAE labels and dashboards.

A graph name is a plain file name (`x` or `x.json`: letters, digits, '.', '_', '-', no leading dot);
it is looked up among the files given explicitly, else resolved inside the data directory with
symlinks followed, and refused unless the real path is still inside it. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import GraphFileError, InputError, QKTraceError, check_index
from ..graph import Graph
from ..saes import hook_checkpoint
from ..tracer import Tracer
from . import schemas as S

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- graph files ------------------------------------------------------------------------------------


class GraphStore:
    """Graph JSON files: `*.json` directly in `root`, plus explicitly given files, by plain file name."""

    def __init__(self, root: str | Path, files: Sequence[str | Path] = ()):
        self.root = Path(root).resolve()
        self.files: dict[str, Path] = {}
        for f in files:
            p = Path(f).resolve()
            if p.name in self.files and self.files[p.name] != p:
                raise InputError(f"two graph files are named '{p.name}': rename one or serve their folders")
            self.files[p.name] = p
        self._summaries: dict[Path, tuple[tuple[int, int], S.GraphSummary | S.InvalidGraph]] = {}

    def resolve(self, name: str) -> Path:
        """The file for `name` ('x' or 'x.json'), confined to the data directory; ApiError otherwise."""
        fname = name if name.endswith(".json") else f"{name}.json"
        if fname in self.files:
            return self.files[fname]
        if not NAME.match(fname):
            raise ApiError(
                400,
                f"graph name {name[:80]!r} is not a plain file name: use a name from GET /api/graphs "
                "(no '/', '\\', '..', leading '.' or absolute paths)",
            )
        real = (self.root / fname).resolve()
        if not real.is_relative_to(self.root):
            raise ApiError(404, f"graph '{fname}' points outside the data directory: refused")
        if not real.is_file():
            raise ApiError(404, f"no graph named '{fname}' in the data directory: GET /api/graphs lists them")
        return real

    def _candidates(self) -> Iterator[str]:
        if self.root.is_dir():
            yield from sorted(p.name for p in self.root.glob("*.json") if NAME.match(p.name))
        yield from sorted(self.files)

    def listing(self) -> S.GraphList:
        graphs: list[S.GraphSummary] = []
        invalid: list[S.InvalidGraph] = []
        for name in self._candidates():
            try:
                real = self.resolve(name)
                st = real.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                cached = self._summaries.get(real)
                if cached is None or cached[0] != stamp:
                    cached = (stamp, _summary(name, real, st.st_mtime))
                    self._summaries[real] = cached
                item = cached[1]
            except (ApiError, OSError) as e:
                item = S.InvalidGraph(name=name, error=str(e))
            if isinstance(item, S.GraphSummary):
                graphs.append(item)
            else:
                invalid.append(item)
        return S.GraphList(graphs=graphs, invalid=invalid)

    def read(self, name: str) -> tuple[str, dict[str, Any]]:
        path = self.resolve(name)
        data = _read_json(path)
        Graph.from_json(data, where=path.name)  # GraphFileError (-> 422) with the reason
        return path.name, data

    def save(self, name: str, data: Mapping[str, Any]) -> str:
        fname = name if name.endswith(".json") else f"{name}.json"
        if not NAME.match(fname):
            raise InputError(f"graph name {name!r} is not a plain file name: use letters, digits, '.', '_', '-'")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{fname}.tmp"
        tmp.write_text(json.dumps(data, separators=(",", ":"), allow_nan=False))
        tmp.replace(self.root / fname)
        return fname


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(), parse_constant=_no_constant)
    except (OSError, ValueError) as e:
        raise GraphFileError(f"cannot read graph {path.name} ({type(e).__name__}): check or rebuild it") from None
    if not isinstance(data, dict):
        raise GraphFileError(f"{path.name} is not a JSON object: it is not a qktrace graph")
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid in a graph")


def _summary(name: str, path: Path, mtime: float) -> S.GraphSummary | S.InvalidGraph:
    try:
        data = _read_json(path)
        meta = data.get("metadata") or {}
        ours = meta.get("qktrace") if isinstance(meta, dict) else None
        if not isinstance(ours, dict) or "format_version" not in ours:
            raise GraphFileError(f"{name} has no metadata.qktrace.format_version: not a qktrace graph")
        return S.GraphSummary(
            name=name,
            prompt=str(meta.get("prompt", "")),
            model=str(ours.get("model", "")),
            n_nodes=len(data.get("nodes") or []),
            n_links=len(data.get("links") or []),
            modified=mtime,
        )
    except QKTraceError as e:
        return S.InvalidGraph(name=name, error=str(e))


def graph_name(req: S.GraphRequest) -> str:
    """A readable, stable file name: the prompt's words and a hash of the prompt and settings."""
    settings = [req.prompt, req.tokens, req.node_threshold, req.edge_threshold, req.max_nodes, req.qk_terms]
    digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", req.prompt or "tokens").strip("-")[:40].strip("-") or "graph"
    return f"{slug}-{digest}.json"


# -- feature labels and dashboards -------------------------------------------------------------------


class Features:
    """Labels (labels.json or the SAE's own) and dashboards (dashboards.json) per SAE checkpoint."""

    def __init__(self, tracer: Tracer | None, saes_dir: str | Path | None):
        self.dirs: dict[int, Path] = {}
        self.d_sae: dict[int, int] = {}
        self.labels: dict[int, Mapping[int, str]] = {}
        self._dash: dict[int, Mapping[str, Any]] = {}
        if tracer is not None:
            for c, sae in tracer.saes.items():
                self.d_sae[c], self.labels[c] = sae.d_sae, sae.labels
                if sae.source and Path(sae.source).is_dir():
                    self.dirs[c] = Path(sae.source)
        elif saes_dir is not None:
            for cfg_path in sorted(Path(saes_dir).rglob("cfg.json")):
                try:
                    cfg = json.loads(cfg_path.read_text())
                    c = hook_checkpoint((cfg.get("metadata") or {}).get("hook_name") or cfg["hook_name"])
                    self.d_sae[c], self.dirs[c] = int(cfg["d_sae"]), cfg_path.parent
                    labels = cfg_path.parent / "labels.json"
                    raw = json.loads(labels.read_text()) if labels.is_file() else {}
                    self.labels[c] = {int(k): str(v) for k, v in raw.items()}
                except (OSError, ValueError, KeyError, TypeError, AttributeError, QKTraceError) as e:
                    log.warning("skipping SAE config %s (%s: %s)", cfg_path, type(e).__name__, e)

    def dashboards(self, c: int) -> Mapping[str, Any]:
        if c not in self._dash:
            path = self.dirs[c] / "dashboards.json" if c in self.dirs else None
            feats: Mapping[str, Any] = {}
            if path is not None and path.is_file():
                try:
                    feats = json.loads(path.read_text()).get("features") or {}
                except (OSError, ValueError, AttributeError) as e:
                    log.warning("ignoring %s (%s: %s)", path, type(e).__name__, e)
            self._dash[c] = feats
        return self._dash[c]

    def get(self, c: int, f: int) -> S.FeatureResponse:
        if c not in self.d_sae:
            known = ", ".join(map(str, sorted(self.d_sae))) or "none"
            raise ApiError(404, f"no SAE at checkpoint {c} (known: {known}): start the server with --saes DIR")
        check_index(f, self.d_sae[c], f"checkpoint {c} feature")
        raw = self.dashboards(c).get(str(f))
        label = self.labels.get(c, {}).get(f) or (raw or {}).get("label") or f"c{c}/f{f}"
        dash = None
        if isinstance(raw, dict):
            try:
                dash = S.Dashboard.model_validate(raw)
            except ValueError as e:
                log.warning("dashboard of c%d/f%d is malformed: %s", c, f, e)
        return S.FeatureResponse(checkpoint=c, feature=f, label=str(label), dashboard=dash)
