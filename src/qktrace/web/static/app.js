// qktrace's page, the entry module: wires the store to the graph view and the panels, lists and opens
// graphs, builds new ones. Native ES modules served from /static, no build step, nothing from a CDN:
//   dom (helpers)  api (the server's JSON)  state (the store)  model (a graph file, indexed)
//   layout, labels, graphview, supernodes (the drawing; supernodes ringed or collapsed)  features (tooltips,
//     dashboards)
//   node-panel, edge-panel, qk-panel, sweep-panel, group-panel  export (JSON, PNG)
//   compare, compare-table (two graphs side by side over their own stores, and the heads whose attention
//     differs; a click on either graph opens the same panels, on that side's store: `active()`)
//
//   zoom (pan, zoom, fit)  legend (node kinds)  keys (the graph by keyboard)  panels (collapsible, reveal)
//   mechanism-panel (explain an answer; a *.mechanism.json shown)  url (the view in the hash)
//
// Which graph opens: the one the URL names (#graph=NAME, or ?graph=NAME), else the first one GET /api/graphs
// lists, i.e. the first JSON file of the data directory in file-name order (then files given to `qktrace
// serve` by path). The whole view lives in the URL (url.js: pins, supernodes, prune level, the selected
// node or edge, the QK view, the mechanism), so a link or a reload reopens it; selections are history
// entries, so Back and Forward step through them. #compare=A,B opens the compare view on graphs A and B
// (the Compare button writes it, with the side and node or edge chosen there); leaving it for #graph=X
// opens X.

import * as API from "./api.js";
import { createCompareView } from "./compare.js";
import { $, clear, el, fmt, setStatus, showError, truncate } from "./dom.js";
import { exportJSON, exportPNG } from "./export.js";
import { hideTip, moveTip, refreshLabels, showNodeTip } from "./features.js";
import { createEdgePanel } from "./edge-panel.js";
import { createGraphView } from "./graphview.js";
import { createGroupPanel } from "./group-panel.js";
import { keyHandler } from "./keys.js";
import { legend } from "./legend.js";
import { createMechanismPanel } from "./mechanism-panel.js";
import { indexGraph } from "./model.js";
import { createNodePanel } from "./node-panel.js";
import { rememberHints, restoreHint, reveal } from "./panels.js";
import { createQKPanel } from "./qk-panel.js";
import { createSweepPanel } from "./sweep-panel.js";
import {
  addSupernode, clearSelection, removeSupernode, selectLink, selectNode, store, togglePin, toggleSupernode,
} from "./state.js";
import { compareHash, readUrl, setHash, viewHash } from "./url.js";

const state = () => store.state;
const openNode = (n, e) => (e && e.shiftKey ? togglePin(n.id) : selectNode(n));
/** The store the panels act on: the page's, or in the compare view the side last clicked. */
const active = () => (compareView.isOpen() ? compareView.active() : store);

const view = createGraphView($("graph-svg"), state, {
  onNode: openNode,
  onLink: selectLink,
  onHover: (n, e) => {
    if (n) showNodeTip(e, store.state.model, n); else hideTip();
    if (store.state.hover !== n) store.set({ hover: n });
  },
  onBackground: () => clearSelection(),
  onKey: keyHandler(() => store.state.model, () => view, openNode),
  onSupernode: toggleSupernode,
});
const qkPanel = createQKPanel(() => active().state, {
  onShown: (qk) => { active().set({ qk }); reveal("qk-panel"); },
});
const sweepPanel = createSweepPanel(() => active().state);
const mechPanel = createMechanismPanel(state, {
  onOpen: (name, m) => showMechanism(name, m),
  onReplay: (m, cand) => { reveal("steer-panel"); sweepPanel.replay(m, cand).then(() => reveal("steer-panel")); },
  onHighlight: (ids) => {
    const shown = view.highlight(ids);
    $("mech-body").dataset.highlighted = shown.join(",");
    setStatus(`${shown.length} of ${ids.length} of the mechanism's features are nodes of this graph (purple)`);
  },
  onDone: (name) => listGraphs().then(() => openMechanism(name, true), showError),
});
const nodePanel = createNodePanel($("node-panel").querySelector(".body"), {
  onLink: (l) => selectLink(l, active()), onPin: (n) => togglePin(n.id, active()),
  onExplain: (n) => { mechPanel.fromLogit(n); reveal("mech-panel"); $("explain-answer").focus(); },
  onSteer: (n) => { sweepPanel.steerNode(n); reveal("steer-panel"); },
});
const edgePanel = createEdgePanel($("edge-panel").querySelector(".body"), {
  onLink: (l) => selectLink(l, active()),
  onHead: (l, layer, head) => {
    edgePanel.markHead(layer, head);
    sweepPanel.prefill(l, layer, head);
    qkPanel.explainHead(l, layer, head);
  },
});
const compareView = createCompareView({
  info: () => store.state.info,
  onOpen: (a, b) => setHash(compareHash({ a, b }), false),
  onEnter: () => { nodePanel.reset(); edgePanel.reset(); resetResults(); },
  onChange: (side, changed) => {
    if (side !== compareView.active()) return;
    showPanels(side.state, changed);
    const w = compareView.where();
    if ((changed.has("selNode") || changed.has("selLink")) && w.a && w.b) setHash(compareHash(w), false);
  },
  onClose: () => {
    nodePanel.reset(); // the panels go back to the page's graph: a side's results go
    edgePanel.reset();
    resetResults();
    showPanels(store.state, new Set(["selNode", "selLink"]));
    // the URL may already name the graph to show (#compare=A,B followed by #graph=X): that one, not the first
    const want = readUrl().graph || store.state.name;
    if (want && want === store.state.name) {
      writeUrl(false, true);
      const q = store.state.qk; // the page's own QK view, as it was before compare
      if (q && store.state.info && store.state.info.can_compute) qkPanel.show(q);
    } else if (want) openGraph(want);
    else listGraphs().then((d) => d.graphs.length && openGraph(d.graphs[0].name), showError);
  },
});
rememberHints("qk-body", "steer-body");
/** The result panels that show one graph's (or one compare side's) QK terms and sweep back to their hints. */
function resetResults() { restoreHint("qk-body"); restoreHint("steer-body"); }

