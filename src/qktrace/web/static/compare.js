// The compare view: two graphs side by side (prompt A and prompt B, each with its own store and graph view,
// the tokens that differ marked in both) and, with a model loaded, the heads whose attention differs most
// between the two prompts (POST /api/compare): each head's attention from the query position in A and in B
// at the key where they differ most, its W_QK eigenvalue sign skew, and for the top heads the QK terms that
// differ most, component by component; with an answer, those heads shown causally (their patterns patched
// from B into A, every other head frozen: the change of logit(answer) − logit(rival), alone and together, and
// their share of the whole difference). Opened by the Compare button or by #compare=A,B in the URL.

import * as API from "./api.js";
import { $, clear, el, errorBox, fmt, num, setStatus, showError } from "./dom.js";
import { hideTip, showNodeTip } from "./features.js";
import { createGraphView } from "./graphview.js";
import { indexGraph } from "./model.js";
import { createStore, initialState } from "./state.js";

const HINT = "Pick two graphs of prompts with the same number of tokens (a minimal pair) and press Compare.";

/** One side: its own store and graph view over the svg `svgId`. */
function createSide(svgId, info) {
  const store = createStore({ ...initialState(), info: info() });
  const view = createGraphView($(svgId), () => store.state, {
    onNode: (n) => store.set({ selNode: n, selLink: null }),
    onLink: (l) => store.set({ selLink: l, selNode: null }),
    onHover: (n, e) => {
      if (n) showNodeTip(e, store.state.model, n); else hideTip();
      if (store.state.hover !== n) store.set({ hover: n });
    },
    onBackground: () => store.set({ selNode: null, selLink: null }),
  });
  store.subscribe((s, changed) => {
    const any = (...keys) => keys.some((k) => changed.has(k));
    if (any("model")) view.show(s.model);
    if (s.model && any("model", "selNode", "selLink", "pinned", "prune")) view.restyle();
    if (any("model", "selNode", "selLink", "pinned", "hover")) view.drawLabels();
  });
  return { store, view };
}

/** `info()`: GET /api/info's answer. `onOpen(a, b)` hears a comparison opened, `onClose()` the view closed. */
export function createCompareView({ info, onOpen, onClose }) {
  const pane = $("compare-pane"), body = $("compare-body");
  const sides = { a: createSide("compare-svg-a", info), b: createSide("compare-svg-b", info) };
  let ticket = 0;

  $("compare-run").addEventListener("click", () => run($("compare-a").value, $("compare-b").value));
  $("compare-close").addEventListener("click", close);

  async function list(a, b) {
    const data = await API.graphs();
    for (const [id, chosen] of [["compare-a", a], ["compare-b", b]]) {
      const sel = clear($(id));
      for (const g of data.graphs) sel.append(el("option", { value: g.name, title: g.prompt }, g.name));
      if (chosen) sel.value = chosen;
    }
    return data.graphs.map((g) => g.name);
  }

  /** Show the view; with two graph names, compare them. */
  async function open(a, b) {
    pane.hidden = false;
    $("main").hidden = true;
    try {
      const names = await list(a, b);
      if (!a || !b) {
        const other = names.find((n) => n !== $("compare-a").value);
        if (other) $("compare-b").value = other;
        clear(body).append(HINT);
        body.className = "body hint";
        return;
      }
      await run(a, b);
    } catch (e) { showError(e); }
  }

  function close() {
    pane.hidden = true;
    $("main").hidden = false;
    hideTip();
    onClose();
  }

  async function run(a, b) {
    if (!a || !b) return showError("pick graph A and graph B first");
    const mine = ++ticket;
    setStatus(`comparing ${a} and ${b}…`, { busy: true });
    try {
      const [ga, gb] = await Promise.all([API.graph(a), API.graph(b)]);
      if (mine !== ticket) return;
      const ma = indexGraph(ga.graph), mb = indexGraph(gb.graph);
      sides.a.store.set({ name: ga.name, model: ma, selNode: null, selLink: null, hover: null, pinned: new Set() });
      sides.b.store.set({ name: gb.name, model: mb, selNode: null, selLink: null, hover: null, pinned: new Set() });
      $("compare-title-a").textContent = `A: ${ga.name} — ${ma.meta.prompt || ""}`;
      $("compare-title-b").textContent = `B: ${gb.name} — ${mb.meta.prompt || ""}`;
      markDiffering(ma.tokens, mb.tokens);
      onOpen(ga.name, gb.name);
      await differences(ma, mb, mine);
      if (mine === ticket) setStatus(`compared ${ga.name} and ${gb.name}`);
    } catch (e) {
      if (mine === ticket) { errorBox(body, e); showError(e); }
    }
  }

  function markDiffering(ta, tb) {
    for (const id of ["compare-svg-a", "compare-svg-b"]) {
      for (const t of $(id).querySelectorAll("text.token-label")) {
        const p = +t.dataset.pos;
        t.classList.toggle("differs", ta[p] !== tb[p]);
      }
    }
  }

  async function differences(ma, mb, mine) {
    body.className = "body";
    const can = info() && info().can_compute;
    const ta = ma.meta.qktrace && ma.meta.qktrace.tokens, tb = mb.meta.qktrace && mb.meta.qktrace.tokens;
    if (!can || !Array.isArray(ta) || !Array.isArray(tb)) {
      clear(body).append(el("p", { class: "muted", id: "compare-note" }, !can
        ? "No model is loaded: the per-head differences need one (qktrace serve --model MODEL --saes SAES)."
        : "A graph made by another tool has no token ids to compare."));
      return;
    }
    clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }), "comparing every head…"));
    const answer = $("compare-answer").value, rival = $("compare-rival").value, q = $("compare-query").value.trim();
    const res = await API.compare({ tokens_a: ta, tokens_b: tb, query_pos: q === "" ? -1 : +q,
      answer: answer === "" ? null : answer, rival: rival === "" ? null : rival, top: 5 });
    if (mine === ticket) render(res);
  }

  function render(res) {
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
          showTerms(terms.get(`${h.layer}/${h.head}`), h, detail, tok);
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

  function showTerms(t, h, detail, tok) {
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
      t.terms.map((x) => el("tr", { class: "compare-term" }, el("td", {}, x.query_label), el("td", {}, x.key_label),
        num(x.value_a, "value_a"), num(x.value_b, "value_b"), num(x.diff, "diff")))),
    el("p", { class: "muted" }, `${t.n_terms} terms in all; the others add ${fmt(t.rest)}.`));
  }

  return { open, close, isOpen: () => !pane.hidden };
}
