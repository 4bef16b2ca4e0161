// The compare view's table: the aligned prompts' summary, logit(answer) − logit(rival) in A and B, the top
// heads' patterns patched from B into A, and the heads whose attention differs most (a row: that head's QK
// terms in A and B, matched component by component). POST /api/compare's answer, drawn; no state.

import { clear, el, fmt, num } from "./dom.js";
import { attachTips } from "./features.js";
import { nameIn } from "./model.js";

/** Draws POST /api/compare's answer `res` into `body`; a component is named as in A's graph `model` (names.js's
 * name through `nameIn`, so as A's panels name it), else as the server labels it. */
export function renderComparison(body, res, model = null) {
  const tok = (i) => JSON.stringify(res.str_tokens_a[i] === undefined ? "?" : res.str_tokens_a[i]);
  const tokB = (i) => JSON.stringify(res.str_tokens_b[i] === undefined ? "?" : res.str_tokens_b[i]);
  const where = res.differing.map((p) => `${p} (${tok(p)} → ${tokB(p)})`).join(", ") || "nowhere";
  clear(body).append(el("p", { id: "compare-summary" }, `${res.str_tokens_a.length} aligned tokens, different at `,
    where, `; attention from position ${res.query_pos} ${tok(res.query_pos)}.`));
  if (res.metric_a !== null) {
    body.append(el("table", { id: "compare-metric" },
      el("tr", {}, el("th", {}, `logit(${JSON.stringify(res.answer)}) − logit(${JSON.stringify(res.rival)})`),
        el("th", {}, "A"), el("th", {}, "B")),
      el("tr", {}, el("td", {}, ""), num(res.metric_a, "metric_a"), num(res.metric_b, "metric_b"))));
  }
  if (res.patching) body.append(patching(res.patching));
  const terms = new Map(res.terms.map((t) => [`${t.layer}/${t.head}`, t]));
  const detail = el("div", { id: "compare-terms" }, el("p", { class: "muted" },
    "Click a head for the QK terms that differ most (the top heads are computed)."));
  const rows = res.heads.slice(0, 20).map((h) => {
    const tr = el("tr", { class: "clickable compare-row", "data-layer": h.layer, "data-head": h.head,
      "data-key": h.key_pos, onclick: () => {
        for (const r of body.querySelectorAll("tr.compare-row")) r.classList.toggle("selected", r === tr);
        showTerms(terms.get(`${h.layer}/${h.head}`), h, detail, tok, model);
      } },
    el("td", {}, `L${h.layer}H${h.head}`), el("td", {}, `${h.key_pos} ${tok(h.key_pos)}`),
    num(h.attention_a, "attention_a"), num(h.attention_b, "attention_b"), num(h.diff, "diff"), num(h.skew, "skew"));
    return tr;
  });
  body.append(el("h4", {}, "Heads whose attention differs most (at the key where it differs most)"),
    el("table", { id: "compare-table" },
      el("tr", {}, el("th", {}, "head"), el("th", {}, "key"), el("th", { class: "num" }, "attention A"),
        el("th", { class: "num" }, "attention B"), el("th", { class: "num" }, "B − A"),
        el("th", { class: "num", title: "W_QK eigenvalue sign skew: > 0 concordance-like, < 0 discordance-like" },
          "W_QK skew")),
      rows), detail);
}

/** The top heads' patterns patched from B into A (others frozen): the change of m, alone and together. */
function patching(p) {
  const share = p.share === null ? "" : ` (${(100 * p.share).toFixed(1)}% of it)`;
  const row = (name, d, cls) => el("tr", { class: cls }, el("td", {}, name), num(d, "delta"));
  return el("div", { id: "compare-patching" },
    el("h4", {}, "The top heads shown causally: their attention patterns patched from B into A"),
    el("p", { id: "compare-patching-summary" }, `Every other head frozen, m moves by ${fmt(p.together)} of `
      + `m(B) − m(A) = ${fmt(p.total)}${share}.`),
    el("table", { id: "compare-patching-table" },
      el("tr", {}, el("th", {}, "patched"), el("th", { class: "num" }, "Δm")),
      p.heads.map(([ly, h], i) => row(`L${ly}H${h}`, p.alone[i], "patch-alone")),
      row("together", p.together, "patch-together")));
}

function showTerms(t, h, detail, tok, model) {
  const comp = (id, label) => el("td", {}, el("span", { class: "comp", "data-component": id },
    model ? nameIn(model, id, label) : label));
  clear(detail);
  if (!t) {
    detail.append(el("p", { class: "muted" }, `L${h.layer}H${h.head} is not among the heads whose terms were `
      + "computed (the top 5 with an SAE at their layer)."));
    return;
  }
  detail.append(el("h4", { id: "compare-terms-title" }, `L${t.layer}H${t.head} at (${t.query_pos} `
    + `${tok(t.query_pos)}, ${t.key_pos} ${tok(t.key_pos)}): score ${fmt(t.score_a)} in A, ${fmt(t.score_b)} in B`),
  el("table", {},
    el("tr", {}, el("th", {}, "query"), el("th", {}, "key"), el("th", { class: "num" }, "A"),
      el("th", { class: "num" }, "B"), el("th", { class: "num" }, "B − A")),
    t.terms.map((x) => el("tr", { class: "compare-term" }, comp(x.query, x.query_label), comp(x.key, x.key_label),
      num(x.value_a, "value_a"), num(x.value_b, "value_b"), num(x.diff, "diff")))),
  el("p", { class: "muted" }, `${t.n_terms} terms in all; the others add ${fmt(t.rest)}.`));
  attachTips(detail);
}
