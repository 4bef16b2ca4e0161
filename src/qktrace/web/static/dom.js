// DOM helpers every view shares: element builders, number formatting, colours, the status line.

export const SVGNS = "http://www.w3.org/2000/svg";
export const FONT = "system-ui, DejaVu Sans, sans-serif";
export const C = {
  pos: "#2563eb", neg: "#dc2626", accent: "#d97706", rival: "#f59e0b", muted: "#6b7280", line: "#e5e7eb",
  feature: "#fcd34d", transcoder: "#7dd3fc",
  token: "#cbd5e1", logit: "#86efac", other: "#e5e7eb", sel: "#111827", group: "#7c3aed",
};

export const $ = (id) => document.getElementById(id);

function build(e, attrs, kids, svg) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || (!svg && v === false)) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class" && !svg) e.className = v;
    else e.setAttribute(k, v === true && !svg ? "" : String(v));
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
}

/** An HTML element: `el("td", {class: "num", onclick: f}, "text", child)`. */
export const el = (tag, attrs = {}, ...kids) => build(document.createElement(tag), attrs, kids, false);

/** An SVG element, same calling convention as `el`. */
export const sv = (tag, attrs = {}, ...kids) => build(document.createElementNS(SVGNS, tag), attrs, kids, true);

export const clear = (node) => { node.replaceChildren(); return node; };

/** Four significant digits, exponent notation for very large or small numbers, "–" for none. */
export function fmt(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e5 || a < 1e-3 ? x.toExponential(digits - 1) : Number(x.toPrecision(digits)).toString();
}

/** A number cell: formatted text, the exact value in data-value, coloured by sign. */
export const num = (x, field, digits = 4) =>
  el("td", { class: `num ${x > 0 ? "pos" : x < 0 ? "neg" : ""}`, "data-field": field, "data-value": x }, fmt(x, digits));

/** `text` cut to `max` characters with an ellipsis. */
export const truncate = (text, max) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

/** The one status line in the header: a message, a spinner while busy, red for an error. */
export function setStatus(msg, { busy = false, error = false } = {}) {
  const s = clear($("status"));
  s.className = error ? "error" : "";
  if (busy) s.append(el("span", { class: "spinner" }));
  s.append(msg);
}

export const showError = (e) => setStatus(String(e.message || e), { error: true });

export const errorBox = (target, err) => clear(target).append(el("p", { class: "error" }, String(err.message || err)));
