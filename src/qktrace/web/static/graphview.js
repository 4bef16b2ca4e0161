// One graph drawn as SVG: grid, edges, nodes, supernode boxes and node labels, in layers of one <svg>.
// The view holds no selection of its own: it draws what `state()` returns ({selNode, selLink, hover, pinned,
// supernodes, weights, prune}) and reports clicks and hovers to the handlers it was given, so a second
// view (e.g. two graphs compared side by side) is a second `createGraphView` over its own store.

import { C, FONT, clear, fmt, sv, truncate } from "./dom.js";
import { placeLabels } from "./labels.js";
import { L, layout, rowName } from "./layout.js";
import { isCross, nodeLabel, quantile, shortLabel, weightOf } from "./model.js";

const LABEL_FONT = 11, LABEL_H = 15; // on screen, whatever the drawing's scale

/** handlers: onNode(n, event), onLink(l), onHover(n or null, event), onBackground(). */
export function createGraphView(svg, state, { onNode, onLink, onHover, onBackground }) {
  let model = null, size = null, scale = 1, edgeEls = [], nodeEls = new Map(), drawn = "";
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = `${LABEL_FONT}px ${FONT}`;
  svg.addEventListener("click", () => onBackground());

  function show(m) {
    model = m;
    drawn = "";
    clear(svg);
    if (!model) return;
    const lay = layout(model);
    size = [lay.width, lay.height];
    fit();
    svg.setAttribute("viewBox", `0 0 ${lay.width} ${lay.height}`);
    svg.append(sv("rect", { x: 0, y: 0, width: lay.width, height: lay.height, fill: "#ffffff" }), grid(lay));
    const edges = sv("g", { class: "edges" });
    edgeEls = model.links.map((l) => {
      const ends = { x1: l.s.x, y1: l.s.y, x2: l.t.x, y2: l.t.y };
      const g = sv("g", { class: "edge", "data-i": l.i, "data-source": l.source, "data-target": l.target,
        "data-cross": isCross(l) ? 1 : 0, "data-raw": l.weight, "data-norm": l.norm,
        onclick: (e) => { e.stopPropagation(); onLink(l); } },
      sv("line", { ...ends, class: "vis", stroke: l.weight >= 0 ? C.pos : C.neg, "stroke-linecap": "round" }),
      sv("line", { ...ends, class: "hit", stroke: "#000", "stroke-opacity": 0, "stroke-width": 9 }),
      sv("title", {}, `${nodeLabel(l.s)} → ${nodeLabel(l.t)}: ${fmt(l.weight)} (normalised ${fmt(l.norm)})`));
      edges.append(g);
      return g;
    });
    const nodes = sv("g", { class: "nodes", "font-family": FONT, "font-size": 10 });
    nodeEls = new Map();
    for (const n of model.nodes) {
      const g = sv("g", { class: "node", "data-id": n.id, "data-kind": n.p.kind, transform: `translate(${n.x},${n.y})`,
        onclick: (e) => { e.stopPropagation(); onNode(n, e); },
        onmouseenter: (e) => onHover(n, e), onmouseleave: (e) => onHover(null, e) }, marker(n.p.kind),
      sv("circle", { class: "ring", r: 8.5, fill: "none", stroke: C.sel, "stroke-width": 1.6, opacity: 0 }));
      nodes.append(g);
      nodeEls.set(n.id, g);
    }
    svg.append(edges, sv("g", { class: "supernodes" }), nodes, sv("g", { class: "labels", "font-family": FONT }));
  }

  function grid(lay) {
    const g = sv("g", { class: "grid", "font-family": FONT, "font-size": 11, fill: C.muted });
    for (let r = 0; r < lay.nRows; r++) {
      const y = L.top + (lay.nRows - 1 - r) * L.rowH;
      g.append(sv("line", { x1: L.left, x2: lay.width - 8, y1: y + L.rowH, y2: y + L.rowH, stroke: C.line }),
        sv("text", { x: 6, y: y + L.rowH / 2 + 4 }, rowName(model, r)));
    }
    const base = L.top + lay.nRows * L.rowH;
    for (let p = 0; p < lay.nPos; p++) {
      const cx = lay.colX[p] + lay.colW[p] / 2;
      const tok = model.tokens[p] === undefined ? "" : model.tokens[p];
      g.append(sv("line", { x1: lay.colX[p], x2: lay.colX[p], y1: L.top, y2: base, stroke: "#f3f4f6" }),
        sv("text", { x: cx, y: base + 16, "text-anchor": "middle", fill: C.sel, "font-size": 12, class: "token-label",
          "data-pos": p }, truncate(tok, 12)),
        sv("text", { x: cx, y: base + 30, "text-anchor": "middle" }, String(p)));
    }
    return g;
  }

  function marker(kind) {
    if (kind === "feature") return sv("circle", { r: 5, fill: C.feature, stroke: "#92400e", "stroke-width": 0.8 });
    if (kind === "transcoder") {
      return sv("circle", { r: 5, fill: C.transcoder, stroke: "#075985", "stroke-width": 0.8 });
    }
    if (kind === "token" || kind === "logit") {
      return sv("rect", { x: -6, y: -4.5, width: 12, height: 9, rx: 2, fill: kind === "token" ? C.token : C.logit,
        stroke: "#334155", "stroke-width": 0.8 });
    }
    return sv("rect", { x: -4, y: -4, width: 8, height: 8, fill: C.other, stroke: "#64748b", "stroke-width": 0.8 });
  }

  /** Scale the drawing to the pane (between 0.6x and 2x); larger graphs scroll. */
  function fit() {
    if (!size) return;
    const [w, h] = size, pane = svg.parentElement;
    const k = Math.max(0.6, Math.min(2, (pane.clientWidth - 8) / w, (pane.clientHeight - 8) / h));
    svg.setAttribute("width", Math.floor(w * k));
    svg.setAttribute("height", Math.floor(h * k));
    if (k !== scale) {
      scale = k;
      drawn = "";
      drawLabels();
    }
  }

  /** Which edges show (pruning), how thick (the shown weights), how strongly (selection), which nodes wear rings. */
  function restyle() {
    if (!model) return { shown: 0, total: 0, threshold: 0 };
    const { selNode: sel, selLink: link, pinned, weights, prune } = state();
    const threshold = quantile(model, weights, prune / 100);
    const maxAbs = Math.max(1e-30, quantile(model, weights, 1));
    let shown = 0;
    for (const l of model.links) {
      const g = edgeEls[l.i], w = weightOf(l, weights), touches = sel && (l.s === sel || l.t === sel);
      const on = Math.abs(w) >= threshold || l === link || touches;
      g.setAttribute("display", on ? "inline" : "none");
      g.setAttribute("data-weight", w);
      shown += on ? 1 : 0;
      const vis = g.firstChild;
      vis.setAttribute("stroke-width", (0.6 + 4.4 * Math.sqrt(Math.abs(w) / maxAbs)).toFixed(2));
      vis.setAttribute("stroke-opacity", l === link ? 0.95 : sel ? (touches ? 0.85 : 0.07) : link ? 0.15 : 0.5);
      vis.setAttribute("stroke-dasharray", l === link ? "6 3" : "none");
    }
    for (const [id, g] of nodeEls) {
      const n = model.byId.get(id), chosen = n === sel || (link && (n === link.s || n === link.t));
      const ring = g.querySelector(".ring");
      ring.setAttribute("opacity", pinned.has(id) || chosen ? 1 : 0);
      ring.setAttribute("stroke", chosen ? C.accent : C.sel);
    }
    return { shown, total: model.links.length, threshold };
  }

  /** Labels of the chosen and pinned nodes (placed first, so they stay put) and of the hovered node. */
  function drawLabels() {
    const layer = svg.querySelector(".labels");
    if (!model || !layer) return;
    const { selNode, selLink, pinned, hover } = state();
    const ids = [selNode && selNode.id, selLink && selLink.t.id, selLink && selLink.s.id, ...pinned];
    const keep = [...new Set(ids.filter((id) => id && model.byId.has(id)))];
    const all = hover && !keep.includes(hover.id) ? [...keep, hover.id] : keep;
    const key = all.map((id) => `${keep.includes(id) ? "" : "hover:"}${id}=${nodeLabel(model.byId.get(id))}`).join("\n");
    if (key === drawn) return;
    drawn = key;
    const u = 1 / scale; // one screen pixel in drawing units
    const items = all.map((id) => {
      const n = model.byId.get(id), text = shortLabel(n); // the full text goes in its title
      return { id, x: n.x, y: n.y, w: (Math.ceil(measure.measureText(text).width) + 8) * u, h: LABEL_H * u, n, text };
    });
    const obstacles = model.nodes.map((n) => ({ x: n.x - 6, y: n.y - 6, w: 12, h: 12 }));
    const boxes = placeLabels(items, obstacles, { width: size[0], height: size[1] });
    clear(layer).setAttribute("font-size", (LABEL_FONT * u).toFixed(2));
    items.forEach((it, i) => {
      const { box } = boxes[i], n = it.n, full = nodeLabel(n), hoverOnly = !keep.includes(it.id);
      const cx = Math.max(box.x, Math.min(n.x, box.x + box.w)), cy = Math.max(box.y, Math.min(n.y, box.y + box.h));
      const far = Math.hypot(cx - n.x, cy - n.y) > 11;
      layer.append(sv("g", { class: `node-label${hoverOnly ? " hover-only" : ""}`, "data-id": it.id, "data-full": full,
        onclick: (e) => { e.stopPropagation(); onNode(n, e); },
        onmouseenter: (e) => onHover(n, e), onmouseleave: (e) => onHover(null, e) },
      far ? sv("line", { x1: n.x, y1: n.y, x2: cx, y2: cy, stroke: C.muted, "stroke-width": 0.8 }) : null,
      sv("rect", { x: box.x, y: box.y, width: box.w, height: box.h, rx: 3 * u, fill: "#ffffff", "fill-opacity": 0.92,
        stroke: hoverOnly ? C.muted : C.sel, "stroke-width": 0.6 * u }),
      sv("text", { x: box.x + 4 * u, y: box.y + (LABEL_H - 4) * u, fill: C.sel }, it.text),
      sv("title", {}, full)));
    });
  }

  function drawSupernodes() {
    const layer = svg.querySelector(".supernodes");
    if (!model || !layer) return;
    clear(layer);
    for (const s of state().supernodes) {
      const members = s.ids.map((id) => model.byId.get(id)).filter(Boolean);
      if (!members.length) continue;
      const xs = members.map((n) => n.x), ys = members.map((n) => n.y);
      const x = Math.min(...xs) - 12, y = Math.min(...ys) - 12;
      const w = Math.max(...xs) - x + 12, h = Math.max(...ys) - y + 12;
      layer.append(sv("g", { class: "supernode", "data-name": s.name, "data-ids": s.ids.join(",") },
        sv("rect", { x, y, width: w, height: h, rx: 8, fill: C.group, "fill-opacity": 0.07, stroke: C.group,
          "stroke-dasharray": "5 3", "stroke-width": 1.2 }),
        sv("text", { x: x + 4, y: y - 3, fill: C.group, "font-family": FONT, "font-size": 11, "font-weight": 600 },
          s.name)));
    }
  }

  return { svg, show, fit, restyle, drawLabels, drawSupernodes, size: () => size };
}
