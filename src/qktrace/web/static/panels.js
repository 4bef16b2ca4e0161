// The side panels as collapsible sections (<details>), and the one rule for results: the panel that just
// got one opens, scrolls into view and takes the focus, so a click on a head lands the eye on its QK terms.
// A result panel's body can go back to the hint the page opened with (`rememberHints`, `restoreHint`): the
// compare view's sides and the page's graph never show each other's results.

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

const hints = new Map(); // body id -> its first markup and class (the page's own hint text)

/** Remember the bodies `ids` as the page first shows them, so that `restoreHint(id)` can put them back. */
export function rememberHints(...ids) {
  for (const id of ids) if ($(id)) hints.set(id, { html: $(id).innerHTML, cls: $(id).className });
}

/** Body `id` back to its hint (a result it showed is gone). */
export function restoreHint(id) {
  const h = hints.get(id);
  if (h) { $(id).innerHTML = h.html; $(id).className = h.cls; }
}
