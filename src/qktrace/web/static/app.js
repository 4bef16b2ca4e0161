// qktrace's page, the entry module: wires the store to the graph view and the panels, lists and opens
// graphs, builds new ones. Native ES modules served from /static, no build step, nothing from a CDN:
//   dom (helpers)  api (the server's JSON)  state (the store)  model (a graph file, indexed)
//   layout, labels, graphview (the drawing)  features (tooltips, dashboards)
//   node-panel, edge-panel, qk-panel, sweep-panel, group-panel  export (JSON, PNG)
//   compare (two graphs side by side and the heads whose attention differs, over their own stores)
//
// Which graph opens: the one the URL names (#graph=NAME, or ?graph=NAME), else the first one GET /api/graphs
// lists, i.e. the first JSON file of the data directory in file-name order (then files given to `qktrace
// serve` by path). Opening a graph writes #graph=NAME into the URL, so a reload comes back to it;
// &weights=norm there shows edge weights normalised per target. #compare=A,B opens the compare view on graphs
// A and B (the Compare button writes it).

import * as API from "./api.js";
import { createCompareView } from "./compare.js";
import { $, clear, el, fmt, setStatus, showError, truncate } from "./dom.js";
import { exportJSON, exportPNG } from "./export.js";
import { hideTip, moveTip, refreshLabels, showNodeTip } from "./features.js";
import { createEdgePanel } from "./edge-panel.js";
import { createGraphView } from "./graphview.js";
import { createGroupPanel } from "./group-panel.js";
import { indexGraph } from "./model.js";
import { createNodePanel } from "./node-panel.js";
import { createQKPanel } from "./qk-panel.js";
import { createSweepPanel } from "./sweep-panel.js";
import {
  addSupernode, clearSelection, removeSupernode, selectLink, selectNode, store, togglePin,
} from "./state.js";

const state = () => store.state;

const view = createGraphView($("graph-svg"), state, {
  onNode: (n, e) => (e && e.shiftKey ? togglePin(n.id) : selectNode(n)),
  onLink: selectLink,
  onHover: (n, e) => {
    if (n) showNodeTip(e, store.state.model, n); else hideTip();
    if (store.state.hover !== n) store.set({ hover: n });
  },
  onBackground: clearSelection,
});
const qkPanel = createQKPanel(state);
const sweepPanel = createSweepPanel(state);
const nodePanel = createNodePanel($("node-panel").querySelector(".body"), {
  onLink: selectLink, onPin: (n) => togglePin(n.id),
});
const edgePanel = createEdgePanel($("edge-panel").querySelector(".body"), {
  onHead: (l, layer, head) => {
    edgePanel.markHead(layer, head);
    sweepPanel.prefill(l, layer, head);
    qkPanel.explainHead(l, layer, head);
  },
});
const compareView = createCompareView({
  info: () => store.state.info,
  onOpen: (a, b) => setHash(new URLSearchParams({ compare: `${a},${b}` }), false),
  onClose: () => {
    if (store.state.name) writeUrl(false, true);
    else listGraphs().then((d) => d.graphs.length && openGraph(d.graphs[0].name), showError);
  },
});
const groupPanel = createGroupPanel($("group-body"), {
  onNode: selectNode, onPin: (n) => togglePin(n.id), onGroup: addSupernode, onUngroup: removeSupernode,
});

// Every change reaches the parts that show it.
store.subscribe((s, changed) => {
  const any = (...keys) => keys.some((k) => changed.has(k));
  if (any("model")) {
    view.show(s.model);
    $("graph-empty").hidden = !!s.model;
    nodePanel.reset();
    edgePanel.reset();
  }
  if (s.model && any("model", "selNode", "selLink", "pinned", "weights", "prune")) edgeCount(view.restyle());
  if (any("model", "selNode", "selLink", "pinned", "hover")) view.drawLabels();
  if (any("model", "supernodes")) view.drawSupernodes();
  if (changed.has("selNode") && s.selNode) nodePanel.show(s);
  else if (any("pinned", "weights")) nodePanel.refresh(s);
  if (changed.has("selLink") && s.selLink) edgePanel.show(s);
  if (any("model", "pinned", "supernodes")) groupPanel.show(s);
  if (any("weights")) {
    $("weights-norm").checked = s.weights === "norm";
    writeUrl(false);
  }
});

