"""Settings, declared once: one frozen dataclass per group, documented field by field, checked on creation.

- `GraphOptions`: an attribution graph (`build_graph`, `Traced.graph`): pruning, logit targets, head
  loadings, memory budget, and the QK terms `Traced.graph` attaches.
- `SweepOptions`: a steering sweep (`qktrace.steering.requests.SteerRequest`): scales, side, mode.
- `ModelOptions`: how a loaded model is named in the files qktrace writes.
- `QKOptions`: a QK attribution's listing (`qktrace qk`, POST /api/qk).
- `ExplainSettings`: how hard `explain` looks; `CompareOptions`: what `compare` keeps.
- `DashboardOptions`, `BatchOptions`: the two corpus-scale jobs (`qktrace.jobs`).

Each field's `metadata["doc"]` is its documentation: the Python API reads it here, the CLI shows it as the
option's help and takes the field's default (`qktrace.cli.args`), and the server's pydantic models take
their defaults from the same fields (`qktrace.server.schemas`); `tests/test_options.py` holds the three
front ends (and the page, which reads its defaults from GET /api/info) to the same defaults.

Every class checks itself in `__post_init__`: a bad value is one `InputError` line naming the setting, the
value and what to give instead. `with_overrides(options, overrides)` is how functions that take an
`options` object also take its fields as keyword arguments (`build_graph(..., max_nodes=50)`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .config import LIMITS, parse_bytes, parse_scales
from .errors import InputError

T = TypeVar("T")


def setting(default: Any, doc: str, **metadata: Any) -> Any:
    """A dataclass field with its documentation (`metadata["doc"]`, the CLI's --help text)."""
    return field(default=default, metadata={"doc": doc, **metadata})


def doc(cls: type, name: str) -> str:
    """The documentation of field `name` of the settings class `cls`."""
    return str(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["doc"])


def with_overrides(options: T | None, cls: type[T], overrides: Mapping[str, Any]) -> T:
    """`options` (default `cls()`) with the fields named in `overrides` replaced, checked again; an unknown
    name is one InputError listing the known ones."""
    base = options if options is not None else cls()
    if not overrides:
        return base
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise InputError(f"{cls.__name__} has no setting '{unknown[0]}': use one of {', '.join(known)}")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]


# -- checks, each one line naming the setting, its value and the fix -----------------------------------


def _int(owner: object, name: str, lo: int, hi: int | None = None, *, none: bool = False) -> None:
    value = getattr(owner, name)
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        span = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise InputError(
            f"{type(owner).__name__}.{name}={value!r} is out of range: give {span}{' (or None)' if none else ''}"
        )


def _fraction(owner: object, name: str) -> None:
    """A number in (0, 1], stored as a float."""
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and 0 < value <= 1):
        example = next(f.default for f in dataclasses.fields(owner) if f.name == name)  # type: ignore[arg-type]
        raise InputError(
            f"{type(owner).__name__}.{name}={value!r} is out of range: give a number in (0, 1], e.g. {example}"
        )
    object.__setattr__(owner, name, float(value))


def _choice(owner: object, name: str, choices: Sequence[str]) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise InputError(f"{type(owner).__name__}.{name}={value!r} is not known: use one of {', '.join(choices)}")


def _flag(owner: object, name: str) -> None:
    if not isinstance(getattr(owner, name), bool):
        raise InputError(f"{type(owner).__name__}.{name}={getattr(owner, name)!r} is not a bool: give True or False")


# -- the settings -----------------------------------------------------------------------------------------

READOUTS = ("decoder", "encoder")
GRAPH_MODES = ("full", "target")


