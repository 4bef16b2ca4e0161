// Where nodes sit: one column per prompt position, one row per checkpoint (tokens at the bottom, logits
// at the top); the nodes of one cell side by side, wrapping onto up to four lines. No DOM here.

export const L = { rowH: 72, gap: 13, lineGap: 13, minCol: 66, left: 58, top: 26, bottom: 64, maxLines: 4 };
const KIND_ORDER = { feature: 0, transcoder: 0, attn: 0, logit: 0, token: 0, error: 1, mlp_error: 1, attn_error: 1,
  sae_bias: 2, attn_bias: 3, mlp_bias: 4 };

export function rowOf(model, n) {
  if (n.p.kind === "token") return 0;
  if (n.p.kind === "logit") return model.nLayers + 2;
  return n.p.cp + 1;
}

export const rowName = (model, r) => (r === 0 ? "tokens" : r === model.nLayers + 2 ? "logits" : `c${r - 1}`);

/** Writes `x`, `y` on every node of `model`; returns the grid: rows, columns and the drawing's size. */
export function layout(model) {
  const nRows = model.nLayers + 3;
  const cells = new Map();
  for (const n of model.nodes) {
    const key = `${rowOf(model, n)}:${n.p.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const nPos = Math.max(model.tokens.length, ...model.nodes.map((n) => n.p.pos + 1), 1);
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
