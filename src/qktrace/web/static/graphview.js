// One graph drawn as SVG: grid, edges, nodes, supernodes and node labels, in layers of one <svg>,
// zoomed and panned through its viewBox (zoom.js). Labels are drawn at screen size whatever the zoom: the
// logit nodes' (token and probability) and the most influential nodes' always, the chosen, pinned and
// hovered ones' on top, placed without overlap (labels.js). So are the axes: the prompt's tokens and positions
// under the grid (held at the pane's foot when the grid runs below it) and the row names at the pane's left,
// each token cut to its column's width on screen (its full text on hover). Edge sign is colour and line style
// (inhibitory edges dashed); nodes take focus (Tab) and report keys to `onKey`. Supernodes (supernodes.js): an expanded
// one rings its members, a collapsed one is one node with summed edges; a click on it or on its label, Enter
// on it, or "c" on a member toggles it (`onSupernode(i)`).
// The view holds no selection of its own: it draws what `state()` returns ({selNode, selLink, hover, pinned,
// supernodes, weights, prune}) and reports clicks and hovers to the handlers it was given, so a second
// view (e.g. two graphs compared side by side) is a second `createGraphView` over its own store.

import { C, FONT, clear, fmt, sv } from "./dom.js";
import { placeLabels } from "./labels.js";
import { L, layout, rowName } from "./layout.js";
import { marker } from "./legend.js";
import { isCross, nodeName, quantile, shortName, weightOf } from "./model.js";
import { collapse, drawGroups, groupOf } from "./supernodes.js";
import { createZoom } from "./zoom.js";

const LABEL_FONT = 11, LABEL_H = 15, AXIS_FONT = 11; // on screen, whatever the drawing's scale
export const TOP_LABELLED = 12; // the most influential nodes labelled without a click

const FEATURE_KINDS = new Set(["feature", "transcoder", "attn"]); // residual-SAE, transcoder, attention-SAE

/** The nodes labelled by default: every logit, then the features of every kind (residual-SAE, transcoder and
 * attention-SAE features) by |raw influence|, each with its label (its SAE's, else its kind's short name). */
export function defaultLabelled(model) {
  const logits = model.nodes.filter((n) => n.p.kind === "logit");
  const strength = (n) => Math.abs(n.raw_influence || 0) || (n.influence ? 1 - n.influence : 0);
  const inner = model.nodes.filter((n) => FEATURE_KINDS.has(n.p.kind))
    .sort((a, b) => strength(b) - strength(a) || a.id.localeCompare(b.id)).slice(0, TOP_LABELLED);
  return [...logits, ...inner];
}

/** A node's drawn label: its name (names.js's, through `nameIn`) shortened to fit; a logit's names its token and
 * probability. */
function labelText(model, n) {
  if (n.p.kind !== "logit" || n.token_prob === undefined || /p=/.test(n.clerp)) return shortName(model, n);
  return `${shortName(model, n)} (p=${fmt(n.token_prob, 3)})`;
}

/** handlers: onNode(n, event), onLink(l), onHover(n or null, event), onBackground(), onKey(n, event),
 * onSupernode(i): toggle supernode i. `opts.minFit`: the least scale `fit` opens at (zoom.js). */
