// The side panels as collapsible sections (<details>), and the one rule for results: the panel that just
// got one opens, scrolls into view and takes the focus, so a click on a head lands the eye on its QK terms.

import { $ } from "./dom.js";

/** Open panel `id`, scroll it to the top of the side column and (with `focus`) focus its heading. */
export function reveal(id, focus = true) {
  const panel = $(id);
  if (!panel) return;
  if (panel.tagName === "DETAILS") panel.open = true;
  panel.scrollIntoView({ block: "start", behavior: "instant" });
  const head = panel.querySelector("summary");
  if (head && focus) head.focus({ preventScroll: true });
  for (const p of document.querySelectorAll("#side .panel.newest")) p.classList.remove("newest");
  panel.classList.add("newest");
}
