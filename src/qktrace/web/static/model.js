// A graph file (circuit-tracer JSON with qktrace's fields), indexed for the views. No DOM here.
//
// Node ids are qktrace's `kind/c<checkpoint>/p<pos>[/f<feature>|/t<token>]`, or `l<layer>` for a
// transcoder graph's `transcoder` and `mlp_error` nodes (drawn in the row of checkpoint <layer>: they
// read layer <layer>'s MLP input) (qktrace/nodes.py writes them); `parseId` is the page's one reader of
// them. A node whose id is not one of those (a circuit-tracer or Neuronpedia graph) is placed from its own
// `feature_type`, `layer`, `ctx_idx` and `feature` fields.
//
// QK tracing (Neuronpedia's fields, which qktrace writes too): a node's `qk_tracing_results` name their
// components by node id, either a node of the graph or a key of the graph's `qk_only_nodes`.
//
// Edge weights come in two kinds: raw (the file's `weight`), and normalised per target, as circuit-tracer
// normalises the adjacency matrix before pruning: each edge's weight divided by the sum of |weight| over
// every edge into its target, so a target's incoming |normalised weights| sum to 1 (the sign is kept).

import { componentLabel, visible } from "./names.js";

const ID = /^([a-z_]+)\/[cl](\d+)\/p(\d+)(?:\/([ft])(\d+))?$/; // c<checkpoint>, or l<layer> (transcoders)
const FOREIGN_KINDS = { embedding: "token", logit: "logit", bias: "sae_bias" };

export function parseId(id, node = {}) {
  const m = ID.exec(id);
  if (m) return { kind: m[1], cp: +m[2], pos: +m[3], index: m[5] === undefined ? -1 : +m[5] };
  const type = String(node.feature_type || "");
  const kind = FOREIGN_KINDS[type] || (/error/.test(type) ? "error"
    : /transcoder|feature|lorsa/.test(type) ? "feature" : "unknown");
  const layer = Number.parseInt(node.layer, 10);
  const index = Number.isInteger(node.feature) ? node.feature : -1;
  return { kind, cp: Number.isNaN(layer) ? 0 : layer, pos: Number.isInteger(node.ctx_idx) ? node.ctx_idx : 0, index };
}

export function indexGraph(graph) {
  const meta = graph.metadata || {};
  const ours = meta.qktrace || {};
  const tokens = meta.prompt_tokens || [];
  const nodes = (graph.nodes || []).map((n) => {
    const p = parseId(n.node_id, n);
    // circuit-tracer leaves token and error labels empty and its page writes them: so does this one
    const tok = JSON.stringify(tokens[p.pos] === undefined ? "?" : tokens[p.pos]);
    const err = p.kind === "error" || p.kind === "mlp_error";
    const clerp = n.clerp || (p.kind === "token" ? `Emb: ${tok}` : err ? `Err: ${tok}` : "");
    return { ...n, clerp, id: n.node_id, p, ins: [], outs: [] };
  });
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const links = [];
  for (const l of graph.links || []) {
    const s = byId.get(l.source), t = byId.get(l.target);
    if (!s || !t) continue;
    const link = { ...l, i: links.length, s, t, abs: Math.abs(l.weight), norm: 0 };
    links.push(link);
    s.outs.push(link);
    t.ins.push(link);
  }
  for (const n of nodes) {
    const total = n.ins.reduce((acc, l) => acc + l.abs, 0);
    for (const l of n.ins) l.norm = total > 0 ? l.weight / total : 0;
  }
  const inner = nodes.filter((n) => n.p.kind !== "logit" && n.p.kind !== "token").map((n) => n.p.cp);
  const q = graph.qParams || {};
  const pins = Array.isArray(q.pinnedIds) ? q.pinnedIds : String(q.pinnedIds || "").split(",").filter(Boolean);
  return {
    graph,
    meta,
    foreign: !meta.qktrace, // made by another tool: no head loadings, no QK terms
    maker: meta.qktrace ? "qktrace" : (meta.info && meta.info.generator && meta.info.generator.name) || "another tool",
    qkOnly: graph.qk_only_nodes || {}, // QK tracing components that are not nodes, by id
    tokens,
    nLayers: ours.n_layers || (inner.length ? Math.max(...inner) : 0),
    nodes,
    byId,
    links,
    sortedAbs: new Map(), // weights mode -> every |shown weight|, ascending (for pruning quantiles)
    pinned: pins.filter((id) => byId.has(id)),
    supernodes: (q.supernodes || []).filter((s) => Array.isArray(s) && s.length > 1)
      .map(([name, ...ids]) => ({ name: String(name), ids: ids.filter((id) => byId.has(id)), collapsed: false })),
  };
}