const groupPanel = createGroupPanel($("group-body"), {
  onNode: selectNode, onPin: (n) => togglePin(n.id), onGroup: addSupernode, onUngroup: removeSupernode,
  onToggle: toggleSupernode,
});

// Every change reaches the parts that show it.
store.subscribe((s, changed) => {
  const any = (...keys) => keys.some((k) => changed.has(k));
  if (any("model")) {
    hideTip(); // a tooltip never outlives its graph
    clear($("legend")).append(...(s.model ? legend(s.model) : []));
    view.show(s.model);
    $("graph-empty").hidden = !!s.model;
    nodePanel.reset();
    edgePanel.reset();
  }
  if (s.model && any("model", "selNode", "selLink", "pinned", "weights", "prune", "subgraph", "supernodes")) {
    edgeCount(view.restyle());
  }
  if (any("subgraph")) $("subgraph").checked = s.subgraph;
  if (any("model", "selNode", "selLink", "pinned", "hover")) view.drawLabels();
  if (any("model", "supernodes")) view.drawSupernodes();
  if (!compareView.isOpen()) showPanels(s, changed);
  if (any("model", "pinned", "supernodes")) groupPanel.show(s);
  if (any("weights")) $("weights-norm").checked = s.weights === "norm";
  if (!restoring && any("weights", "prune", "pinned", "subgraph", "supernodes", "selNode", "selLink", "qk",
    "mechanism")) {
    writeUrl(any("selNode", "selLink", "qk", "mechanism"));
  }
});

/** The node and edge panels follow the selection of the store `s` belongs to. */
function showPanels(s, changed) {
  if (changed.has("selNode") && s.selNode) { nodePanel.show(s); if (!restoring) reveal("node-panel", false); }
  else if (changed.has("pinned") || changed.has("weights")) nodePanel.refresh(s);
  if (changed.has("selLink") && s.selLink) { edgePanel.show(s); if (!restoring) reveal("edge-panel", false); }
}

function edgeCount({ shown, total, threshold }) {
  const what = store.state.weights === "norm" ? "|normalised w|" : "|w|";
  $("edge-count").textContent = `${shown} of ${total} edges (${what} ≥ ${fmt(threshold, 3)})`;
}

// -- the URL ---------------------------------------------------------------------------------------

let restoring = false; // while the page applies the URL's view, it does not write it back

/** Writes the view into the URL's hash; `push`: as a new history entry. While the compare view is open the
 * hash names its two graphs instead, unless `force`. */
function writeUrl(push, force = false) {
  const s = store.state;
  if (!s.name || (compareView.isOpen() && !force)) return;
  setHash(viewHash({ graph: s.name, weights: s.weights, prune: s.prune, pins: [...s.pinned], subgraph: s.subgraph,
    supernodes: s.supernodes, node: s.selNode && s.selNode.id, edge: s.selLink && { source: s.selLink.source, target: s.selLink.target },
    qk: s.qk, mechanism: s.mechanism }), push);
}

