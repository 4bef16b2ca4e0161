// Zoom, pan and fit for one <svg>, through its viewBox: the wheel zooms about the pointer, a drag pans (the
// click that ends a drag is swallowed, so panning never clears the selection), `fit` opens the drawing
// whole or, when that would shrink it below MIN_FIT, at a readable scale with its right end (the answer
// column: logits sit at the last position) in view. `scale()`: screen pixels per drawing unit. No state
// of the page here; `onChange(scale)` hears every change (the view redraws its labels at screen size).
// `minFit` raises the least scale a fit opens at (the compare view's half-width panes keep text readable).

const MIN_FIT = 0.45, MAX_FIT = 1.6, MIN_SCALE = 0.05, MAX_SCALE = 12;

export function createZoom(svg, { minFit = MIN_FIT } = {}, onChange = () => {}) {
  let size = null, box = null, drag = null, dragged = false, fitted = false; // fitted: untouched since fit

  const pane = () => svg.getBoundingClientRect();
  const scale = () => { const r = pane(); return box && r.width ? Math.min(r.width / box.w, r.height / box.h) : 1; };

  function set(b) {
    box = b;
    svg.setAttribute("viewBox", `${b.x.toFixed(2)} ${b.y.toFixed(2)} ${b.w.toFixed(2)} ${b.h.toFixed(2)}`);
    onChange(scale());
  }

  /** The drawing (width, height) fitted to the pane; `at`: a drawing x to keep in view (default: the right end). */
  function fit(drawing = size, at = null) {
    if (!drawing) return;
    size = drawing;
    const [w, h] = size, r = pane(), W = Math.max(r.width, 50), H = Math.max(r.height, 50);
    let k = Math.min(W / w, H / h, MAX_FIT);
    if (k < minFit) k = minFit === MIN_FIT ? Math.min(H / h, MIN_FIT) : minFit;
    const bw = W / k, bh = H / k;
    const right = at === null ? w : Math.min(w, at + bw / 2);
    const x = bw >= w ? (w - bw) / 2 : Math.max(0, right - bw);
    set({ x, y: (h - bh) / 2, w: bw, h: bh });
    fitted = true;
  }

  /** Zoom by `factor` about the drawing point (cx, cy) (default: the middle of the view). */
  function zoomBy(factor, cx = box.x + box.w / 2, cy = box.y + box.h / 2) {
    const k = scale() * factor;
    if (!box || k < MIN_SCALE || k > MAX_SCALE) return;
    fitted = false;
    set({ x: cx - (cx - box.x) / factor, y: cy - (cy - box.y) / factor, w: box.w / factor, h: box.h / factor });
  }

  /** Move the view so that the drawing point (x, y) is in the middle, unless it is in view already. */
  function reveal(x, y) {
    if (!box || (x > box.x + 20 && x < box.x + box.w - 20 && y > box.y + 20 && y < box.y + box.h - 20)) return;
    set({ ...box, x: x - box.w / 2, y: y - box.h / 2 });
  }

  const toDrawing = (e) => {
    const m = svg.getScreenCTM();
    const p = new DOMPoint(e.clientX, e.clientY).matrixTransform(m.inverse());
    return [p.x, p.y];
  };

  svg.addEventListener("wheel", (e) => {
    if (!box) return;
    e.preventDefault();
    zoomBy(Math.exp(-Math.max(-100, Math.min(100, e.deltaY)) * 0.004), ...toDrawing(e));
  }, { passive: false });
  svg.addEventListener("pointerdown", (e) => {
    if (box && e.button === 0) { drag = { x: e.clientX, y: e.clientY, box, k: scale() }; dragged = false; }
  });
  svg.addEventListener("pointermove", (e) => {
    if (!drag || (!dragged && Math.hypot(e.clientX - drag.x, e.clientY - drag.y) < 4)) return;
    dragged = true;
    fitted = false;
    svg.classList.add("panning");
    set({ ...drag.box, x: drag.box.x - (e.clientX - drag.x) / drag.k, y: drag.box.y - (e.clientY - drag.y) / drag.k });
  });
  const end = () => { drag = null; svg.classList.remove("panning"); };
  svg.addEventListener("pointerup", end);
  svg.addEventListener("pointerleave", end);
  svg.addEventListener("click", (e) => { if (dragged) { e.stopPropagation(); dragged = false; } }, true);

  // the pane changed size (the window, the toolbar wrapping): fit again unless the user moved the view
  new ResizeObserver(() => { if (size && fitted) fit(); else if (box) set(box); }).observe(svg);

  return { fit, zoomBy, reveal, scale, view: () => box };
}
