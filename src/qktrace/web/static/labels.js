// Where node labels go: beside their nodes and not on one another. Greedy, in the order given (callers put
// the labels that should not move first): each label tries spots around its node (right, left, then
// stacked above and below) and takes the first that covers no label placed so far, no node and nothing
// outside the drawing; when every spot covers something, the one that covers least. No DOM here.

const STACK = 8;

function spots(x, y, w, h) {
  const out = [
    [x + 9, y - h - 2], [x + 10, y - h / 2], [x + 9, y + 2], // above right, right, below right
    [x - 9 - w, y - h - 2], [x - 10 - w, y - h / 2], [x - 9 - w, y + 2], // the same on the left
  ];
  for (let k = 0; k < STACK; k++) {
    out.push([x - w / 2, y - 9 - h - k * (h + 2)], [x - w / 2, y + 9 + k * (h + 2)]); // above, below
  }
  for (let k = 1; k < STACK; k++) { // stacked beside, right then left
    out.push([x + 10, y - h / 2 - k * (h + 2)], [x + 10, y - h / 2 + k * (h + 2)]);
    out.push([x - 10 - w, y - h / 2 - k * (h + 2)], [x - 10 - w, y - h / 2 + k * (h + 2)]);
  }
  return out;
}

const overlap = (a, b) => {
  const dx = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x);
  const dy = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
  return dx > 0 && dy > 0 ? dx * dy : 0;
};

const outside = (box, { width, height }) => box.w * box.h - overlap(box, { x: 0, y: 0, w: width, h: height });

/**
 * items: [{id, x, y, w, h}], a node at (x, y) and its label's size; obstacles: [{x, y, w, h}], boxes
 * labels should not cover (node markers); bounds: {width, height}. An item with `optional: true` is left out (box null) rather than
 * cover a label placed before it. Returns [{id, box: {x, y, w, h} or null}].
 */
export function placeLabels(items, obstacles, bounds) {
  const placed = [];
  for (const it of items) {
    let best = null;
    for (const [x, y] of spots(it.x, it.y, it.w, it.h)) {
      const box = { x, y, w: it.w, h: it.h };
      let covers = 0;
      for (const p of placed) if (p.box) covers += overlap(box, p.box);
      const cost = 4 * outside(box, bounds) + 4 * covers + obstacles.reduce((a, o) => a + overlap(box, o), 0);
      if (!best || cost < best.cost) best = { id: it.id, box, cost, covers };
      if (cost === 0) break;
    }
    placed.push(it.optional && best.covers > 0 ? { id: it.id, box: null } : best);
  }
  return placed;
}