@dataclass(frozen=True)
class GraphOptions:
    """How an attribution graph is built, pruned and annotated (`build_graph`, `Traced.graph`)."""

    node_threshold: float = setting(0.8, "keep the nodes that carry this share of the influence on the logits")
    edge_threshold: float = setting(0.98, "keep the edges that carry this share of the kept nodes' influence")
    # graphs past a few thousand edges are unreadable in a browser and take minutes to write (a random
    # GPT-2-small keeps 14k nodes / 2M edges at the thresholds alone)
    max_nodes: int | None = setting(600, "features kept after pruning, at most (None: no cap)")
    max_logits: int = setting(10, "logit nodes at most, when no targets are named")
    logit_probability: float = setting(0.95, "logit nodes: the fewest top tokens covering this probability")
    readout: Literal["decoder", "encoder"] = setting(
        "decoder", "how a target feature reads the residual: a * W_dec row (the paper's) or a * W_enc column"
    )
    mode: Literal["full", "target"] = setting(
        "full", "full: every edge (within max_memory); target: expand from the logits, max_nodes_per_checkpoint"
    )
    max_nodes_per_checkpoint: int = setting(256, "mode target: features kept per checkpoint, by influence")
    loadings_per_edge: int = setting(
        5, "head loadings kept per edge, largest first (graph files store it as settings.top_heads)"
    )
    max_memory: int | None = setting(
        None,
        "bytes a build may hold, at least 1MiB (None: half the device's free memory); residual-SAE full mode "
        "computes within it, transcoder graphs refuse up front when their adjacency does not fit",
    )
    qk_terms: bool = setting(True, "attach QK terms to the most influential cross-position links (Traced.graph)")
    qk_links: int = setting(200, "cross-position links, by influence, that carry QK terms and QK tracing")
    heads_per_link: int = setting(2, "heads per such link whose QK terms are attached, by loading")
    top_terms: int = setting(8, "QK terms (and marginals) attached per head")

    def __post_init__(self) -> None:
        _fraction(self, "node_threshold")
        _fraction(self, "edge_threshold")
        _fraction(self, "logit_probability")
        _int(self, "max_nodes", 1, LIMITS.max_graph_nodes, none=True)
        _int(self, "max_logits", 1, LIMITS.max_top)
        _choice(self, "readout", READOUTS)
        _choice(self, "mode", GRAPH_MODES)
        _int(self, "max_nodes_per_checkpoint", 1, LIMITS.max_graph_nodes)
        _int(self, "loadings_per_edge", 0, LIMITS.max_heads_per_layer)
        if self.max_memory is not None:  # the one rule for byte budgets: config.parse_bytes
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory, "max_memory"))
        _flag(self, "qk_terms")
        _int(self, "qk_links", 0, LIMITS.max_graph_nodes)
        _int(self, "heads_per_link", 0, LIMITS.max_heads_per_layer)
        _int(self, "top_terms", 1, LIMITS.max_top)


@dataclass(frozen=True)
class SweepOptions:
    """How a steering sweep runs (`SteerRequest`, `qktrace steer`, POST /api/sweep, the page's sweep form)."""

    scales: str | tuple[float, ...] = setting(
        "-1:3:5",
        "start:stop:count or a comma list; the default's five passes hold the clean run (1), the ablation (0), "
        "the sign flip (-1) and two amplifications (2, 3)",
    )
    side: Literal["query", "key"] = setting("key", "steer the feature where the head's keys (or queries) read it")
    mode: Literal["scale", "value"] = setting("scale", "the swept number scales the activation, or replaces it")
    freeze_others: bool = setting(False, "keep every other head's clean attention pattern (QK steering only)")
    top_k: int = setting(5, "next tokens reported per scale, by probability")

    def __post_init__(self) -> None:
        if not isinstance(self.scales, str):
            object.__setattr__(self, "scales", tuple(parse_scales(self.scales)))
        else:
            parse_scales(self.scales)
        _choice(self, "side", ("query", "key"))
        _choice(self, "mode", ("scale", "value"))
        _flag(self, "freeze_others")
        _int(self, "top_k", 1, 20)

    @property
    def values(self) -> tuple[float, ...]:
        """The scales, one forward pass each."""
        return tuple(parse_scales(self.scales))


@dataclass(frozen=True)
class ExplainSettings:
    """How hard `explain` looks; the defaults are the budget documented in `qktrace.analyses.explain`."""

    sites: int = setting(4, "sites searched for candidates, led to by the top heads by cross-position influence")
    ablate: int = setting(8, "heads ablated one by one (the top ones by cross-position influence)")
    candidates: int = setting(6, "candidates kept per site and side, by predicted effect")
    top_k: tuple[int, ...] = setting((2, 3, 5), "sizes of the 'top k together' candidates")
    scales: tuple[float, ...] = setting((1.0, 0.0, -1.0, -2.0, -3.0), "1: clean, 0: removed, < 0: reversed")
    member_attention: float = setting(0.1, "a head joins a site when it attends to the site's key at least this")
    null_draws: int = setting(8, "random controls per tested mechanism, 0..1000 (0: no control, never 'specific')")
    null_seed: int = setting(0, "seed of the controls' draws")

    def __post_init__(self) -> None:
        for name in ("sites", "ablate", "candidates"):
            _int(self, name, 1)
        _int(self, "null_draws", 0, 1000)
        _int(self, "null_seed", 0)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in self.top_k):
            raise InputError(f"ExplainSettings.top_k={self.top_k}: group sizes must be integers of 2 or more")
        scales = tuple(float(s) for s in self.scales)
        if not scales or not all(math.isfinite(s) for s in scales) or len(set(scales)) != len(scales):
            raise InputError(f"ExplainSettings.scales={self.scales} must be distinct finite numbers")
        if min(scales) >= 1.0:
            raise InputError(f"ExplainSettings.scales={self.scales} need a value below 1 (0 removes, < 0 reverses)")
        object.__setattr__(self, "scales", tuple(sorted(scales, reverse=True)))
        object.__setattr__(self, "top_k", tuple(int(k) for k in self.top_k))


