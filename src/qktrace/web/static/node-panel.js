// The node panel: a node's numbers, a pin button, its QK tracing (why the head that carries most of its
// cross-position inputs attended there, when the graph stores it), and its strongest inputs and outputs in
// the shown weights.

import { clear, el, fmt, num } from "./dom.js";
import { nameIn, nodeWhere, strongest, weightOf } from "./model.js";
import { attachTips, hasDashboard, showFeaturePanel } from "./features.js";

const HINT = "Click a node.";
const ROWS = 12;

/** handlers: onLink(l), onPin(n), onNode(n). `show(state)` draws state.selNode; `refresh(state)` redraws
 * the node last shown (pins or weights changed); `reset()` goes back to the hint. */
export function createNodePanel(body, { onLink, onPin, onExplain = null, onSteer = null }) {
  let current = null;

  function reset() {
    current = null;
    clear(body).append(HINT);
    body.className = "body hint";
  }

  function draw(state, n) {
    current = n;
    const { model, weights, pinned } = state;
    clear(body).className = "body";
    body.append(el("h3", { id: "node-title", title: n.id }, nameIn(model, n.id)), el("dl", { class: "kv" },
      el("dt", {}, "id"), el("dd", {}, n.id),
      el("dt", {}, "position"), el("dd", {}, nodeWhere(model, n)),
      el("dt", {}, "activation"), el("dd", {}, fmt(n.activation)),
      el("dt", {}, "influence"), el("dd", {}, `${fmt(n.raw_influence)} (cumulative ${fmt(n.influence, 3)})`)),
    el("div", { class: "btnrow" },
      el("button", { type: "button", id: "pin-btn", onclick: () => onPin(n) }, pinned.has(n.id) ? "Unpin" : "Pin"),
      n.p.kind === "logit" && onExplain ? el("button", { type: "button", id: "explain-logit",
        title: "explain why the model gives this token rather than the strongest other logit",
        onclick: () => onExplain(n) }, "Explain this answer") : null,
      hasDashboard(n.p.kind) ? el("button", { type: "button", id: "feature-details",
        onclick: () => showFeaturePanel(n.id, nameIn(model, n.id)) }, "Details") : null,
      ["feature", "transcoder", "attn"].includes(n.p.kind) && onSteer ? el("button", { type: "button", id: "steer-node",
        title: "fill the steering panel with this feature at its position", onclick: () => onSteer(n) },
      "Steer this feature") : null));
    const column = weights === "norm" ? "normalised" : "weight";
    const table = (title, links, end) => {
      if (!links.length) return el("p", { class: "muted" }, `no ${title.toLowerCase()}`);
      return [el("h4", {}, `${title} (${links.length})`), el("table", { class: "links" },
        el("tr", {}, el("th", { class: "num" }, column), el("th", {}, end)),
        strongest(links, weights).slice(0, ROWS).map((l) => {
          const other = end === "from" ? l.s : l.t;
          return el("tr", { class: "clickable", "data-link": l.i, onclick: () => onLink(l) },
            num(weightOf(l, weights), "weight", 3),
            el("td", {}, el("span", { class: other.p.kind === "feature" ? "comp" : "", "data-component": other.id },
              nameIn(model, other.id))));
        }))];
    };
    if (n.qk_tracing_results) body.append(...qkTracing(model, n));
    body.append(...[table("Strongest inputs", n.ins, "from"), table("Strongest outputs", n.outs, "to")].flat());
    attachTips(body);
  }

  return {
    show: (state) => draw(state, state.selNode),
    refresh: (state) => { if (current) draw(state, current); },
    reset,
  };
}

/** Neuronpedia's qk_tracing_results of a node: the top (query, key) term pairs and each side summed. */
function qkTracing(model, n) {
  const r = n.qk_tracing_results, h = n.qk_tracing_head;
  const comp = (id) => el("td", {}, el("span", { class: "comp", "data-component": id }, nameIn(model, id)));
  const title = h ? `QK tracing of L${h.layer}H${h.head}: query ${h.query_pos} → key ${h.key_pos} `
    + `(score ${fmt(h.score)}, p ${fmt(h.pattern, 3)})` : "QK tracing";
  const side = (list, what, id) => el("div", {}, el("h4", {}, what), el("table", { id },
    (list || []).map(([c, v]) => el("tr", {}, comp(c), num(v, "value", 3)))));
  return [el("h4", {}, title), el("table", { id: "qk-tracing", class: "terms" },
    el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side"), el("th", { class: "num" }, "term")),
    (r.pair_wise_contributors || []).map(([q, k, v]) => el("tr", { class: "qk-pair" }, comp(q), comp(k),
      num(v, "value", 3)))),
  el("div", { class: "two-col" }, side(r.top_q_marginal_contributors, "Query side (summed)", "qk-tracing-q"),
    side(r.top_k_marginal_contributors, "Key side (summed)", "qk-tracing-k"))];
}
