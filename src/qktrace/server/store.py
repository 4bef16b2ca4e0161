"""Files the app serves: graph JSON confined to one data directory, and SAE labels and dashboards.

Graph files are qktrace's own or circuit-tracer's / Neuronpedia's: all are read through
`qktrace.graph.formats.read` (as `load_graph` reads them), listed and served, the others marked with their
origin (they have no head loadings).

A graph name is a plain file name (`x` or `x.json`: letters, digits, '.', '_', '-', no leading dot);
it is looked up among the files given explicitly, else resolved inside the data directory with
symlinks followed, and refused unless the real path is still inside it. Nothing is unpickled.

A file that cannot be read for any reason (bad bytes, deep nesting, past `Limits.max_graph_file_bytes`,
not a graph) is listed as invalid with its reason; the others are listed. New graphs are written through
`qktrace.files` (a temp file created exclusively beside the target, links never followed, then renamed)
and never replace an existing file unless the request asked to overwrite it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..config import LIMITS, Limits
from ..errors import GraphFileError, InputError, QKTraceError, check_index
from ..files import atomic_write
from ..graph import Graph, formats
from ..jobs.dashboards import VERSION as DASHBOARDS_VERSION
from ..saes import hook_checkpoint
from ..saes.formats import read_json
from ..saes.labels import LABELS_FILE, dashboards_folder, read_labels_json
from ..tracer import Tracer
from . import schemas as S

log = logging.getLogger(__name__)
MECHANISM = ".mechanism.json"  # `qktrace explain --out` and the demo write these beside graphs
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


# -- graph files ------------------------------------------------------------------------------------


class GraphStore:
    """Graph JSON files: `*.json` directly in `root`, plus explicitly given files, by plain file name."""

    def __init__(self, root: str | Path, files: Sequence[str | Path] = (), limits: Limits = LIMITS):
        self.root = Path(root).resolve()
        self.limits = limits
        self.files: dict[str, Path] = {}
        for f in files:
            p = Path(f).resolve()
            if p.name in self.files and self.files[p.name] != p:
                raise InputError(f"two graph files are named '{p.name}': rename one or serve their folders")
            self.files[p.name] = p
        self._summaries: dict[Path, tuple[tuple[int, int], S.GraphSummary | S.InvalidGraph]] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[Path, int, int], Future[bytes]] = {}  # reads under way, shared

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
        """Every graph file; one that cannot be read (any reason) is listed as invalid, never the whole list."""
        graphs: list[S.GraphSummary] = []
        invalid: list[S.InvalidGraph] = []
        mechanisms: list[S.MechanismSummary] = []
        for name in self._candidates():
            if name.endswith(MECHANISM):
                try:
                    m = self.read_mechanism(name)[1]
                    mechanisms.append(
                        S.MechanismSummary(name=name, prompt=m["prompt"], answer=m["answer"], rival=m.get("rival"))
                    )
                except (ApiError, OSError, QKTraceError, KeyError, TypeError) as e:
                    invalid.append(S.InvalidGraph(name=name, error=f"not a mechanism file: {' '.join(str(e).split())}"))
                continue
            try:
                real = self.resolve(name)
                st = real.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                cached = self._summaries.get(real)
                if cached is None or cached[0] != stamp:
                    cached = (stamp, _summary(name, real, st.st_mtime, self.limits))
                    self._summaries[real] = cached
                item = cached[1]
            except (ApiError, OSError, QKTraceError) as e:
                item = S.InvalidGraph(name=name, error=" ".join(str(e).split()))
            except Exception as e:  # a file no rule foresaw: list it as unreadable, keep listing
                log.warning("cannot summarise graph %s (%s: %s)", name, type(e).__name__, e)
                item = S.InvalidGraph(name=name, error=f"cannot read it ({type(e).__name__}): check or rebuild it")
            if isinstance(item, S.GraphSummary):
                graphs.append(item)
            else:
                invalid.append(item)
        return S.GraphList(graphs=graphs, invalid=invalid, mechanisms=mechanisms)

    def read_mechanism(self, name: str) -> tuple[str, dict[str, Any]]:
        """A `*.mechanism.json` file (`Mechanism.to_json()`), confined as graphs are; 404 for any other name."""
        if not name.endswith(MECHANISM):
            raise ApiError(404, f"'{name[:80]}' is not a mechanism file: its name must end in {MECHANISM}")
        path = self.resolve(name)
        data = formats.read_json(path, self.limits.max_graph_file_bytes, shown=path.name)
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list) or "answer" not in data:
            msg = f"{path.name} is not a mechanism (no answer or candidates): write it with qktrace explain"
            raise ApiError(422, msg)
        return path.name, data

    def read_shared(self, name: str, render: Callable[[str, dict[str, Any]], bytes]) -> bytes:
        """`render(*self.read(name))`, computed once for concurrent requests of one unchanged file: the others
        wait for that parse and share its bytes (or its error), so four readers of a large graph hold one copy."""
        path = self.resolve(name)
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            shared = self._inflight.get(key)
            owner = shared is None
            if shared is None:
                shared = self._inflight[key] = Future()
        if not owner:
            return shared.result()
        try:
            body = render(*self.read(name))
            shared.set_result(body)
            return body
        except BaseException as e:
            shared.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def read(self, name: str) -> tuple[str, dict[str, Any]]:
        path = self.resolve(name)
        data = formats.read_json(path, self.limits.max_graph_file_bytes, shown=path.name)
        Graph.from_json(data, where=path.name)  # GraphFileError (-> 422) with the reason
        return path.name, data

    def exists(self, fname: str) -> bool:
        return fname in self.files or os.path.lexists(self.root / fname)

    def plan_name(self, name: str | None, auto: str, overwrite: bool) -> str:
        """The file a new graph will be saved as: `name` (409 if it exists and `overwrite` is not set) or,
        without a name, `auto` made unique with a numeric suffix."""
        if name is None:
            stem = auto.removesuffix(".json")
            for i in range(1, 1000):
                fname = auto if i == 1 else f"{stem}-{i}.json"
                if not self.exists(fname):
                    return fname
            raise ApiError(409, f"graphs named {stem}-*.json fill the data directory: give this one a name")
        fname = name if name.endswith(".json") else f"{name}.json"
        if not NAME.match(fname):
            raise InputError(f"graph name {name[:80]!r} is not a plain file name: use letters, digits, '.', '_', '-'")
        if fname in self.files:
            raise ApiError(409, f"'{fname}' names a graph file given on the command line: choose another name")
        if not overwrite and self.exists(fname):
            raise ApiError(409, f"a graph named '{fname}' exists: choose another name, or send \"overwrite\": true")
        return fname

    def save(self, fname: str, data: Mapping[str, Any], overwrite: bool = False) -> str:
        """Write a graph into the data directory through a temp file created exclusively beside it, never
        following links; an existing file is replaced only with `overwrite`."""
        if not NAME.match(fname) or not fname.endswith(".json"):
            raise InputError(f"graph name {fname[:80]!r} is not a plain file name: use letters, digits, '.', '_', '-'")
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        try:
            atomic_write(self.root / fname, text, overwrite=overwrite)
        except InputError as e:
            if not overwrite and self.exists(fname):
                raise ApiError(
                    409, f"a graph named '{fname}' exists (it appeared while this one was built): use another name"
                ) from e
            raise
        return fname


def _summary(name: str, path: Path, mtime: float, limits: Limits) -> S.GraphSummary | S.InvalidGraph:
    """What the list shows of a graph file: qktrace's own, or circuit-tracer's / Neuronpedia's."""
    try:
        data = formats.read_json(path, limits.max_graph_file_bytes, shown=path.name)
        Graph.from_json(data, where=path.name)  # the check `read` makes: listed valid only if it is served
        try:
            head = formats.describe(data)
        except GraphFileError as e:
            raise GraphFileError(f"{name}: {e}") from None
        return S.GraphSummary(
            name=name,
            prompt=head.prompt,
            model=head.model,
            n_nodes=head.n_nodes,
            n_links=head.n_links,
            tokens=[str(t) for t in (data.get("metadata") or {}).get("prompt_tokens") or []],
            modified=mtime,
            origin=head.origin,  # type: ignore[arg-type]
        )
    except QKTraceError as e:
        return S.InvalidGraph(name=name, error=str(e))


