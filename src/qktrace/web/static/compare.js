// The compare view: two graphs side by side (prompt A and prompt B, each with its own store and graph view,
// zoomed, panned and fitted as the main view is but never below a readable scale, the tokens that differ
// marked in both) and, with a model loaded, the heads whose attention differs most between the two prompts
// (POST /api/compare, drawn by compare-table.js). A click on a node or an edge of either graph selects it in
// that side's store and makes that side the active one: the page opens the same node, edge (head loadings)
// and QK panels as for one graph, on that side's graph and prompt (`onChange(store, changed)` hears every
// change of either side). B is a graph of the data directory (those whose tokens align with A's listed
// first, and the Compare button picks one of them) or a typed prompt: compared at once (the server traces
// it against the loaded model and SAEs), then its graph built by the server's bounded graph job and drawn.
// A pair whose tokens do not align is refused in one line before any work. Opened by the Compare button or
// by #compare=A,B in the URL (with &side=b&node=ID or &edge=S>T: that side's node or edge chosen).

import * as API from "./api.js";
import { $, clear, el, setStatus, truncate } from "./dom.js";
import { renderComparison } from "./compare-table.js";
import { hideTip, showNodeTip } from "./features.js";
import { createGraphView } from "./graphview.js";
import { keyHandler } from "./keys.js";
import { indexGraph } from "./model.js";
import { createStore, initialState } from "./state.js";

const HINT = "Pick two graphs of prompts with the same number of tokens (a minimal pair), or type prompt B, and "
  + "press Compare. A click on a node or an edge of either graph opens its panels.";
const MIN_FIT = 0.85; // the panes open at this scale or more: nodes and edges legible (text is 11 px at any scale)

const shown = (t) => JSON.stringify(t === undefined ? "(end)" : t);

/** Why the tokens `ta` of graph `a` and `tb` of graph `b` do not align, in one line; null when they do. */
export function misaligned(a, ta, b, tb) {
  if (ta.length === tb.length) return null;
  const first = ta.findIndex((t, i) => t !== tb[i]);
  const at = first < 0 ? ta.length : first;
  return `A (${a}) has ${ta.length} tokens and B (${b}) has ${tb.length}; they first differ at position ${at} `
    + `(${shown(ta[at])} vs ${shown(tb[at])}): compare needs prompts whose tokens align (a minimal pair)`;
}

/** How many positions two aligned token lists differ at. */
const differing = (ta, tb) => ta.reduce((n, t, i) => n + (t !== tb[i] ? 1 : 0), 0);

/** One side: its own store and graph view over the svg `compare-svg-<key>`. */
function createSide(key, onPick, onChange) {
  const store = createStore({ ...initialState() });
  const pick = (patch) => { onPick(key); store.set(patch); };
  const view = createGraphView($(`compare-svg-${key}`), () => store.state, {
    onNode: (n) => pick({ selNode: n, selLink: null }),
    onLink: (l) => pick({ selLink: l, selNode: null }),
    onHover: (n, e) => {
      if (n) showNodeTip(e, store.state.model, n); else hideTip();
      if (store.state.hover !== n) store.set({ hover: n });
    },
    onBackground: () => store.set({ selNode: null, selLink: null }),
    onKey: keyHandler(() => store.state.model, () => view, (n) => pick({ selNode: n, selLink: null })),
  }, { minFit: MIN_FIT });
  store.subscribe((s, changed) => {
    const any = (...keys) => keys.some((k) => changed.has(k));
    if (any("model")) view.show(s.model);
    if (s.model && any("model", "selNode", "selLink", "pinned", "prune", "weights")) view.restyle();
    if (any("model", "selNode", "selLink", "pinned", "hover")) view.drawLabels();
    onChange(store, changed);
  });
  return { key, store, view };
}

/** `info()`: GET /api/info's answer. `onOpen(a, b)` hears a comparison opened, `onEnter()` the view shown,
 * `onClose()` it closed, `onChange(store, changed)` a side's store changed. */
