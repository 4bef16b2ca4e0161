// The QK panel: why a head's query attends to a key, as terms query-side component × key-side component
// (POST /api/qk): the top terms as a table or as a query × key heatmap (qk-heatmap.js), "features only" in
// both; the head's attention row, inhibitory terms and the contrast with a rival key the user picks; without
// a model, the terms a graph stored for its edges (a table and a heatmap too). Components are named as names.js
// names them. The latest request wins: an answer that comes back after another request was made, or after the
// panel was reset (compare closed), is dropped.

import * as API from "./api.js";
import { $, C, FONT, clear, el, errorBox, fmt, num, sv, truncate } from "./dom.js";
import { attachTips } from "./features.js";
import { heatmapView, storedHeatmap } from "./qk-heatmap.js";
import { nameIn, parseId, tokText } from "./model.js";
import { visible } from "./names.js";

const isFeature = (id) => parseId(id).kind === "feature";
const bothFeatures = (t) => isFeature(t.query) && isFeature(t.key);

/** The prompt to compute on: the open graph's token ids, else the text in the prompt box. */
export function promptPayload(state) {
  const ours = state.model && state.model.meta.qktrace;
  if (ours && Array.isArray(ours.tokens)) return { tokens: ours.tokens };
  const text = $("prompt-input").value.trim();
  if (!text) throw new Error("open a graph or type a prompt first");
  return { prompt: text };
}

const tokOf = (res, i) => `"${visible(res.str_tokens[i] === undefined ? "?" : res.str_tokens[i])}"`;
const comp = (id, label) => el("td", {}, el("span", { class: "comp", "data-component": id }, label));

/** `state()`: the store's state. Wires the QK form; `explainHead(link, layer, head)` fills it and explains;
 * `onShown({layer, head, query, key, rival})` hears each view shown (the URL keeps it; rival: the contrast's
 * rival key when one was chosen, else null). */
