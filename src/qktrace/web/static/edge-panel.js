// The edge panel: an edge's weight, raw and normalised per target, and the heads that carried it (head
// loadings, direct and via the MLP, as a chart and a table; click a head for its QK attribution); a collapsed
// supernode's edge: its summed weight and the edges it sums.

import { C, FONT, clear, el, fmt, num, sv } from "./dom.js";
import { isCross, nameIn, nodeName, nodeWhere, strongest, weightOf } from "./model.js";
import { attachTips } from "./features.js";

const HINT = "Click an edge, or an input or output of a node.";

/** handlers: onHead(link, layer, head), onLink(link): one of the edges a supernode's edge sums. */
export function createEdgePanel(body, { onHead, onLink = () => {} }) {
  function reset() {
    clear(body).append(HINT);
    body.className = "body hint";
  }

  function show(state) {
    const l = state.selLink, model = state.model;
    clear(body).className = "body";
    if (l.members) return summed(model, l, state.weights);
    const share = `${fmt(100 * Math.abs(l.norm), 3)}% of the |weight| into its target`;
    body.append(el("h3", {}, el("span", { class: "comp", "data-component": l.s.id }, nameIn(model, l.s.id)), " → ",
      el("span", { class: "comp", "data-component": l.t.id }, nameIn(model, l.t.id))),
    el("dl", { class: "kv" },
      el("dt", {}, "weight"), el("dd", { id: "edge-weight", "data-value": l.weight }, fmt(l.weight)),
      el("dt", { title: "weight / Σ |weight| over every edge into the target" }, "normalised"),
      el("dd", {}, el("span", { id: "edge-weight-norm", "data-value": l.norm }, fmt(l.norm)), " ",
        el("span", { class: "muted" }, share)),
      el("dt", {}, "from"), el("dd", {}, `${l.s.id} ${nodeWhere(model, l.s)}`),
      el("dt", {}, "to"), el("dd", {}, `${l.t.id} ${nodeWhere(model, l.t)}`),
      el("dt", {}, "kind"), el("dd", {}, isCross(l) ? "cross-position (carried by attention)" : "same position")));
    const loads = l.head_loadings || [];
    if (!loads.length) {
      const why = model.foreign ? `This graph was made by ${model.maker}: it has no head loadings.`
        : "This edge does not cross an attention layer: no head loadings.";
      body.append(el("p", { class: "muted" }, why));
      return attachTips(body);
    }
    body.append(el("h4", {}, `Head loadings in layer ${loads[0].layer}: direct and via the MLP (click a head)`));
    body.append(headChart(loads, (h) => onHead(l, h.layer, h.head)));
    const rows = loads.map((h) => el("tr", { class: "clickable head-row", "data-layer": h.layer, "data-head": h.head,
      onclick: () => onHead(l, h.layer, h.head) },
    el("td", {}, el("button", { type: "button", class: "head-btn", "data-layer": h.layer, "data-head": h.head },
      `L${h.layer}H${h.head}`)),
    num(h.direct, "direct"), num(h.via_mlp, "via_mlp"), num(h.direct + h.via_mlp, "total")));
    body.append(el("table", { id: "head-table" }, el("tr", {}, el("th", {}, "head"), el("th", { class: "num" }, "direct"),
      el("th", { class: "num" }, "via MLP"), el("th", { class: "num" }, "total")), rows));
    attachTips(body);
  }

  /** A collapsed supernode's edge (supernodes.js): the sum, and the edges it sums, strongest first. */
  function summed(model, l, weights) {
    const n = l.members.length; // a collapsed supernode's end keeps its group name
    const end = (x) => (model.byId.get(x.id) === x ? el("span", { class: "comp", "data-component": x.id },
      nodeName(model, x)) : el("b", { class: "group-name" }, nodeName(model, x)));
    body.append(el("h3", {}, end(l.s), " → ", end(l.t)), el("dl", { class: "kv" },
      el("dt", {}, "weight"), el("dd", {}, el("span", { id: "edge-weight", "data-value": l.weight }, fmt(l.weight)),
        el("span", { class: "muted" }, ` the sum of ${n} edge${n === 1 ? "" : "s"}`)),
      el("dt", {}, "normalised"), el("dd", { id: "edge-weight-norm", "data-value": l.norm }, fmt(l.norm))),
    el("h4", {}, "The edges it sums (click one for its head loadings)"),
    el("table", { id: "summed-table", class: "links" }, strongest(l.members, weights).map((m) =>
      el("tr", { class: "clickable", "data-link": m.i, onclick: () => onLink(m) }, num(weightOf(m, weights), "weight", 3),
        el("td", {}, end(m.s), " → ", end(m.t))))));
  }

  /** Marks the chosen head's buttons. */
  function markHead(layer, head) {
    for (const b of body.querySelectorAll(".head-btn")) {
      b.classList.toggle("active", +b.dataset.layer === layer && +b.dataset.head === head);
    }
  }

  return { show, reset, markHead };
}

function headChart(loads, onClick) {
  const rowH = 22, labelW = 56, w = 500, plotW = w - labelW - 70;
  const vals = loads.flatMap((h) => [h.direct, h.via_mlp, h.direct + h.via_mlp]);
  const lo = Math.min(0, ...vals), hi = Math.max(0, ...vals), span = hi - lo || 1;
  const X = (v) => labelW + ((v - lo) / span) * plotW;
  const chart = sv("svg", { class: "chart", id: "head-chart", width: w, height: loads.length * rowH + 26,
    "font-family": FONT, "font-size": 11 });
  loads.forEach((h, i) => {
    const y = 4 + i * rowH;
    const bar = (v, dy, color) => sv("rect", { x: Math.min(X(0), X(v)), y: y + dy, height: 8,
      width: Math.max(1, Math.abs(X(v) - X(0))), fill: color });
    chart.append(sv("g", { class: "head-bar", "data-layer": h.layer, "data-head": h.head, cursor: "pointer",
      onclick: () => onClick(h) },
    sv("rect", { x: 0, y, width: w, height: rowH - 2, fill: "#fff", "fill-opacity": 0 }),
    sv("text", { x: 2, y: y + 14, fill: C.sel }, `L${h.layer}H${h.head}`),
    bar(h.direct, 1, h.direct >= 0 ? C.pos : C.neg), bar(h.via_mlp, 10, h.via_mlp >= 0 ? "#93c5fd" : "#fca5a5"),
    sv("text", { x: labelW + plotW + 6, y: y + 14, fill: C.muted }, fmt(h.direct + h.via_mlp, 3))));
  });
  const base = 4 + loads.length * rowH;
  chart.append(sv("line", { x1: X(0), x2: X(0), y1: 2, y2: base, stroke: C.muted }),
    sv("rect", { x: labelW, y: base + 6, width: 10, height: 8, fill: C.pos }),
    sv("text", { x: labelW + 14, y: base + 14, fill: C.muted }, "direct"),
    sv("rect", { x: labelW + 70, y: base + 6, width: 10, height: 8, fill: "#93c5fd" }),
    sv("text", { x: labelW + 84, y: base + 14, fill: C.muted }, "via MLP (lighter)"));
  return chart;
}
