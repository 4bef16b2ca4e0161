// qktrace web UI: graph view, node and edge details, head loadings, QK attribution, steering, export.
// Vanilla JS + SVG, nothing from a CDN. It talks only to this server's /api (versioned JSON; the
// contract is qktrace/server/schemas.py). Sections: helpers, API, graph model, layout and drawing,
// node panel, edge panel, QK panel, steering panel, pins and supernodes, tooltips, export, start-up.
"use strict";

(() => {
  const API_VERSION = 1;
  const SVGNS = "http://www.w3.org/2000/svg";
  const C = {
    pos: "#2563eb", neg: "#dc2626", accent: "#d97706", rival: "#f59e0b", muted: "#6b7280", line: "#e5e7eb",
    feature: "#fcd34d", token: "#cbd5e1", logit: "#86efac", other: "#e5e7eb", sel: "#111827", group: "#7c3aed",
  };
  const FONT = "system-ui, DejaVu Sans, sans-serif";

  // ---------------------------------------------------------------- helpers
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }

  function sv(tag, attrs = {}, ...kids) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    }
    for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }

  const clear = (node) => { while (node.firstChild) node.removeChild(node.firstChild); return node; };

  function fmt(x, digits = 4) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e5 || a < 1e-3 ? x.toExponential(digits - 1) : Number(x.toPrecision(digits)).toString();
  }

  // A number cell: formatted text, the exact value in data-value, coloured by sign.
  const num = (x, field, digits = 4) =>
    el("td", { class: `num ${x > 0 ? "pos" : x < 0 ? "neg" : ""}`, "data-field": field, "data-value": x }, fmt(x, digits));

  const tokText = (i) => (state.tokens[i] === undefined ? "?" : JSON.stringify(state.tokens[i]));

  function setStatus(msg, busy = false, isError = false) {
    const s = clear($("status"));
    s.className = isError ? "error" : "";
    if (busy) s.append(el("span", { class: "spinner" }));
    s.append(msg);
  }

  const errorBox = (target, err) => clear(target).append(el("p", { class: "error" }, String(err.message || err)));

  // ---------------------------------------------------------------- API
  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    let res;
    try { res = await fetch(path, opts); } catch (e) { throw new Error(`the server is not reachable (${e.message})`); }
    let data;
    try { data = await res.json(); } catch { throw new Error(`${path}: HTTP ${res.status}, not JSON`); }
    if (!res.ok) throw new Error(data.error || `${path}: HTTP ${res.status}`);
    if (data.version !== API_VERSION) {
      throw new Error(`the server speaks API version ${data.version}; this page reads ${API_VERSION}: reload it`);
    }
    return data;
  }

  // ---------------------------------------------------------------- graph model
  const state = {
    info: null, name: null, graph: null, tokens: [], nodes: [], byId: new Map(), links: [], nLayers: 0,
    absSorted: [], threshold: 0, selNode: null, selLink: null, selHead: null,
    pinned: new Set(), supernodes: [], features: new Map(), edgeEls: [], nodeEls: new Map(),
  };

  const ID = /^([a-z_]+)\/c(\d+)\/p(\d+)(?:\/([ft])(\d+))?$/;
  function parseId(id) {
    const m = ID.exec(id);
    if (!m) return { kind: "unknown", cp: 0, pos: 0, index: -1 };
    return { kind: m[1], cp: +m[2], pos: +m[3], index: m[5] === undefined ? -1 : +m[5] };
  }

  function indexGraph(graph) {
    const meta = graph.metadata || {};
    state.graph = graph;
    state.tokens = meta.prompt_tokens || [];
    state.nLayers = (meta.qktrace && meta.qktrace.n_layers) || 0;
    state.nodes = (graph.nodes || []).map((n) => ({ ...n, id: n.node_id, p: parseId(n.node_id), ins: [], outs: [] }));
    state.byId = new Map(state.nodes.map((n) => [n.id, n]));
    state.links = [];
    for (const l of graph.links || []) {
      const s = state.byId.get(l.source), t = state.byId.get(l.target);
      if (!s || !t) continue;
      const link = { ...l, i: state.links.length, s, t, abs: Math.abs(l.weight) };
      state.links.push(link);
      s.outs.push(link);
      t.ins.push(link);
    }
    for (const n of state.nodes) for (const list of [n.ins, n.outs]) list.sort((a, b) => b.abs - a.abs);
    state.absSorted = state.links.map((l) => l.abs).sort((a, b) => a - b);
    const q = graph.qParams || {};
    const pins = Array.isArray(q.pinnedIds) ? q.pinnedIds : String(q.pinnedIds || "").split(",").filter(Boolean);
    state.pinned = new Set(pins.filter((id) => state.byId.has(id)));
    state.supernodes = (q.supernodes || []).filter((s) => Array.isArray(s) && s.length > 1)
      .map(([name, ...ids]) => ({ name: String(name), ids: ids.filter((id) => state.byId.has(id)) }));
    state.selNode = state.selLink = state.selHead = null;
  }

  const isCross = (link) => link.s.p.pos !== link.t.p.pos;
  const nodeLabel = (n) => n.clerp || n.id;
  const nodeWhere = (n) => `@${n.p.pos} ${tokText(n.p.pos)}`;

  // rows: tokens at the bottom, then checkpoints 0..L, then logits at the top
  function rowOf(n) {
    if (n.p.kind === "token") return 0;
    if (n.p.kind === "logit") return state.nLayers + 2;
    return n.p.cp + 1;
  }
  const rowName = (r) => (r === 0 ? "tokens" : r === state.nLayers + 2 ? "logits" : `c${r - 1}`);
  const KIND_ORDER = { feature: 0, logit: 0, token: 0, error: 1, sae_bias: 2, attn_bias: 3, mlp_bias: 4 };

  // ---------------------------------------------------------------- layout and drawing
  const L = { rowH: 72, gap: 13, lineGap: 13, minCol: 66, left: 58, top: 26, bottom: 64, maxLines: 4 };

  function layout() {
    const nRows = state.nLayers + 3;
    const cells = new Map();
    for (const n of state.nodes) {
      const key = `${rowOf(n)}:${n.p.pos}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const nPos = Math.max(state.tokens.length, ...state.nodes.map((n) => n.p.pos + 1), 1);
    const perLine = new Map();
    const colW = new Array(nPos).fill(L.minCol);
    for (const [key, list] of cells) {
      list.sort((a, b) => (KIND_ORDER[a.p.kind] ?? 9) - (KIND_ORDER[b.p.kind] ?? 9)
        || Math.abs(b.raw_influence || 0) - Math.abs(a.raw_influence || 0) || a.id.localeCompare(b.id));
      const per = Math.max(Math.min(list.length, 8), Math.ceil(list.length / L.maxLines));
      perLine.set(key, per);
      const pos = +key.split(":")[1];
      colW[pos] = Math.max(colW[pos], per * L.gap + 18);
    }
    const colX = [];
    let x = L.left;
    for (let p = 0; p < nPos; p++) { colX.push(x); x += colW[p]; }
    for (const [key, list] of cells) {
      const [row, pos] = key.split(":").map(Number);
      const per = perLine.get(key);
      const lines = Math.ceil(list.length / per);
      const yMid = L.top + (nRows - 1 - row) * L.rowH + L.rowH / 2;
      list.forEach((n, i) => {
        const line = Math.floor(i / per), j = i % per;
        const inLine = Math.min(per, list.length - line * per);
        n.x = colX[pos] + colW[pos] / 2 + (j - (inLine - 1) / 2) * L.gap;
        n.y = yMid + (line - (lines - 1) / 2) * L.lineGap;
      });
    }
    return { nRows, nPos, colX, colW, width: x + 90, height: L.top + nRows * L.rowH + L.bottom };
  }

  function drawGraph() {
    const root = clear($("graph-svg"));
    $("graph-empty").hidden = !!state.graph;
    if (!state.graph) return;
    const lay = layout();
    state.size = [lay.width, lay.height];
    fitGraph();
    root.setAttribute("viewBox", `0 0 ${lay.width} ${lay.height}`);
    root.append(sv("rect", { x: 0, y: 0, width: lay.width, height: lay.height, fill: "#ffffff" }));
    const grid = sv("g", { class: "grid", "font-family": FONT, "font-size": 11, fill: C.muted });
    for (let r = 0; r < lay.nRows; r++) {
      const y = L.top + (lay.nRows - 1 - r) * L.rowH;
      grid.append(sv("line", { x1: L.left, x2: lay.width - 8, y1: y + L.rowH, y2: y + L.rowH, stroke: C.line }));
      grid.append(sv("text", { x: 6, y: y + L.rowH / 2 + 4 }, rowName(r)));
    }
    const base = L.top + lay.nRows * L.rowH;
    for (let p = 0; p < lay.nPos; p++) {
      const cx = lay.colX[p] + lay.colW[p] / 2;
      grid.append(sv("line", { x1: lay.colX[p], x2: lay.colX[p], y1: L.top, y2: base, stroke: "#f3f4f6" }));
      const tok = state.tokens[p] === undefined ? "" : state.tokens[p];
      const shown = tok.length > 12 ? `${tok.slice(0, 11)}…` : tok;
      grid.append(sv("text", { x: cx, y: base + 16, "text-anchor": "middle", fill: C.sel, "font-size": 12,
        class: "token-label", "data-pos": p }, shown));
      grid.append(sv("text", { x: cx, y: base + 30, "text-anchor": "middle" }, String(p)));
    }
    root.append(grid);
    const maxAbs = Math.max(1e-30, ...state.links.map((l) => l.abs));
    const edges = sv("g", { class: "edges" });
    state.edgeEls = state.links.map((l) => {
      const width = 0.6 + 4.4 * Math.sqrt(l.abs / maxAbs);
      const color = l.weight >= 0 ? C.pos : C.neg;
      const attrs = { x1: l.s.x, y1: l.s.y, x2: l.t.x, y2: l.t.y };
      const g = sv("g", { class: "edge", "data-i": l.i, "data-source": l.source, "data-target": l.target,
        "data-cross": isCross(l) ? 1 : 0, onclick: (e) => { e.stopPropagation(); selectLink(l); } },
      sv("line", { ...attrs, class: "vis", stroke: color, "stroke-width": width.toFixed(2), "stroke-opacity": 0.5,
        "stroke-linecap": "round" }),
      sv("line", { ...attrs, class: "hit", stroke: "#000", "stroke-opacity": 0, "stroke-width": 9 }),
      sv("title", {}, `${nodeLabel(l.s)} → ${nodeLabel(l.t)}: ${fmt(l.weight)}`));
      edges.append(g);
      return g;
    });
    root.append(edges);
    root.append(sv("g", { class: "supernodes" }));
    const nodes = sv("g", { class: "nodes", "font-family": FONT, "font-size": 10 });
    state.nodeEls = new Map();
    for (const n of state.nodes) {
      const g = sv("g", { class: "node", "data-id": n.id, "data-kind": n.p.kind, transform: `translate(${n.x},${n.y})`,
        onclick: (e) => { e.stopPropagation(); if (e.shiftKey) togglePin(n); else selectNode(n); },
        onmouseenter: (e) => showNodeTip(e, n), onmousemove: moveTip, onmouseleave: hideTip });
      const k = n.p.kind;
      if (k === "feature") g.append(sv("circle", { r: 5, fill: C.feature, stroke: "#92400e", "stroke-width": 0.8 }));
      else if (k === "token" || k === "logit") {
        g.append(sv("rect", { x: -6, y: -4.5, width: 12, height: 9, rx: 2, fill: k === "token" ? C.token : C.logit,
          stroke: "#334155", "stroke-width": 0.8 }));
      } else g.append(sv("rect", { x: -4, y: -4, width: 8, height: 8, fill: C.other, stroke: "#64748b", "stroke-width": 0.8 }));
      g.append(sv("circle", { class: "ring", r: 8.5, fill: "none", stroke: C.sel, "stroke-width": 1.6, opacity: 0 }));
      g.append(sv("text", { class: "label", x: 9, y: -7, fill: C.sel, display: "none" }, shortLabel(n)));
      nodes.append(g);
      state.nodeEls.set(n.id, g);
    }
    root.append(nodes);
    applyPrune();
    drawSupernodes();
  }

  // The graph is scaled to fit the pane (between 0.6x and 2x); larger ones scroll.
  function fitGraph() {
    if (!state.size) return;
    const [w, h] = state.size, pane = $("graph-scroll");
    const fit = Math.max(0.6, Math.min(2, (pane.clientWidth - 8) / w, (pane.clientHeight - 8) / h));
    $("graph-svg").setAttribute("width", Math.floor(w * fit));
    $("graph-svg").setAttribute("height", Math.floor(h * fit));
  }

  const shortLabel = (n) => { const s = nodeLabel(n); return s.length > 28 ? `${s.slice(0, 27)}…` : s; };

  function quantile(sorted, q) {
    if (!sorted.length) return 0;
    const i = Math.min(sorted.length - 1, Math.max(0, Math.floor(q * sorted.length)));
    return q <= 0 ? 0 : sorted[i];
  }

  // Which edges show (pruning), how strongly (selection), and which nodes wear rings and labels.
  function applyPrune() {
    const q = +$("prune").value / 100;
    $("prune-value").textContent = `${Math.round(q * 100)}%`;
    state.threshold = quantile(state.absSorted, q);
    let shown = 0;
    const sel = state.selNode, link = state.selLink;
    for (const l of state.links) {
      const g = state.edgeEls[l.i];
      if (!g) continue;
      const on = l.abs >= state.threshold || l === link || (sel && (l.s === sel || l.t === sel));
      g.setAttribute("display", on ? "inline" : "none");
      shown += on ? 1 : 0;
      const touches = sel && (l.s === sel || l.t === sel);
      const vis = g.firstChild;
      const opacity = l === link ? 0.95 : sel ? (touches ? 0.85 : 0.07) : link ? 0.15 : 0.5;
      vis.setAttribute("stroke-opacity", opacity);
      vis.setAttribute("stroke-dasharray", l === link ? "6 3" : "none");
    }
    $("edge-count").textContent = `${shown} of ${state.links.length} edges (|w| ≥ ${fmt(state.threshold, 3)})`;
    for (const [id, g] of state.nodeEls) {
      const n = state.byId.get(id);
      const pinned = state.pinned.has(id), chosen = n === sel || (link && (n === link.s || n === link.t));
      g.querySelector(".ring").setAttribute("opacity", pinned || chosen ? 1 : 0);
      g.querySelector(".ring").setAttribute("stroke", chosen ? C.accent : C.sel);
      g.querySelector(".label").setAttribute("display", pinned || chosen ? "inline" : "none");
    }
  }

  // ---------------------------------------------------------------- node panel
  function linkRow(l, other) {
    return el("tr", { class: "clickable", "data-link": l.i, onclick: () => selectLink(l) },
      num(l.weight, "weight", 3),
      el("td", {}, el("span", { class: other.p.kind === "feature" ? "comp" : "", "data-component": other.id },
        nodeLabel(other)), " ", el("span", { class: "muted" }, nodeWhere(other))));
  }

  function selectNode(n) {
    state.selNode = n;
    state.selLink = null;
    applyPrune();
    const body = clear($("node-panel").querySelector(".body"));
    body.className = "body";
    const pin = el("button", { type: "button", id: "pin-btn", onclick: () => togglePin(n) },
      state.pinned.has(n.id) ? "Unpin" : "Pin");
    body.append(el("h3", {}, nodeLabel(n)), el("dl", { class: "kv" },
      el("dt", {}, "id"), el("dd", {}, n.id),
      el("dt", {}, "position"), el("dd", {}, nodeWhere(n)),
      el("dt", {}, "activation"), el("dd", {}, fmt(n.activation)),
      el("dt", {}, "influence"), el("dd", {}, `${fmt(n.raw_influence)} (cumulative ${fmt(n.influence, 3)})`)),
    el("div", { class: "btnrow" }, pin));
    const table = (title, links, end) => {
      if (!links.length) return el("p", { class: "muted" }, `no ${title.toLowerCase()}`);
      return [el("h4", {}, `${title} (${links.length})`), el("table", { class: "links" },
        el("tr", {}, el("th", { class: "num" }, "weight"), el("th", {}, end)),
        links.slice(0, 12).map((l) => linkRow(l, end === "from" ? l.s : l.t)))];
    };
    body.append(...[table("Strongest inputs", n.ins, "from"), table("Strongest outputs", n.outs, "to")].flat());
    attachTips(body);
  }

  // ---------------------------------------------------------------- edge panel
  function selectLink(l) {
    state.selLink = l;
    state.selNode = null;
    applyPrune();
    const body = clear($("edge-panel").querySelector(".body"));
    body.className = "body";
    body.append(el("h3", {}, el("span", { class: "comp", "data-component": l.s.id }, nodeLabel(l.s)), " → ",
      el("span", { class: "comp", "data-component": l.t.id }, nodeLabel(l.t))),
    el("dl", { class: "kv" },
      el("dt", {}, "weight"), el("dd", { id: "edge-weight", "data-value": l.weight }, fmt(l.weight)),
      el("dt", {}, "from"), el("dd", {}, `${l.s.id} ${nodeWhere(l.s)}`),
      el("dt", {}, "to"), el("dd", {}, `${l.t.id} ${nodeWhere(l.t)}`),
      el("dt", {}, "kind"), el("dd", {}, isCross(l) ? "cross-position (carried by attention)" : "same position")));
    const loads = l.head_loadings || [];
    if (!loads.length) {
      body.append(el("p", { class: "muted" }, "This edge does not cross an attention layer: no head loadings."));
      return attachTips(body);
    }
    body.append(el("h4", {}, `Head loadings in layer ${loads[0].layer}: direct and via the MLP (click a head)`));
    body.append(headChart(l, loads));
    const rows = loads.map((h) => el("tr", { class: "clickable head-row", "data-layer": h.layer, "data-head": h.head,
      onclick: () => selectHead(l, h.layer, h.head) },
    el("td", {}, el("button", { type: "button", class: "head-btn", "data-layer": h.layer, "data-head": h.head },
      `L${h.layer}H${h.head}`)),
    num(h.direct, "direct"), num(h.via_mlp, "via_mlp"), num(h.direct + h.via_mlp, "total")));
    body.append(el("table", { id: "head-table" }, el("tr", {}, el("th", {}, "head"), el("th", { class: "num" }, "direct"),
      el("th", { class: "num" }, "via MLP"), el("th", { class: "num" }, "total")), rows));
    attachTips(body);
  }

  function headChart(l, loads) {
    const rowH = 22, labelW = 56, w = 500, plotW = w - labelW - 70;
    const vals = loads.flatMap((h) => [h.direct, h.via_mlp, h.direct + h.via_mlp]);
    const lo = Math.min(0, ...vals), hi = Math.max(0, ...vals), span = hi - lo || 1;
    const X = (v) => labelW + ((v - lo) / span) * plotW;
    const svgEl = sv("svg", { class: "chart", id: "head-chart", width: w, height: loads.length * rowH + 26,
      "font-family": FONT, "font-size": 11 });
    loads.forEach((h, i) => {
      const y = 4 + i * rowH;
      const g = sv("g", { class: "head-bar", "data-layer": h.layer, "data-head": h.head, cursor: "pointer",
        onclick: () => selectHead(l, h.layer, h.head) },
      sv("rect", { x: 0, y, width: w, height: rowH - 2, fill: "#fff", "fill-opacity": 0 }),
      sv("text", { x: 2, y: y + 14, fill: C.sel }, `L${h.layer}H${h.head}`));
      const bar = (v, dy, color) => sv("rect", { x: Math.min(X(0), X(v)), y: y + dy, height: 8,
        width: Math.max(1, Math.abs(X(v) - X(0))), fill: color });
      g.append(bar(h.direct, 1, h.direct >= 0 ? C.pos : C.neg), bar(h.via_mlp, 10, h.via_mlp >= 0 ? "#93c5fd" : "#fca5a5"));
      g.append(sv("text", { x: labelW + plotW + 6, y: y + 14, fill: C.muted }, fmt(h.direct + h.via_mlp, 3)));
      svgEl.append(g);
    });
    const base = 4 + loads.length * rowH;
    svgEl.append(sv("line", { x1: X(0), x2: X(0), y1: 2, y2: base, stroke: C.muted }));
    svgEl.append(sv("rect", { x: labelW, y: base + 6, width: 10, height: 8, fill: C.pos }),
      sv("text", { x: labelW + 14, y: base + 14, fill: C.muted }, "direct"),
      sv("rect", { x: labelW + 70, y: base + 6, width: 10, height: 8, fill: "#93c5fd" }),
      sv("text", { x: labelW + 84, y: base + 14, fill: C.muted }, "via MLP (lighter)"));
    return svgEl;
  }

  function selectHead(l, layer, head) {
    state.selHead = { layer, head, link: l };
    for (const b of document.querySelectorAll(".head-btn")) {
      b.classList.toggle("active", +b.dataset.layer === layer && +b.dataset.head === head);
    }
    const q = l.t.p.pos, k = l.s.p.pos;
    $("qk-layer").value = layer; $("qk-head").value = head; $("qk-query").value = q; $("qk-key").value = k;
    prefillSteering(l, layer, head);
    if (state.info && state.info.can_compute) runQK({ layer, head, query_pos: q, key_pos: k });
    else showStoredQK(l, layer, head);
  }

  // ---------------------------------------------------------------- QK panel
  async function runQK(req) {
    const body = $("qk-body");
    body.className = "body";
    clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }),
      `explaining L${req.layer}H${req.head} at query ${req.query_pos}…`));
    try {
      const res = await api("/api/qk", { ...promptPayload(), ...req, top: 12 });
      renderQK(res);
    } catch (e) { errorBox(body, e); }
  }

  function promptPayload() {
    const meta = state.graph && state.graph.metadata;
    if (meta && meta.qktrace && Array.isArray(meta.qktrace.tokens)) return { tokens: meta.qktrace.tokens };
    const text = $("prompt-input").value.trim();
    if (!text) throw new Error("open a graph or type a prompt first");
    return { prompt: text };
  }

  function tokOf(res, i) { return JSON.stringify(res.str_tokens[i] === undefined ? "?" : res.str_tokens[i]); }

  function termTable(terms, id, withPos) {
    return el("table", { id, class: "terms" },
      el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side"), withPos ? el("th", { class: "num" }, "key") : null,
        el("th", { class: "num" }, "term"), el("th", { class: "num" }, "Δp(key)")),
      terms.map((t) => el("tr", { class: "qk-term" },
        el("td", {}, el("span", { class: "comp", "data-component": t.query }, t.query_label)),
        el("td", {}, el("span", { class: "comp", "data-component": t.key }, t.key_label)),
        withPos ? el("td", { class: "num" }, String(t.key_pos)) : null,
        num(t.value, "value"), num(t.prob_effect, "prob_effect"))));
  }

  function marginalTable(list, title, id) {
    const max = Math.max(1e-30, ...list.map((m) => Math.abs(m.value)));
    return el("div", {}, el("h4", {}, title), el("table", { id },
      list.slice(0, 10).map((m) => el("tr", {},
        el("td", {}, el("span", { class: "comp", "data-component": m.component }, m.label)),
        num(m.value, "value", 3),
        el("td", {}, sv("svg", { width: 60, height: 8 }, sv("rect", { x: 0, y: 0, height: 8,
          width: Math.max(1, (60 * Math.abs(m.value)) / max), fill: m.value >= 0 ? C.pos : C.neg })))))));
  }

  function attentionChart(res) {
    const row = res.row, n = row.key_positions.length;
    const barW = Math.max(10, Math.min(36, Math.floor(500 / Math.max(n, 1)))), h = 90, top = 14;
    const w = n * barW + 10;
    const svgEl = sv("svg", { class: "chart", id: "attn-chart", width: w, height: h + top + 30,
      "font-family": FONT, "font-size": 10 });
    const rival = res.contrast ? res.contrast.key_b : null;
    row.key_positions.forEach((k, i) => {
      const p = row.pattern[i], x = 5 + i * barW, bh = Math.max(1, p * h);
      const color = k === res.key_pos ? C.pos : k === rival ? C.rival : "#9ca3af";
      const tok = res.str_tokens[k] === undefined ? "?" : res.str_tokens[k];
      svgEl.append(sv("g", { class: "attn-bar", "data-key": k, "data-value": p, cursor: "pointer",
        onclick: () => runQK({ layer: res.layer, head: res.head, query_pos: res.query_pos, key_pos: k }) },
      sv("rect", { x: x + 1, y: top + h - bh, width: barW - 2, height: bh, fill: color }),
      sv("text", { x: x + barW / 2, y: top + h + 12, "text-anchor": "middle", fill: C.sel },
        tok.length > 5 ? `${tok.slice(0, 4)}…` : tok),
      sv("text", { x: x + barW / 2, y: top + h + 24, "text-anchor": "middle", fill: C.muted }, String(k)),
      sv("title", {}, `key ${k} ${JSON.stringify(tok)}: p = ${fmt(p)}, score ${fmt(row.score[i])}`)));
    });
    return svgEl;
  }

  function renderQK(res) {
    const body = clear($("qk-body"));
    const qk = res.qk;
    body.append(el("h3", { id: "qk-title" }, `L${res.layer}H${res.head}: query ${res.query_pos} ${tokOf(res, res.query_pos)}`
      + ` → key ${res.key_pos} ${tokOf(res, res.key_pos)}`));
    if (state.graph && state.graph.metadata.qktrace && state.graph.metadata.qktrace.model !== res.model) {
      body.append(el("p", { class: "error" }, `computed with the loaded model ${res.model}, not the graph's`));
    }
    body.append(el("table", { id: "qk-check" },
      el("tr", {}, el("th", {}, "score (model)"), el("th", {}, "sum of terms"), el("th", {}, "capped sum"),
        el("th", {}, "p(key)"), el("th", {}, "max rel. error")),
      el("tr", {}, num(qk.score[0], "score", 6), num(qk.sum_of_terms[0], "sum_of_terms", 6),
        num(qk.capped_sum[0], "capped_sum", 6), num(qk.pattern[0], "pattern", 6),
        num(qk.max_relative_error, "max_relative_error", 2))));
    body.append(el("h4", {}, "Attention of the query over every key (blue: this key, amber: its rival; click a bar)"),
      attentionChart(res));
    body.append(el("h4", {}, "Top terms: query-side × key-side components"), termTable(qk.terms, "qk-terms", false));
    body.append(el("div", { class: "two-col" }, marginalTable(qk.query_marginals, "Query side (summed)", "qk-qmarg"),
      marginalTable(qk.key_marginals, "Key side (summed)", "qk-kmarg")));
    body.append(el("h4", {}, "Strongest inhibitory terms (lower p(key) most, over all keys)"));
    body.append(res.inhibitory.length ? termTable(res.inhibitory, "qk-inhibitory", true)
      : el("p", { class: "muted" }, "none"));
    if (res.contrast) {
      const c = res.contrast;
      body.append(el("h4", {}, `Why key ${c.key_a} ${tokOf(res, c.key_a)} rather than key ${c.key_b} `
        + `${tokOf(res, c.key_b)}: score difference `, el("span", { id: "qk-score-diff", "data-value": c.score_diff },
        fmt(c.score_diff))));
      body.append(el("table", { id: "qk-contrast" },
        el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side (either key)"), el("th", { class: "num" }, "at key"),
          el("th", { class: "num" }, "at rival"), el("th", { class: "num" }, "difference")),
        c.terms.map((t) => el("tr", {},
          el("td", {}, el("span", { class: "comp", "data-component": t.query }, t.query_label)),
          el("td", {}, el("span", { class: "comp", "data-component": t.key }, t.key_label)),
          num(t.value_a, "value_a", 3), num(t.value_b, "value_b", 3), num(t.diff, "diff", 3)))));
    }
    attachTips(body);
  }

  function showStoredQK(l, layer, head) {
    const body = clear($("qk-body"));
    body.className = "body";
    const stored = (Array.isArray(l.qk_top_terms) ? l.qk_top_terms : [])
      .filter((e) => e && (e.layer === undefined || (e.layer === layer && e.head === head)));
    if (!stored.length) {
      body.append(el("p", { class: "muted" }, "No model is loaded and this graph stores no QK terms for this head: "
        + "start qktrace serve with --model to compute them."));
      return;
    }
    for (const e of stored) {
      const terms = Array.isArray(e.terms) ? e.terms : [e];
      body.append(el("h3", { id: "qk-title" }, `L${layer}H${head}: query ${l.t.p.pos} ${tokText(l.t.p.pos)} → key `
        + `${l.s.p.pos} ${tokText(l.s.p.pos)} (stored in the graph; no model loaded)`));
      if (e.score !== undefined) {
        body.append(el("dl", { class: "kv" }, el("dt", {}, "score"), el("dd", {}, fmt(e.score)),
          el("dt", {}, "p(key)"), el("dd", {}, fmt(e.pattern))));
      }
      body.append(el("table", { id: "qk-terms", class: "terms" },
        el("tr", {}, el("th", {}, "query side"), el("th", {}, "key side"), el("th", { class: "num" }, "term")),
        terms.map((t) => el("tr", { class: "qk-term" },
          el("td", {}, el("span", { class: "comp", "data-component": t.query }, t.query_label || t.query)),
          el("td", {}, el("span", { class: "comp", "data-component": t.key }, t.key_label || t.key)),
          num(t.value, "value")))));
    }
    attachTips(body);
  }

  // ---------------------------------------------------------------- steering panel
  function prefillSteering(l, layer, head) {
    $("steer-heads").value = `L${layer}H${head}`;
    $("steer-side").value = "key";
    $("steer-checkpoint").value = "";
    if (l.s.p.kind === "feature" && l.s.p.cp === layer) $("steer-feature").value = l.s.p.index;
    $("steer-positions").value = String(l.s.p.pos);
    $("steer-watch-attn").value = `L${layer}H${head}:${l.t.p.pos}->${l.s.p.pos}`;
    const logits = state.nodes.filter((n) => n.p.kind === "logit").sort((a, b) => b.token_prob - a.token_prob);
    $("steer-watch-tokens").value = logits.slice(0, 2).map((n) => n.p.index).join(", ");
  }

  function parseList(text) {
    const t = text.trim();
    if (!t) return [];
    try { return JSON.parse(`[${t}]`); } catch { return t.split(",").map((s) => s.trim()).filter(Boolean); }
  }

  function steeringRequest() {
    const heads = [...$("steer-heads").value.matchAll(/L(\d+)\s*H(\d+)/gi)].map((m) => [+m[1], +m[2]]);
    const watch = [...$("steer-watch-attn").value.matchAll(/L(\d+)\s*H(\d+)\s*:\s*(-?\d+)\s*->\s*(-?\d+)/gi)]
      .map((m) => [+m[1], +m[2], +m[3], +m[4]]);
    const positions = $("steer-positions").value.split(/[\s,]+/).filter(Boolean).map(Number);
    const cp = $("steer-checkpoint").value.trim();
    return {
      ...promptPayload(), heads, side: $("steer-side").value, checkpoint: cp === "" ? null : +cp,
      feature: +$("steer-feature").value, positions, scales: $("steer-scales").value.trim(), mode: $("steer-mode").value,
      freeze_others: $("steer-freeze").checked, watch_tokens: parseList($("steer-watch-tokens").value),
      watch_attention: watch,
    };
  }

  async function runSweep() {
    const body = $("steer-body");
    body.className = "body";
    try {
      const req = steeringRequest();
      clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }), "running the sweep…"));
      const res = await api("/api/sweep", req);
      renderSweep(res);
    } catch (e) { errorBox(body, e); }
  }

  function renderSweep(res) {
    const body = clear($("steer-body"));
    const xs = res.rows.map((r) => r.scale);
    const probCols = res.columns.filter((c) => c.startsWith("p:"));
    const probs = [{ name: "top-1 p", ys: res.rows.map((r) => r.p_top_1) },
      ...probCols.map((c) => ({ name: c, ys: res.rows.map((r) => r[c]) }))];
    body.append(el("h4", {}, "Next-token probabilities against the scale"), lineChart("sweep-probs", xs, probs, [0, 1]));
    const attnCols = res.columns.filter((c) => c.startsWith("attn:"));
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

  const SERIES = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2"];

  function lineChart(id, xs, series, yRange) {
    const w = 500, h = 170, m = { l: 40, r: 10, t: 8, b: 24 };
    const legendH = 16 * Math.ceil(series.length / 3);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), xspan = x1 - x0 || 1;
    const allY = series.flatMap((s) => s.ys).filter((y) => y !== null && y !== undefined);
    const [y0, y1] = yRange || [Math.min(0, ...allY), Math.max(...allY, 1e-9)];
    const X = (x) => m.l + ((x - x0) / xspan) * (w - m.l - m.r);
    const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0 || 1)) * (h - m.t - m.b);
    const svgEl = sv("svg", { id, class: "chart", width: w, height: h + legendH, "font-family": FONT, "font-size": 10 });
    for (let i = 0; i <= 4; i++) {
      const yv = y0 + ((y1 - y0) * i) / 4;
      svgEl.append(sv("line", { x1: m.l, x2: w - m.r, y1: Y(yv), y2: Y(yv), stroke: C.line }),
        sv("text", { x: m.l - 4, y: Y(yv) + 3, "text-anchor": "end", fill: C.muted }, fmt(yv, 2)));
    }
    for (const xv of xs) {
      svgEl.append(sv("text", { x: X(xv), y: h - m.b + 14, "text-anchor": "middle", fill: C.muted }, fmt(xv, 3)));
    }
    svgEl.append(sv("text", { x: w - m.r, y: h - 2, "text-anchor": "end", fill: C.muted }, "scale"));
    series.forEach((s, i) => {
      const color = SERIES[i % SERIES.length];
      const pts = xs.map((x, j) => [x, s.ys[j]]).filter(([, y]) => y !== null && y !== undefined);
      svgEl.append(sv("polyline", { points: pts.map(([x, y]) => `${X(x)},${Y(y)}`).join(" "), fill: "none",
        stroke: color, "stroke-width": 1.8, class: "series", "data-name": s.name }));
      for (const [x, y] of pts) {
        svgEl.append(sv("circle", { cx: X(x), cy: Y(y), r: 2.5, fill: color },
          sv("title", {}, `${s.name} at ${fmt(x)}: ${fmt(y)}`)));
      }
      const lx = m.l + (i % 3) * 150, ly = h + 4 + 16 * Math.floor(i / 3);
      svgEl.append(sv("rect", { x: lx, y: ly, width: 10, height: 3, fill: color }),
        sv("text", { x: lx + 14, y: ly + 5, fill: C.sel }, s.name.length > 22 ? `${s.name.slice(0, 21)}…` : s.name));
    });
    return svgEl;
  }

  // ---------------------------------------------------------------- pins and supernodes
  function togglePin(n) {
    if (state.pinned.has(n.id)) state.pinned.delete(n.id); else state.pinned.add(n.id);
    if (state.selNode === n) selectNode(n);
    applyPrune();
    drawGroupPanel();
  }

  function drawGroupPanel() {
    const body = clear($("group-body"));
    body.className = "body";
    if (!state.pinned.size && !state.supernodes.length) {
      body.className = "body hint";
      body.append("Shift-click nodes (or use Pin) to pin them; group pinned nodes into a labelled supernode.");
      return;
    }
    const grouped = new Set(state.supernodes.flatMap((s) => s.ids));
    const free = [...state.pinned].filter((id) => !grouped.has(id));
    if (free.length) {
      body.append(el("h4", {}, "Pinned"), el("table", { id: "pinned-table" }, free.map((id) => {
        const n = state.byId.get(id);
        return el("tr", {}, el("td", {}, el("input", { type: "checkbox", class: "pin-check", value: id, checked: true })),
          el("td", { class: "clickable", onclick: () => selectNode(n) }, nodeLabel(n), " ",
            el("span", { class: "muted" }, nodeWhere(n))),
          el("td", {}, el("button", { type: "button", onclick: () => togglePin(n) }, "unpin")));
      })));
      const name = el("input", { type: "text", id: "group-name", placeholder: "supernode label", size: 18 });
      body.append(el("div", { class: "btnrow" }, name, el("button", { type: "button", id: "group-btn", onclick: () => {
        const ids = [...body.querySelectorAll(".pin-check")].filter((c) => c.checked).map((c) => c.value);
        if (!ids.length) return;
        state.supernodes.push({ name: name.value.trim() || `group ${state.supernodes.length + 1}`, ids });
        drawSupernodes();
        drawGroupPanel();
      } }, "Group checked")));
    }
    if (state.supernodes.length) {
      body.append(el("h4", {}, "Supernodes"), el("table", { id: "supernode-table" }, state.supernodes.map((s, i) =>
        el("tr", {}, el("td", {}, el("b", {}, s.name)), el("td", { class: "muted" }, s.ids.map((id) =>
          shortLabel(state.byId.get(id))).join("; ")),
        el("td", {}, el("button", { type: "button", onclick: () => {
          state.supernodes.splice(i, 1);
          drawSupernodes();
          drawGroupPanel();
        } }, "ungroup"))))));
    }
  }

  function drawSupernodes() {
    const layer = document.querySelector("#graph-svg .supernodes");
    if (!layer) return;
    clear(layer);
    for (const s of state.supernodes) {
      const members = s.ids.map((id) => state.byId.get(id)).filter(Boolean);
      if (!members.length) continue;
      const xs = members.map((n) => n.x), ys = members.map((n) => n.y);
      const x = Math.min(...xs) - 12, y = Math.min(...ys) - 12;
      const w = Math.max(...xs) - x + 12, h = Math.max(...ys) - y + 12;
      layer.append(sv("g", { class: "supernode", "data-name": s.name, "data-ids": s.ids.join(",") },
        sv("rect", { x, y, width: w, height: h, rx: 8, fill: C.group, "fill-opacity": 0.07, stroke: C.group,
          "stroke-dasharray": "5 3", "stroke-width": 1.2 }),
        sv("text", { x: x + 4, y: y - 3, fill: C.group, "font-family": FONT, "font-size": 11, "font-weight": 600 },
          s.name)));
    }
  }

  // ---------------------------------------------------------------- tooltips and feature dashboards
  const tip = () => $("tooltip");

  function moveTip(e) {
    const t = tip();
    const x = Math.min(e.clientX + 14, window.innerWidth - t.offsetWidth - 8);
    const y = Math.min(e.clientY + 14, window.innerHeight - t.offsetHeight - 8);
    t.style.left = `${Math.max(4, x)}px`;
    t.style.top = `${Math.max(4, y)}px`;
  }

  function hideTip() { tip().hidden = true; }

  function showTip(e, content) {
    const t = clear(tip());
    t.append(...[content].flat());
    t.hidden = false;
    moveTip(e);
  }

  function feature(cp, f) {
    const key = `${cp}/${f}`;
    if (!state.features.has(key)) {
      const p = state.info && state.info.features ? api(`/api/features/${cp}/${f}`).catch(() => null) : Promise.resolve(null);
      state.features.set(key, p);
    }
    return state.features.get(key);
  }

  function dashboardView(d, fallback) {
    if (!d) return [el("b", {}, fallback)];
    const out = [el("b", {}, d.label), el("div", { class: "muted" }, `checkpoint ${d.checkpoint}, feature ${d.feature}`)];
    const dash = d.dashboard;
    if (!dash) return out;
    out.push(el("div", { class: "muted" }, `fires on ${fmt(100 * (dash.freq || 0), 3)}% of tokens; max activation `
      + fmt(dash.max_act, 3)));
    if (dash.top_out.length) out.push(el("div", { class: "chips" }, "top outputs: ", dash.top_out.map((t) => el("span", {}, t))));
    for (const c of dash.contexts.slice(0, 6)) {
      out.push(el("div", { class: "ctx" }, el("span", { class: "muted" }, `${fmt(c.act, 3)} `),
        c.tokens.map((t, i) => el(i === c.i ? "mark" : "span", { class: "t" }, t))));
    }
    return out;
  }

  function showFeatureTip(e, id, fallback) {
    const p = parseId(id);
    showTip(e, [el("b", {}, fallback), el("div", { class: "muted" }, id)]);
    if (p.kind !== "feature") return;
    const target = e.currentTarget;
    feature(p.cp, p.index).then((d) => {
      if (!tip().hidden && target.matches(":hover")) { showTip(e, dashboardView(d, fallback)); }
    });
  }

  // Graphs built before the SAEs had labels carry placeholder clerps ("c3/f12"): ask the dashboards.
  async function refreshLabels() {
    if (!state.info || !state.info.features) return;
    const todo = state.nodes.filter((n) => n.p.kind === "feature" && /^c\d+\/f\d+$/.test(n.clerp || "")).slice(0, 400);
    const graph = state.graph;
    const worker = async () => {
      for (let n = todo.shift(); n; n = todo.shift()) {
        const d = await feature(n.p.cp, n.p.index);
        if (state.graph !== graph || !d || d.label === n.clerp) continue;
        n.clerp = d.label;
        const g = state.nodeEls.get(n.id);
        if (g) g.querySelector(".label").textContent = shortLabel(n);
      }
    };
    await Promise.all([1, 2, 3, 4].map(worker));
  }

  function showNodeTip(e, n) {
    if (n.p.kind !== "feature") {
      showTip(e, [el("b", {}, nodeLabel(n)), el("div", { class: "muted" }, `${n.id} ${nodeWhere(n)}`),
        n.activation !== null && n.activation !== undefined ? el("div", {}, `value ${fmt(n.activation)}`) : null]);
      return;
    }
    showFeatureTip(e, n.id, nodeLabel(n));
  }

  function attachTips(root) {
    for (const span of root.querySelectorAll("[data-component]")) {
      span.addEventListener("mouseenter", (e) => showFeatureTip(e, span.dataset.component, span.textContent));
      span.addEventListener("mousemove", moveTip);
      span.addEventListener("mouseleave", hideTip);
    }
  }

  // ---------------------------------------------------------------- export
  function download(href, filename) {
    const a = el("a", { href, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
  }

  function exportJSON() {
    if (!state.graph) return setStatus("open a graph first", false, true);
    const out = JSON.parse(JSON.stringify(state.graph));
    out.qParams = { ...(out.qParams || {}), pinnedIds: [...state.pinned],
      supernodes: state.supernodes.map((s) => [s.name, ...s.ids]), clickedId: state.selNode ? state.selNode.id : "" };
    const blob = new Blob([JSON.stringify(out)], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    download(url, state.name || "graph.json");
    setTimeout(() => URL.revokeObjectURL(url), 5000);
    setStatus(`saved ${state.name} (${Math.round(blob.size / 1024)} kB)`);
  }

  function exportPNG() {
    if (!state.graph) return setStatus("open a graph first", false, true);
    const src = $("graph-svg");
    const clone = src.cloneNode(true);
    clone.setAttribute("xmlns", SVGNS);
    for (const hit of clone.querySelectorAll(".hit, title")) hit.remove();
    for (const hidden of clone.querySelectorAll("[display=none]")) hidden.remove();
    const [w, h] = state.size;
    clone.setAttribute("width", w);
    clone.setAttribute("height", h);
    const scale = Math.min(2, 8000 / Math.max(w, h));
    const img = new Image();
    img.onload = () => {
      const canvas = el("canvas", { width: Math.round(w * scale), height: Math.round(h * scale) });
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.scale(scale, scale);
      ctx.drawImage(img, 0, 0);
      const url = canvas.toDataURL("image/png");
      const name = (state.name || "graph").replace(/\.json$/, "") + ".png";
      download(url, name);
      setStatus(`saved ${name} (${canvas.width}×${canvas.height})`);
      $("export-png").dataset.lastLength = String(url.length);
    };
    img.onerror = () => setStatus("could not render the view to PNG", false, true);
    img.src = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(new XMLSerializer().serializeToString(clone))}`;
  }

  // ---------------------------------------------------------------- graphs, jobs, start-up
  async function listGraphs(select) {
    const data = await api("/api/graphs");
    const sel = clear($("graph-select"));
    sel.append(el("option", { value: "" }, data.graphs.length ? "(choose a graph)" : "(no graphs yet)"));
    for (const g of data.graphs) {
      sel.append(el("option", { value: g.name, title: `${g.prompt} — ${g.n_nodes} nodes, ${g.n_links} links` },
        `${g.name} — ${g.prompt.length > 40 ? `${g.prompt.slice(0, 39)}…` : g.prompt}`));
    }
    for (const bad of data.invalid) {
      sel.append(el("option", { value: "", disabled: true, title: bad.error }, `${bad.name} (not a graph)`));
    }
    if (select) sel.value = select;
    else if (state.name) sel.value = state.name;
    return data;
  }

  async function openGraph(name) {
    if (!name) return;
    setStatus(`loading ${name}…`, true);
    try {
      const data = await api(`/api/graphs/${encodeURIComponent(name)}`);
      state.name = data.name;
      indexGraph(data.graph);
      drawGraph();
      drawGroupPanel();
      for (const id of ["node-panel", "edge-panel"]) {
        const b = clear($(id).querySelector(".body"));
        b.className = "body hint";
        b.append(id === "node-panel" ? "Click a node." : "Click an edge, or an input or output of a node.");
      }
      $("graph-select").value = data.name;
      const meta = data.graph.metadata || {}, ours = meta.qktrace || {};
      const info = $("graph-info");
      info.textContent = `${meta.prompt || ""} · ${state.nodes.length} nodes · model ${ours.model || "?"}`
        + ` · completeness ${fmt(ours.completeness, 3)} · replacement ${fmt(ours.replacement, 3)}`;
      const mismatch = state.info && state.info.model && ours.model && state.info.model !== ours.model;
      info.className = mismatch ? "warn" : "";
      if (mismatch) info.textContent += ` (the loaded model is ${state.info.model})`;
      history.replaceState(null, "", `#graph=${encodeURIComponent(data.name)}`);
      setStatus(`opened ${data.name}`);
      refreshLabels();
    } catch (e) { setStatus(String(e.message || e), false, true); }
  }

  async function buildGraph(prompt) {
    try {
      let job = await api("/api/graph", { prompt });
      while (job.status === "running") {
        setStatus(`building: ${job.stage} (${Math.round(job.elapsed_s)} s)`, true);
        await new Promise((r) => setTimeout(r, 500));
        job = await api(`/api/jobs/${job.id}`);
      }
      if (job.status === "error") throw new Error(job.error);
      await listGraphs(job.graph);
      await openGraph(job.graph);
    } catch (e) { setStatus(String(e.message || e), false, true); }
  }

  async function start() {
    $("prune").addEventListener("input", applyPrune);
    let resize = null;
    window.addEventListener("resize", () => { clearTimeout(resize); resize = setTimeout(fitGraph, 100); });
    $("graph-select").addEventListener("change", (e) => openGraph(e.target.value));
    $("refresh-graphs").addEventListener("click", () => listGraphs().catch((e) => setStatus(e.message, false, true)));
    $("export-json").addEventListener("click", exportJSON);
    $("export-png").addEventListener("click", exportPNG);
    $("build-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const prompt = $("prompt-input").value.trim();
      if (prompt) buildGraph(prompt); else setStatus("type a prompt first", false, true);
    });
    $("qk-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("qk-key").value.trim();
      runQK({ layer: +$("qk-layer").value, head: +$("qk-head").value, query_pos: +$("qk-query").value,
        key_pos: key === "" ? null : +key });
    });
    $("steer-form").addEventListener("submit", (e) => { e.preventDefault(); runSweep(); });
    $("graph-svg").addEventListener("click", () => {
      state.selNode = state.selLink = null;
      applyPrune();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { state.selNode = state.selLink = null; applyPrune(); hideTip(); }
    });
    try {
      state.info = await api("/api/info");
      const i = state.info;
      $("model-info").textContent = i.model ? `model ${i.model} (${i.n_layers} layers × ${i.n_heads} heads)`
        : "no model loaded: viewing only";
      for (const id of ["build-btn", "qk-run", "steer-run", "prompt-input"]) $(id).disabled = !i.can_compute;
      await listGraphs();
      const m = /graph=([^&]+)/.exec(location.hash);
      if (m) await openGraph(decodeURIComponent(m[1]));
      else if (!state.graph) drawGraph();
    } catch (e) { setStatus(String(e.message || e), false, true); }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