export function createQKPanel(state, { onShown = () => {} } = {}) {
  const body = $("qk-body");
  const shown = { mode: "table", only: false }; // table or heatmap, features only: kept from view to view
  let asked = 0; // requests made: an answer to any but the latest is dropped

  $("qk-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("qk-key").value.trim();
    run({ layer: +$("qk-layer").value, head: +$("qk-head").value, query_pos: +$("qk-query").value,
      key_pos: key === "" ? null : +key });
  });

  async function run(req) {
    const mine = ++asked;
    body.className = "body";
    const wait = el("p", { class: "muted qk-pending", "data-request": mine }, el("span", { class: "spinner" }),
      `explaining L${req.layer}H${req.head} at query ${req.query_pos}…`);
    clear(body).append(wait);
    // still wanted: no later request, and the panel not reset meanwhile (its waiting line still shown)
    const current = () => mine === asked && wait.isConnected;
    try {
      const res = await API.qk({ ...promptPayload(state()), ...req, top: 12 });
      if (current()) render(res, req.rival_pos ?? null);
    } catch (e) { if (current()) errorBox(body, e); }
  }

  /** Drop the answer of any request still running (the panel is going back to its hint). */
  const cancel = () => { asked++; };

  function render(res, rival) {
    onShown({ layer: res.layer, head: res.head, query: res.query_pos, key: res.key_pos, rival });
    const qk = res.qk, ours = state().model && state().model.meta.qktrace;
    clear(body).append(el("h3", { id: "qk-title" }, `L${res.layer}H${res.head}: query ${res.query_pos} `
      + `${tokOf(res, res.query_pos)} → key ${res.key_pos} ${tokOf(res, res.key_pos)}`));
    if (ours && ours.model !== res.model) {
      body.append(el("p", { class: "error" }, `computed with the loaded model ${res.model}, not the graph's`));
    }
    body.append(el("table", { id: "qk-check" },
      el("tr", {}, el("th", {}, "score (model)"), el("th", {}, "sum of terms"), el("th", {}, "capped sum"),
        el("th", {}, "p(key)"), el("th", {}, "max rel. error")),
      el("tr", {}, num(qk.score[0], "score", 6), num(qk.sum_of_terms[0], "sum_of_terms", 6),
        num(qk.capped_sum[0], "capped_sum", 6), num(qk.pattern[0], "pattern", 6),
        num(qk.max_relative_error, "max_relative_error", 2))));
    body.append(el("h4", {}, "Attention of the query over every key (blue: this key, amber: its rival; click a bar)"),
      attentionChart(res, (k) => run({ layer: res.layer, head: res.head, query_pos: res.query_pos, key_pos: k })));
    const hm = (only) => (only ? res.heatmap_features : res.heatmap);
    body.append(...termsView(termTable(res.qk.terms, "qk-terms", false), hm, shown));
    body.append(el("div", { class: "two-col" }, marginalTable(qk.query_marginals, "Query side (summed)", "qk-qmarg"),
      marginalTable(qk.key_marginals, "Key side (summed)", "qk-kmarg")));
    body.append(el("h4", {}, "Strongest inhibitory terms (lower p(key) most, over all keys)"),
      res.inhibitory.length ? termTable(res.inhibitory, "qk-inhibitory", true) : el("p", { class: "muted" }, "none"));
    if (res.contrast) {
      body.append(...contrastView(res, (rival) => run({ layer: res.layer, head: res.head, query_pos: res.query_pos,
        key_pos: res.key_pos, rival_pos: rival })));
    }
    attachTips(body);
  }

  function stored(l, layer, head) {
    asked++; // a request still running must not replace these terms
    const model = state().model;
    clear(body).className = "body";
    const entries = (Array.isArray(l.qk_top_terms) ? l.qk_top_terms : [])
      .filter((e) => e && (e.layer === undefined || (e.layer === layer && e.head === head)));
    if (!entries.length) {
      body.append(el("p", { class: "muted" }, "No model is loaded and this graph stores no QK terms for this head: "
        + "start qktrace serve with --model to compute them."));
      return;
    }
    const q = l.t.p.pos, k = l.s.p.pos, name = (id, label) => nameIn(model, id, label);
    for (const e of entries) {
      const terms = (Array.isArray(e.terms) ? e.terms : [e]).filter((t) => t && typeof t.value === "number");
      body.append(el("h3", { id: "qk-title" }, `L${layer}H${head}: query ${q} ${tokText(model, q)} → key `
        + `${k} ${tokText(model, k)} (stored in the graph; no model loaded)`));
      const score = typeof e.score === "number" ? e.score : undefined;
      body.append(score === undefined
        ? el("p", { id: "qk-top-only", class: "muted" }, "The graph stores the top terms only (no score): they "
          + "need not add up to the head's score.")
        : el("dl", { class: "kv" }, el("dt", {}, "score"), el("dd", { id: "qk-stored-score", "data-value": score },
          fmt(score)), el("dt", {}, "p(key)"), el("dd", {}, fmt(e.pattern))));
      const table = el("table", { id: "qk-terms", class: "terms" },
        el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side"), el("th", { class: "num" }, "term")),
        terms.map((t) => el("tr", { class: `qk-term${bothFeatures(t) ? "" : " not-features"}` },
          comp(t.query, name(t.query, t.query_label)), comp(t.key, name(t.key, t.key_label)), num(t.value, "value"))));
      const heatmap = (only) => storedHeatmap(only ? terms.filter(bothFeatures) : terms, score,
        (id, side) => name(id, side === "query" ? terms.find((t) => t.query === id).query_label
          : terms.find((t) => t.key === id).key_label), only);
      body.append(...termsView(table, heatmap, shown));
    }
    attachTips(body);
  }

  function explainHead(l, layer, head) {
    const q = l.t.p.pos, k = l.s.p.pos;
    fill({ layer, head, query: q, key: k });
    const info = state().info;
    if (info && info.can_compute) run({ layer, head, query_pos: q, key_pos: k });
    else stored(l, layer, head);
  }

  const fill = ({ layer, head, query, key }) => {
    $("qk-layer").value = layer; $("qk-head").value = head; $("qk-query").value = query; $("qk-key").value = key;
  };

  /** The view `{layer, head, query, key}` (from a link): the form filled, then explained. */
  function show(v) {
    fill(v);
    return run({ layer: v.layer, head: v.head, query_pos: v.query, key_pos: v.key, rival_pos: v.rival ?? null });
  }

  return { run, show, explainHead, cancel };
}

function termTable(terms, id, withPos) {
  return el("table", { id, class: "terms" },
    el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side"), withPos ? el("th", { class: "num" }, "key") : null,
      el("th", { class: "num" }, "term"), el("th", { class: "num" }, "Δp(key)")),
    terms.map((t) => el("tr", { class: `qk-term${bothFeatures(t) ? "" : " not-features"}` },
      comp(t.query, t.query_label), comp(t.key, t.key_label),
      withPos ? el("td", { class: "num" }, String(t.key_pos)) : null, num(t.value, "value"),
      num(t.prob_effect, "prob_effect"))));
}

function marginalTable(list, title, id) {
  const max = Math.max(1e-30, ...list.map((m) => Math.abs(m.value)));
  return el("div", {}, el("h4", {}, title), el("table", { id },
    list.slice(0, 10).map((m) => el("tr", {}, comp(m.component, m.label), num(m.value, "value", 3),
      el("td", {}, sv("svg", { width: 60, height: 8 }, sv("rect", { x: 0, y: 0, height: 8,
        width: Math.max(1, (60 * Math.abs(m.value)) / max), fill: m.value >= 0 ? C.pos : C.neg })))))));
}

