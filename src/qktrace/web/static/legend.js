// How each node kind is drawn (one marker per kind, errors and each bias kind distinct) and the legend that
// names them. The kinds are qktrace/nodes.py's `Kind`s.

import { C, el, sv } from "./dom.js";

/** kind -> [shape, fill, stroke, what the legend calls it] */
export const KINDS = {
  feature: ["circle", C.feature, "#92400e", "SAE feature"],
  transcoder: ["circle", C.transcoder, "#075985", "transcoder feature"],
  attn: ["circle", "#c4b5fd", "#5b21b6", "attention SAE feature"],
  token: ["wide", C.token, "#334155", "token (embedding)"],
  logit: ["wide", C.logit, "#166534", "logit (output token)"],
  error: ["diamond", "#fca5a5", "#991b1b", "SAE error"],
  mlp_error: ["diamond", "#f9a8d4", "#9d174d", "MLP (transcoder) error"],
  attn_error: ["diamond", "#ddd6fe", "#6d28d9", "attention (SAE) error"],
  sae_bias: ["square", "#e5e7eb", "#64748b", "SAE decoder bias"],
  attn_bias: ["triangle", "#bfdbfe", "#1e40af", "attention bias"],
  mlp_bias: ["triangle-down", "#ddd6fe", "#5b21b6", "MLP bias"],
  head_bias: ["square", "#a5f3fc", "#155e75", "head bias"],
};
const UNKNOWN = ["square", C.other, "#64748b", "other"];

export function marker(kind, k = 1) {
  const [shape, fill, stroke] = KINDS[kind] || UNKNOWN, s = { fill, stroke, "stroke-width": 0.8, class: "mark" };
  if (shape === "circle") return sv("circle", { r: 5 * k, ...s });
  if (shape === "wide") return sv("rect", { x: -6 * k, y: -4.5 * k, width: 12 * k, height: 9 * k, rx: 2, ...s });
  if (shape === "diamond") return sv("path", { d: `M0 ${-5.5 * k}L${5.5 * k} 0L0 ${5.5 * k}L${-5.5 * k} 0Z`, ...s });
  if (shape === "triangle") return sv("path", { d: `M0 ${-5 * k}L${5 * k} ${4 * k}L${-5 * k} ${4 * k}Z`, ...s });
  if (shape === "triangle-down") return sv("path", { d: `M0 ${5 * k}L${5 * k} ${-4 * k}L${-5 * k} ${-4 * k}Z`, ...s });
  return sv("rect", { x: -4 * k, y: -4 * k, width: 8 * k, height: 8 * k, ...s });
}

/** The legend of the kinds present in `model`, and of the edges' signs (colour and line style). */
export function legend(model) {
  const present = new Set(model.nodes.map((n) => n.p.kind));
  const items = Object.entries(KINDS).filter(([kind]) => present.has(kind)).map(([kind, [, , , name]]) =>
    el("span", { class: "legend-item", "data-kind": kind },
      sv("svg", { width: 14, height: 14, viewBox: "-7 -7 14 14" }, marker(kind)), name));
  const line = (sign, colour, dash) => el("span", { class: "legend-item", "data-sign": sign },
    sv("svg", { width: 22, height: 8 }, sv("line", { x1: 1, y1: 4, x2: 21, y2: 4, stroke: colour, "stroke-width": 2,
      "stroke-dasharray": dash })), sign === "pos" ? "excites" : "inhibits");
  const rows = el("span", { class: "legend-item", title: "rows from the bottom: the tokens, the residual stream at each "
    + "checkpoint (checkpoint c is the input of layer c), the logits" }, "rows: tokens, c0…c", String(model.nLayers),
  " = residual checkpoints, logits");
  return [...items, line("pos", C.pos, "none"), line("neg", C.neg, "4 2"), rows];
}