function edgeCount({ shown, total, threshold }) {
  const what = store.state.weights === "norm" ? "|normalised w|" : "|w|";
  $("edge-count").textContent = `${shown} of ${total} edges (${what} ≥ ${fmt(threshold, 3)})`;
}

// -- the URL ---------------------------------------------------------------------------------------

function readUrl() {
  const hash = new URLSearchParams(location.hash.slice(1)), query = new URLSearchParams(location.search);
  const pair = (hash.get("compare") || "").split(",").filter(Boolean);
  return { graph: hash.get("graph") || query.get("graph"), weights: hash.get("weights") === "norm" ? "norm" : "raw",
    compare: pair.length === 2 ? pair : null };
}

function setHash(params, push) {
  const url = `${location.pathname}#${params}`;
  if (url === `${location.pathname}${location.hash}`) return;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

/** Writes the open graph (and the weights shown) into the URL's hash; `push`: as a new history entry.
 * While the compare view is open the hash names its two graphs instead, unless `force`. */
function writeUrl(push, force = false) {
  const { name, weights } = store.state;
  if (!name || (compareView.isOpen() && !force)) return;
  const params = new URLSearchParams({ graph: name });
  if (weights === "norm") params.set("weights", "norm");
  setHash(params, push);
}

function followUrl() {
  const { graph, weights, compare } = readUrl();
  if (weights !== store.state.weights) store.set({ weights });
  if (compare) return void compareView.open(...compare);
  if (compareView.isOpen()) compareView.close();
  if (graph && graph !== store.state.name) openGraph(graph);
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
  for (const bad of data.invalid) {
    sel.append(el("option", { value: "", disabled: true, title: bad.error }, `${bad.name} (not a graph)`));
  }
  sel.value = store.state.name || "";
  return data;
}

let opening = 0; // only the latest request opens its graph

async function openGraph(name, { push = false } = {}) {
  const ticket = ++opening;
  setStatus(`loading ${name}…`, { busy: true });
  try {
    const data = await API.graph(name);
    if (ticket !== opening) return;
    const model = indexGraph(data.graph);
    store.set({ name: data.name, model, selNode: null, selLink: null, hover: null, pinned: new Set(model.pinned),
      supernodes: model.supernodes });
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
  const info = $("graph-info");
  info.textContent = `${meta.prompt || ""} · ${model.nodes.length} nodes · model ${ours.model || meta.scan || "?"}`
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
  let resize = null;
  window.addEventListener("resize", () => { clearTimeout(resize); resize = setTimeout(view.fit, 100); });
  window.addEventListener("hashchange", followUrl);
  window.addEventListener("popstate", followUrl);
  $("graph-svg").addEventListener("mousemove", (e) => { if (!$("tooltip").hidden) moveTip(e); });
  $("graph-select").addEventListener("change", (e) => { if (e.target.value) openGraph(e.target.value, { push: true }); });
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
    if (e.key === "Escape") { clearSelection(); hideTip(); }
  });
}

async function start() {
  wire();
  try {
    const info = await API.info();
    store.set({ info, weights: readUrl().weights });
    sweepPanel.setDefaults(info.defaults.sweep);
    $("model-info").textContent = info.model ? `model ${info.model} (${info.n_layers} layers × ${info.n_heads} heads)`
      : "no model loaded: viewing only";
    for (const id of ["build-btn", "qk-run", "steer-run", "prompt-input"]) $(id).disabled = !info.can_compute;
    const list = await listGraphs();
    const first = list.graphs.length ? list.graphs[0].name : null;
    const { graph, compare } = readUrl();
    if (compare) await compareView.open(...compare);
    else if (graph || first) await openGraph(graph || first);
    else setStatus("no graphs in the data directory yet");
  } catch (e) { showError(e); }
}

start();
