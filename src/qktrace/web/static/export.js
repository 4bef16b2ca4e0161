// Downloads: the graph JSON with the page's pins and supernodes, and a PNG of a graph view as drawn.

import { SVGNS, el } from "./dom.js";
import { withViewState } from "./model.js";

function download(href, filename) {
  const a = el("a", { href, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
}

/** Saves the open graph with `qParams` updated from `state`; returns the file's size in bytes. */
export function exportJSON(state) {
  const blob = new Blob([JSON.stringify(withViewState(state.model, state))], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  download(url, state.name || "graph.json");
  setTimeout(() => URL.revokeObjectURL(url), 5000);
  return blob.size;
}

/** Renders `view`'s SVG (no hit areas, tooltips or hidden edges) at up to 2x and downloads it.
 * Resolves to {name, width, height, length}. */
export function exportPNG(view, name) {
  const [w, h] = view.size();
  const scale = Math.min(2, 8000 / Math.max(w, h));
  view.placeAxesFor(scale, { x: 0, y: 0, w, h }); // the tokens under the whole grid, readable in the image
  const clone = view.svg.cloneNode(true);
  view.placeAxesFor(); // and back where the pane shows them
  clone.setAttribute("xmlns", SVGNS);
  for (const e of clone.querySelectorAll(".hit, title, [display=none]")) e.remove();
  clone.setAttribute("width", w);
  clone.setAttribute("height", h);
  clone.setAttribute("viewBox", `0 0 ${w} ${h}`); // the whole drawing, whatever the zoom
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const canvas = el("canvas", { width: Math.round(w * scale), height: Math.round(h * scale) });
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.scale(scale, scale);
      ctx.drawImage(img, 0, 0);
      const url = canvas.toDataURL("image/png");
      const file = `${(name || "graph").replace(/\.json$/, "")}.png`;
      download(url, file);
      resolve({ name: file, width: canvas.width, height: canvas.height, length: url.length });
    };
    img.onerror = () => reject(new Error("could not render the view to PNG"));
    img.src = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(new XMLSerializer().serializeToString(clone))}`;
  });
}