/** The URL's pins, prune level, selection, QK view and mechanism on the open graph. */
function applyView(v) {
  const m = store.state.model;
  if (!m) return;
  restoring = true;
  try {
    const patch = {};
    if (v.prune !== null && v.prune !== store.state.prune) { $("prune").value = v.prune; patch.prune = v.prune; }
    if (v.pins.length) patch.pinned = new Set(v.pins.filter((id) => m.byId.has(id)));
    if (v.subgraph !== store.state.subgraph) patch.subgraph = v.subgraph;
    const groups = v.supernodes && v.supernodes.map((s) => ({ ...s, ids: s.ids.filter((id) => m.byId.has(id)) }));
    if (groups && JSON.stringify(groups) !== JSON.stringify(store.state.supernodes)) patch.supernodes = groups;
    const node = (v.node && m.byId.get(v.node)) || null;
    const link = (!node && v.edge && m.links.find((l) => l.source === v.edge.source && l.target === v.edge.target))
      || null;
    if (node !== store.state.selNode || link !== store.state.selLink) Object.assign(patch, { selNode: node, selLink: link });
    store.set(patch);
    if (node) view.focusNode(node);
    const q = v.qk, had = store.state.qk;
    if (q && !(had && ["layer", "head", "query", "key", "rival"].every((k) => (had[k] ?? null) === (q[k] ?? null)))
      && store.state.info && store.state.info.can_compute) qkPanel.show(q);
    if (v.mechanism && v.mechanism !== store.state.mechanism) openMechanism(v.mechanism, false);
  } finally { restoring = false; }
  $("prune-value").textContent = `${$("prune").value}%`;
}

async function followUrl() {
  const v = readUrl();
  if (v.weights !== store.state.weights) store.set({ weights: v.weights });
  if (v.compare) return void compareView.open(...v.compare, v);
  if (compareView.isOpen()) compareView.close(); // its onClose opens the graph the URL names
  if (v.graph && v.graph !== store.state.name) await openGraph(v.graph);
  if (store.state.name === (v.graph || store.state.name)) applyView(v);
}

// -- graphs ----------------------------------------------------------------------------------------

async function listGraphs() {
  const data = await API.graphs();
  const sel = clear($("graph-select"));
  sel.append(el("option", { value: "" }, data.graphs.length ? "(choose a graph)" : "(no graphs yet)"));
  for (const g of data.graphs) {
    sel.append(el("option", { value: g.name, title: `${g.prompt} — ${g.n_nodes} nodes, ${g.n_links} links` },
      `${g.name} — ${truncate(g.prompt, 40)}${g.origin && g.origin !== "qktrace" ? ` (${g.origin})` : ""}`));
  }
  if (data.mechanisms && data.mechanisms.length) {
    sel.append(el("optgroup", { label: "explained answers (mechanisms)" }, data.mechanisms.map((m) =>
      el("option", { value: `mechanism:${m.name}`, title: `${m.prompt} → ${JSON.stringify(m.answer)}` },
        `${m.name} — ${truncate(JSON.stringify(m.answer), 16)} rather than ${truncate(JSON.stringify(m.rival), 16)}`))));
  }
  graphNames = new Set(data.graphs.map((g) => g.name));
  for (const bad of data.invalid) {
    sel.append(el("option", { value: "", disabled: true, title: bad.error }, `${bad.name} (not a graph)`));
  }
  sel.value = store.state.name || "";
  return data;
}

let opening = 0; // only the latest request opens its graph
let graphNames = new Set(); // the graphs listed

/** Show a mechanism file (in the explain panel), on its graph when the data directory has it. */
function openMechanism(name, push) {
  if (push) store.set({ mechanism: name });
  reveal("mech-panel");
  return mechPanel.open(name);
}

async function showMechanism(name, m) {
  const graph = name.replace(/\.mechanism\.json$/, ".graph.json");
  const ours = store.state.model && store.state.model.meta.qktrace;
  const same = ours && ours.prompt === m.prompt;
  if (!same && graphNames.has(graph) && graph !== store.state.name) await openGraph(graph, { keep: true });
  restoring = true;
  store.set({ mechanism: name });
  restoring = false;
  writeUrl(false);
  $("graph-select").value = `mechanism:${name}`;
  const cur = mechPanel.current();
  if (cur && cur.m.best !== null) $("mech-highlight").click();
}

async function openGraph(name, { push = false, keep = false } = {}) {
  const ticket = ++opening;
  setStatus(`loading ${name}…`, { busy: true });
  try {
    const data = await API.graph(name);
    if (ticket !== opening) return;
    const model = indexGraph(data.graph);
    restoring = true;
    store.set({ name: data.name, model, selNode: null, selLink: null, hover: null, pinned: new Set(model.pinned),
      supernodes: model.supernodes, qk: null, mechanism: keep ? store.state.mechanism : null });
    restoring = false;
    $("graph-select").value = data.name;
    graphInfo(model);
    writeUrl(push);
    setStatus(`opened ${data.name}`);
    refreshLabels(model, () => view.drawLabels());
  } catch (e) {
    if (ticket === opening) showError(e);
  }
}