def graph_name(req: S.GraphRequest, model: str = "") -> str:
    """A readable, stable file name: the prompt's words and a hash of the model, prompt and settings."""
    settings = [model, req.prompt, req.tokens, req.node_threshold, req.edge_threshold, req.max_nodes, req.qk_terms]
    digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", req.prompt or "tokens").strip("-")[:40].strip("-") or "graph"
    return f"{slug}-{digest}.json"


# -- feature labels and dashboards -------------------------------------------------------------------


CODER_KINDS = {"transcoder": "transcoder", "attn": "attention SAE"}  # node kind -> what its features are
_CODER_FOLDER = re.compile(r"blocks\.(\d{1,6})\.(transcoder|attn)")
Key = tuple[str, int]  # ("feature", checkpoint) for residual SAEs; (kind, layer) for CODER_KINDS


class Features:
    """Labels (labels.json or the coder's own) and dashboards (dashboards.json) per residual-SAE checkpoint, and
    per layer of the tracer's transcoders and attention SAEs (`blocks.L.transcoder` / `blocks.L.attn`, as the
    dashboards job writes them, found from the coders' sources by `saes.labels.dashboards_folder`)."""

    def __init__(self, tracer: Tracer | None, saes_dir: str | Path | None):
        self.dirs: dict[Key, Path] = {}
        self.d_sae: dict[Key, int] = {}
        self.labels: dict[Key, Mapping[int, str]] = {}
        self._dash: dict[Key, Mapping[str, Any]] = {}
        self._edges: dict[Key, list[float]] = {}  # each dashboards.json's histogram bin edges
        if tracer is not None:
            for c, sae in tracer.saes.items():
                self.d_sae["feature", c], self.labels["feature", c] = sae.d_sae, sae.labels
                if sae.source and Path(sae.source).is_dir():
                    self.dirs["feature", c] = Path(sae.source)
            self._coders(tracer)
        elif saes_dir is not None:
            for cfg_path in sorted(Path(saes_dir).rglob("cfg.json")):
                try:
                    cfg = read_json(cfg_path, "SAELens cfg.json")  # a regular file, bounded: never a FIFO
                    c = hook_checkpoint((cfg.get("metadata") or {}).get("hook_name") or cfg["hook_name"])
                    self.d_sae["feature", c], self.dirs["feature", c] = int(cfg["d_sae"]), cfg_path.parent
                    self.labels["feature", c] = read_labels_json(cfg_path.parent / LABELS_FILE)
                except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, QKTraceError) as e:
                    log.warning("skipping SAE config %s (%s: %s)", cfg_path, type(e).__name__, e)
            self._coder_dashboards(Path(saes_dir))

    def _coders(self, tracer: Tracer) -> None:
        """The tracer's transcoder and attention-SAE layers: widths, labels, where their dashboards are."""
        ts, att = tracer.transcoders, tracer.attention_saes
        rows: list[tuple[Key, int, Mapping[int, str], str]] = []
        if ts is not None and ts.clt is not None:
            clt = ts.clt
            for ly in ts.layers:
                own = {f: t for (lt, f), t in clt.labels.items() if lt == ly}
                rows.append((("transcoder", ly), clt.d_sae, own, clt.source))
        elif ts is not None:
            rows += [(("transcoder", ly), t.d_sae, t.labels, t.source) for ly, t in ts.items()]
        rows += [(("attn", ly), a.d_sae, a.labels, a.source) for ly, a in (att or {}).items()]
        for (kind, ly), d_sae, labels, source in rows:
            self.d_sae[kind, ly], self.labels[kind, ly] = d_sae, labels
            where = dashboards_folder(source, f"blocks.{ly}.{kind}")
            if where is not None:
                self.dirs[kind, ly] = where

    def _coder_dashboards(self, root: Path) -> None:
        """View only: the dashboards job's `blocks.L.transcoder` / `blocks.L.attn` folders under `root` (their
        labels.json lists every feature, dead ones too: its length is the width)."""
        for path in sorted(root.rglob(LABELS_FILE)):
            m = _CODER_FOLDER.fullmatch(path.parent.name)
            if m is None or (m.group(2), int(m.group(1))) in self.d_sae:
                continue
            try:
                labels = read_labels_json(path)
            except QKTraceError as e:
                log.warning("skipping %s (%s)", path, e)
                continue
            key = (m.group(2), int(m.group(1)))
            self.d_sae[key], self.labels[key], self.dirs[key] = max(labels, default=-1) + 1, labels, path.parent

    def coder_layers(self) -> dict[str, list[int]]:
        """kind -> layers of transcoder / attention-SAE features known here (GET /api/info)."""
        return {k: sorted(n for kind, n in self.d_sae if kind == k) for k in CODER_KINDS}

    @property
    def checkpoints(self) -> list[int]:
        """The residual-SAE checkpoints (GET /api/info)."""
        return sorted(c for kind, c in self.d_sae if kind == "feature")

    def dashboards(self, key: Key) -> Mapping[str, Any]:
        if key not in self._dash:
            path = self.dirs[key] / "dashboards.json" if key in self.dirs else None
            feats: Mapping[str, Any] = {}
            if path is not None and path.is_file():
                try:
                    data = json.loads(path.read_text())
                    feats = data.get("features") or {}
                    self._edges[key] = list(data.get("hist_edges") or [])  # version 1 on
                    if int(data.get("version", 0)) > DASHBOARDS_VERSION:
                        log.warning(
                            "%s is version %s, newer than this qktrace reads (%d)",
                            path,
                            data["version"],
                            DASHBOARDS_VERSION,
                        )
                except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
                    log.warning("ignoring %s (%s: %s)", path, type(e).__name__, e)
            self._dash[key] = feats
        return self._dash[key]

    def get(self, c: int, f: int, kind: str = "feature") -> S.FeatureResponse:
        """Feature `f` of the residual SAE at checkpoint `c` (kind "feature"), or of layer `c`'s transcoder
        ("transcoder") or attention SAE ("attn")."""
        key = (kind, c)
        if key not in self.d_sae:
            known = ", ".join(str(n) for k, n in sorted(self.d_sae) if k == kind) or "none"
            if kind == "feature":
                fix = "start the server with `qktrace serve --model M --saes D`"
                raise ApiError(404, f"no SAE at checkpoint {c} (known: {known}): {fix}")
            flag = "--transcoders T" if kind == "transcoder" else "--transcoders T --attention-saes A"
            raise ApiError(
                404,
                f"no {CODER_KINDS[kind]} at layer {c} (known: {known}): start the server with "
                f"`qktrace serve --model M {flag}`",
            )
        where = f"checkpoint {c} feature" if kind == "feature" else f"layer {c} {CODER_KINDS[kind]} feature"
        check_index(f, self.d_sae[key], where)
        raw = self.dashboards(key).get(str(f))
        label = self.labels.get(key, {}).get(f) or (raw or {}).get("label") or _placeholder(kind, c, f)
        dash = None
        if isinstance(raw, dict):
            try:
                hist = _histogram(raw.get("hist"), self._edges.get(key, []))
                dash = S.Dashboard.model_validate({**raw, "hist": hist})
            except ValueError as e:
                log.warning("dashboard of %s %d/f%d is malformed: %s", kind, c, f, e)
        return S.FeatureResponse.model_validate(
            {"checkpoint": c, "feature": f, "label": str(label), "dashboard": dash, "kind": kind}
        )


_PREFIX = {"feature": "c", "transcoder": "t", "attn": "a"}


def _placeholder(kind: str, n: int, f: int) -> str:
    """The label a feature without one shows: as `SAE.label`, `Transcoder.label`, `AttentionSAE.label` write it."""
    return f"{_PREFIX[kind]}{n}/f{f}"


def _histogram(hist: Any, edges: list[float]) -> dict[str, Any] | None:
    """dashboards.json's {"lo": first bin, "counts": [...]} with its bins' edges; None when absent or when the
    file has too few edges for it."""
    if not isinstance(hist, dict) or not isinstance(hist.get("lo"), int) or not isinstance(hist.get("counts"), list):
        return None
    lo, counts = hist["lo"], hist["counts"]
    if lo < 0 or lo + len(counts) + 1 > len(edges):
        return None
    return {"lo": lo, "counts": counts, "edges": edges[lo : lo + len(counts) + 1]}
