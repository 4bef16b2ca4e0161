// Supernodes: nodes grouped under a name ({name, ids, collapsed}). Expanded, a group is its members ringed
// in the group colour (nothing is drawn around non-members, however the members are scattered); collapsed,
// it is one node at its members' mean position whose edges are the sums of its members' edges to and from
// each other node (or other collapsed group), with the member count in its label; the edges among its own
// members are inside it and not drawn. `collapse` has no DOM; `drawGroups` draws into the view's layers.

import { C, fmt, sv } from "./dom.js";
import { nodeName } from "./model.js";

export const groupId = (i) => `supernode:${i}`;

const mean = (xs) => xs.reduce((a, x) => a + x, 0) / xs.length;

/**
 * The collapsed groups of `supernodes` on `model`: {hidden: member ids not drawn, groups: [{i, id, name,
 * members, x, y, p, clerp}], links: [{key, source, target, s, t, weight, norm, members}]} where a link's
 * weight (and normalised weight) is the sum over the member links it stands for. A node in two collapsed
 * groups belongs to the first.
 */
export function collapse(model, supernodes) {
  const rep = new Map(), groups = [];
  supernodes.forEach((s, i) => {
    if (!s.collapsed) return;
    const members = s.ids.map((id) => model.byId.get(id)).filter((n) => n && !rep.has(n.id));
    if (!members.length) return;
    const g = { i, id: groupId(i), name: s.name, members, x: mean(members.map((n) => n.x)),
      y: mean(members.map((n) => n.y)), p: { kind: "supernode", pos: null }, clerp: `${s.name} (${members.length})` };
    for (const n of members) rep.set(n.id, g);
    groups.push(g);
  });
  const links = new Map();
  if (groups.length) {
    for (const l of model.links) {
      const s = rep.get(l.source), t = rep.get(l.target);
      if ((!s && !t) || s === t) continue; // not grouped, or inside one group
      const src = s || l.s, tgt = t || l.t, key = `${src.id}>${tgt.id}`;
      if (!links.has(key)) links.set(key, { key, source: src.id, target: tgt.id, s: src, t: tgt, weight: 0, norm: 0,
        members: [] });
      const agg = links.get(key);
      agg.weight += l.weight;
      agg.norm += l.norm;
      agg.members.push(l);
    }
  }
  return { hidden: new Set(rep.keys()), groups, links: [...links.values()] };
}

/** The group (index into `supernodes`) node `id` belongs to, or -1. */
export const groupOf = (supernodes, id) => supernodes.findIndex((s) => s.ids.includes(id));

/**
 * Draws the groups: expanded ones as rings round their members (in `rings`), collapsed ones as one node
 * each (in `nodes`) and their summed edges (in `edges`, their sums in the title). `onToggle(i, byKey)`: a
 * collapsed node clicked, or Enter or Space on it; `onLink(l)`: a summed edge clicked.
 * Returns the summed edges' elements, by key, for `restyle`.
 */
export function drawGroups({ rings, edges, nodes }, model, supernodes, collapsed, onToggle, onLink) {
  for (const layer of [rings, edges, nodes]) layer.replaceChildren();
  supernodes.forEach((s, i) => {
    if (s.collapsed) return;
    const members = s.ids.map((id) => model.byId.get(id)).filter(Boolean);
    if (!members.length) return;
    rings.append(sv("g", { class: "supernode expanded", "data-name": s.name, "data-ids": s.ids.join(","),
      "data-i": i }, members.map((n) => sv("circle", { class: "member-ring", cx: n.x, cy: n.y, r: 9, fill: C.group,
      "fill-opacity": 0.16, stroke: C.group, "stroke-width": 1.6 }))));
  });
  const els = new Map();
  for (const l of collapsed.links) {
    const ends = { x1: l.s.x, y1: l.s.y, x2: l.t.x, y2: l.t.y };
    const g = sv("g", { class: "edge summed", "data-source": l.source, "data-target": l.target, "data-raw": l.weight,
      "data-norm": l.norm, "data-count": l.members.length, onclick: (e) => { e.stopPropagation(); onLink(l); } },
    sv("line", { ...ends, class: "vis", stroke: l.weight >= 0 ? C.pos : C.neg, "stroke-linecap": "round",
      "stroke-dasharray": l.weight >= 0 ? "none" : "5 2.5" }),
    sv("line", { ...ends, class: "hit", stroke: "#000", "stroke-opacity": 0, "stroke-width": 9 }),
    sv("title", {}, `${nodeName(model, l.s)} → ${nodeName(model, l.t)}: ${fmt(l.weight)}, the sum of `
      + `${l.members.length} edge${l.members.length === 1 ? "" : "s"} (normalised ${fmt(l.norm)})`));
    edges.append(g);
    els.set(l.key, g);
  }
  for (const g of collapsed.groups) {
    const s = supernodes[g.i], toggle = (e) => { e.stopPropagation(); e.preventDefault(); onToggle(g.i, !!e.key); };
    nodes.append(sv("g", { class: "supernode collapsed", "data-name": s.name, "data-ids": s.ids.join(","),
      "data-i": g.i, "data-id": g.id, "data-count": g.members.length, transform: `translate(${g.x},${g.y})`,
      tabindex: 0, role: "button", "aria-label": `supernode ${s.name}: ${g.members.length} nodes (Enter expands)`,
      onclick: toggle, onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") toggle(e); } },
    sv("circle", { class: "mark", r: 9, fill: C.group, "fill-opacity": 0.85, stroke: "#4c1d95", "stroke-width": 1.2 }),
    sv("text", { "text-anchor": "middle", y: 3.5, fill: "#fff", "font-size": 10, "font-weight": 700 },
      String(g.members.length)),
    sv("title", {}, `${s.name}: ${g.members.length} nodes collapsed; click to expand`)));
  }
  return els;
}
