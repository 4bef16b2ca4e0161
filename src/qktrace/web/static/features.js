// The tooltip, and what it shows for a feature: its label and dashboard (GET /api/features), fetched once;
// a click on a feature opens the same in the Feature panel, with every context, to stay while the mouse moves.
// Whitespace in tokens is drawn visible (␣ space, ⏎ newline, ⇥ tab).

import * as API from "./api.js";
import { histogram } from "./chart.js";
import { $, clear, el, fmt } from "./dom.js";
import { baseLabel, nameIn, nodeWhere, parseId, qkSuffix } from "./model.js";
import { visible } from "./names.js";
import { reveal } from "./panels.js";
import { store } from "./state.js";


const cache = new Map(); // "kind/checkpoint/feature" -> Promise<FeatureResponse | null>

/** Node kinds with a label and dashboard: residual-SAE, transcoder and attention-SAE features. */
export const hasDashboard = (kind) => kind === "feature" || kind === "transcoder" || kind === "attn";

/** Whether the server knows features of this kind at `cp` (/api/info's `coder_features`: transcoder and
 * attention-SAE layers). */
const served = (info, cp, kind) => Boolean(info && info.features
  && (kind === "feature" || ((info.coder_features || {})[kind] || []).includes(cp)));

/** A feature's label and dashboard, or null when the server has none (`cp`: a transcoder or attention
 * feature's layer). */
export function feature(cp, f, kind = "feature") {
  const key = `${kind}/${cp}/${f}`;
  if (!cache.has(key)) {
    cache.set(key, served(store.state.info, cp, kind) ? API.feature(cp, f, kind).catch(() => null)
      : Promise.resolve(null));
  }
  return cache.get(key);
}

const where = (d) => (d.kind === "transcoder" ? `layer ${d.checkpoint} transcoder`
  : d.kind === "attn" ? `layer ${d.checkpoint} attention SAE` : `checkpoint ${d.checkpoint}`);

// -- the tooltip -----------------------------------------------------------------------------------

const tip = () => $("tooltip");

export function moveTip(e) {
  const t = tip();
  const x = Math.min(e.clientX + 14, window.innerWidth - t.offsetWidth - 8);
  const y = Math.min(e.clientY + 14, window.innerHeight - t.offsetHeight - 8);
  t.style.left = `${Math.max(4, x)}px`;
  t.style.top = `${Math.max(4, y)}px`;
}

export const hideTip = () => { tip().hidden = true; };

export function showTip(e, content) {
  const t = clear(tip());
  t.append(...[content].flat().filter((x) => x !== null && x !== undefined)); // no "null" at the end
  t.hidden = false;
  moveTip(e);
}

const chips = (id, title, tokens) => el("div", { class: "chips", id }, title,
  tokens.map((t) => el("span", { class: "t", title: JSON.stringify(t) }, visible(t))));

/** A feature's label and dashboard; `full` (the Feature panel): every context, its activation histogram
 * and bottom outputs too. */
function dashboardView(d, fallback, contexts = 6, full = false) {
  if (!d) return [el("b", {}, fallback)];
  const out = [el("b", {}, visible(d.label, false)), el("div", { class: "muted" }, `${where(d)}, feature ${d.feature}`)];
  const dash = d.dashboard;
  if (!dash) return out;
  out.push(el("div", { class: "muted" }, `fires on ${fmt(100 * (dash.freq || 0), 3)}% of tokens; max activation `
    + fmt(dash.max_act, 3)));
  if (dash.top_out.length) out.push(chips("feature-top-out", "top outputs: ", dash.top_out));
  if (full && dash.bottom_out && dash.bottom_out.length) {
    out.push(chips("feature-bottom-out", "bottom outputs: ", dash.bottom_out));
  }
  if (full && dash.hist) {
    const total = dash.hist.counts.reduce((a, b) => a + b, 0);
    out.push(el("div", { class: "muted" }, `activations of its ${total} firings`),
      histogram("feature-hist", dash.hist.edges, dash.hist.counts));
  }
  for (const c of dash.contexts.slice(0, contexts)) {
    out.push(el("div", { class: "ctx" }, el("span", { class: "muted" }, `${fmt(c.act, 3)} `),
      c.tokens.map((t, i) => el(i === c.i ? "mark" : "span", { class: "t" }, visible(t)))));
  }
  return out;
}

