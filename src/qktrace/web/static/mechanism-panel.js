// The explained answer on the page: "Explain this answer" (answer and optional rival, typed or taken from a
// logit node) runs POST /api/explain/jobs and follows its job; a `*.mechanism.json` (the job's, or one the
// demo or `qktrace explain --out` wrote) opens here: the clean prediction, the heads ablated, the sites, the
// candidates table, the winning curve (m = logit(answer) − logit(rival), p(answer), p(rival) and the
// heads' attention against the scale, the clean scale marked), its features highlighted on the graph, and
// one click to replay it in the steering panel.

import * as API from "./api.js";
import { lineChart } from "./chart.js";
import { $, clear, el, errorBox, fmt, num } from "./dom.js";
import { tokenOf } from "./model.js";
import { componentLabel, visible } from "./names.js";

const tok = (m, i) => `"${visible(m.str_tokens[i] === undefined ? "?" : m.str_tokens[i])}"`;

/** The graph node ids of a candidate's features: `feature/c<layer>/p<position>/f<index>`. */
export const candidateIds = (cand) =>
  cand.parts.flatMap((p) => p.features.map((f) => `feature/c${p.layer}/p${p.position}/f${f}`));

/** handlers: onOpen(name, mechanism) after one is shown; onReplay(mechanism, candidate); onHighlight(ids);
 * onDone(name) when an explain job saved its mechanism. */
