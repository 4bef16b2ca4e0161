// The graph by keyboard: Tab reaches the nodes, arrow keys move along edges (Up: to the strongest output,
// towards the logits; Down: to the strongest input; Left and Right: the next node of the same row by x),
// Enter opens a node (shift+Enter pins it), Escape closes the selection and the tooltip.

import { rowOf } from "./layout.js";

const strongestEnd = (links, end) => {
  const best = links.reduce((a, l) => (!a || Math.abs(l.weight) > Math.abs(a.weight) ? l : a), null);
  return best && best[end];
};

/** The node an arrow key moves to from `n`, or null. */
export function neighbour(model, n, key) {
  if (key === "ArrowUp") return strongestEnd(n.outs, "t");
  if (key === "ArrowDown") return strongestEnd(n.ins, "s");
  if (key !== "ArrowLeft" && key !== "ArrowRight") return null;
  const row = rowOf(model, n), dir = key === "ArrowRight" ? 1 : -1;
  const same = model.nodes.filter((m) => m !== n && rowOf(model, m) === row && dir * (m.x - n.x) > 0);
  return same.reduce((a, m) => (!a || dir * (m.x - a.x) < 0 || (m.x === a.x && Math.abs(m.y - n.y) < Math.abs(a.y - n.y))
    ? m : a), null);
}

/** `getView()`: the graph view (made after this handler); `open(n, event)`: what Enter does. */
export function keyHandler(getModel, getView, open) {
  return (n, e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      open(n, e);
      return;
    }
    const next = neighbour(getModel(), n, e.key);
    if (!next) return;
    e.preventDefault();
    getView().focusNode(next);
  };
}
