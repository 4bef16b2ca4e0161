// A QK heatmap: query-side components (rows) × key-side components (columns) of one key's score, each cell the
// sum of their terms, the components outside the top of each side in "other" (qktrace's
// QKAttribution.heatmap, from POST /api/qk): the cells add up to the score. Blue raises the score, red
// lowers it; hover a cell for its value, a label for the component's id and dashboard.

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

/** `hm`: {query, query_labels, key, key_labels, values[row][column], features_only}. */
export function heatmapView(hm) {
  const rows = hm.query.length, cols = hm.key.length;
  const max = Math.max(1e-30, ...hm.values.flat().map(Math.abs));
  const w = LABEL_W + cols * CELL_W + 8, h = HEAD_H + rows * CELL_H + 4; // scaled down to the panel's width
  const svg = sv("svg", { id: "qk-heatmap", class: "chart", width: "100%", viewBox: `0 0 ${w} ${h}`,
    style: `max-width: ${w}px`, "font-family": FONT, "font-size": 10, "data-features-only": hm.features_only });
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
      svg.append(sv("rect", { class: "hm-cell", x: LABEL_W + j * CELL_W, y, width: CELL_W - 1, height: CELL_H - 1,
        fill: shade(v, max), "data-value": v, "data-query": hm.query[i], "data-key": hm.key[j] },
      sv("title", {}, `${hm.query_labels[i]} × ${hm.key_labels[j]}: ${fmt(v)}`)));
    });
  });
  return svg;
}
