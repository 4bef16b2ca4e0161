"""The user facade: `Tracer(model, saes).run(prompt)` -> `Traced`, which answers questions about it.

The only stateful object in qktrace: it holds the model, the SAEs and, per traced prompt, the
forward-pass caches and the SAE encodings (computed once, lazily). Every answer comes from a pure
function in `qk`, `graph` or `interventions`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import DEMO_MODEL, DEMO_NAME, resolve_coders, resolve_saes
from .errors import Fix, InputError
from .models import Model, Trace, load_model
from .options import GraphOptions, ModelOptions, with_overrides
from .qk import QKAttribution, qk_attribution
from .saes import SAE, AttentionSAESet, FeatureActs, SAESet, TranscoderSet, load_saes, load_transcoders

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .analyses.compare import Comparison
    from .graph import Graph, QKContributor, QKTracing
    from .graph.transcoder_qk import ResidualWriters
    from .nodes import Node
    from .steering.interventions import Intervention, InterventionResult


class Tracer:
    """Holds a model, its residual-stream SAEs and/or its transcoders; `run(prompt)` traces one prompt.

    With residual SAEs, graphs are residual-SAE graphs with head loadings and QK components are SAE
    features; with transcoders and no residual SAEs, graphs are plain transcoder graphs (circuit-tracer's)
    and QK components are the residual's writers (`qktrace.graph.transcoder_qk`); with transcoders and
    attention-output SAEs, graphs are checkpointed graphs (the paper's strategy 2, `qktrace.graph.strategy2`),
    whose edges into attention features carry head loadings, and the writers include those features."""

    def __init__(
        self, model: Model, saes: SAESet | None = None, *, transcoders: TranscoderSet | None = None,
        attention_saes: AttentionSAESet | None = None,
    ):  # fmt: skip
        _check_pairing(transcoders, attention_saes)
        self.model = model
        self.saes = saes if saes is not None else SAESet({})
        self.transcoders = transcoders
        self.attention_saes = attention_saes

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
        labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        transcoders: str | os.PathLike[str] | None = None,
        attention_saes: str | os.PathLike[str] | None = None,
        full_path: bool = False,
    ) -> Tracer:
        """`model`: a save_pretrained directory, a hub id, or "demo" (whose SAEs are the default `saes`).

        `device`: cpu, cuda, cuda:N or auto; `dtype`: float32, bfloat16 or float16 (decompositions
        accumulate in float32); `device_map`: spread a model too large for one device over several
        (accelerate); each SAE then sits on the device of the layer that reads its checkpoint.
        `labels`: Neuronpedia explanation exports (files or folders) that label the SAEs' features.
        `transcoders`: a transcoder set (`qktrace.saes.load_transcoders`: circuit-tracer, Gemma Scope, Llama
        Scope, SAELens); without residual SAEs, `Traced.graph` then builds the plain transcoder graph.
        `attention_saes`: SAEs on every layer's attention output (`qktrace.saes.load_attention_saes`: SAELens
        hook_z / hook_attn_out folders, Gemma Scope "att" params.npz), with `transcoders` only: `Traced.graph`
        then builds the checkpointed graph (strategy 2) with head loadings.
        `full_path`: name a local model by its full path in the files written (`ModelOptions.full_path`;
        by default its hub id or folder name)."""
        name = str(model)
        transcoders, attention_saes = resolve_coders(
            None if transcoders is None else str(transcoders), None if attention_saes is None else str(attention_saes)
        )
        saes = resolve_saes(name, None if saes is None else str(saes), transcoders)
        if saes is None and labels is not None:
            raise InputError("labels were given but no SAEs: pass the SAEs the Neuronpedia export describes")
        _check_pairing(transcoders, attention_saes)
        source = DEMO_MODEL if name == DEMO_NAME else model
        keep = ModelOptions(full_path=full_path).full_path
        m = load_model(source, dtype=dtype, device=device, device_map=device_map, full_path=keep)
        s = None
        if saes is not None:
            s = load_saes(saes, m, sae_ids=sae_ids, device=m.device, dtype=m.anatomy.dtype, labels=labels)
        if s is not None and device_map is not None:
            s = SAESet({c: sae.to(m.checkpoint_device(c)) for c, sae in s.items()})
        ts = None if transcoders is None else load_transcoders(transcoders, m, device=m.device, dtype=m.anatomy.dtype)
        return cls(m, s, transcoders=ts, attention_saes=_attention_saes(attention_saes, m, ts))

    def tokenize(self, prompt: str | Sequence[int] | Tensor, *, what: str = "the prompt") -> Tensor:
        """Token ids as this model and these SAEs expect them (BOS first when the SAEs were trained with it);
        `what` names the prompt in a refusal ("prompt B")."""
        return self.model.tokenize(prompt, prepend_bos=getattr(self.saes, "prepend_bos", None), what=what)

    def run(self, prompt: str | Sequence[int] | Tensor, *, what: str = "the prompt") -> Traced:
        trace = self.model.run(self.tokenize(prompt, what=what))
        return Traced(self.model, self.saes, trace, self.transcoders, attention_saes=self.attention_saes)


def _check_pairing(transcoders: object, attention_saes: object) -> None:
    """Attention SAEs come with transcoders (one line otherwise)."""
    if attention_saes is not None and transcoders is None:
        raise InputError(
            "attention SAEs were given without transcoders: a checkpointed graph replaces every MLP and every "
            "attention output",
            Fix(api="pass transcoders=PATH too", cli="pass --transcoders DIR too", http="pass --transcoders DIR too"),
        )


def _attention_saes(
    source: str | os.PathLike[str] | None, model: Model, transcoders: TranscoderSet | None
) -> AttentionSAESet | None:
    """The attention SAEs at `source`, checked to cover every layer, as the transcoders must (one line)."""
    if source is None or transcoders is None:
        return None
    from .graph.strategy2 import check_coverage
    from .saes import load_attention_saes

    saes = load_attention_saes(source, model, device=model.device, dtype=model.anatomy.dtype)
    check_coverage(model, transcoders, saes)
    return saes


@dataclass(eq=False)
class Traced:
    """One traced prompt: caches of its forward pass, and SAE encodings on demand."""

    model: Model
    saes: SAESet
    trace: Trace
    transcoders: TranscoderSet | None = None
    _acts: dict[int, FeatureActs] = field(default_factory=dict, repr=False)
    _writers: ResidualWriters | None = field(default=None, repr=False)
    attention_saes: AttentionSAESet | None = None

    @property
    def str_tokens(self) -> tuple[str, ...]:
        return self.trace.str_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held for this prompt: the trace, its pattern cache, the SAE encodings and the residual's
        writers (with transcoders) made so far."""
        held = sum(
            t.numel() * t.element_size() for a in self._acts.values() for t in (a.pos, a.feature, a.act, a.error)
        )
        if self._writers is not None:
            held += self._writers.nbytes
        return self.trace.nbytes + held

    def sae(self, checkpoint: int) -> SAE:
        """The SAE at `checkpoint` (the input of layer `checkpoint`), or MissingSAEError."""
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

    def writers(self) -> ResidualWriters:
        """What wrote the residual (transcoder features, MLP errors, attention outputs, embeddings), made once."""
        from .graph.transcoder_qk import residual_writers

        if self.transcoders is None:
            raise InputError("this tracer holds no transcoders: load them (Tracer.load(..., transcoders=PATH))")
        if self._writers is None:
            self._writers = residual_writers(
                self.model, self.trace, self.transcoders, attention_saes=self.attention_saes
            )
        return self._writers

    @property
    def graph_kind(self) -> str:
        """Which graph `graph()` builds: "sae" (residual SAEs, head loadings), "transcoder" (the plain
        transcoder graph: transcoders and no residual SAEs) or "checkpointed" (transcoders and attention SAEs,
        strategy 2, head loadings); InputError when residual SAEs and transcoders are both loaded."""
        if self.transcoders is None:
            return "sae"
        if len(self.saes):
            raise InputError(
                "both residual SAEs and transcoders are loaded: which graph to build is ambiguous; load one of them"
            )
        return "transcoder" if self.attention_saes is None else "checkpointed"

    def qk(self, layer: int, head: int, query_pos: int, key_pos: int | Sequence[int] | None = None) -> QKAttribution:
        """QK attribution of head (layer, head) from `query_pos` to `key_pos` (None: the whole row): over the
        SAE's features at checkpoint `layer`, or, without one there and with transcoders, over the residual's
        writers (`qktrace.graph.transcoder_qk`)."""
        from .errors import check_index

        layer = check_index(layer, self.model.n_layers, "layer")
        if layer not in self.saes and self.transcoders is not None:
            from .graph.transcoder_qk import transcoder_qk_attribution

            return transcoder_qk_attribution(self.model, self.trace, self.writers(), layer, head, query_pos, key_pos)
        return qk_attribution(
            self.model, self.trace, self.sae(layer), self.acts(layer), layer, head, query_pos, key_pos
        )

    def graph(
        self,
        options: GraphOptions | None = None,
        *,
        targets: Sequence[str | int] | str | int | None = None,
        slug: str | None = None,
        scan: str | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> Graph:
        """The attribution graph of this prompt: with residual SAEs, the residual-SAE graph with head loadings
        (`qktrace.graph.build_graph`); with transcoders and no residual SAEs, the plain transcoder graph, pruned
        and scored as circuit-tracer does (`qktrace.graph.build_transcoder_graph`), or with attention SAEs too
        the checkpointed graph, whose edges into attention features carry head loadings
        (`qktrace.graph.strategy2_graph`); `graph_kind` says which.

        `options` (`qktrace.options.GraphOptions`, or any of its fields as keywords, which replace the
        options' own): with `qk_terms`, the `qk_links` most influential cross-position links also carry the
        top `top_terms` QK terms of their `heads_per_link` top heads at (target position, source position):
        the paper's jump from an edge to why its heads attended there; and their target nodes carry the QK
        tracing of the head that carries most of their cross-position inputs (`qk_tracing`).
        `targets`: the logit tokens (default: the top tokens). `slug`, `scan`: the graph's Neuronpedia name
        and model id ([a-zA-Z0-9_.-]; default: from the prompt, and from the model and its SAEs).
        """
        import dataclasses

        from .graph import build_graph, formats

        o = with_overrides(options, GraphOptions, overrides)
        names = {k: formats.check_name(v, k) for k, v in (("slug", slug), ("scan", scan)) if v is not None}
        if self.graph_kind == "transcoder":
            from .graph import build_transcoder_graph

            assert self.transcoders is not None
            log.info("graph: the plain transcoder graph (%s transcoders, no head loadings)", self.transcoders.kind)
            graph = build_transcoder_graph(self.model, self.transcoders, self.trace, o, targets=targets)
        elif self.graph_kind == "checkpointed":
            from .graph.strategy2_graph import build_checkpointed_graph

            assert self.transcoders is not None and self.attention_saes is not None
            log.info("graph: the checkpointed graph (transcoders and attention SAEs, head loadings)")
            graph = build_checkpointed_graph(
                self.model, self.transcoders, self.attention_saes, self.trace, o, targets=targets
            )
        else:
            graph = build_graph(self.model, self.saes, self.trace, o, targets=targets, progress=progress)
        sources = {c: sae.neuronpedia_id for c, sae in self.saes.items() if sae.neuronpedia_id}
        slug = names.get("slug") or formats.default_slug(graph)
        scan = names.get("scan") or formats.neuronpedia_scan(graph.model_name, sources.values())
        graph = dataclasses.replace(graph, slug=slug, scan=scan, sources=sources)
        if not o.qk_terms:
            return graph
        rows: dict[tuple[int, int, int], QKAttribution | None] = {}  # whole QK rows, shared by both
        terms = self.link_qk_terms(graph, o.qk_links, o.heads_per_link, o.top_terms, rows=rows)
        tracing, only = self.qk_tracing(graph, o.qk_links, o.top_terms, rows=rows)
        return dataclasses.replace(graph, qk_terms=terms, qk_tracing=tracing, qk_only=only)

    def _row(self, rows: dict[tuple[int, int, int], QKAttribution | None], layer: int, head: int, q: int):
        """Head (layer, head)'s QK attribution of every key from `q` (None without an SAE at `layer` or
        transcoders), cached."""
        if (layer, head, q) not in rows:
            known = layer in self.saes or self.transcoders is not None
            rows[layer, head, q] = self.qk(layer, head, q) if known else None
        return rows[layer, head, q]

    def qk_tracing(
        self,
        graph: Graph,
        links: int = GraphOptions.qk_links,
        top: int = GraphOptions.top_terms,
        *,
        rows: dict[tuple[int, int, int], QKAttribution | None] | None = None,
    ) -> tuple[dict[int, QKTracing], dict[str, QKContributor]]:
        """Per target node of the `links` most influential cross-position links: the QK attribution of
        the head that carries most of its cross-position inputs (`Graph.carrier`), from its position to
        the key that head carries most from -- the top `top` term pairs, and each side's components summed
        over the other side's. Also the label and activation of every component named there that is not a
        node of the graph. `rows`: a cache of whole QK rows to reuse (see `graph`)."""
        from .graph import QKTracing
        from .nodes import Node

        rows = {} if rows is None else rows
        ids = {n.id for n in graph.nodes}
        out: dict[int, QKTracing] = {}
        only: dict[str, QKContributor] = {}
        plain = graph.settings.get("graph") == "transcoder" and self.transcoders is not None
        for t in dict.fromkeys(int(graph.target[e]) for e in graph.cross_position_edges(links, loaded=not plain)):
            carrier = self._direct_carrier(graph, t) if plain else graph.carrier(t)
            att = None if carrier is None else self._row(rows, carrier[0], carrier[1], graph.nodes[t].node.pos)
            if carrier is None or att is None or carrier[2] not in att.key_positions:
                continue
            layer, head, key = carrier
            cols = (att.key.pos == key).nonzero().flatten()
            terms = att.terms[:, cols]  # [q_component, k_component at the key]
            q_ids, k_ids = att.query.ids, [att.key.id(int(i)) for i in cols]
            flat = terms.flatten()
            best = torch.topk(flat.abs(), min(top, flat.numel())).indices.tolist()
            q_sum, k_sum = terms.sum(1), terms.sum(0)
            q_top = torch.topk(q_sum.abs(), min(top, len(q_sum))).indices.tolist()
            k_top = torch.topk(k_sum.abs(), min(top, len(k_sum))).indices.tolist()
            i = att.key_positions.index(key)
            out[t] = QKTracing(
                layer, head, att.query_pos, key, float(att.sum_of_terms[i]), float(att.pattern[i]),
                pairs=tuple((q_ids[j // len(k_ids)], k_ids[j % len(k_ids)], float(flat[j])) for j in best),
                query=tuple((q_ids[j], float(q_sum[j])) for j in q_top),
                key=tuple((k_ids[j], float(k_sum[j])) for j in k_top),
            )  # fmt: skip
            named = [c for q, k, _ in out[t].pairs for c in (q, k)] + [c for c, _ in out[t].query + out[t].key]
            for cid in named:
                if cid not in ids and cid not in only:
                    only[cid] = self._contributor(Node.parse(cid), layer)
        return out, only

    def _contributor(self, node: Node, layer: int) -> QKContributor:
        """A QK component that is no node of the graph: its label and activation (features only)."""
        from .graph import QKContributor
        from .nodes import Kind, describe

        if node.kind is Kind.FEATURE:
            feats, values = self.acts(layer).at(node.pos)
            hit = (feats == node.index).nonzero().flatten()
            act = float(values[hit[0]]) if len(hit) else None
            return QKContributor(self.saes[layer].label(node.index), act)
        if node.kind is Kind.TRANSCODER and self.transcoders is not None:
            enc, ts = self.writers().enc, self.transcoders
            hit = ((enc.layer == node.layer) & (enc.pos == node.pos) & (enc.index == node.index)).nonzero().flatten()
            act = float(enc.act[hit[0]]) if len(hit) else None
            label = ts.clt.label(node.layer, node.index) if ts.clt is not None else ts[node.layer].label(node.index)
            return QKContributor(label, act)
        att = self.writers().att if node.kind is Kind.ATTN_FEATURE and self.transcoders is not None else None
        if att is not None and self.attention_saes is not None:
            hit = ((att.layer == node.layer) & (att.pos == node.pos) & (att.index == node.index)).nonzero().flatten()
            act = float(att.act[hit[0]]) if len(hit) else None
            return QKContributor(self.attention_saes[node.layer].label(node.index), act)
        return QKContributor(describe(node), None)

    def _direct_carrier(self, graph: Graph, t: int) -> tuple[int, int, int] | None:
        from .graph.transcoder_qk import direct_carrier

        assert self.transcoders is not None
        return direct_carrier(self.model, self.trace, self.transcoders, graph, t)

    def intervene(
        self, interventions: Sequence[Intervention], *, record_attention: bool | Sequence[int] = False,
        last_only: bool = False,
    ) -> InterventionResult:  # fmt: skip
        """This prompt run once more under `interventions` (`qktrace.steering.interventions.run_with`), reusing its
        clean run, with this tracer's SAEs, transcoders and attention SAEs (`SteerFeature` / `SteerQK` of kind
        transcoder or attn)."""
        from .steering.interventions import run_with

        return run_with(
            self.model, self.saes, self.trace.tokens, interventions, clean=self.trace,
            record_attention=record_attention, last_only=last_only, transcoders=self.transcoders,
            attention_saes=self.attention_saes,
        )  # fmt: skip

    def compare(self, other: Traced, **kwargs: Any) -> Comparison:
        """This prompt (A) against `other` (B), whose tokens align, head by head (see `qktrace.compare`)."""
        from .analyses.compare import compare

        return compare(self, other, **kwargs)

    def link_qk_terms(
        self,
        graph: Graph,
        links: int = GraphOptions.qk_links,
        heads_per_link: int = GraphOptions.heads_per_link,
        top: int = GraphOptions.top_terms,
        *,
        rows: dict[tuple[int, int, int], QKAttribution | None] | None = None,
    ) -> dict[int, list[dict[str, Any]]]:
        """Per cross-position edge: for each of its top heads, the score and top terms at (q, k).
        `rows`: a cache of whole QK rows to reuse (see `graph`)."""
        rows = {} if rows is None else rows
        out: dict[int, list[dict[str, Any]]] = {}
        cols = ["query", "query_label", "key", "key_label", "value"]
        for e in graph.cross_position_edges(links):
            src, tgt = graph.nodes[int(graph.source[e])].node, graph.nodes[int(graph.target[e])].node
            per_head = []
            for hl in graph._loadings(e)[:heads_per_link]:
                att = self._row(rows, hl.layer, hl.head, tgt.pos)
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
