// The pins and supernodes panel: pinned nodes (shift-click or Pin), grouped into labelled supernodes, each
// collapsed into one node or expanded (supernodes.js draws them).

import { clear, el } from "./dom.js";
import { nameIn } from "./model.js";

const HINT = "Shift-click nodes (or use Pin) to pin them; group pinned nodes into a labelled supernode.";

/** handlers: onNode(n), onPin(n), onGroup(name, ids), onUngroup(i), onToggle(i). `show(state)` redraws it. */
export function createGroupPanel(body, { onNode, onPin, onGroup, onUngroup, onToggle }) {
  function show({ model, pinned, supernodes }) {
    clear(body).className = "body";
    if (!model || (!pinned.size && !supernodes.length)) {
      body.className = "body hint";
      body.append(HINT);
      return;
    }
    const grouped = new Set(supernodes.flatMap((s) => s.ids));
    const free = [...pinned].filter((id) => !grouped.has(id) && model.byId.has(id));
    if (free.length) {
      body.append(el("h4", {}, "Pinned"), el("table", { id: "pinned-table" }, free.map((id) => {
        const n = model.byId.get(id);
        return el("tr", {}, el("td", {}, el("input", { type: "checkbox", class: "pin-check", value: id, checked: true })),
          el("td", { class: "clickable", onclick: () => onNode(n) },
            el("span", { class: "comp", "data-component": id, title: id }, nameIn(model, id))),
          el("td", {}, el("button", { type: "button", onclick: () => onPin(n) }, "unpin")));
      })));
      const name = el("input", { type: "text", id: "group-name", placeholder: "supernode label", size: 18 });
      body.append(el("div", { class: "btnrow" }, name, el("button", { type: "button", id: "group-btn", onclick: () => {
        const ids = [...body.querySelectorAll(".pin-check")].filter((c) => c.checked).map((c) => c.value);
        if (ids.length) onGroup(name.value.trim(), ids);
      } }, "Group checked")));
    }
    if (supernodes.length) {
      body.append(el("h4", {}, "Supernodes"), el("table", { id: "supernode-table" }, supernodes.map((s, i) =>
        el("tr", { "data-i": i }, el("td", {}, el("b", {}, s.name), ` (${s.ids.length})`),
          el("td", { class: "muted" }, s.ids.filter((id) => model.byId.has(id)).flatMap((id, j) => [j ? "; " : "",
            el("span", { class: "comp", "data-component": id, title: id }, nameIn(model, id))])),
          el("td", { class: "btnrow" }, el("button", { type: "button", class: "group-toggle",
            onclick: () => onToggle(i) }, s.collapsed ? "expand" : "collapse"),
          el("button", { type: "button", onclick: () => onUngroup(i) }, "ungroup"))))));
    }
  }

  return { show };
}
