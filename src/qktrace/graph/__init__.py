"""Attribution graphs over residual-stream SAE features, with the heads that carried each edge.

`build_graph(model, saes, trace)` -> `Graph` (pruned, with head loadings); `attribute(...)` -> the
unpruned layered `Attribution` it starts from; `Graph.save(path)` / `load_graph(path)` write and read
the circuit-tracer / Neuronpedia JSON with head loadings per link and QK tracing (`formats`), and
`load_graph` opens circuit-tracer's and Neuronpedia's own graph files. `build_transcoder_graph(model,
transcoders, trace)` -> the plain transcoder graph (`replacement`), pruned and scored as circuit-tracer does,
as a `Graph` without head loadings; `build_checkpointed_graph(model, transcoders, attention_saes, trace)` -> the
checkpointed graph (transcoders + attention-output SAEs, the paper's strategy 2: `strategy2`), pruned the same
way, with head loadings on its edges into attention features.
"""

from .build import Attribution, attribute, build_graph
from .graph import FORMAT_VERSION, Graph, GraphNode, HeadLoading, QKContributor, QKTracing, load_graph
from .replacement_graph import build_transcoder_graph
from .strategy2_graph import build_checkpointed_graph

__all__ = [
    "FORMAT_VERSION",
    "Attribution",
    "Graph",
    "GraphNode",
    "HeadLoading",
    "QKContributor",
    "QKTracing",
    "attribute",
    "build_checkpointed_graph",
    "build_graph",
    "build_transcoder_graph",
    "load_graph",
]