/** The tooltip for a component id (a node id or a QK term's component): its label, then its dashboard. */
export function showFeatureTip(e, id, fallback) {
  const p = parseId(id);
  showTip(e, [el("b", {}, fallback), el("div", { class: "muted" }, id)]);
  if (!hasDashboard(p.kind)) return;
  const target = e.currentTarget;
  feature(p.cp, p.index, p.kind).then((d) => {
    if (!tip().hidden && target.matches(":hover")) showTip(e, dashboardView(d, fallback));
  });
}

export function showNodeTip(e, model, n) {
  if (hasDashboard(n.p.kind)) return showFeatureTip(e, n.id, nameIn(model, n.id));
  showTip(e, [el("b", {}, nameIn(model, n.id)), el("div", { class: "muted" }, `${n.id} ${nodeWhere(model, n)}`),
    n.activation !== null && n.activation !== undefined ? el("div", {}, `value ${fmt(n.activation)}`) : null]);
}

/** The Feature panel: a feature's label and whole dashboard, until another is clicked. */
export async function showFeaturePanel(id, fallback) {
  const p = parseId(id), body = $("feature-body");
  if (!hasDashboard(p.kind)) return;
  body.className = "body";
  clear(body).append(el("p", { class: "muted" }, `${fallback} (${id})`));
  reveal("feature-panel");
  const d = await feature(p.cp, p.index, p.kind);
  clear(body).append(el("div", { id: "feature-detail", "data-component": id }, dashboardView(d, fallback, 50, true)),
    el("div", { class: "muted" }, id));
}

/** Tooltips for every `[data-component]` span under `root`; a click opens the Feature panel. */
export function attachTips(root) {
  for (const span of root.querySelectorAll("[data-component]:not([data-tips])")) { // each once
    span.dataset.tips = "1";
    if (!span.closest("tr.clickable")) { // a clickable row keeps its own click (its edge)
      span.addEventListener("click", (e) => {
        e.stopPropagation();
        showFeaturePanel(span.dataset.component, span.dataset.label || span.textContent);
      });
    }
    span.addEventListener("mouseenter", (e) => showFeatureTip(e, span.dataset.component,
      span.dataset.label || span.textContent)); // a cut label keeps its whole text in data-label
    span.addEventListener("mousemove", moveTip);
    span.addEventListener("mouseleave", hideTip);
  }
}

/**
 * Graphs built before the SAEs had labels carry placeholder clerps ("c3/f12", "t2/f5", "a1/f7", after which a node with QK tracing
 * names its head, see `qkSuffix`): ask the server for the real
 * ones (4 requests at a time, at most 400) and call `changed()` once some label changed.
 */
export async function refreshLabels(model, changed) {
  if (!store.state.info || !store.state.info.features) return;
  const base = baseLabel;
  const todo = model.nodes.filter((n) => hasDashboard(n.p.kind) && /^(c|t|clt|a)\d+\/f\d+$/.test(base(n)))
    .slice(0, 400);
  let any = false;
  const worker = async () => {
    for (let n = todo.shift(); n; n = todo.shift()) {
      const d = await feature(n.p.cp, n.p.index, n.p.kind);
      const label = d && d.label + (base(n) === n.clerp ? "" : qkSuffix(n));
      if (d && label !== n.clerp) { n.clerp = label; any = true; }
    }
  };
  await Promise.all([1, 2, 3, 4].map(worker));
  if (any && store.state.model === model) changed();
}