export function createMechanismPanel(state, { onOpen, onReplay, onHighlight, onDone }) {
  const body = $("mech-body");
  let current = null;

  $("explain-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const answer = $("explain-answer").value, rival = $("explain-rival").value;
    if (!answer.trim()) return errorBox(body, "type the answer token (with its leading space, e.g. ' Sally')");
    explainAnswer(answer, rival.trim() ? rival : null);
  });

  /** Fill the answer (and rival) from logit nodes: the answer's, and the strongest other one. */
  function fromLogit(n) {
    const logits = state().model.nodes.filter((m) => m.p.kind === "logit" && m !== n)
      .sort((a, b) => (b.token_prob || 0) - (a.token_prob || 0));
    $("explain-answer").value = tokenOf(n);
    $("explain-rival").value = logits.length ? tokenOf(logits[0]) : "";
  }

  async function explainAnswer(answer, rival) {
    const s = state(), ours = s.model && s.model.meta.qktrace;
    const req = { answer, rival, name: s.name || undefined };
    if (ours && Array.isArray(ours.tokens)) req.tokens = ours.tokens;
    else req.prompt = $("prompt-input").value.trim();
    body.className = "body";
    const line = el("p", { class: "muted", id: "explain-progress" }, el("span", { class: "spinner" }), "starting…");
    clear(body).append(line);
    try {
      let job = await API.api("/api/explain/jobs", req);
      while (job.status === "running") {
        clear(line).append(el("span", { class: "spinner" }), `${job.stage} (${Math.round(job.elapsed_s)} s)`);
        await new Promise((r) => setTimeout(r, 400));
        job = await API.api(`/api/jobs/${job.id}`);
      }
      if (job.status === "error") throw new Error(job.error);
      onDone(job.graph);
    } catch (e) { errorBox(body, e); }
  }

  async function open(name) {
    body.className = "body";
    clear(body).append(el("p", { class: "muted" }, el("span", { class: "spinner" }), `opening ${name}…`));
    try {
      const data = await API.api(`/api/mechanisms/${encodeURIComponent(name)}`);
      current = { name: data.name, m: data.mechanism };
      render(current.m);
      onOpen(data.name, current.m);
    } catch (e) { errorBox(body, e); }
  }

  function render(m) {
    const best = m.best === null ? null : m.candidates[m.best];
    clear(body).append(el("h3", { id: "mech-title" }, `${tok(m, m.str_tokens.length - 1)} → ${JSON.stringify(m.answer)}`
      + ` rather than ${JSON.stringify(m.rival)}`),
    el("dl", { class: "kv" },
      el("dt", {}, "prediction"), el("dd", {}, `${JSON.stringify(m.prediction)} (p(answer) ${fmt(m.p_answer, 3)}, `
        + `p(rival) ${fmt(m.p_rival, 3)})`),
      el("dt", {}, "m = logit(answer) − logit(rival)"), el("dd", { id: "mech-metric", "data-value": m.metric },
        fmt(m.metric, 4)),
      el("dt", {}, "found"), el("dd", {}, best ? `${best.kind}: ${best.parts.reduce((a, p) => a + p.features.length, 0)}`
        + ` features at ${best.parts.length} site(s); ${m.flips ? "flips the answer" : m.halves ? "halves p(answer)"
          : "neither flips nor halves the answer"}` : "no candidate lowered m"),
      el("dt", {}, "verdict"), el("dd", { id: "mech-verdict", "data-specific": String(Boolean(m.specific)) },
        m.verdict || "—"),
      el("dt", {}, "the answer goes to"), el("dd", { id: "mech-goes-to" }, goesTo(m)),
      el("dt", {}, "searched"), el("dd", {}, `${m.candidates.length} candidates, ${m.n_passes} intervened passes`
        + (m.null_passes ? ` (+${m.null_passes} for the controls)` : ""))));
    if (m.nulls && m.nulls.length) body.append(el("h4", {}, "Against random features (the control)"), nullsTable(m));
    if (best) {
      body.append(el("div", { class: "btnrow" },
        el("button", { type: "button", id: "mech-replay", onclick: () => onReplay(m, best) },
          "Replay in the steering panel"),
        el("button", { type: "button", id: "mech-highlight", onclick: () => onHighlight(candidateIds(best)) },
          "Highlight its features")));
      body.append(...curveView(m, best), partsTable(m, best));
      onHighlight(candidateIds(best));
    }
    body.append(el("h4", {}, "Heads (ablated one at a time, every other head frozen: Δm)"), headsTable(m),
      el("h4", {}, "Sites (a key and the heads of one layer that attend there)"), sitesTable(m),
      el("h4", {}, "Candidates, best first (click one to see its curve)"), candidatesTable(m));
  }

  function candidatesTable(m) {
    const order = m.candidates.map((c, i) => i).sort((a, b) => m.candidates[a].effect - m.candidates[b].effect);
    return el("table", { id: "mech-candidates" },
      el("tr", {}, el("th", {}, "#"), el("th", {}, "kind"), el("th", {}, "sites · side"), el("th", { class: "num" },
        "features"), el("th", { class: "num" }, "predicted Δm"), el("th", { class: "num" }, "m at last scale"),
      el("th", { class: "num" }, "effect")),
      order.map((i) => {
        const c = m.candidates[i], last = c.curve[c.curve.length - 1];
        return el("tr", { class: `clickable mech-cand${i === m.best ? " selected" : ""}`, "data-index": i,
          onclick: () => { render({ ...m, best: i }); onHighlight(candidateIds(c)); } },
        el("td", {}, String(i)), el("td", {}, c.kind),
        el("td", {}, c.parts.map((p) => `L${p.layer}H${p.heads.join(",")} ${p.side}@${p.position}`).join("; ")),
        el("td", { class: "num" }, String(c.parts.reduce((a, p) => a + p.features.length, 0))),
        num(c.predicted, "predicted", 3), num(last.metric, "metric", 4), num(c.effect, "effect", 4));
      }));
  }

  return { open, fromLogit, explainAnswer, current: () => current };
}

function curveView(m, c) {
  const xs = c.curve.map((p) => p.scale), order = xs.map((x, i) => i).sort((a, b) => xs[a] - xs[b]);
  const sorted = (f) => order.map((i) => f(c.curve[i]));
  const sx = order.map((i) => xs[i]);
  const heads = c.parts[0].heads.map((h, j) => ({ name: `attention L${c.parts[0].layer}H${h}`,
    ys: sorted((p) => p.attention[j]) }));
  return [el("h4", {}, "The winning curve: m, probabilities and attention against the scale"),
    lineChart("mech-metric-chart", sx, [{ name: "m = logit(answer) − logit(rival)", ys: sorted((p) => p.metric) }],
      null, 1),
    lineChart("mech-prob-chart", sx, [{ name: `p(${JSON.stringify(m.answer)})`, ys: sorted((p) => p.p_answer) },
      { name: `p(${JSON.stringify(m.rival)})`, ys: sorted((p) => p.p_rival) }, ...heads], [0, 1], 1),
    el("table", { id: "mech-curve" },
      el("tr", {}, el("th", { class: "num" }, "scale"), el("th", { class: "num" }, "m"), el("th", { class: "num" },
        "p(answer)"), el("th", { class: "num" }, "p(rival)"), el("th", {}, "top token")),
      c.curve.map((p) => el("tr", { class: `curve-row${p.scale === 1 ? " clean" : ""}` }, num(p.scale, "scale", 3),
        num(p.metric, "metric", 4), num(p.p_answer, "p_answer", 3), num(p.p_rival, "p_rival", 3),
        el("td", {}, `${JSON.stringify(p.top_token)} (${fmt(p.top_p, 3)})`))))];
}

