// The one way the page names a component (a graph node or a QK term's query- or key-side part): its label
// (a feature's own, with its kind's short name; else the short name alone), then `@pos "token"` with whitespace
// visible, e.g. `Mary/John (c3/f12) @8 "␣Sally"`, `SAE bias c0 @8 "␣Sally"`; its id goes on hover. The library writes the same
// string (qktrace.nodes.component_label: the server's QK labels, the CLI's tables), from the same table
// (tests/test_component_labels.py checks that KIND_NAMES below is the library's). model.js's `nameIn` names
// a graph's components with it. No DOM here.

// {c}: checkpoint or layer, {l}: the layer before a checkpoint, {i}: index (qktrace.nodes.KIND_NAMES)
export const KIND_NAMES = {
  "token": "embedding",
  "feature": "c{c}/f{i}",
  "error": "SAE error c{c}",
  "sae_bias": "SAE bias c{c}",
  "attn_bias": "attention bias L{l}",
  "mlp_bias": "MLP bias L{l}",
  "logit": "logit t{i}",
  "head_bias": "head bias L{c}",
  "transcoder": "t{c}/f{i}",
  "mlp_error": "MLP error L{c}",
  "attn_out": "attention output L{c}",
  "tc_bias": "transcoder bias L{c}",
  "pos_embed": "position embedding",
  "attn": "a{c}/f{i}",
  "attn_error": "attention error L{c}",
  "attn_sae_bias": "attention SAE bias L{c}"
};
const LABELLED = new Set(["feature", "transcoder", "attn"]);
const MARKS = [[/ /g, "␣"], [/\n/g, "⏎"], [/\t/g, "⇥"]];

/** Whitespace made visible: ⏎ newline (a label's written-out "\n" too), ⇥ tab and, with `spaces`, ␣; ∅ for nothing. */
export function visible(text, spaces = true) {
  let out = String(text).replace(/\\n/g, "\n");
  for (const [re, mark] of MARKS) if (spaces || mark !== "␣") out = out.replace(re, mark);
  return out.trim() ? out : out ? visible(out) : "∅";
}

/** A component without its position: its kind's short name ("SAE bias c3", "c3/f12"), after a feature's `label`
 * (newlines visible) when it has one: "name after title (c3/f12)". */
export function componentName(p, label) {
  const t = KIND_NAMES[p.kind];
  if (t === undefined) return String(label || p.kind);
  const name = t.replace(/\{([cli])\}/g, (_, k) => String(k === "c" ? p.cp : k === "l" ? p.cp - 1 : p.index));
  if (label !== undefined && label !== null && String(label).trim() && String(label).trim() !== name && LABELLED.has(p.kind)) {
    return `${visible(String(label).trim(), false)} (${name})`;
  }
  return name;
}

/** The one label: `componentName`, then `@pos "token"` (qktrace.nodes.component_label). */
export const componentLabel = (p, label, token) =>
  `${componentName(p, label)} @${p.pos} "${visible(token === undefined ? "?" : token)}"`;
