// Line charts against the steering scale (the sweep panel's and the mechanism's curves). No state.

import { C, FONT, fmt, sv, truncate } from "./dom.js";

export const SERIES = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2"];

/** A line per series over `xs`; `yRange`: [lo, hi] (default: the data and 0); `mark`: an x drawn as a dashed
 * vertical line with its `markLabel` (the clean scale). */
export function lineChart(id, xs, series, yRange, mark = null, markLabel = "clean") {
  const w = 500, h = 170, m = { l: 40, r: 10, t: 8, b: 24 };
  const legendH = 16 * Math.ceil(series.length / 3);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), xspan = x1 - x0 || 1;
  const allY = series.flatMap((s) => s.ys).filter((y) => y !== null && y !== undefined);
  const [y0, y1] = yRange || [Math.min(0, ...allY), Math.max(...allY, 1e-9)];
  const X = (x) => m.l + ((x - x0) / xspan) * (w - m.l - m.r);
  const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0 || 1)) * (h - m.t - m.b);
  const chart = sv("svg", { id, class: "chart", width: "100%", viewBox: `0 0 ${w} ${h + legendH}`,
    "font-family": FONT, "font-size": 10 });
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4;
    chart.append(sv("line", { x1: m.l, x2: w - m.r, y1: Y(yv), y2: Y(yv), stroke: C.line }),
      sv("text", { x: m.l - 4, y: Y(yv) + 3, "text-anchor": "end", fill: C.muted }, fmt(yv, 2)));
  }
  for (const xv of xs) {
    chart.append(sv("text", { x: X(xv), y: h - m.b + 14, "text-anchor": "middle", fill: C.muted }, fmt(xv, 3)));
  }
  chart.append(sv("text", { x: w - m.r, y: h - 2, "text-anchor": "end", fill: C.muted }, "scale"));
  if (mark !== null && mark >= x0 && mark <= x1) {
    chart.append(sv("g", { class: "mark", "data-x": mark },
      sv("line", { x1: X(mark), x2: X(mark), y1: m.t, y2: h - m.b, stroke: C.sel, "stroke-dasharray": "3 3" }),
      sv("text", { x: X(mark) + 3, y: m.t + 9, fill: C.sel }, markLabel)));
  }
  series.forEach((s, i) => {
    const color = SERIES[i % SERIES.length];
    const pts = xs.map((x, j) => [x, s.ys[j]]).filter(([, y]) => y !== null && y !== undefined);
    chart.append(sv("polyline", { points: pts.map(([x, y]) => `${X(x)},${Y(y)}`).join(" "), fill: "none",
      stroke: color, "stroke-width": 1.8, class: "series", "data-name": s.name }));
    for (const [x, y] of pts) {
      chart.append(sv("circle", { cx: X(x), cy: Y(y), r: 2.5, fill: color },
        sv("title", {}, `${s.name} at ${fmt(x)}: ${fmt(y)}`)));
    }
    const lx = m.l + (i % 3) * 150, ly = h + 4 + 16 * Math.floor(i / 3);
    chart.append(sv("rect", { x: lx, y: ly, width: 10, height: 3, fill: color }),
      sv("text", { x: lx + 14, y: ly + 5, fill: C.sel }, truncate(s.name, 22)));
  });
  return chart;
}

/** A bar per bin: `counts` over bins between `edges` (len(counts) + 1, drawn evenly: the dashboards' bins are
 * logarithmic); each bar holds its count in data-count and its range in its title. */
export function histogram(id, edges, counts, what = "activation") {
  const w = 500, h = 110, m = { l: 40, r: 10, t: 6, b: 28 };
  const n = counts.length, bw = (w - m.l - m.r) / Math.max(n, 1), top = Math.max(1, ...counts);
  const chart = sv("svg", { id, class: "chart", width: "100%", viewBox: `0 0 ${w} ${h}`, "font-family": FONT,
    "font-size": 10 });
  chart.append(sv("line", { x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b, stroke: C.line }),
    sv("text", { x: m.l - 4, y: m.t + 8, "text-anchor": "end", fill: C.muted }, String(top)),
    sv("text", { x: m.l - 4, y: h - m.b, "text-anchor": "end", fill: C.muted }, "0"));
  counts.forEach((c, i) => {
    const bh = ((h - m.t - m.b) * c) / top;
    chart.append(sv("rect", { class: "hist-bar", x: m.l + i * bw + 0.5, y: h - m.b - bh, width: Math.max(1, bw - 1),
      height: bh, fill: SERIES[0], "data-count": c },
    sv("title", {}, `${fmt(edges[i], 3)} ≤ ${what} < ${fmt(edges[i + 1], 3)}: ${c}`)));
  });
  const tick = (i) => sv("text", { x: m.l + i * bw, y: h - m.b + 12, "text-anchor": "middle", fill: C.muted },
    fmt(edges[i], 3));
  chart.append(tick(0), tick(Math.floor(n / 2)), tick(n),
    sv("text", { x: w - m.r, y: h - 2, "text-anchor": "end", fill: C.muted }, `${what} (log bins)`));
  return chart;
}