/** The weight shown for a link: raw, or normalised per target. */
export const weightOf = (l, mode) => (mode === "norm" ? l.norm : l.weight);

/** Links sorted by |shown weight|, strongest first. */
export const strongest = (links, mode) =>
  [...links].sort((a, b) => Math.abs(weightOf(b, mode)) - Math.abs(weightOf(a, mode)));

/** The |weight| below which a fraction `q` of the links' shown |weights| lie (0 for q = 0). */
export function quantile(model, mode, q) {
  if (!model.sortedAbs.has(mode)) {
    model.sortedAbs.set(mode, model.links.map((l) => Math.abs(weightOf(l, mode))).sort((a, b) => a - b));
  }
  const sorted = model.sortedAbs.get(mode);
  if (!sorted.length || q <= 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

export const isCross = (l) => l.s.p.pos !== l.t.p.pos;

/** What qktrace appends to the label of a node with QK tracing (qktrace.graph.formats.qk_suffix), or "". */
export const qkSuffix = (n) => {
  const h = n.qk_tracing_head;
  return h ? ` [QK L${h.layer}H${h.head} @${h.key_pos}]` : "";
};

/** A node's own label: its clerp without the QK suffix a graph appends to it (" [QK L2H6 @5]"). */
export function baseLabel(n) {
  const c = n.clerp || "", s = qkSuffix(n);
  return s && c.endsWith(s) ? c.slice(0, -s.length) : c;
}

/** The one label of component `id` (a node, or a QK tracing component in `qk_only_nodes`): names.js's
 * `componentLabel` of its kind, label and position. A logit keeps its own label ('Output " x" (p=…)'), and a
 * node of another tool (an id qktrace does not write) its clerp. */
export function nameIn(model, id, fallback) {
  const n = model.byId.get(id) || model.qkOnly[id];
  const own = n ? baseLabel(n) : fallback && String(fallback).replace(/ @\d+ .*$/, ""); // a full label's name
  if (!ID.test(id)) return own || id;
  const p = parseId(id);
  if (p.kind === "logit" && own) return own;
  return componentLabel(p, own, model.tokens[p.pos]);
}
/** The name of a drawn node `n`: a graph node's `nameIn`; a collapsed supernode (supernodes.js) keeps its group
 * name and member count. */
export const nodeName = (model, n) => (model.byId.get(n.id) === n ? nameIn(model, n.id) : n.clerp || n.name || n.id);
export const LABEL_CHARS = 40; // names drawn on the graph and listed are cut to this with "…" (the whole on hover)
/** `text` cut to `chars` with "…". */
export const cut = (text, chars = LABEL_CHARS) => (text.length > chars ? `${text.slice(0, chars - 1)}…` : text);
/** `nodeName` shortened to fit a drawn label: the name part cut first, the position `@8 "tok"` kept. */
export function shortName(model, n) {
  const full = nodeName(model, n), at = / @(\d+) "(.*)"$/.exec(full);
  return at ? `${cut(full.slice(0, at.index), LABEL_CHARS - 16)} @${at[1]} "${cut(at[2], 10)}"` : cut(full);
}
export const tokText = (model, i) => `"${visible(model.tokens[i] === undefined ? "?" : model.tokens[i])}"`;
export const nodeWhere = (model, n) => `@${n.p.pos} ${tokText(model, n.p.pos)}`;

/** The graph file as it should be saved: its qParams carry the pins, supernodes and clicked node. */
export function withViewState(model, { pinned, supernodes, selNode }) {
  const out = JSON.parse(JSON.stringify(model.graph));
  out.qParams = { ...(out.qParams || {}), pinnedIds: [...pinned],
    supernodes: supernodes.map((s) => [s.name, ...s.ids]), clickedId: selNode ? selNode.id : "" };
  return out;
}

/** A logit node's token text: from its label 'Output " x" (p=…)', else its id. */
export function tokenOf(n) {
  const m = /"((?:[^"\\]|\\.)*)"/.exec(n.clerp || "");
  if (m) { try { return JSON.parse(`"${m[1]}"`); } catch { return m[1]; } }
  return String(n.p.index);
}
