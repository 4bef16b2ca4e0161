// A QK heatmap: query-side components (rows) × key-side components (columns) of one key's score, each cell the
// sum of their terms, the components outside the top of each side in "other" (qktrace's
// QKAttribution.heatmap, from POST /api/qk): the cells add up to the score. Blue raises the score, red
// lowers it; hover a cell for its value, a label for the component's id and dashboard. `storedHeatmap` makes one
// from the top terms a graph file stored (no model loaded): its cells are those terms, every other term in one
// "other" cell when the file gives the score (so the cells add up to it), the rest of the grid not stored (grey).

import { C, FONT, fmt, sv, truncate } from "./dom.js";

const CELL_W = 26, CELL_H = 18, LABEL_W = 215, HEAD_H = 150, CHARS = 36;

const shade = (v, max) => {
  const a = Math.min(1, Math.abs(v) / (max || 1));
  const [r, g, b] = v >= 0 ? [37, 99, 235] : [220, 38, 38];
  const mix = (c) => Math.round(255 - a * (255 - c));
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
};

const name = (ids, labels, i, cls, attrs) => ids[i] === "other"
  ? sv("text", { ...attrs, class: `${cls} other`, fill: C.muted }, "other")
  : sv("text", { ...attrs, class: `${cls} comp`, "data-component": ids[i], "data-label": labels[i], fill: C.sel },
    truncate(labels[i], CHARS));

/** The heatmap of the stored `terms` ([{query, key, value}], each pair once) of a key whose score is `score`
 * (undefined: not stored), components named by `name(id, side)`: a row per query-side component and a column per
 * key-side one, in order of first appearance; a pair not stored is null; with a score, "other" × "other" holds
 * the score less the stored terms. `topOnly`: no score, so the cells are the top terms only. */
export function storedHeatmap(terms, score, name, featuresOnly = false) {
  const query = [...new Set(terms.map((t) => t.query))], key = [...new Set(terms.map((t) => t.key))];
  const values = query.map(() => key.map(() => null));
  for (const t of terms) values[query.indexOf(t.query)][key.indexOf(t.key)] = t.value;
  const hm = { query, key, values, features_only: featuresOnly, top_only: typeof score !== "number",
    query_labels: query.map((id) => name(id, "query")), key_labels: key.map((id) => name(id, "key")) };
  if (hm.top_only) return hm;
  const rest = score - terms.reduce((a, t) => a + t.value, 0);
  hm.query.push("other"); hm.query_labels.push("other"); hm.key.push("other"); hm.key_labels.push("other");
  for (const row of values) row.push(null);
  values.push([...key.slice(0, -1).map(() => null), rest]);
  return hm;
}

/** `hm`: {query, query_labels, key, key_labels, values[row][column] (null: a term not stored), features_only}. */
export function heatmapView(hm) {
  const rows = hm.query.length, cols = hm.key.length;
  const max = Math.max(1e-30, ...hm.values.flat().filter((v) => v !== null).map(Math.abs));
  const w = LABEL_W + cols * CELL_W + 8, h = HEAD_H + rows * CELL_H + 4; // scaled down to the panel's width
  const svg = sv("svg", { id: "qk-heatmap", class: "chart", width: "100%", viewBox: `0 0 ${w} ${h}`, "font-family": FONT, "font-size": 10, "data-features-only": hm.features_only,
    "data-top-only": hm.top_only ? "true" : null });
  svg.style.maxWidth = `${w}px`; // through the CSSOM: the page's CSP refuses style attributes
  hm.key.forEach((_, j) => {
    const x = LABEL_W + j * CELL_W + CELL_W / 2, y = HEAD_H - 4;
    svg.append(name(hm.key, hm.key_labels, j, "hm-key", { x, y, transform: `rotate(-60 ${x} ${y})` }));
  });
  hm.query.forEach((_, i) => {
    const y = HEAD_H + i * CELL_H;
    svg.append(name(hm.query, hm.query_labels, i, "hm-query", { x: LABEL_W - 4, y: y + CELL_H / 2 + 3,
      "text-anchor": "end" }));
    hm.key.forEach((_, j) => {
      const v = hm.values[i][j];
      if (v === null) {
        svg.append(sv("rect", { class: "hm-empty", x: LABEL_W + j * CELL_W, y, width: CELL_W - 1, height: CELL_H - 1,
          fill: "#f3f4f6" }, sv("title", {}, `${hm.query_labels[i]} × ${hm.key_labels[j]}: not stored`)));
        return;
      }
      svg.append(sv("rect", { class: "hm-cell", x: LABEL_W + j * CELL_W, y, width: CELL_W - 1, height: CELL_H - 1,
        fill: shade(v, max), "data-value": v, "data-query": hm.query[i], "data-key": hm.key[j] },
      sv("title", {}, `${hm.query_labels[i]} × ${hm.key_labels[j]}: ${fmt(v)}`)));
    });
  });
  return svg;
}
