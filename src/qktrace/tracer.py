"""The user facade: `Tracer(model, saes).run(prompt)` -> `Traced`, which answers questions about it.

The only stateful object in qktrace: it holds the model, the SAEs and, per traced prompt, the
forward-pass caches and the SAE encodings (computed once, lazily). Every answer comes from a pure
function in `qk`, `graph` or `interventions`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import DEMO_MODEL, DEMO_NAME, resolve_saes
from .errors import InputError
from .models import Model, Trace, load_model
from .qk import QKAttribution, qk_attribution
from .saes import SAE, FeatureActs, SAESet, load_saes

if TYPE_CHECKING:
    from .compare import Comparison
    from .graph import Graph


class Tracer:
    """Holds a model and its SAEs; `run(prompt)` traces one prompt."""

    def __init__(self, model: Model, saes: SAESet | None = None):
        self.model = model
        self.saes = saes if saes is not None else SAESet({})

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        saes: str | os.PathLike[str] | None = None,
        *,
        sae_ids: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        device_map: str | dict[str, Any] | None = None,
    ) -> Tracer:
        """`model`: a save_pretrained directory, a hub id, or "demo" (whose SAEs are the default `saes`).

        `device`: cpu, cuda, cuda:N or auto; `dtype`: float32, bfloat16 or float16 (decompositions
        accumulate in float32); `device_map`: spread a model too large for one device over several
        (accelerate); each SAE then sits on the device of the layer that reads its checkpoint."""
        name = str(model)
        source = DEMO_MODEL if name == DEMO_NAME else model
        m = load_model(source, dtype=dtype, device=device, device_map=device_map, name=name)
        saes = resolve_saes(name, None if saes is None else str(saes))
        s = load_saes(saes, m, sae_ids=sae_ids, device=m.device, dtype=m.anatomy.dtype) if saes is not None else None
        if s is not None and device_map is not None:
            s = SAESet({c: sae.to(m.checkpoint_device(c)) for c, sae in s.items()})
        return cls(m, s)

    def tokenize(self, prompt: str | Sequence[int] | Tensor) -> Tensor:
        """Token ids as this model and these SAEs expect them (BOS first when the SAEs were trained with it)."""
        return self.model.tokenize(prompt, prepend_bos=getattr(self.saes, "prepend_bos", None))

    def run(self, prompt: str | Sequence[int] | Tensor) -> Traced:
        return Traced(self.model, self.saes, self.model.run(self.tokenize(prompt)))


@dataclass(eq=False)
class Traced:
    """One traced prompt: caches of its forward pass, and SAE encodings on demand."""

    model: Model
    saes: SAESet
    trace: Trace
    _acts: dict[int, FeatureActs] = field(default_factory=dict, repr=False)

    @property
    def str_tokens(self) -> tuple[str, ...]:
        return self.trace.str_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held for this prompt: the trace, its pattern cache and the SAE encodings made so far."""
        held = sum(
            t.numel() * t.element_size() for a in self._acts.values() for t in (a.pos, a.feature, a.act, a.error)
        )
        return self.trace.nbytes + held

    def sae(self, checkpoint: int) -> SAE:
        if checkpoint not in self.saes:
            loaded = ", ".join(map(str, self.saes.checkpoints)) or "none"
            raise InputError(
                f"checkpoint {checkpoint} (the input of layer {checkpoint}) has no SAE (loaded: {loaded}): "
                f"load one with hook_name blocks.{checkpoint}.hook_resid_pre"
            )
        return self.saes[checkpoint]

    def acts(self, checkpoint: int) -> FeatureActs:
        """Active features at a checkpoint, encoded once from the cached residual stream."""
        if checkpoint not in self._acts:
            sae = self.sae(checkpoint)
            self._acts[checkpoint] = sae.sparse(self.trace.resid[checkpoint])
        return self._acts[checkpoint]

    def pattern(self, layer: int, head: int, query_pos: int) -> Tensor:
        """Head (layer, head)'s attention [k_pos] from `query_pos` (negative counts from the end)."""
        from .errors import check_index

        layer = check_index(layer, self.model.n_layers, "layer")
        head = check_index(head, self.model.anatomy.layers[layer].n_heads, "head")
        q = check_index(query_pos, self.trace.n_pos, "query position", allow_negative=True)
        return self.trace.pattern(layer, q, [head])[0, 0]

    def qk(self, layer: int, head: int, query_pos: int, key_pos: int | Sequence[int] | None = None) -> QKAttribution:
        """QK attribution of head (layer, head) from `query_pos` to `key_pos` (None: the whole row)."""
        from .errors import check_index

        layer = check_index(layer, self.model.n_layers, "layer")
        return qk_attribution(
            self.model, self.trace, self.sae(layer), self.acts(layer), layer, head, query_pos, key_pos
        )

    def graph(
        self, *, qk_terms: bool = True, qk_links: int = 200, heads_per_link: int = 2, top_terms: int = 8, **kwargs: Any
    ) -> Graph:
        """The attribution graph of this prompt with head loadings (see `qktrace.graph.build_graph`).

        With `qk_terms`, the `qk_links` most influential cross-position links also carry the top QK
        terms of their `heads_per_link` top heads at (target position, source position): the paper's
        jump from an edge to why its heads attended there.
        """
        import dataclasses

        from .graph import build_graph

        graph = build_graph(self.model, self.saes, self.trace, **kwargs)
        if not qk_terms:
            return graph
        return dataclasses.replace(graph, qk_terms=self.link_qk_terms(graph, qk_links, heads_per_link, top_terms))

    def compare(self, other: Traced, **kwargs: Any) -> Comparison:
        """This prompt (A) against `other` (B), whose tokens align, head by head (see `qktrace.compare.compare`)."""
        from .compare import compare

        return compare(self, other, **kwargs)

    def link_qk_terms(
        self, graph: Graph, links: int = 200, heads_per_link: int = 2, top: int = 8
    ) -> dict[int, list[dict[str, Any]]]:
        """Per cross-position edge: for each of its top heads, the score and top terms at (q, k)."""
        rows: dict[tuple[int, int, int], QKAttribution | None] = {}
        out: dict[int, list[dict[str, Any]]] = {}
        cols = ["query", "query_label", "key", "key_label", "value"]
        for e in graph.cross_position_edges(links):
            src, tgt = graph.nodes[int(graph.source[e])].node, graph.nodes[int(graph.target[e])].node
            per_head = []
            for hl in graph._loadings(e)[:heads_per_link]:
                key = (hl.layer, hl.head, tgt.pos)
                if key not in rows:
                    rows[key] = self.qk(*key) if hl.layer in self.saes else None
                att = rows[key]
                if att is None or src.pos not in att.key_positions:
                    continue
                k = att.key_positions.index(src.pos)
                df = att.terms_frame(top=top, key_pos=src.pos)
                per_head.append(
                    {
                        "layer": hl.layer,
                        "head": hl.head,
                        "query_pos": tgt.pos,
                        "key_pos": src.pos,
                        "score": float(att.sum_of_terms[k]),
                        "pattern": float(att.pattern[k]),
                        "terms": [dict(zip(cols, r)) for r in df[cols].itertuples(index=False)],
                    }
                )
            if per_head:
                out[e] = per_head
        return out
