// The steering panel: steer a feature inside chosen heads' QK circuits (or in the residual stream) over a
// range of scales (POST /api/sweep) and plot next-token probabilities and watched attention against it.
// "more features" steers further sets with it at the same scale, each inside its own heads' QK circuit
// (`also`): `replay(mechanism, candidate)` fills the form with a mechanism's candidate and runs it.
// The feature is a residual-SAE feature (read at the checkpoint, the heads' layer by default), a transcoder or
// an attention-SAE feature (kind "transcoder" or "attn": of its own layer, `feature layer`, below the heads'
// layer; without heads its output is steered at that layer); `steerNode(n)` fills the form from a clicked node.
//   more features:  L2H6,7 key@6: 143 480; L3H1 query@20: 12   (layer, heads, side@position: features)

import * as API from "./api.js";
import { lineChart } from "./chart.js";
import { $, clear, el, errorBox, num } from "./dom.js";
import { tokenOf } from "./model.js";
import { promptPayload } from "./qk-panel.js";

const LAYERED = new Set(["transcoder", "attn"]); // features of a layer, steered in the heads of a later one

/** `state()`: the store's state. Wires the sweep form; `setDefaults(sweep)` fills it with the server's defaults
 * (GET /api/info's `defaults.sweep`, which are `qktrace.options.SweepOptions`'s, as the CLI's are);
 * `prefill(link, layer, head)` fills it from an edge, `steerNode(n)` from a feature node of any kind. */