export function createGraphView(svg, state, { onNode, onLink, onHover, onBackground, onKey = () => {},
  onSupernode = () => {} }, opts = {}) {
  let model = null, size = null, scale = 1, edgeEls = [], nodeEls = new Map(), drawn = "", pending = 0;
  let grouped = collapse({ links: [] }, []), groupedFor = null, summedEls = new Map(), lay = null, axisEls = null;
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = `${LABEL_FONT}px ${FONT}`;
  svg.addEventListener("click", () => onBackground());
  const zoom = createZoom(svg, opts, (k) => {
    placeAxes(k);
    if (Math.abs(k - scale) < 1e-6) return;
    scale = k;
    drawn = "";
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(() => drawLabels());
  });

  function show(m) {
    model = m;
    drawn = "";
    groupedFor = null;
    clear(svg);
    axisEls = null;
    if (!model) return;
    lay = layout(model);
    size = [lay.width, lay.height];
    svg.setAttribute("width", "100%");
    svg.setAttribute("height", "100%");
    zoom.fit(size);
    svg.append(sv("rect", { x: 0, y: 0, width: lay.width, height: lay.height, fill: "#ffffff" }), grid());
    const edges = sv("g", { class: "edges" });
    edgeEls = model.links.map((l) => {
      const ends = { x1: l.s.x, y1: l.s.y, x2: l.t.x, y2: l.t.y };
      const g = sv("g", { class: "edge", "data-i": l.i, "data-source": l.source, "data-target": l.target,
        "data-cross": isCross(l) ? 1 : 0, "data-raw": l.weight, "data-norm": l.norm,
        onclick: (e) => { e.stopPropagation(); onLink(l); } },
      sv("line", { ...ends, class: "vis", stroke: l.weight >= 0 ? C.pos : C.neg, "stroke-linecap": "round",
        "stroke-dasharray": l.weight >= 0 ? "none" : "5 2.5" }),
      sv("line", { ...ends, class: "hit", stroke: "#000", "stroke-opacity": 0, "stroke-width": 9 }),
      sv("title", {}, `${nodeName(model, l.s)} → ${nodeName(model, l.t)}: ${fmt(l.weight)} (normalised ${fmt(l.norm)})`));
      edges.append(g);
      return g;
    });
    const nodes = sv("g", { class: "nodes", "font-family": FONT, "font-size": 10 });
    nodeEls = new Map();
    for (const n of model.nodes) {
      const g = sv("g", { class: "node", "data-id": n.id, "data-kind": n.p.kind, transform: `translate(${n.x},${n.y})`,
        tabindex: 0, role: "button", "aria-label": `${nodeName(model, n)} (${n.id})`,
        onclick: (e) => { e.stopPropagation(); onNode(n, e); }, onkeydown: (e) => nodeKey(n, e),
        onmouseenter: (e) => onHover(n, e), onmouseleave: (e) => onHover(null, e) }, marker(n.p.kind),
      sv("circle", { class: "ring", r: 8.5, fill: "none", stroke: C.sel, "stroke-width": 1.6, opacity: 0 }));
      nodes.append(g);
      nodeEls.set(n.id, g);
    }
    axisEls = axes();
    svg.append(edges, sv("g", { class: "group-edges" }), sv("g", { class: "group-rings" }), nodes,
      sv("g", { class: "group-nodes", "font-family": FONT }), axisEls.g,
      sv("g", { class: "labels", "font-family": FONT }));
    placeAxes(zoom.scale());
  }

  /** "c" on a grouped node toggles its supernode; every other key goes to `onKey`. */
  function nodeKey(n, e) {
    const i = e.key === "c" ? groupOf(state().supernodes || [], n.id) : -1;
    if (i < 0) return onKey(n, e);
    e.preventDefault();
    toggleByKey(i);
  }

  /** Toggle supernode i from the keyboard; the focus goes to its node (collapsed) or first member (expanded). */
  function toggleByKey(i) {
    onSupernode(i);
    groups();
    const g = svg.querySelector(`.group-nodes g.supernode[data-i="${i}"]`);
    const s = (state().supernodes || [])[i], first = s && nodeEls.get(s.ids.find((id) => nodeEls.has(id)));
    if (g || first) (g || first).focus({ preventScroll: true });
  }

  /** The supernodes as drawn now: (re)drawn when the list changed (a new array: the store never mutates it). */
  function groups() {
    const sn = state().supernodes || [];
    if (model && sn !== groupedFor) {
      groupedFor = sn;
      grouped = collapse(model, sn);
      const layer = (c) => svg.querySelector(`.${c}`);
      summedEls = drawGroups({ rings: layer("group-rings"), edges: layer("group-edges"), nodes: layer("group-nodes") },
        model, sn, grouped, (i, key) => (key ? toggleByKey(i) : onSupernode(i)), onLink);
      drawn = "";
    }
    return grouped;
  }

  function grid() {
    const g = sv("g", { class: "grid" });
    for (let r = 0; r < lay.nRows; r++) {
      const y = L.top + (lay.nRows - r) * L.rowH;
      g.append(sv("line", { x1: L.left, x2: lay.width - 8, y1: y, y2: y, stroke: C.line }));
    }
    const base = L.top + lay.nRows * L.rowH;
    for (let p = 0; p < lay.nPos; p++) {
      g.append(sv("line", { x1: lay.colX[p], x2: lay.colX[p], y1: L.top, y2: base, stroke: "#f3f4f6" }));
    }
    return g;
  }

  /** The axes' text, made once per graph (so marks such as compare's "differs" stay), placed by `placeAxes`. */
  function axes() {
    const g = sv("g", { class: "axes", "font-family": FONT, fill: C.muted, "pointer-events": "none" });
    const back = (cls) => sv("rect", { class: cls, fill: "#ffffff", "fill-opacity": 0.85 });
    const foot = back("axis-back");
    const tokens = [], positions = [], rows = [], rowBacks = [];
    g.append(foot);
    for (let p = 0; p < lay.nPos; p++) {
      const tok = model.tokens[p] === undefined ? "" : String(model.tokens[p]);
      tokens.push(sv("text", { "text-anchor": "middle", fill: C.sel, class: "token-label", "data-pos": p,
        "data-full": tok }));
      positions.push(sv("text", { "text-anchor": "middle", class: "pos-label" }, String(p)));
      g.append(sv("g", { class: "axis-token" }, sv("title", {}, `${p}: ${JSON.stringify(tok)}`), tokens[p],
        positions[p]));
    }
    for (let r = 0; r < lay.nRows; r++) {
      rowBacks.push(back("row-back"));
      rows.push(sv("text", { class: "row-label" }, rowName(model, r)));
      g.append(rowBacks[r], rows[r]);
    }
    return { g, foot, tokens, positions, rows, rowBacks };
  }

  /** `text` cut with "…" to at most `px` screen pixels at the axes' font. */
  function fitText(text, px) {
    if (measure.measureText(text).width <= px) return text;
    let n = text.length - 1;
    while (n > 1 && measure.measureText(`${text.slice(0, n)}…`).width > px) n--;
    return `${text.slice(0, n)}…`;
  }

  /** The axes at AXIS_FONT px on screen at scale `k` in the view box `b` (default: the pane's): tokens under the
   * grid, or at the view's foot when the grid runs below it; row names at its left edge (or the drawing's). */
  function placeAxes(k, b = zoom.view()) {
    if (!model || !axisEls || !b || !(k > 0)) return;
    const u = 1 / k, base = L.top + lay.nRows * L.rowH, a = axisEls;
    const yTok = Math.min(base + 16 * u, b.y + b.h - 20 * u);
    a.g.setAttribute("font-size", (AXIS_FONT * u).toFixed(3));
    measure.font = `${AXIS_FONT}px ${FONT}`;
    const set = (e, attrs) => { for (const [key, v] of Object.entries(attrs)) e.setAttribute(key, v); };
    set(a.foot, { x: b.x, y: yTok - 13 * u, width: b.w, height: 31 * u });
    for (let p = 0; p < lay.nPos; p++) {
      const cx = lay.colX[p] + lay.colW[p] / 2;
      set(a.tokens[p], { x: cx, y: yTok });
      set(a.positions[p], { x: cx, y: yTok + 14 * u });
      a.tokens[p].textContent = fitText(a.tokens[p].dataset.full, lay.colW[p] * k - 4);
    }
    const x = Math.max(6, b.x + 4 * u);
    for (let r = 0; r < lay.nRows; r++) {
      const y = L.top + (lay.nRows - 1 - r) * L.rowH + L.rowH / 2 + 4 * u;
      const w = measure.measureText(a.rows[r].textContent).width;
      set(a.rows[r], { x, y });
      set(a.rowBacks[r], { x: x - 2 * u, y: y - 11 * u, width: (w + 4) * u, height: 14 * u });
    }
  }

  /** The whole drawing in the pane (the answer column in view when it is too wide to read whole). */
  const fit = () => zoom.fit(size);

  /** Bring node `n` (or the collapsed supernode it is in) into view and give it the keyboard focus. */
  function focusNode(n) {
    const shut = groups().groups.find((x) => x.members.includes(n)); // a collapsed supernode's member: the group
    zoom.reveal((shut || n).x, (shut || n).y);
    const g = shut ? svg.querySelector(`.group-nodes g.supernode[data-i="${shut.i}"]`) : nodeEls.get(n.id);
    if (g) g.focus({ preventScroll: true });
  }

  /** Which edges show (pruning), how thick (the shown weights), how strongly (selection), which nodes wear rings. */
  function restyle() {
    if (!model) return { shown: 0, total: 0, threshold: 0 };
    const { selNode: sel, selLink: link, pinned, weights, prune, subgraph } = state();
    const only = subgraph && pinned.size ? pinned : null; // the subgraph of the pinned nodes, alone
    const threshold = quantile(model, weights, prune / 100);
    const maxAbs = Math.max(1e-30, quantile(model, weights, 1));
    const { hidden, links: summed } = groups();
    let shown = 0;
    const style = (g, l, w, on, touches) => {
      g.setAttribute("display", on ? "inline" : "none");
      g.setAttribute("data-weight", w);
      shown += on ? 1 : 0;
      const vis = g.firstChild, k = Math.sqrt(Math.min(1, Math.abs(w) / maxAbs));
      vis.setAttribute("stroke-width", (0.6 + 4.4 * k + (l === link ? 2 : 0)).toFixed(2));
      vis.setAttribute("stroke-opacity", l === link ? 0.95 : sel ? (touches ? 0.85 : 0.07) : link ? 0.15 : 0.5);
    };
    for (const l of model.links) {
      const w = weightOf(l, weights), touches = sel && (l.s === sel || l.t === sel);
      const on = !hidden.has(l.source) && !hidden.has(l.target) && (only ? only.has(l.source) && only.has(l.target)
        : Math.abs(w) >= threshold || l === link || touches);
      style(edgeEls[l.i], l, w, on, touches);
    }
    for (const l of summed) { // a group's summed edge shows when one of its edges would
      const w = weightOf(l, weights), touches = sel && (l.s === sel || l.t === sel);
      const on = !only && (touches || l.members.some((m) => Math.abs(weightOf(m, weights)) >= threshold));
      style(summedEls.get(l.key), l, w, on, touches);
    }
    for (const [id, g] of nodeEls) {
      const n = model.byId.get(id), chosen = n === sel || (link && (n === link.s || n === link.t));
      const ring = g.querySelector(".ring");
      g.setAttribute("display", !hidden.has(id) && (!only || only.has(id)) ? "inline" : "none");
      ring.setAttribute("opacity", pinned.has(id) || chosen ? 1 : 0);
      ring.setAttribute("stroke", chosen ? C.accent : C.sel);
    }
    svg.querySelector(".group-nodes").setAttribute("display", only ? "none" : "inline");
    return { shown, total: model.links.length, threshold };
  }

  /** Labels of the chosen and pinned nodes (placed first, so they stay put), of the supernodes, of the logits
   * and the most influential nodes, and of the hovered node; none for a collapsed supernode's members. */
  function drawLabels() {
    const layer = svg.querySelector(".labels");
    if (!model || !layer) return;
    const { selNode, selLink, pinned, hover } = state();
    const { hidden, groups: shut } = groups(), sn = state().supernodes || [];
    const ids = [selNode && selNode.id, selLink && selLink.t.id, selLink && selLink.s.id, ...pinned,
      ...defaultLabelled(model).map((n) => n.id)];
    const keep = [...new Set(ids.filter((id) => id && model.byId.has(id) && !hidden.has(id)))];
    const chosen = new Set([selNode && selNode.id, selLink && selLink.t.id, selLink && selLink.s.id, ...pinned]);
    const all = hover && !keep.includes(hover.id) && !hidden.has(hover.id) ? [...keep, hover.id] : keep;
    const tags = groupTags(sn, shut);
    const key = [...tags.map((t) => `${t.id}=${t.text}`),
      ...all.map((id) => `${keep.includes(id) ? "" : "hover:"}${id}`)].join("\n");
    if (key === drawn) return;
    drawn = key;
    const u = 1 / scale; // one screen pixel in drawing units
    const box = (text, bold = false) => {
      measure.font = `${bold ? "600 " : ""}${LABEL_FONT}px ${FONT}`;
      return { w: (Math.ceil(measure.measureText(text).width) + 8) * u, h: LABEL_H * u };
    };
    const items = [...tags.map((t) => ({ ...t, ...box(t.text, true) })), ...all.map((id) => {
      const n = model.byId.get(id), text = labelText(model, n); // the full name goes in its title
      return { id, x: n.x, y: n.y, n, text, ...box(text),
        optional: keep.includes(id) && !chosen.has(id) && n.p.kind !== "logit" }; // top nodes by influence give way
    })];
    const obstacles = [...model.nodes.filter((n) => !hidden.has(n.id)), ...shut]
      .map((n) => ({ x: n.x - 6, y: n.y - 6, w: 12, h: 12 }));
    const boxes = placeLabels(items, obstacles, { width: size[0], height: size[1] });
    clear(layer).setAttribute("font-size", (LABEL_FONT * u).toFixed(2));
    items.forEach((it, i) => {
      const { box: b } = boxes[i];
      if (b) layer.append(it.group === undefined ? nodeTag(it, b, u, !keep.includes(it.id)) : groupTag(it, b, u));
    });
  }

  /** A supernode's label: at its node when collapsed, at its topmost member when expanded; a click toggles it. */
  function groupTags(sn, shut) {
    return sn.map((s, i) => {
      const g = shut.find((x) => x.i === i);
      const members = g ? [g] : s.ids.map((id) => model.byId.get(id)).filter(Boolean);
      if (!members.length) return null;
      const top = members.reduce((a, n) => (n.y < a.y ? n : a));
      const k = g ? g.members.length : members.length;
      return { id: `group:${i}`, group: i, x: top.x, y: top.y, open: !g, text: `${g ? "▸" : "▾"} ${s.name} (${k})`,
        title: `${s.name}: ${k} nodes; click to ${g ? "expand" : "collapse"} (or "c" on a member)` };
    }).filter(Boolean);
  }

  function leader(x, y, b) {
    const cx = Math.max(b.x, Math.min(x, b.x + b.w)), cy = Math.max(b.y, Math.min(y, b.y + b.h));
    return Math.hypot(cx - x, cy - y) > 11 ? sv("line", { x1: x, y1: y, x2: cx, y2: cy, stroke: C.muted,
      "stroke-width": 0.8 }) : null;
  }

  function nodeTag(it, b, u, hoverOnly) {
    const n = it.n, full = nodeName(model, n);
    return sv("g", { class: `node-label${hoverOnly ? " hover-only" : ""}`, "data-id": it.id, "data-full": full,
      onclick: (e) => { e.stopPropagation(); onNode(n, e); },
      onmouseenter: (e) => onHover(n, e), onmouseleave: (e) => onHover(null, e) },
    leader(n.x, n.y, b),
    sv("rect", { x: b.x, y: b.y, width: b.w, height: b.h, rx: 3 * u, fill: "#ffffff", "fill-opacity": 0.92,
      stroke: hoverOnly ? C.muted : C.sel, "stroke-width": 0.6 * u }),
    sv("text", { x: b.x + 4 * u, y: b.y + (LABEL_H - 4) * u, fill: C.sel }, it.text),
    sv("title", {}, full));
  }

  function groupTag(it, b, u) {
    return sv("g", { class: `node-label group-label ${it.open ? "expanded" : "collapsed"}`, "data-group": it.group,
      onclick: (e) => { e.stopPropagation(); onSupernode(it.group); } },
    leader(it.x, it.y, b),
    sv("rect", { x: b.x, y: b.y, width: b.w, height: b.h, rx: 3 * u, fill: "#f5f3ff", "fill-opacity": 0.95,
      stroke: C.group, "stroke-width": 0.8 * u }),
    sv("text", { x: b.x + 4 * u, y: b.y + (LABEL_H - 4) * u, fill: C.group, "font-weight": 600 }, it.text),
    sv("title", {}, it.title));
  }

  /** Draw the supernodes now (they are also drawn whenever the view restyles or labels). */
  function drawSupernodes() {
    if (!model) return;
    groups();
    drawLabels();
  }

  /** Mark the nodes `ids` (a mechanism's features) on the graph; returns those that are nodes of it. */
  function highlight(ids) {
    const chosen = new Set(ids);
    for (const [id, g] of nodeEls) g.classList.toggle("chosen", chosen.has(id));
    return ids.filter((id) => nodeEls.has(id));
  }

  /** The axes as the whole drawing at scale `k` shows them (an export), or, with no arguments, as the pane does. */
  const placeAxesFor = (k = zoom.scale(), box = undefined) => placeAxes(k, box);

  return { svg, show, fit, highlight, restyle, drawLabels, drawSupernodes, focusNode, zoom, placeAxesFor,
    size: () => size };
}