/** The top terms as a `table` or a query × key heatmap (`heatmap(featuresOnly)`, a toggle beside them); "features
 * only" filters both. `shown`: {mode, only}, the choices, which the next view keeps. */
function termsView(table, heatmap, shown) {
  const holder = el("div", { id: "qk-terms-view" });
  const draw = () => {
    table.classList.toggle("features-only", shown.only);
    holder.replaceChildren(shown.mode === "table" ? table : heatmapView(heatmap(shown.only)));
    attachTips(holder);
  };
  const buttons = ["table", "heatmap"].map((m) => el("button", { type: "button", id: `qk-show-${m}`,
    class: m === shown.mode ? "active" : "", "aria-pressed": String(m === shown.mode), onclick: () => {
      shown.mode = m;
      for (const b of buttons) {
        b.classList.toggle("active", b.id === `qk-show-${m}`);
        b.setAttribute("aria-pressed", String(b.id === `qk-show-${m}`));
      }
      draw();
    } }, m));
  draw();
  return [el("h4", {}, "Top terms: query-side × key-side components ",
    el("span", { class: "toggle", role: "group", "aria-label": "show the terms as" }, buttons), " ",
    el("label", { class: "muted", title: "hide terms with a bias or error term on either side" },
      el("input", { type: "checkbox", id: "qk-features-only", checked: shown.only,
        onchange: (e) => { shown.only = e.target.checked; draw(); } }), " features only")), holder];
}

/** Why the key rather than a rival key (a selector of every other key the query sees): the terms of the score
 * difference, the rest summed in a last row, so the column adds up to the difference shown. */
function contrastView(res, onRival) {
  const c = res.contrast, row = res.row;
  const select = el("select", { id: "qk-rival", onchange: (e) => onRival(+e.target.value) },
    row.key_positions.filter((k) => k !== c.key_a).map((k) => el("option", { value: k, selected: k === c.key_b },
      `@${k} ${tokOf(res, k)} (p ${fmt(row.pattern[row.key_positions.indexOf(k)], 2)})`)));
  return [el("h4", {}, `Why key ${c.key_a} ${tokOf(res, c.key_a)} rather than `,
    el("label", { title: "the rival key: another key the query sees" }, "key ", select),
    ": score difference ", el("span", { id: "qk-score-diff", "data-value": c.score_diff }, fmt(c.score_diff))),
  el("table", { id: "qk-contrast" },
    el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side (either key)"), el("th", { class: "num" }, "at key"),
      el("th", { class: "num" }, "at rival"), el("th", { class: "num" }, "difference")),
    c.terms.map((t) => el("tr", { class: "contrast-term" }, comp(t.query, t.query_label), comp(t.key, t.key_label),
      num(t.value_a, "value_a", 3), num(t.value_b, "value_b", 3), num(t.diff, "diff", 3))),
    el("tr", { class: "contrast-rest muted" }, el("td", { colspan: 4 }, "every other term"), num(c.rest, "diff", 3)))];
}

function attentionChart(res, onKey) {
  const row = res.row, n = row.key_positions.length;
  const barW = Math.max(10, Math.min(36, Math.floor(500 / Math.max(n, 1)))), h = 90, top = 14;
  const chart = sv("svg", { class: "chart", id: "attn-chart", width: n * barW + 10, height: h + top + 30,
    "font-family": FONT, "font-size": 10 });
  const rival = res.contrast ? res.contrast.key_b : null;
  row.key_positions.forEach((k, i) => {
    const p = row.pattern[i], x = 5 + i * barW, bh = Math.max(1, p * h);
    const color = k === res.key_pos ? C.pos : k === rival ? C.rival : "#9ca3af";
    const tok = res.str_tokens[k] === undefined ? "?" : res.str_tokens[k];
    chart.append(sv("g", { class: "attn-bar", "data-key": k, "data-value": p, cursor: "pointer", onclick: () => onKey(k) },
      sv("rect", { x: x + 1, y: top + h - bh, width: barW - 2, height: bh, fill: color }),
      sv("text", { x: x + barW / 2, y: top + h + 12, "text-anchor": "middle", fill: C.sel }, truncate(tok, 5)),
      sv("text", { x: x + barW / 2, y: top + h + 24, "text-anchor": "middle", fill: C.muted }, String(k)),
      sv("title", {}, `key ${k} ${JSON.stringify(tok)}: p = ${fmt(p)}, score ${fmt(row.score[i])}`)));
  });
  return chart;
}
