"""Graph JSON as circuit-tracer's and Neuronpedia's frontends read it: declared once, written and read here.

By job: `schema` (the JSON as typed declarations, the versions), `numbering` (where each node kind sits:
layer, feature, ctx_idx), `names` (slug and scan), `write` (a Graph to JSON), `read` (a file to JSON to
a Graph's fields, or to what a listing shows). The `Graph` itself (`qktrace.graph.graph`) sits above
this package: it calls the writer and the reader, which see it only as data.

The file (circuit-tracer 0.5's frontend models and Neuronpedia's upload schema, plus qktrace's fields):

    metadata       slug, scan, prompt_tokens, prompt, transcoder_list, node_threshold, schema_version,
                   feature_details (when the SAEs are on Neuronpedia), info, generation_settings,
                   pruning_settings, replacement_score and completeness_score (the unpruned graph's, which
                   Neuronpedia's graph view shows); qktrace: {format_version, model (a hub id or folder
                   name), n_layers, tokens, replacement, completeness, settings, neuronpedia_ids}
    qParams        pinnedIds, supernodes, linkType, clickedId, sg_pos
    nodes          node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, token_prob,
                   is_target_logit, run_idx, reverse_ctx_idx, influence (cumulative), activation;
                   qktrace: raw_influence; on targets of cross-position links, Neuronpedia's
                   qk_tracing_results and qktrace's qk_tracing_head (which head, query and key)
    links          source, target, weight; qktrace: influence, head_loadings, qk_top_terms
    qk_only_nodes  QK contributors that are not nodes of the graph, keyed by node_id (Neuronpedia's)

Conventions:
- node_id and jsNodeId are qktrace ids (`qktrace.nodes` writes and parses them).
- layer: the checkpoint as a string; tokens "E"; logits n_layers + 1. When every SAE has a Neuronpedia id
  of one source set, metadata.feature_details names it and layers use that set's layer numbers (Gemma
  Scope's resid_post SAE of layer L reads checkpoint L + 1: layer = checkpoint - 1), so Neuronpedia finds
  each feature's dashboard at `{layer}-{source set}`.
- feature: tokens their position, logits their token id, features Cantor(layer, index) (schema_version 1;
  Neuronpedia decodes it), and one negative number per other kind: `FEATURE_NUMBER`, error -1, SAE bias -2,
  attention bias -3, MLP bias -4, head bias -5. Both frontends show a node under (layer, feature,
  ctx_idx), so no two nodes of a graph share it.
- feature_type: "embedding", "cross layer transcoder" (SAE features), "logit", "mlp reconstruction error"
  (SAE errors only) and "bias" (SAE, attention, MLP and head biases: Neuronpedia's type for bias leaves,
  never counted as error).
- slug: [a-zA-Z0-9_.-] (Neuronpedia's rule), by default the prompt's words and a hash of the model, tokens
  and settings. scan: the Neuronpedia model id when the model or its SAEs name one (`NEURONPEDIA_MODELS`),
  else the model's name made safe (the demo model is `qktrace-demo`). Both can be given.
- QK tracing: a target node of cross-position links carries, for the head that carries most of those
  links, the top (query, key) term pairs and both sides' marginals at (the node's position, the key the
  head carries most from); every contributor id is a node of the graph or a key of qk_only_nodes. The
  head is named in qk_tracing_head and at the end of the node's clerp (" [QK L2H6 @5]").

Versions: 2 is written, 1 and 2 are read (`read`).
"""

from .names import (
    DEMO_SCAN,
    NEURONPEDIA_MODELS,
    check_name,
    default_slug,
    graph_slug,
    neuronpedia_scan,
    neuronpedia_source_set,
    sanitise,
)
from .numbering import FEATURE_NUMBER, FEATURE_TYPE, cantor, node_json, uncantor
from .read import GraphHeader, describe, graph_fields, origin, read_json, validate
from .schema import CIRCUIT_TRACER, FORMAT_VERSION, NEURONPEDIA, QKTRACE, GraphJSON, NodeJSON
from .write import qk_suffix, to_json

__all__ = [
    "CIRCUIT_TRACER",
    "DEMO_SCAN",
    "FEATURE_NUMBER",
    "FEATURE_TYPE",
    "FORMAT_VERSION",
    "NEURONPEDIA",
    "NEURONPEDIA_MODELS",
    "QKTRACE",
    "GraphHeader",
    "GraphJSON",
    "NodeJSON",
    "cantor",
    "check_name",
    "default_slug",
    "describe",
    "graph_fields",
    "graph_slug",
    "neuronpedia_scan",
    "neuronpedia_source_set",
    "node_json",
    "origin",
    "qk_suffix",
    "read_json",
    "sanitise",
    "to_json",
    "uncantor",
    "validate",
]