function goesTo(m) {
  if (!m.goes_to) return "— (the model does not give the answer)";
  const where = { rival: "the rival", other: "another token", nowhere: "nowhere (p halved, still top)" }[m.goes_to];
  return m.goes_to_token ? `${where || m.goes_to}: ${JSON.stringify(m.goes_to_token)}` : where || m.goes_to;
}

const count = (x, field) => el("td", { class: "num", "data-field": field, "data-value": x }, String(x));

/** Each candidate run against its control: N draws of as many other active features in the same heads. */
function nullsTable(m) {
  return el("table", { id: "mech-nulls" },
    el("tr", {}, el("th", {}, "candidate"), el("th", { class: "num" }, "draws"), el("th", { class: "num" },
      "at least as strong"), el("th", { class: "num" }, "p"), el("th", { class: "num" }, "threshold"),
    el("th", { class: "num" }, "draws flip"), el("th", { class: "num" }, "draws halve"), el("th", {}, "specific")),
    m.nulls.map((n) => el("tr", { class: "mech-null", "data-candidate": n.candidate }, el("td", {}, `#${n.candidate}`),
      count(n.n, "n"), count(n.stronger, "stronger"), num(n.p_value, "p_value", 3), num(n.threshold, "threshold", 3),
      num(n.flip_share, "flip_share", 3), num(n.halve_share, "halve_share", 3),
      el("td", { "data-field": "specific" }, n.specific ? "yes" : "no"))));
}

function partsTable(m, c) {
  return el("table", { id: "mech-parts" },
    el("tr", {}, el("th", {}, "heads"), el("th", {}, "side @ position"), el("th", {}, "features (labels)")),
    c.parts.map((p) => el("tr", {}, el("td", {}, `L${p.layer}H${p.heads.join(",")}`),
      el("td", {}, `${p.side} @${p.position} ${tok(m, p.position)}`),
      el("td", {}, p.features.map((f, i) => el("span", { class: "comp", "data-component":
        `feature/c${p.layer}/p${p.position}/f${f}` }, componentLabel({ kind: "feature", cp: p.layer, pos: p.position,
        index: f }, p.labels[i], m.str_tokens[p.position]))).flatMap((x) => [x, " "])))));
}

function headsTable(m) {
  return el("table", { id: "mech-heads" },
    el("tr", {}, el("th", {}, "head"), el("th", { class: "num" }, "influence"), el("th", { class: "num" }, "Δm ablated"),
      el("th", {}, "attends to"), el("th", { class: "num" }, "attention")),
    m.heads.map((h) => el("tr", {}, el("td", {}, `L${h.layer}H${h.head}`), num(h.influence, "influence", 3),
      num(h.ablation, "ablation", 4), el("td", {}, `@${h.key_pos} ${tok(m, h.key_pos)}`), num(h.attention, "attention", 3))));
}

function sitesTable(m) {
  return el("table", { id: "mech-sites" },
    el("tr", {}, el("th", {}, "layer · heads"), el("th", {}, "key"), el("th", { class: "num" }, "Δm ablated")),
    m.sites.map((s) => el("tr", {}, el("td", {}, `L${s.layer}H${s.heads.join(",")}`),
      el("td", {}, `@${s.key_pos} ${tok(m, s.key_pos)}`), num(s.ablation, "ablation", 4))));
}