export function createSweepPanel(state) {
  const body = $("steer-body");
  $("steer-form").addEventListener("submit", (e) => { e.preventDefault(); run(); });

  let defaults = null;

  function setDefaults(sweep) {
    defaults = sweep;
    $("steer-scales").value = Array.isArray(sweep.scales) ? sweep.scales.join(",") : sweep.scales;
    $("steer-side").value = sweep.side;
    $("steer-mode").value = sweep.mode;
    $("steer-freeze").checked = sweep.freeze_others;
  }

  /** A mechanism's candidate in the form (its first feature as the feature, the rest as more features,
   * the answer and rival watched, the mechanism's scales, other heads frozen), then run. */
  function replay(mech, cand) {
    const [first, ...rest] = cand.parts;
    $("steer-heads").value = first.heads.map((h) => `L${first.layer}H${h}`).join(" ");
    $("steer-side").value = first.side;
    setFeature("", "", ""); // the tracer's kind, as the mechanism was found
    $("steer-feature").value = first.features[0];
    $("steer-positions").value = String(first.position);
    $("steer-mode").value = "scale";
    $("steer-scales").value = mech.scales.join(",");
    $("steer-freeze").checked = true;
    $("steer-watch-tokens").value = [mech.answer_id, mech.rival_id].filter((t) => t !== null).join(", ");
    $("steer-watch-attn").value = first.heads.map((h) => `L${first.layer}H${h}:${mech.str_tokens.length - 1}->${first.key_pos}`)
      .join(" ");
    const more = [{ ...first, features: first.features.slice(1) }, ...rest].filter((p) => p.features.length);
    $("steer-also").value = more.map((p) => `L${p.layer}H${p.heads.join(",")} ${p.side}@${p.position}: `
      + p.features.join(" ")).join("; ");
    return run();
  }

  function prefill(l, layer, head) {
    $("steer-also").value = "";
    $("steer-heads").value = `L${layer}H${head}`;
    if (defaults) $("steer-side").value = defaults.side;
    const src = l.s.p;
    if (src.kind === "feature" && src.cp === layer) setFeature("feature", "", "", src.index);
    else if (LAYERED.has(src.kind) && src.cp < layer) setFeature(src.kind, "", src.cp, src.index);
    else setFeature($("steer-kind").value, "", "");
    $("steer-positions").value = String(l.s.p.pos);
    $("steer-watch-attn").value = `L${layer}H${head}:${l.t.p.pos}->${l.s.p.pos}`;
    const logits = state().model.nodes.filter((n) => n.p.kind === "logit").sort((a, b) => b.token_prob - a.token_prob);
    $("steer-watch-tokens").value = logits.slice(0, 2).map((n) => n.p.index).join(", "); // ids: exact
    $("steer-watch-tokens").title = `token ids of ${logits.slice(0, 2).map((n) => JSON.stringify(tokenOf(n))).join(", ")}`;
  }

  /** The form's kind, checkpoint, feature layer and (when given) feature. */
  function setFeature(kind, checkpoint, featureLayer, feature = null) {
    $("steer-kind").value = kind;
    $("steer-checkpoint").value = checkpoint;
    $("steer-feature-layer").value = featureLayer;
    if (feature !== null) $("steer-feature").value = feature;
  }

  /** A feature node (its checkpoint) or a transcoder or attention feature node (its layer), at its position, no
   * heads yet. Another tool's feature node could be any: its kind is left to the server (auto). */
  function steerNode(n) {
    if (LAYERED.has(n.p.kind)) setFeature(n.p.kind, "", n.p.cp, n.p.index);
    else setFeature(state().model && state().model.foreign ? "" : "feature", n.p.cp, "", n.p.index);
    $("steer-positions").value = n.p.pos;
    $("steer-heads").value = ""; $("steer-also").value = ""; $("steer-freeze").checked = false;
  }

  async function run() {
    body.className = "body";
    try {
      const req = request();
      clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }), "running the sweep…"));
      render(await API.sweep(req));
    } catch (e) { errorBox(body, e); }
  }

  function request() {
    const heads = [...$("steer-heads").value.matchAll(/L(\d+)\s*H(\d+)/gi)].map((m) => [+m[1], +m[2]]);
    const watch = [...$("steer-watch-attn").value.matchAll(/L(\d+)\s*H(\d+)\s*:\s*(-?\d+)\s*->\s*(-?\d+)/gi)]
      .map((m) => [+m[1], +m[2], +m[3], +m[4]]);
    const positions = $("steer-positions").value.split(/[\s,]+/).filter(Boolean).map(Number);
    const kind = $("steer-kind").value || null, fl = $("steer-feature-layer").value.trim();
    let cp = $("steer-checkpoint").value.trim();
    if (LAYERED.has(kind) && !heads.length && cp === "") cp = fl; // its output, at its own layer
    if (LAYERED.has(kind) && heads.length && fl === "") {
      throw new Error(`a ${kind === "attn" ? "attention" : "transcoder"} feature steered inside heads needs its layer: `
        + "fill in feature layer (below the heads' layer)");
    }
    if (!heads.length && cp === "") {
      throw new Error("name heads (e.g. L1H3 L1H0) to steer inside their QK circuits, or a checkpoint to steer the "
        + "residual stream there");
    }
    const layered = heads.length && kind !== "feature" && fl !== ""; // a feature of a layer below the heads
    return {
      ...promptPayload(state()), heads, side: $("steer-side").value, checkpoint: cp === "" || layered ? null : +cp,
      kind, feature_layer: layered ? +fl : null,
      feature: +$("steer-feature").value, positions, scales: $("steer-scales").value.trim(), mode: $("steer-mode").value,
      freeze_others: $("steer-freeze").checked, watch_tokens: parseList($("steer-watch-tokens").value),
      watch_attention: watch, also: parseAlso($("steer-also").value),
    };
  }

  function render(res) {
    clear(body);
    const xs = res.rows.map((r) => r.scale);
    const probCols = res.columns.filter((c) => c.startsWith("p:"));
    const attnCols = res.columns.filter((c) => c.startsWith("attn:"));
    const probs = [{ name: "top-1 p", ys: res.rows.map((r) => r.p_top_1) },
      ...probCols.map((c) => ({ name: c, ys: res.rows.map((r) => r[c]) }))];
    const clean = $("steer-mode").value === "scale" ? 1 : null;
    body.append(el("h4", {}, "Next-token probabilities against the scale"),
      lineChart("sweep-probs", xs, probs, [0, 1], clean));
    if (attnCols.length) {
      body.append(el("h4", {}, "Watched attention against the scale"),
        lineChart("sweep-attn", xs, attnCols.map((c) => ({ name: c.slice(5), ys: res.rows.map((r) => r[c]) })), [0, 1],
          clean));
    }
    body.append(el("table", { id: "sweep-table" },
      el("tr", {}, el("th", { class: "num" }, "scale"), el("th", {}, "top-1"), el("th", { class: "num" }, "p"),
        probCols.map((c) => el("th", { class: "num" }, c)), attnCols.map((c) => el("th", { class: "num" }, c.slice(5)))),
      res.rows.map((r) => el("tr", { class: "sweep-row" }, num(r.scale, "scale", 3), el("td", {}, JSON.stringify(r.top_1)),
        num(r.p_top_1, "p_top_1", 3), probCols.map((c) => num(r[c], c, 3)), attnCols.map((c) => num(r[c], c, 3))))));
  }

  return { prefill, replay, run, setDefaults, steerNode };
}

function parseList(text) {
  const t = text.trim();
  if (!t) return [];
  try { return JSON.parse(`[${t}]`); } catch { return t.split(",").map((s) => s.trim()).filter(Boolean); }
}

/** "L2H6,7 key@6: 143 480; ..." -> [{heads, side, positions, features}], the sweep request's `also`. */
export function parseAlso(text) {
  return text.split(";").map((t) => t.trim()).filter(Boolean).map((t) => {
    const m = /^L(\d+)\s*H([\d,\s]+?)\s+(query|key)\s*@\s*(\d+)\s*:\s*([\d,\s]+)$/i.exec(t);
    if (!m) throw new Error(`more features ${JSON.stringify(t)}: write them as L2H6,7 key@6: 143 480`);
    return { heads: m[2].split(/[\s,]+/).filter(Boolean).map((h) => [+m[1], +h]), side: m[3].toLowerCase(),
      positions: [+m[4]], features: m[5].split(/[\s,]+/).filter(Boolean).map(Number) };
  });
}