@dataclass(frozen=True)
class DashboardOptions:
    """What a dashboards job reads and keeps (`qktrace.jobs.dashboards.build_dashboards`)."""

    seq_len: int = setting(128, "tokens per chunk of a document, 2..65536")
    max_chunks_per_doc: int | None = setting(None, "chunks read per document at most (None: all)")
    max_docs: int | None = setting(None, "read only the first N documents (None: all)")
    text_field: str = setting("text", "the text field of JSONL records")
    docs_per_shard: int = setting(256, "documents per shard (the unit a restarted job resumes from)")
    batch_tokens: int = setting(4096, "tokens through the model at once")
    n_contexts: int = setting(10, "top activating contexts kept per feature, 1..1000")
    label_pool: int = setting(24, "top activations a feature's automatic label is drawn from")
    before: int = setting(12, "tokens shown before a context's activating token")
    after: int = setting(4, "tokens shown after it")
    n_out: int = setting(10, "top and bottom output tokens per feature")
    checkpoints: tuple[int, ...] | None = setting(None, "which SAEs (None: all)")

    def __post_init__(self) -> None:
        _int(self, "seq_len", 2, 1 << 16)  # BOS and one token at least
        _int(self, "n_contexts", 1, 1000)
        for name in ("docs_per_shard", "batch_tokens", "label_pool", "n_out"):
            _int(self, name, 1)
        for name in ("max_chunks_per_doc", "max_docs"):
            _int(self, name, 1, none=True)
        for name in ("before", "after"):
            _int(self, name, 0)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise InputError(f"DashboardOptions.text_field={self.text_field!r} is empty: name a JSONL field")

    @property
    def keep(self) -> int:
        """Top activations kept per feature (contexts and the label's pool)."""
        return max(self.n_contexts, self.label_pool)


@dataclass(frozen=True)
class ModelOptions:
    """How a loaded model is named in what qktrace writes (`Tracer.load`, every command taking a model)."""

    full_path: bool = setting(
        False,
        "write a local model's full path into graph files, reports and job files (by default they carry its "
        "hub id, or the folder's name: a path names the machine, and an upload publishes it)",
    )

    def __post_init__(self) -> None:
        _flag(self, "full_path")


@dataclass(frozen=True)
class QKOptions:
    """How a QK attribution is listed (`qktrace qk`, POST /api/qk)."""

    top: int = setting(20, f"QK terms listed, 1..{LIMITS.max_top}")

    def __post_init__(self) -> None:
        _int(self, "top", 1, LIMITS.max_top)


@dataclass(frozen=True)
class CompareOptions:
    """What `compare` keeps (`Traced.compare`, `qktrace compare`, POST /api/compare)."""

    top: int = setting(5, "heads whose QK terms are compared (the heads whose attention differs most), 0..64")
    top_terms: int = setting(12, "QK terms kept per compared head (the largest change first), 0..200")

    def __post_init__(self) -> None:
        _int(self, "top", 0, 64)
        _int(self, "top_terms", 0, 200)


@dataclass(frozen=True)
class BatchOptions:
    """What a batch job computes per prompt (`qktrace.jobs.batch.trace_batch`)."""

    graph: GraphOptions = field(default_factory=GraphOptions, metadata={"doc": "the graph of each prompt"})
    qk_rows: int = setting(3, "heads, by cross-position influence, given a QK row (query: the last position)")
    qk_top: int = setting(QKOptions.top, "QK terms listed per such row")
    explain: bool = setting(True, "run explain where a prompt names an answer")

    def __post_init__(self) -> None:
        if not isinstance(self.graph, GraphOptions):
            raise InputError(f"BatchOptions.graph={self.graph!r} is not a GraphOptions: give GraphOptions(...)")
        _int(self, "qk_rows", 0, LIMITS.max_top)
        _int(self, "qk_top", 1, LIMITS.max_top)
        _flag(self, "explain")