export function createCompareView({ info, onOpen, onEnter = () => {}, onClose, onChange = () => {} }) {
  const pane = $("compare-pane"), body = $("compare-body");
  let active = "a", ticket = 0, summaries = new Map();
  const markActive = (key) => {
    active = key;
    for (const k of ["a", "b"]) $(`compare-svg-${k}`).closest(".compare-side").classList.toggle("active", k === key);
  };
  const sides = { a: createSide("a", markActive, onChange), b: createSide("b", markActive, onChange) };

  $("compare-run").addEventListener("click", () => run($("compare-a").value, $("compare-b").value));
  $("compare-close").addEventListener("click", close);
  $("compare-a").addEventListener("change", () => fillB(null));
  $("compare-prompt-b").addEventListener("keydown", (e) => { if (e.key === "Enter") $("compare-run").click(); });

  async function list(a, b) {
    const data = await API.graphs();
    summaries = new Map(data.graphs.map((g) => [g.name, g]));
    const sel = clear($("compare-a"));
    for (const g of data.graphs) sel.append(el("option", { value: g.name, title: g.prompt }, g.name));
    if (a) sel.value = a;
    fillB(b);
  }

  /** B's list: the graphs whose tokens align with A's first (fewest differing positions first, A itself
   * last), then the others; `chosen`, else the first aligned graph but A. */
  function fillB(chosen) {
    const a = summaries.get($("compare-a").value), ta = a ? a.tokens : [];
    const aligned = [], other = [];
    for (const g of summaries.values()) (a && g.tokens.length === ta.length ? aligned : other).push(g);
    const rank = (g) => (g === a ? Infinity : differing(ta, g.tokens) || 1e6);
    aligned.sort((x, y) => rank(x) - rank(y));
    const opt = (g) => el("option", { value: g.name, title: g.prompt, "data-aligned": aligned.includes(g) ? 1 : 0 },
      `${g.name} (${g.tokens.length} tokens)`);
    clear($("compare-b")).append(
      el("optgroup", { label: a ? `aligned with A (${ta.length} tokens)` : "graphs" }, aligned.map(opt)),
      el("optgroup", { label: "not aligned with A" }, other.map(opt)));
    const pick = aligned.find((g) => g !== a);
    $("compare-b").value = chosen || (pick ? pick.name : "");
    return pick;
  }

  /** Show the view; with two graph names, compare them (then choose `chosen`: {side, node, edge}, as the URL
   * names them); with one, pick a B that aligns or say why none does. */
  async function open(a, b, chosen = null) {
    pane.hidden = false;
    $("graph-pane").hidden = true;
    onEnter();
    try {
      await list(a, b);
      if (a && b) {
        await comparePair(a, b); // the pair the URL or the caller names, whatever is typed
        if (chosen && chosen.side) select(chosen);
        return;
      }
      const g = summaries.get($("compare-a").value);
      const others = [...summaries.values()].filter((x) => x !== g).map((x) => x.tokens.length);
      body.className = "body hint";
      if (!g || !others.length || $("compare-b").value) return void clear(body).append(HINT);
      clear(body).append(el("p", { id: "compare-none" }, `No other graph aligns with A (${g.name}, ${g.tokens.length} `
        + `tokens): the others have ${[...new Set(others)].sort((x, y) => x - y).join(", ")} tokens. Type a prompt B `
        + `of ${g.tokens.length} tokens to trace one.`));
    } catch (e) { fail(e); }
  }

  function close() {
    ticket++;
    pane.hidden = true;
    $("graph-pane").hidden = false;
    hideTip();
    onClose();
  }

  function fail(e) {
    const msg = String(e.message || e);
    body.className = "body";
    clear(body).append(el("p", { class: "error", id: "compare-error" }, msg));
    setStatus(msg, { error: true });
  }

  function draw(side, name, model) {
    side.store.set({ name, model, info: info(), selNode: null, selLink: null, hover: null, pinned: new Set(), qk: null });
    $(`compare-title-${side.key}`).textContent = `${side.key.toUpperCase()}: ${name} — ${model.meta.prompt || ""}`;
    fitHeights();
  }

  /** The panes as tall as the taller graph at the least scale (up to 3/4 of the window): every row in view,
   * the rest of the view (the table) below them. */
  function fitHeights() {
    const hs = Object.values(sides).filter((s) => s.store.state.model).map((s) => s.view.size()[1] * MIN_FIT);
    const h = Math.min(Math.max(400, ...hs), Math.round(0.75 * window.innerHeight));
    for (const box of pane.querySelectorAll(".compare-scroll")) box.style.height = `${Math.ceil(h)}px`;
  }

  /** The Compare button: A against the typed prompt B, else against graph B. */
  function run(a, b) {
    const typed = $("compare-prompt-b").value.trim();
    return typed ? runTyped(a, typed) : comparePair(a, b);
  }

  async function comparePair(a, b) {
    if (!a || !b) return fail("pick graph A and graph B (or type prompt B) first");
    const mine = ++ticket;
    setStatus(`comparing ${a} and ${b}…`, { busy: true });
    try {
      const [ga, gb] = await Promise.all([API.graph(a), API.graph(b)]);
      if (mine !== ticket) return;
      const ma = indexGraph(ga.graph), mb = indexGraph(gb.graph);
      const why = misaligned(ga.name, ma.tokens, gb.name, mb.tokens);
      if (why) return fail(why);
      draw(sides.a, ga.name, ma);
      draw(sides.b, gb.name, mb);
      markDiffering(ma.tokens, mb.tokens);
      onOpen(ga.name, gb.name);
      const ta = tokenIds(ma), tb = tokenIds(mb);
      if (!ta || !tb) return note(ta ? "B" : "A");
      await differences({ tokens_a: ta, tokens_b: tb }, mine);
      if (mine === ticket) setStatus(`compared ${ga.name} and ${gb.name}`);
    } catch (e) {
      if (mine === ticket) fail(e);
    }
  }

  /** Prompt B typed: compared with graph A's tokens at once (the server traces it), then its graph built. */
  async function runTyped(a, text) {
    if (!a) return fail("pick graph A first");
    if (!(info() && info().can_compute)) {
      return fail("a typed prompt B needs a loaded model: qktrace serve --model MODEL --saes SAES");
    }
    const mine = ++ticket;
    setStatus(`tracing prompt B against ${a}…`, { busy: true });
    try {
      const ga = await API.graph(a);
      if (mine !== ticket) return;
      const ma = indexGraph(ga.graph), ta = tokenIds(ma);
      if (!ta) return fail(`${ga.name} was made by another tool: it has no token ids to compare with`);
      draw(sides.a, ga.name, ma);
      sides.b.store.set({ name: null, model: null, selNode: null, selLink: null });
      $("compare-title-b").textContent = `B: ${truncate(text, 80)} (typed; its graph follows)`;
      const res = await differences({ tokens_a: ta, prompt_b: text }, mine);
      if (!res || mine !== ticket) return;
      const same = [...summaries.values()].find((g) => g.model === res.model // B's graph is there already
        && g.tokens.join("\u0000") === res.str_tokens_b.join("\u0000"));
      const name = same ? same.name : await API.buildGraph(text, (job) => {
        if (mine === ticket) setStatus(`compared; building B's graph: ${job.stage} (${Math.round(job.elapsed_s)} s)`,
          { busy: true });
      });
      if (mine !== ticket) return;
      const gb = await API.graph(name), mb = indexGraph(gb.graph);
      if (mine !== ticket) return;
      draw(sides.b, gb.name, mb);
      markDiffering(ma.tokens, mb.tokens);
      await list(ga.name, gb.name);
      $("compare-prompt-b").value = "";
      onOpen(ga.name, gb.name);
      setStatus(`compared ${ga.name} and ${gb.name} (prompt B typed)`);
    } catch (e) {
      if (mine === ticket) fail(e);
    }
  }

  const tokenIds = (m) => (m.meta.qktrace && Array.isArray(m.meta.qktrace.tokens) ? m.meta.qktrace.tokens : null);

  function note(which) {
    body.className = "body";
    const can = info() && info().can_compute;
    clear(body).append(el("p", { class: "muted", id: "compare-note" }, !can
      ? "No model is loaded: the per-head differences need one (qktrace serve --model MODEL --saes SAES)."
      : `Graph ${which} was made by another tool: it has no token ids to compare.`));
  }

  function markDiffering(ta, tb) {
    for (const id of ["compare-svg-a", "compare-svg-b"]) {
      for (const t of $(id).querySelectorAll("text.token-label")) {
        const p = +t.dataset.pos;
        t.classList.toggle("differs", ta[p] !== tb[p]);
      }
    }
  }

  /** POST /api/compare with the toolbar's query position, answer and rival; its answer drawn (and returned). */
  async function differences(prompts, mine) {
    if (!(info() && info().can_compute)) return void note("");
    body.className = "body";
    clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }), "comparing every head…"));
    const answer = $("compare-answer").value, rival = $("compare-rival").value, q = $("compare-query").value.trim();
    const res = await API.compare({ ...prompts, query_pos: q === "" ? -1 : +q,
      answer: answer === "" ? null : answer, rival: rival === "" ? null : rival, top: 5 });
    if (mine === ticket) renderComparison(body, res, sides.a.store.state.model);
    return res;
  }

  /** Choose node `node` (else edge `edge`: {source, target}) of side `side`'s graph. */
  function select({ side, node, edge }) {
    const st = sides[side].store, m = st.state.model;
    if (!m) return;
    const n = node && m.byId.get(node);
    const l = !n && edge && m.links.find((x) => x.source === edge.source && x.target === edge.target);
    if (!n && !l) return;
    markActive(side);
    st.set({ selNode: n || null, selLink: l || null });
    if (n) sides[side].view.focusNode(n);
  }

  /** The pair shown and the node or edge chosen on the active side (for the URL). */
  function where() {
    const s = sides[active].store.state, l = s.selLink;
    return { a: sides.a.store.state.name, b: sides.b.store.state.name, side: active,
      node: s.selNode && s.selNode.id, edge: l && { source: l.source, target: l.target } };
  }

  return {
    open, close, select, where, isOpen: () => !pane.hidden,
    /** The store of the side last clicked (A until one is). */
    active: () => sides[active].store,
  };
}
