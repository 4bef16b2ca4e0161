// The view in the URL's hash, so that a link (or a reload) reopens it: the graph, the weights shown, the
// prune level, the pins, the supernodes (each e: expanded or c: collapsed, its name, its members), the
// selected node or edge, the head and QK query and key explained, the mechanism shown, or the compare pair
// (and the node or edge chosen on either side). No DOM here but `location` and `history`.
//
//   #graph=NAME&weights=norm&prune=70&pins=ID,ID&sub=1&group=c:NAME|ID,ID&group=e:NAME|ID,ID&node=ID
//     &edge=SOURCE>TARGET&qk=L1H3:20:6&mechanism=NAME
//     (qk=L1H3:20:6:2 when the contrast's rival key, here 2, was chosen)
//   #compare=A,B&side=b&node=ID

const QK = /^L(\d+)H(\d+):(-?\d+):(-?\d+)(?::(-?\d+))?$/;
const GROUP = /^([ce]):(.*)\|([^|]*)$/;

/** `group=c:NAME|ID,ID` values as supernodes, or null when the URL names none. */
function readGroups(values) {
  const out = values.map((v) => GROUP.exec(v)).filter(Boolean)
    .map(([, state, name, ids]) => ({ name, ids: ids.split(",").filter(Boolean), collapsed: state === "c" }));
  return values.length ? out.filter((s) => s.ids.length) : null;
}

/** The view the URL names (graph also from ?graph=NAME). */
export function readUrl() {
  const hash = new URLSearchParams(location.hash.slice(1)), query = new URLSearchParams(location.search);
  const pair = (hash.get("compare") || "").split(",").filter(Boolean);
  const qk = QK.exec(hash.get("qk") || "");
  const edge = (hash.get("edge") || "").split(">");
  const prune = Number.parseInt(hash.get("prune"), 10);
  return {
    graph: hash.get("graph") || query.get("graph"),
    weights: hash.get("weights") === "norm" ? "norm" : "raw",
    compare: pair.length === 2 ? pair : null,
    prune: Number.isInteger(prune) && prune >= 0 && prune <= 99 ? prune : null,
    pins: (hash.get("pins") || "").split(",").filter(Boolean),
    subgraph: hash.get("sub") === "1",
    supernodes: readGroups(hash.getAll("group")),
    side: ["a", "b"].includes(hash.get("side")) ? hash.get("side") : null,
    node: hash.get("node"),
    edge: edge.length === 2 ? { source: edge[0], target: edge[1] } : null,
    qk: qk ? { layer: +qk[1], head: +qk[2], query: +qk[3], key: +qk[4], rival: qk[5] === undefined ? null : +qk[5] }
      : null,
    mechanism: hash.get("mechanism"),
  };
}

/** The hash for a view: {graph, weights, prune, pins, subgraph, supernodes, node, edge, qk, mechanism}. */
export function viewHash({ graph, weights, prune, pins, subgraph, supernodes, node, edge, qk, mechanism }) {
  const p = new URLSearchParams({ graph });
  if (weights === "norm") p.set("weights", "norm");
  if (prune !== null && prune !== undefined && prune !== 50) p.set("prune", String(prune));
  if (pins && pins.length) p.set("pins", pins.join(","));
  if (subgraph) p.set("sub", "1");
  for (const s of supernodes || []) p.append("group", `${s.collapsed ? "c" : "e"}:${s.name}|${s.ids.join(",")}`);
  if (node) p.set("node", node);
  if (edge) p.set("edge", `${edge.source}>${edge.target}`);
  const rival = qk && qk.rival !== null && qk.rival !== undefined ? `:${qk.rival}` : "";
  if (qk) p.set("qk", `L${qk.layer}H${qk.head}:${qk.query}:${qk.key}${rival}`);
  if (mechanism) p.set("mechanism", mechanism);
  return p;
}

/** The compare view's hash: the pair, and the node or edge chosen on `side` ("a" or "b"), if any. */
export function compareHash({ a, b, side, node, edge }) {
  const p = new URLSearchParams({ compare: `${a},${b}` });
  if (side && (node || edge)) p.set("side", side);
  if (side && node) p.set("node", node);
  else if (side && edge) p.set("edge", `${edge.source}>${edge.target}`);
  return p;
}

/** Write `params` into the hash; `push`: as a new history entry (Back returns to the one before). */
export function setHash(params, push) {
  const url = `${location.pathname}#${params}`;
  if (url === `${location.pathname}${location.hash}`) return;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}
