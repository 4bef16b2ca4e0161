// The page's state in one explicit store. Views read `store.state` and never assign to it; they call
// `store.set(patch)` (or an action below), and every subscriber hears which keys changed. Values are
// replaced, not mutated (a new Set of pins, a new list of supernodes), so a key that changed is a key in
// the patch. A second view of the same kind (e.g. a compare view) gets its own store from `createStore`.

export function createStore(initial) {
  const state = { ...initial };
  const subscribers = new Set();
  return {
    state,
    set(patch) {
      Object.assign(state, patch);
      const keys = new Set(Object.keys(patch));
      for (const fn of subscribers) fn(state, keys);
    },
    /** `fn(state, changedKeys)` after every `set`; returns the unsubscribe function. */
    subscribe(fn) {
      subscribers.add(fn);
      return () => subscribers.delete(fn);
    },
  };
}

/** What the page knows about one open graph, and what the user did to it. */
export const initialState = () => ({
  info: null, // GET /api/info: model, checkpoints, can_compute, features
  name: null, // the open graph's file name
  model: null, // the open graph, indexed (model.js)
  selNode: null, // the clicked node
  selLink: null, // the clicked edge
  hover: null, // the node under the mouse
  pinned: new Set(), // pinned node ids, in pin order
  supernodes: [], // [{name, ids, collapsed}]: a new array on every change (the view redraws on a new one)
  weights: "raw", // edge weights shown: "raw" or "norm" (normalised per target)
  prune: 50, // hide edges below this percentile of the shown |weights|
  qk: null, // the QK view shown: {layer, head, query, key}
  mechanism: null, // the name of the *.mechanism.json shown
  subgraph: false, // show only the pinned nodes and the edges among them
});

export const store = createStore(initialState());

// -- actions ---------------------------------------------------------------------------------------

// (on the page's store, or on `target`: a compare side's)
export const selectNode = (n, target = store) => target.set({ selNode: n, selLink: null });
export const selectLink = (l, target = store) => target.set({ selLink: l, selNode: null });
export const clearSelection = (target = store) => target.set({ selNode: null, selLink: null });

export function togglePin(id, target = store) {
  const pinned = new Set(target.state.pinned);
  if (pinned.has(id)) pinned.delete(id); else pinned.add(id);
  target.set({ pinned });
}

export function addSupernode(name, ids) {
  const { supernodes } = store.state;
  store.set({ supernodes: [...supernodes, { name: name || `group ${supernodes.length + 1}`, ids, collapsed: false }] });
}

/** Collapse supernode `i` into one node, or expand it. */
export const toggleSupernode = (i) => store.set({ supernodes: store.state.supernodes.map((s, j) =>
  (j === i ? { ...s, collapsed: !s.collapsed } : s)) });

export const removeSupernode = (i) => store.set({ supernodes: store.state.supernodes.filter((_, j) => j !== i) });
