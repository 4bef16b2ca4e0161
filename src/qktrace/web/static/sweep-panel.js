// The steering panel: steer a feature inside chosen heads' QK circuits (or in the residual stream) over a
// range of scales (POST /api/sweep) and plot next-token probabilities and watched attention against it.

import * as API from "./api.js";
import { $, C, FONT, clear, el, errorBox, fmt, num, sv, truncate } from "./dom.js";
import { promptPayload } from "./qk-panel.js";

const SERIES = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2"];

/** `state()`: the store's state. Wires the sweep form; `setDefaults(sweep)` fills it with the server's defaults
 * (GET /api/info's `defaults.sweep`, which are `qktrace.options.SweepOptions`'s, as the CLI's are);
 * `prefill(link, layer, head)` fills it from an edge. */
export function createSweepPanel(state) {
  const body = $("steer-body");
  $("steer-form").addEventListener("submit", (e) => { e.preventDefault(); run(); });

  let defaults = null;

  function setDefaults(sweep) {
    defaults = sweep;
    $("steer-scales").value = Array.isArray(sweep.scales) ? sweep.scales.join(",") : sweep.scales;
    $("steer-side").value = sweep.side;
    $("steer-mode").value = sweep.mode;
    $("steer-freeze").checked = sweep.freeze_others;
  }

  function prefill(l, layer, head) {
    $("steer-heads").value = `L${layer}H${head}`;
    if (defaults) $("steer-side").value = defaults.side;
    $("steer-checkpoint").value = "";
    if (l.s.p.kind === "feature" && l.s.p.cp === layer) $("steer-feature").value = l.s.p.index;
    $("steer-positions").value = String(l.s.p.pos);
    $("steer-watch-attn").value = `L${layer}H${head}:${l.t.p.pos}->${l.s.p.pos}`;
    const logits = state().model.nodes.filter((n) => n.p.kind === "logit").sort((a, b) => b.token_prob - a.token_prob);
    $("steer-watch-tokens").value = logits.slice(0, 2).map((n) => n.p.index).join(", ");
  }

  async function run() {
    body.className = "body";
    try {
      const req = request();
      clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }), "running the sweep…"));
      render(await API.sweep(req));
    } catch (e) { errorBox(body, e); }
  }

  function request() {
    const heads = [...$("steer-heads").value.matchAll(/L(\d+)\s*H(\d+)/gi)].map((m) => [+m[1], +m[2]]);
    const watch = [...$("steer-watch-attn").value.matchAll(/L(\d+)\s*H(\d+)\s*:\s*(-?\d+)\s*->\s*(-?\d+)/gi)]
      .map((m) => [+m[1], +m[2], +m[3], +m[4]]);
    const positions = $("steer-positions").value.split(/[\s,]+/).filter(Boolean).map(Number);
    const cp = $("steer-checkpoint").value.trim();
    return {
      ...promptPayload(state()), heads, side: $("steer-side").value, checkpoint: cp === "" ? null : +cp,
      feature: +$("steer-feature").value, positions, scales: $("steer-scales").value.trim(), mode: $("steer-mode").value,
      freeze_others: $("steer-freeze").checked, watch_tokens: parseList($("steer-watch-tokens").value),
      watch_attention: watch,
    };
  }

  function render(res) {
    clear(body);
    const xs = res.rows.map((r) => r.scale);
    const probCols = res.columns.filter((c) => c.startsWith("p:"));
    const attnCols = res.columns.filter((c) => c.startsWith("attn:"));
    const probs = [{ name: "top-1 p", ys: res.rows.map((r) => r.p_top_1) },
      ...probCols.map((c) => ({ name: c, ys: res.rows.map((r) => r[c]) }))];
    body.append(el("h4", {}, "Next-token probabilities against the scale"), lineChart("sweep-probs", xs, probs, [0, 1]));
    if (attnCols.length) {
      body.append(el("h4", {}, "Watched attention against the scale"),
        lineChart("sweep-attn", xs, attnCols.map((c) => ({ name: c.slice(5), ys: res.rows.map((r) => r[c]) })), [0, 1]));
    }
    body.append(el("table", { id: "sweep-table" },
      el("tr", {}, el("th", { class: "num" }, "scale"), el("th", {}, "top-1"), el("th", { class: "num" }, "p"),
        probCols.map((c) => el("th", { class: "num" }, c)), attnCols.map((c) => el("th", { class: "num" }, c.slice(5)))),
      res.rows.map((r) => el("tr", { class: "sweep-row" }, num(r.scale, "scale", 3), el("td", {}, JSON.stringify(r.top_1)),
        num(r.p_top_1, "p_top_1", 3), probCols.map((c) => num(r[c], c, 3)), attnCols.map((c) => num(r[c], c, 3))))));
  }

  return { prefill, run, setDefaults };
}

function parseList(text) {
  const t = text.trim();
  if (!t) return [];
  try { return JSON.parse(`[${t}]`); } catch { return t.split(",").map((s) => s.trim()).filter(Boolean); }
}

function lineChart(id, xs, series, yRange) {
  const w = 500, h = 170, m = { l: 40, r: 10, t: 8, b: 24 };
  const legendH = 16 * Math.ceil(series.length / 3);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), xspan = x1 - x0 || 1;
  const allY = series.flatMap((s) => s.ys).filter((y) => y !== null && y !== undefined);
  const [y0, y1] = yRange || [Math.min(0, ...allY), Math.max(...allY, 1e-9)];
  const X = (x) => m.l + ((x - x0) / xspan) * (w - m.l - m.r);
  const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0 || 1)) * (h - m.t - m.b);
  const chart = sv("svg", { id, class: "chart", width: w, height: h + legendH, "font-family": FONT, "font-size": 10 });
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4;
    chart.append(sv("line", { x1: m.l, x2: w - m.r, y1: Y(yv), y2: Y(yv), stroke: C.line }),
      sv("text", { x: m.l - 4, y: Y(yv) + 3, "text-anchor": "end", fill: C.muted }, fmt(yv, 2)));
  }
  for (const xv of xs) {
    chart.append(sv("text", { x: X(xv), y: h - m.b + 14, "text-anchor": "middle", fill: C.muted }, fmt(xv, 3)));
  }
  chart.append(sv("text", { x: w - m.r, y: h - 2, "text-anchor": "end", fill: C.muted }, "scale"));
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