function graphInfo(model) {
  const meta = model.meta, ours = meta.qktrace || {}, loaded = store.state.info && store.state.info.model;
  const info = $("graph-info"), name = String(ours.model || meta.scan || "?");
  info.title = `${meta.prompt || ""}\nmodel ${name}`;
  $("prompt-line").textContent = meta.prompt || "";
  info.textContent = `${model.nodes.length} nodes · model ${name.split("/").filter(Boolean).pop()}`
    + (model.foreign ? ` · made by ${model.maker}: no head loadings`
      : ` · completeness ${fmt(ours.completeness, 3)} · replacement ${fmt(ours.replacement, 3)}`);
  const mismatch = loaded && ours.model && loaded !== ours.model;
  info.className = mismatch ? "warn" : "";
  if (mismatch) info.textContent += ` (the loaded model is ${loaded})`;
}

async function buildGraph(prompt) {
  try {
    const name = await API.buildGraph(prompt,
      (job) => setStatus(`building: ${job.stage} (${Math.round(job.elapsed_s)} s)`, { busy: true }));
    await listGraphs();
    await openGraph(name, { push: true });
  } catch (e) { showError(e); }
}

// -- start-up --------------------------------------------------------------------------------------

function wire() {
  const prune = $("prune"), pruned = () => {
    $("prune-value").textContent = `${prune.value}%`;
    store.set({ prune: +prune.value });
  };
  prune.addEventListener("input", pruned);
  pruned(); // a reload may have restored the slider
  $("weights-norm").addEventListener("change", (e) => store.set({ weights: e.target.checked ? "norm" : "raw" }));
  $("subgraph").addEventListener("change", (e) => store.set({ subgraph: e.target.checked }));
  let resize = null;
  window.addEventListener("resize", () => { clearTimeout(resize); resize = setTimeout(view.fit, 100); });
  window.addEventListener("hashchange", followUrl);
  window.addEventListener("popstate", followUrl);
  $("graph-svg").addEventListener("mousemove", (e) => { if (!$("tooltip").hidden) moveTip(e); });
  $("graph-select").addEventListener("change", (e) => {
    const v = e.target.value;
    if (v.startsWith("mechanism:")) openMechanism(v.slice(10), true);
    else if (v) openGraph(v, { push: true });
  });
  $("zoom-in").addEventListener("click", () => view.zoom.zoomBy(1.4));
  $("zoom-out").addEventListener("click", () => view.zoom.zoomBy(1 / 1.4));
  $("zoom-fit").addEventListener("click", () => view.fit());
  $("refresh-graphs").addEventListener("click", () => listGraphs().catch(showError));
  $("compare-open").addEventListener("click", () => compareView.open(store.state.name, null));
  $("export-json").addEventListener("click", () => {
    if (!store.state.model) return showError("open a graph first");
    const bytes = exportJSON(store.state);
    setStatus(`saved ${store.state.name} (${Math.round(bytes / 1024)} kB)`);
  });
  $("export-png").addEventListener("click", () => {
    if (!store.state.model) return showError("open a graph first");
    exportPNG(view, store.state.name).then((r) => {
      setStatus(`saved ${r.name} (${r.width}×${r.height})`);
      $("export-png").dataset.lastLength = String(r.length);
    }, showError);
  });
  $("build-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("prompt-input").value.trim();
    if (prompt) buildGraph(prompt); else showError("type a prompt first");
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { clearSelection(active()); hideTip(); }
  });
}

async function start() {
  wire();
  try {
    const info = await API.info();
    store.set({ info, weights: readUrl().weights });
    sweepPanel.setDefaults(info.defaults.sweep);
    $("model-info").textContent = info.model ? `loaded: ${info.model.split("/").filter(Boolean).pop()} `
      + `(${info.n_layers} layers × ${info.n_heads} heads)` : "no model loaded: viewing only";
    $("model-info").title = info.model || "";
    for (const id of ["build-btn", "qk-run", "steer-run", "prompt-input", "explain-run"]) {
      $(id).disabled = !info.can_compute;
    }
    const list = await listGraphs();
    const first = list.graphs.length ? list.graphs[0].name : null;
    const v = readUrl();
    if (v.compare) await compareView.open(...v.compare, v);
    else if (v.graph || first) {
      await openGraph(v.graph || first);
      applyView(v);
    } else if (v.mechanism) openMechanism(v.mechanism, true);
    else setStatus("no graphs in the data directory yet");
  } catch (e) { showError(e); }
}

start();
